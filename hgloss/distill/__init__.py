"""Self-distillation: the teacher heatmaps S and the per-sample blend alpha of the soft target.

The loss blends the hand-made target G with what the same network predicted for the same sample
a little earlier in training::

    T = (1 - alpha_b) * G + alpha_b * S

Two ways to get S are offered, each a class of its own module with the same three calls per
iteration (``fetch_teacher``, ``store_predictions``, ``after_step``):

- ``ReplayDistillation`` (replay.py): no extra forward pass. ``ReplayBatchSampler`` makes part of
  each batch the samples that were fresh ``distance`` iterations earlier, with the same
  augmentation seed, and ``PredictionBank`` hands back the predictions made for them then.
- ``SnapshotDistillation`` (snapshot.py): any model, any data pipeline. ``SnapshotTeacher`` is a
  frozen copy of the model, refreshed every ``distance`` optimizer steps, that predicts S
  without grad.

``SteppingSchedule`` (schedule.py) drives both: the distance grows each time the learning rate
decays, so that teacher and student still differ when the learning rate is small.
``SeededBatchSampler`` (sampler.py) gives training without distillation the same data order and
augmentation as the replay sampler's fresh samples.
"""

from .replay import PredictionBank, ReplayDistillation
from .sampler import ReplayBatchSampler, SeededBatchSampler
from .schedule import SteppingSchedule
from .snapshot import SnapshotDistillation, SnapshotTeacher

__all__ = [
    "PredictionBank",
    "ReplayBatchSampler",
    "ReplayDistillation",
    "SeededBatchSampler",
    "SnapshotDistillation",
    "SnapshotTeacher",
    "SteppingSchedule",
]
