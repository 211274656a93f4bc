"""Self-distillation: the teacher heatmaps S and the per-sample blend alpha of the soft target.

The loss blends the hand-made target G with what the same network predicted for the same sample
a little earlier in training::

    T = (1 - alpha_b) * G + alpha_b * S

Two ways to get S are offered:

- "replay": no extra forward pass. ``ReplayBatchSampler`` makes part of each batch the samples
  that were fresh ``distance`` iterations earlier, with the same augmentation seed, and
  ``PredictionBank`` hands back the predictions made for them then.
- "snapshot": any model, any data pipeline. ``SnapshotTeacher`` is a frozen copy of the model,
  refreshed every ``distance`` optimizer steps, that predicts S without grad.

``SteppingSchedule`` drives both: the distance grows each time the learning rate decays, so that
teacher and student still differ when the learning rate is small. ``SelfDistillation`` ties the
pieces together for a training loop.
"""

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from numbers import Integral, Real
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PredictionBank", "ReplayBatchSampler", "SelfDistillation", "SnapshotTeacher", "SteppingSchedule"]

_Item = TypeVar("_Item")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_real(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, Real)
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not in_range:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _as_key_list(keys: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
            raise ValueError(
                "keys must be a 1-D integer tensor or a sequence of ints, "
                f"got {keys.dtype} of shape {tuple(keys.shape)}"
            )
        return keys.tolist()
    return [int(key) for key in keys]


def _as_flag_list(flags: torch.Tensor | Sequence[bool]) -> list[bool]:
    if isinstance(flags, torch.Tensor):
        return flags.bool().flatten().tolist()
    return [bool(flag) for flag in flags]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the weights: DistributedDataParallel and DataParallel keep it in .module."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


class SteppingSchedule:
    """Teacher-student distance that steps up as the learning rate decays, and the blend alpha.

    The distance is counted in optimizer steps (snapshot mode) or iterations (replay mode; one
    iteration is one optimizer step). It starts at ``distance0`` and, at each stepping event, is
    multiplied by ``step_factor`` or moves to the next entry of ``distances``. A stepping event
    happens when the learning rate has fallen to at most ``decay_ratio`` times the learning rate
    recorded at the previous event. With the default ``decay_ratio=0.5``, each 10x drop of
    MultiStepLR is one event, and a cosine or polynomial decay gives one event per halving.
    Nothing here depends on the scheduler: any change of the learning rate, by hand included,
    is judged the same way.

    A rise of the learning rate (linear warm-up, a restart, a hand-set increase) raises the
    recorded learning rate, so the next decay is measured from the peak. Without that, a warm-up
    that starts at 0.001x the base rate would leave the distance at ``distance0`` for the whole
    run. The distance never decreases.

    A decay towards zero (cosine with ``eta_min=0``) keeps halving to the last step and so keeps
    doubling the distance; an explicit ``distances`` list caps it, because its last entry holds.

    alpha, for the optimizer step about to be taken: 0 during the first ``warmup_steps`` steps,
    then a linear ramp to ``alpha`` over ``alpha_ramp_steps`` steps (PS-KD style: alpha / n,
    2 alpha / n, ..., alpha), then ``alpha``.

    Under DistributedDataParallel every rank observes the same learning rate, so every rank
    computes the same distance and alpha without communicating.

    Args:
        distance0: the first distance, an int >= 1.
        step_factor: the distance's multiplier at each stepping event, an int >= 1.
        distances: an explicit non-decreasing list of distances instead: the distance starts at
            ``distances[0]``, each event moves to the next entry, and the last entry holds. Leave
            ``distance0`` and ``step_factor`` at their defaults when giving it.
        decay_ratio: in (0, 1); the fraction of the recorded learning rate that triggers an event.
        alpha: the teacher's weight in the soft target once ramped up, in [0, 1].
        alpha_ramp_steps: steps of the linear ramp of alpha, >= 0 (0: no ramp).
        warmup_steps: steps with alpha = 0 before the ramp, >= 0.

    Example::

        >>> schedule = SteppingSchedule(distance0=1, step_factor=2, alpha=0.5, warmup_steps=500)
        >>> for images, targets in loader:
        ...     ...  # forward with schedule.distance and schedule.alpha, backward, step
        ...     lr_scheduler.step()
        ...     schedule.observe_lr(optimizer.param_groups[0]["lr"])
    """

    def __init__(
        self,
        distance0: int = 1,
        step_factor: int = 2,
        distances: Sequence[int] | None = None,
        decay_ratio: float = 0.5,
        alpha: float = 0.5,
        alpha_ramp_steps: int = 0,
        warmup_steps: int = 0,
    ) -> None:
        self.distance0 = _check_int("distance0", distance0, 1)
        self.step_factor = _check_int("step_factor", step_factor, 1)
        if distances is not None:
            if self.distance0 != 1 or self.step_factor != 2:
                raise ValueError(
                    "give either distances or distance0/step_factor, not both: distances[0] is the "
                    f"first distance (got distance0={distance0!r}, step_factor={step_factor!r})"
                )
            distances = [_check_int("each entry of distances", entry, 1) for entry in distances]
            if not distances:
                raise ValueError("distances must not be empty")
            if any(later < earlier for earlier, later in zip(distances, distances[1:])):
                raise ValueError(f"distances must be non-decreasing, got {distances}")
        self.distances = distances
        self.decay_ratio = _check_real("decay_ratio", decay_ratio, 0.0, 1.0, low_open=True, high_open=True)
        self.alpha_max = _check_real("alpha", alpha, 0.0, 1.0)
        self.alpha_ramp_steps = _check_int("alpha_ramp_steps", alpha_ramp_steps, 0)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)

        self.steps = 0
        self.stepping_events = 0
        self.reference_lr: float | None = None

    @property
    def distance(self) -> int:
        """The current teacher-student distance, in optimizer steps."""
        if self.distances is not None:
            return self.distances[min(self.stepping_events, len(self.distances) - 1)]
        return self.distance0 * self.step_factor**self.stepping_events

    @property
    def alpha(self) -> float:
        """The blend for the optimizer step about to be taken (the ``steps``-th, 0-based)."""
        steps_after_warmup = self.steps - self.warmup_steps
        if steps_after_warmup < 0:
            return 0.0
        if steps_after_warmup < self.alpha_ramp_steps:
            return self.alpha_max * (steps_after_warmup + 1) / self.alpha_ramp_steps
        return self.alpha_max

    def observe_lr(self, lr: float) -> None:
        """Record the learning rate after an optimizer step; call exactly once per step."""
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        self.steps += 1
        if self.reference_lr is None or lr > self.reference_lr:
            self.reference_lr = lr
        elif self.reference_lr > 0 and lr <= self.decay_ratio * self.reference_lr:
            # One event however deep the drop, so a 10x MultiStepLR drop steps once, not 3 times.
            self.stepping_events += 1
            self.reference_lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "stepping_events": self.stepping_events, "reference_lr": self.reference_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.stepping_events = int(state["stepping_events"])
        self.reference_lr = None if state["reference_lr"] is None else float(state["reference_lr"])


