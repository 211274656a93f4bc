"""The reference top-down pose trainer: the application built on hgloss and its pose toolkit
(hgloss.pose). `examples/train_pose.py` is its command line, `examples/demo.py` and
`examples/ablation.py` drive it too.

One run writes to its output folder: `config.yaml` (the resolved configuration), `log.jsonl`
(one json record per logged iteration and per evaluation), `last.pt` and `best.pt` (written
atomically: a temporary file, then a rename), `metrics.json` (the last evaluation),
`curves.png` (loss, learning rate and validation metrics) and `predictions.png` (predicted
keypoints and heatmaps on validation crops).

Losses (`loss`):
    mse    HRNet's JointsMSELoss, exactly (hgloss.compat, grad_weight 0)
    hg     the heatmap gradient loss: MSE plus grad_weight x the MSE of the gradient maps
    hg+sd  the same with self-distillation soft targets (`distill`: replay or snapshot)

With `fused_targets` (the default) the data loader hands the loss keypoints instead of heatmaps,
and the loss paints the codec's Gaussians itself (hgloss.keypoint_heatmap_loss): the same loss,
without the loader's painting.

Under torchrun the trainer runs DistributedDataParallel (gloo on CPU, nccl on GPU): each rank
trains on its shard, the validation predictions are gathered on rank 0, and rank 0 alone logs,
plots and writes checkpoints.

Modules: config (TrainConfig, load_config, ConfigError), data (the split, codec, datasets, Batch, loaders),
loss (PoseLoss), evaluate (validation metrics), checkpoints (RunState, atomic saves, RNG state),
distributed (device, rank, collectives), loop (the build functions and the Trainer), plots.
"""

from .config import LOSSES, ConfigError, TrainConfig, load_config
from .loop import Trainer, TrainingDiverged

__all__ = ["LOSSES", "ConfigError", "TrainConfig", "Trainer", "TrainingDiverged", "load_config"]
