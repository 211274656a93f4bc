"""The configured loss of (heatmaps, targets, target weights, teacher, alpha)."""

import torch.nn as nn

import hgloss

from .config import TrainConfig
from .data import build_codec


class PoseLoss(nn.Module):
    """mse: HRNet's JointsMSELoss exactly (hgloss.compat); hg and hg+sd: the heatmap gradient loss,
    its gradient term switched on from grad_start_epoch (set_epoch).

    With config.targets_in_loss the targets are keypoints, and hgloss.KeypointHeatmapLoss paints
    the configured codec's heatmaps from them inside the loss: the same loss as on the codec's
    heatmaps (JointsMSELoss is its mse_weight 0.5, grad_weight 0, on the squared weights)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.kind = config.loss
        self.targets_in_loss = config.targets_in_loss
        self.grad_weight, self.grad_start_epoch = config.grad_weight, config.grad_start_epoch
        mse = config.loss == "mse"
        if self.targets_in_loss:
            codec = build_codec(config)
            self.criterion = hgloss.KeypointHeatmapLoss(
                sigma=codec.sigma, encoding=codec.encoding, mse_weight=0.5 if mse else 1.0,
                grad_weight=0.0 if mse else config.grad_weight, stencil=config.stencil, backend=config.backend,
            )
        elif mse:
            self.criterion = hgloss.compat.JointsMSELoss(use_target_weight=True, backend=config.backend)
        else:
            self.criterion = hgloss.HeatmapGradientLoss(
                grad_weight=config.grad_weight, stencil=config.stencil, backend=config.backend,
                gradient_form=config.gradient_form,
            )

    def set_epoch(self, epoch: int) -> None:
        """Switches the gradient term on once `epoch` reaches grad_start_epoch."""
        if self.kind != "mse":
            self.criterion.grad_weight = self.grad_weight if epoch >= self.grad_start_epoch else 0.0

    def forward(self, output, target, target_weight, teacher=None, alpha=None):
        """`target`: (B, K, H, W) heatmaps, or with targets_in_loss (B, K, 2) keypoints in heatmap
        pixels; `target_weight`: (B, K). Batch.targets gives the pair."""
        if self.kind == "mse" and self.targets_in_loss:
            target_weight = target_weight.square()  # HRNet weights prediction and target, so D^2 by w^2
        elif self.kind == "mse":
            target_weight = target_weight[..., None]
        if teacher is None:
            return self.criterion(output, target, target_weight)
        return self.criterion(output, target, target_weight, teacher=teacher, alpha=alpha)