class SnapshotTeacher:
    """A frozen copy of the model, at most ``schedule.distance`` optimizer steps behind it.

    ``teacher(inputs)`` runs the copy under ``torch.no_grad()``. The copy has its own parameters
    and buffers (requires_grad off, never seen by the optimizer), so it neither receives gradients
    nor touches the student's BatchNorm statistics. For a model wrapped in DistributedDataParallel
    or DataParallel, the underlying ``.module`` is copied, so teacher calls do not go through the
    wrapper's gradient synchronisation.

    Train mode: the copy always runs in train mode. Then S is what the network computed for the
    sample during training, as in replay mode (the bank stores training-forward predictions),
    and BatchNorm normalises with the batch's statistics on both sides, so teacher and student
    differ only by the weights. Eval mode would use running statistics, which lag behind the
    weights early in training. This is a design choice, not a measured result. Consequences:
    dropout and drop-path are active in the teacher too, and SyncBatchNorm layers in the copy
    synchronise, so every rank must call the teacher equally often (SelfDistillation calls it
    once per iteration on every rank). The copy's own running statistics are updated by its
    forward passes and overwritten at the next refresh.

    Lag: let ``lag`` be the number of optimizer steps between the copy's weights and the
    student's. ``after_step()`` counts a step. Once ``lag >= schedule.distance``, the next
    teacher call first computes its output with the old copy and then refreshes the copy from
    the student's current weights (those of this iteration's student forward). So the outputs
    come from a copy 1, 2, ..., ``distance`` steps old, in turn. Refreshing inside
    ``after_step()`` instead would copy the weights the student is about to use, a lag of 0 at
    the next iteration and no teacher at all at distance 1. Call the teacher once per
    iteration; a second call after a refresh would see lag 0. At the very start the copy equals
    the student (lag 0); ``has_teacher`` is false until one step has passed.

    Args:
        model: the student, plain or wrapped in (Distributed)DataParallel.
        schedule: supplies the distance, read at each teacher call.
    """

    def __init__(self, model: nn.Module, schedule: SteppingSchedule) -> None:
        self.student = _unwrap(model)
        self.schedule = schedule
        self.model = copy.deepcopy(self.student)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        self.model.train()
        self.steps = 0
        self.copy_step = 0

    @property
    def lag(self) -> int:
        """Optimizer steps between the copy's weights and the student's."""
        return self.steps - self.copy_step

    @property
    def has_teacher(self) -> bool:
        """Whether the copy differs from the student, i.e. at least one step has passed."""
        return self.lag >= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            outputs = self.model(*args, **kwargs)
        if self.lag >= self.schedule.distance:
            self.model.load_state_dict(self.student.state_dict())
            self.copy_step = self.steps
        return outputs

    def after_step(self) -> None:
        """Count one optimizer step; call after each ``optimizer.step()``."""
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps, "copy_step": self.copy_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])
        self.copy_step = int(state["copy_step"])


