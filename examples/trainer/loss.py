"""The configured loss of (heatmaps, targets, target weights, teacher, alpha)."""

import torch.nn as nn

import hgloss

from .config import TrainConfig


class PoseLoss(nn.Module):
    """mse: HRNet's JointsMSELoss exactly (hgloss.compat); hg and hg+sd: the heatmap gradient loss,
    its gradient term switched on from grad_start_epoch (set_epoch)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.kind = config.loss
        self.grad_weight, self.grad_start_epoch = config.grad_weight, config.grad_start_epoch
        if config.loss == "mse":
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
        if self.kind == "mse":
            return self.criterion(output, target, target_weight[..., None])
        if teacher is None:
            return self.criterion(output, target, target_weight)
        return self.criterion(output, target, target_weight, teacher=teacher, alpha=alpha)