class ReplayBatchSampler:
    """Batches whose replayed part repeats the samples that were fresh ``distance`` iterations ago.

    Each iteration yields a list of ``(index, aug_seed, replayed)`` triples; use it as
    ``DataLoader(dataset, batch_sampler=sampler)``. The dataset receives the triple and seeds its
    augmentation from ``aug_seed``, so a replayed sample gets the identical crop, flip and
    scaling, and the prediction made for it when it was fresh is a valid teacher for it now.

    Per epoch, every index of this rank's shard is fresh exactly once, in an order and with aug
    seeds fixed by ``seed`` and the epoch (``set_epoch``). When a batch is drawn, the distance d
    is read from the schedule, and the first ``round(replay_fraction * batch_size)`` of the
    batch's fresh samples are scheduled to come back d iterations later. A batch holds the
    replays scheduled for it and is filled up with fresh samples to ``batch_size``. The first
    d batches of an epoch have nothing to replay and are all fresh; replays never cross an epoch
    boundary, and those still pending when the fresh samples run out are dropped.

    A change of distance in the middle of an epoch: batches drawn before the change still come
    back at the old distance, those drawn after it at the new one. The distance never decreases,
    so no two batches are due at the same iteration; after an increase from d to d', the
    d' - d batches that no earlier batch is due at are all fresh. Every sample thus comes back
    exactly the distance that was in force when it was fresh, and the bank of SelfDistillation,
    which keeps the current distance's worth of batches, still holds its prediction.

    Replays take batch slots: with ``replay_fraction`` f <= 0.5, an epoch has about 1 / (1 - f)
    times as many batches as plain batching (twice as many at the default 0.5).

    Each fresh sample comes back at most once, so replays cannot outnumber fresh samples over
    time: a ``replay_fraction`` above 0.5 makes batches alternate between more and fewer replays,
    averaging at most one half. The replayed count is capped at ``batch_size - 1`` so every
    batch draws at least one fresh sample.

    Sharding follows DistributedSampler: the permutation is shared by all ranks, padded by
    repeating indices to a multiple of ``num_replicas`` (or truncated with ``drop_last``), and
    rank r takes positions r, r + num_replicas, ... Replays stay on the rank that drew them
    fresh. Ranks see the same distances (SteppingSchedule), so they yield the same number of
    batches.

    With DataLoader workers, batches are drawn a few iterations ahead of training (prefetching),
    so the distance read may lag the schedule by those iterations; replays remain consistent
    because they are scheduled from what was read.

    Args:
        dataset_size: the number of samples, >= 1.
        batch_size: samples per batch, >= 1.
        schedule: supplies the distance, read once per batch.
        replay_fraction: the share of a batch that is replayed, in [0, 1).
        shuffle: draw the fresh samples in a random order (else 0, 1, 2, ...).
        seed: base of the per-epoch random order and aug seeds; the same on every rank.
        num_replicas, rank: the shard; default from torch.distributed when initialised, else 1, 0.
        drop_last: drop the tail so that every batch is full and no index repeats: the shard is
            truncated instead of padded, and a final incomplete batch is not yielded.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        schedule: SteppingSchedule,
        replay_fraction: float = 0.5,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.dataset_size = _check_int("dataset_size", dataset_size, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if not isinstance(schedule, SteppingSchedule):
            raise ValueError(f"schedule must be a SteppingSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.replay_fraction = _check_real("replay_fraction", replay_fraction, 0.0, 1.0, high_open=True)
        self.shuffle = bool(shuffle)
        self.seed = _check_int("seed", seed, 0)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.num_replicas = _check_int("num_replicas", num_replicas, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.drop_last = bool(drop_last)
        self.epoch = 0

        if self.drop_last:
            self.shard_size = self.dataset_size // self.num_replicas
        else:
            self.shard_size = math.ceil(self.dataset_size / self.num_replicas)
        self.replays_per_batch = min(math.floor(self.replay_fraction * self.batch_size + 0.5), self.batch_size - 1)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's order and aug seeds; call before each epoch, like DistributedSampler."""
        self.epoch = _check_int("epoch", epoch, 0)

    def _shard(self) -> list[tuple[int, int]]:
        """This rank's fresh (index, aug_seed) pairs for the epoch, in draw order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        total = self.shard_size * self.num_replicas
        if total > self.dataset_size:
            order = order.repeat(math.ceil(total / self.dataset_size))
        order = order[:total]
        # One seed per position, so a padded repeat of an index gets a crop of its own.
        aug_seeds = torch.randint(0, 2**62, (total,), generator=generator)
        shard = slice(self.rank, None, self.num_replicas)
        return list(zip(order[shard].tolist(), aug_seeds[shard].tolist()))

    def _compose(
        self, fresh: Sequence[_Item], distance: Callable[[], int]
    ) -> Iterator[tuple[Sequence[_Item], Sequence[_Item]]]:
        """(fresh part, replayed part) of each batch, drawing from `fresh` in order."""
        due: dict[int, Sequence[_Item]] = {}
        cursor = 0
        iteration = 0
        while cursor < len(fresh):
            replays = due.pop(iteration, fresh[:0])  # empty, of the same sequence type as `fresh`
            fresh_count = self.batch_size - len(replays)
            batch_fresh = fresh[cursor : cursor + fresh_count]
            if self.drop_last and len(batch_fresh) < fresh_count:
                return
            cursor += fresh_count
            if self.replays_per_batch:
                due[iteration + distance()] = batch_fresh[: self.replays_per_batch]
            yield batch_fresh, replays
            iteration += 1

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        for batch_fresh, replays in self._compose(self._shard(), lambda: self.schedule.distance):
            yield [(index, aug_seed, False) for index, aug_seed in batch_fresh] + [
                (index, aug_seed, True) for index, aug_seed in replays
            ]

    def __len__(self) -> int:
        """Batches in the epoch if the distance stays at its current value.

        An increase of the distance during the epoch changes the count. With replay_fraction
        <= 0.5 it can only shorten the epoch: the all-fresh batches it adds take more fresh
        samples each.
        """
        distance = self.schedule.distance
        return sum(1 for _ in self._compose(range(self.shard_size), lambda: distance))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_epoch(int(state["epoch"]))


class PredictionBank:
    """Detached predictions of fresh samples, kept until they are replayed as teacher heatmaps.

    Storage is float16 (``STORAGE_DTYPE``) on the device the predictions came from: heatmaps
    lie in about [0, 1], where float16 keeps three significant digits, and the bank costs half
    the memory of float32. The loss accepts the float16 teacher as it is.

    Eviction: every ``store`` call is one batch. The bank keeps the last ``capacity_batches``
    batches and drops older ones, so a key stored at iteration j can be fetched up to iteration
    j + capacity_batches when the fetch comes before the store of that iteration (as in
    SelfDistillation). Keep ``capacity_batches`` at least the largest distance in use; memory is
    at most ``capacity_batches * fresh samples per batch * K * H * W * 2`` bytes. Storing a key
    again replaces its entry.

    Args:
        capacity_batches: the number of most recent batches kept, >= 1; may be raised or lowered
            later by assignment.
    """

    STORAGE_DTYPE = torch.float16

    def __init__(self, capacity_batches: int) -> None:
        self._batches: OrderedDict[int, tuple[list[int], torch.Tensor]] = OrderedDict()
        self._location: dict[int, tuple[int, int]] = {}
        self.stored_batches = 0
        self.capacity_batches = capacity_batches

    @property
    def capacity_batches(self) -> int:
        return self._capacity_batches

    @capacity_batches.setter
    def capacity_batches(self, value: int) -> None:
        self._capacity_batches = _check_int("capacity_batches", value, 1)
        self._evict()

    def __len__(self) -> int:
        """The number of keys held."""
        return len(self._location)

    def _evict(self) -> None:
        oldest_kept = self.stored_batches - self._capacity_batches
        while self._batches and next(iter(self._batches)) < oldest_kept:
            batch_number, (keys, _) = self._batches.popitem(last=False)
            for key in keys:
                if self._location[key][0] == batch_number:
                    del self._location[key]

    def store(self, keys: torch.Tensor | Sequence[int], heatmaps: torch.Tensor) -> None:
        """Keep ``heatmaps[i]`` (detached, float16) under ``keys[i]``; counts as one batch.

        Args:
            keys: n distinct integer keys, e.g. the sample indices of the fresh samples.
            heatmaps: (n, ...) predictions of those samples, any floating dtype.
        """
        keys = _as_key_list(keys)
        if not heatmaps.is_floating_point():
            raise TypeError(f"heatmaps must have a floating dtype, got {heatmaps.dtype}")
        if heatmaps.dim() < 1 or heatmaps.shape[0] != len(keys):
            raise ValueError(f"got {len(keys)} keys for heatmaps of shape {tuple(heatmaps.shape)}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct within a batch, got {keys}")
        batch_number = self.stored_batches
        self.stored_batches += 1
        # copy=True: a float16 prediction would otherwise be kept by reference and could change.
        self._batches[batch_number] = (keys, heatmaps.detach().to(self.STORAGE_DTYPE, copy=True))
        for row, key in enumerate(keys):
            self._location[key] = (batch_number, row)
        self._evict()

    def fetch(
        self, keys: torch.Tensor | Sequence[int], replayed: torch.Tensor | Sequence[bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The stored heatmaps of a batch's replayed samples.

        Args:
            keys: the B keys of the batch.
            replayed: B flags; only the flagged keys are looked up.

        Returns:
            heatmaps: (B, ...) float16 on the stored predictions' device, the stored heatmap
                where replayed and zeros elsewhere; None when no sample is replayed.
            mask: (B,) bool, True where a heatmap was returned; on the heatmaps' device, or on
                the device of ``replayed`` (CPU for a sequence) when heatmaps is None.

        Raises:
            KeyError: naming a replayed key that is not held (never stored, or evicted).
        """
        keys = _as_key_list(keys)
        flags = _as_flag_list(replayed)
        if len(flags) != len(keys):
            raise ValueError(f"got {len(keys)} keys and {len(flags)} replayed flags")
        mask = torch.tensor(flags, dtype=torch.bool)
        if isinstance(replayed, torch.Tensor):
            mask = mask.to(replayed.device)
        positions = [position for position, flag in enumerate(flags) if flag]
        if not positions:
            return None, mask
        rows = []
        for position in positions:
            key = keys[position]
            if key not in self._location:
                raise KeyError(
                    f"key {key} is not in the prediction bank: it was never stored, or it was stored "
                    f"more than capacity_batches={self._capacity_batches} batches ago and dropped"
                )
            batch_number, row = self._location[key]
            rows.append(self._batches[batch_number][1][row])
        stacked = torch.stack(rows)
        heatmaps = stacked.new_zeros((len(keys), *stacked.shape[1:]))
        heatmaps[torch.tensor(positions, device=stacked.device)] = stacked
        return heatmaps, mask.to(stacked.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity_batches": self._capacity_batches,
            "stored_batches": self.stored_batches,
            "batch_numbers": list(self._batches),
            "keys": [keys for keys, _ in self._batches.values()],
            "heatmaps": [heatmaps for _, heatmaps in self._batches.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = OrderedDict(
            (int(number), (list(keys), heatmaps))
            for number, keys, heatmaps in zip(state["batch_numbers"], state["keys"], state["heatmaps"])
        )
        self._location = {
            key: (number, row) for number, (keys, _) in self._batches.items() for row, key in enumerate(keys)
        }
        self.stored_batches = int(state["stored_batches"])
        self.capacity_batches = int(state["capacity_batches"])


class SelfDistillation:
    """The teacher heatmaps and per-sample alpha for each batch, in replay or snapshot mode.

    Per iteration, ``teacher(...)`` returns ``(teacher, alpha)`` for the loss, where alpha is a
    (B,) float32 tensor: ``schedule.alpha`` for samples that have a teacher, 0 for the others
    (fresh samples in replay mode, everything before the first step in snapshot mode).
    ``after_step()``, called after each optimizer step (and after a per-iteration lr scheduler's
    step), feeds the optimizer's learning rate to the schedule (the largest over param groups)
    and advances the bank or snapshot.

    - ``mode="replay"``: ``batch_sampler`` is a ReplayBatchSampler for the DataLoader, and
      ``bank`` a PredictionBank whose capacity follows ``schedule.distance``. No extra forward
      pass. ``teacher(predictions, keys=..., replayed=...)`` first fetches the replayed
      samples' stored predictions, then stores the fresh samples' ones.
    - ``mode="snapshot"``: ``snapshot`` is a SnapshotTeacher of ``model``. One extra no-grad
      forward per iteration. ``teacher(predictions, inputs=...)`` runs it on the inputs; the
      model's output must be the (B, K, H, W) heatmaps.

    Under DistributedDataParallel, build one per rank. The learning rate is the same on every
    rank, so the schedules agree without communication; the sampler shards the data like
    DistributedSampler and every rank draws the same number of batches.

    Args:
        mode: "replay" or "snapshot".
        schedule: the SteppingSchedule.
        optimizer: the optimizer whose learning rate drives the schedule.
        model: the student (snapshot mode), plain or DDP-wrapped.
        dataset_size, batch_size, replay_fraction, shuffle, seed, num_replicas, rank, drop_last:
            the ReplayBatchSampler's arguments (replay mode; batch_size is per rank).

    Example (replay mode)::

        class PoseDataset(torch.utils.data.Dataset):
            def __getitem__(self, item):
                index, aug_seed, replayed = item
                rng = np.random.default_rng(aug_seed)     # a replayed sample gets the same crop
                image, target, target_weight = self.load_and_augment(index, rng)
                return image, target, target_weight, index, replayed

        schedule = SteppingSchedule(distance0=1, step_factor=2, alpha=0.5, warmup_steps=1000)
        distill = SelfDistillation("replay", schedule, optimizer=optimizer,
                                   dataset_size=len(dataset), batch_size=32)
        loader = DataLoader(dataset, batch_sampler=distill.batch_sampler, num_workers=8)
        for epoch in range(epochs):
            distill.set_epoch(epoch)
            for images, targets, target_weights, indices, replayed in loader:
                outputs = model(images)
                teacher, alpha = distill.teacher(outputs, keys=indices, replayed=replayed)
                loss = hgloss.heatmap_gradient_loss(outputs, targets, target_weights,
                                                    teacher=teacher, alpha=alpha)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                distill.after_step()
            lr_scheduler.step()
            torch.save({"model": model.state_dict(), "distill": distill.state_dict()}, path)

    In snapshot mode, build it with ``SelfDistillation("snapshot", schedule, optimizer=optimizer,
    model=model)``, use any loader, and call ``distill.teacher(outputs, inputs=images)``.
    """

    MODES = ("replay", "snapshot")

    def __init__(
        self,
        mode: str,
        schedule: SteppingSchedule,
        *,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        dataset_size: int | None = None,
        batch_size: int | None = None,
        replay_fraction: float = 0.5,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {list(self.MODES)}")
        if not isinstance(schedule, SteppingSchedule):
            raise ValueError(f"schedule must be a SteppingSchedule, got {type(schedule).__name__}")
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        self.mode = mode
        self.schedule = schedule
        self.optimizer = optimizer
        if mode == "replay":
            if dataset_size is None or batch_size is None:
                raise ValueError("mode='replay' needs dataset_size and batch_size")
            self.batch_sampler = ReplayBatchSampler(
                dataset_size, batch_size, schedule, replay_fraction, shuffle, seed, num_replicas, rank, drop_last
            )
            self.bank = PredictionBank(schedule.distance)
        else:
            if model is None:
                raise ValueError("mode='snapshot' needs model")
            self.snapshot = SnapshotTeacher(model, schedule)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch to the sampler (replay mode); harmless in snapshot mode."""
        if self.mode == "replay":
            self.batch_sampler.set_epoch(epoch)

    def teacher(
        self,
        predictions: torch.Tensor,
        *,
        keys: torch.Tensor | Sequence[int] | None = None,
        replayed: torch.Tensor | Sequence[bool] | None = None,
        inputs: Any = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher heatmaps (or None) and the (B,) alpha for the loss; call once per iteration.

        Args:
            predictions: the student's (B, K, H, W) heatmaps for this batch.
            keys: replay mode: the sample indices of the batch (the sampler's first element).
            replayed: replay mode: the sampler's replayed flags of the batch.
            inputs: snapshot mode: the model's input for this batch.
        """
        batch = predictions.shape[0]
        if self.mode == "replay":
            if keys is None or replayed is None:
                raise ValueError("mode='replay' needs keys= and replayed= for each batch")
            key_list = _as_key_list(keys)
            flags = _as_flag_list(replayed)
            if len(key_list) != batch or len(flags) != batch:
                raise ValueError(
                    f"got {len(key_list)} keys and {len(flags)} replayed flags for a batch of {batch}"
                )
            teacher, has_teacher = self.bank.fetch(key_list, flags)
            fresh_positions = [position for position, flag in enumerate(flags) if not flag]
            self.bank.store(
                [key_list[position] for position in fresh_positions],
                predictions.detach()[torch.tensor(fresh_positions, dtype=torch.long, device=predictions.device)],
            )
        else:
            if inputs is None:
                raise ValueError("mode='snapshot' needs inputs= for each batch")
            has_teacher = torch.full((batch,), self.snapshot.has_teacher, dtype=torch.bool)
            teacher = self.snapshot(inputs)
        alpha = has_teacher.to(device=predictions.device, dtype=torch.float32) * self.schedule.alpha
        return teacher, alpha

    def after_step(self) -> None:
        """Advance the schedule, and the bank's capacity or the snapshot's step count."""
        self.schedule.observe_lr(max(group["lr"] for group in self.optimizer.param_groups))
        if self.mode == "replay":
            self.bank.capacity_batches = self.schedule.distance
        else:
            self.snapshot.after_step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"mode": self.mode, "schedule": self.schedule.state_dict()}
        if self.mode == "replay":
            state["sampler"] = self.batch_sampler.state_dict()
            state["bank"] = self.bank.state_dict()
        else:
            state["snapshot"] = self.snapshot.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"state is for mode {state['mode']!r}, this SelfDistillation is {self.mode!r}")
        self.schedule.load_state_dict(state["schedule"])
        if self.mode == "replay":
            self.batch_sampler.load_state_dict(state["sampler"])
            self.bank.load_state_dict(state["bank"])
        else:
            self.snapshot.load_state_dict(state["snapshot"])
