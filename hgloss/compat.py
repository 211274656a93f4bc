"""Drop-in replacements for the heatmap losses of HRNet and mmpose.

At ``grad_weight=0`` they return the anchors' numbers (to floating-point rounding of a different
summation order); a positive ``grad_weight`` adds the gradient term under the anchor's own
weighting and scaling.
"""

import torch
from torch import nn

from .contract import check_term_weight
from .functional import check_settings, heatmap_gradient_loss


class JointsMSELoss(nn.Module):
    """HRNet's ``JointsMSELoss``: ``0.5 * mean_{b,k,i,j}(w^2 * D^2)``.

    HRNet multiplies prediction and target by the weight before the MSE, so the weight enters
    squared. With ``grad_weight`` the plane loss is ``0.5 * w^2 * (V + grad_weight * R)``.

    Example::

        >>> criterion = hgloss.compat.JointsMSELoss(use_target_weight=True, grad_weight=1.0)
        >>> loss = criterion(output, target, target_weight)   # target_weight: (B, K, 1)
    """

    def __init__(
        self,
        use_target_weight: bool,
        grad_weight: float = 0.0,
        stencil: str = "forward",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _, grad_weight = check_settings(grad_weight=grad_weight, stencil=stencil, backend=backend)
        self.use_target_weight = use_target_weight
        self.grad_weight = grad_weight
        self.stencil = stencil
        self.backend = backend

    def forward(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        target_weight: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
    ) -> torch.Tensor:
        weight = None
        if self.use_target_weight:
            if target_weight is None:
                raise ValueError("JointsMSELoss(use_target_weight=True) needs target_weight")
            weight = target_weight.square()
        return heatmap_gradient_loss(
            output,
            target,
            weight,
            teacher=teacher,
            alpha=alpha,
            mse_weight=0.5,
            grad_weight=0.5 * self.grad_weight,
            stencil=self.stencil,
            reduction="mean",
            backend=self.backend,
        )


class KeypointMSELoss(nn.Module):
    """mmpose 1.x ``KeypointMSELoss``: ``loss_weight * mean_{b,k,i,j}(w * D^2)``.

    ``skip_empty_channel`` masks out the planes whose target is all zero. A ``mask`` may be
    passed as in mmpose when it holds one value per plane (shape (B, K), (B, K, 1) or
    (B, K, 1, 1)); a per-pixel mask does not fit the per-plane fused kernels and is refused.
    With ``grad_weight`` the plane loss is ``loss_weight * w * (V + grad_weight * R)``.
    """

    def __init__(
        self,
        use_target_weight: bool = False,
        skip_empty_channel: bool = False,
        loss_weight: float = 1.0,
        grad_weight: float = 0.0,
        stencil: str = "forward",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _, grad_weight = check_settings(grad_weight=grad_weight, stencil=stencil, backend=backend)
        self.use_target_weight = use_target_weight
        self.skip_empty_channel = skip_empty_channel
        self.loss_weight = check_term_weight("loss_weight", loss_weight)
        self.grad_weight = grad_weight
        self.stencil = stencil
        self.backend = backend

    def _plane_mask(self, target, target_weights, mask):
        batch, joints = target.shape[:2]
        plane_mask = None
        if mask is not None:
            if mask.dim() < 2 or tuple(mask.shape[:2]) != (batch, joints) or mask[0, 0].numel() != 1:
                raise ValueError(
                    f"mask must hold one value per plane, shape ({batch}, {joints}[, 1[, 1]]), "
                    f"got {tuple(mask.shape)}; per-pixel masks are not supported"
                )
            plane_mask = mask.reshape(batch, joints).to(target.dtype)
        if target_weights is not None and self.use_target_weight:
            weights = target_weights.reshape(batch, joints)
            plane_mask = weights if plane_mask is None else plane_mask * weights
        if self.skip_empty_channel:
            non_empty = (target != 0).flatten(2).any(dim=2).to(target.dtype)
            plane_mask = non_empty if plane_mask is None else plane_mask * non_empty
        return plane_mask

    def forward(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        target_weights: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
    ) -> torch.Tensor:
        if output.dim() != 4:
            raise ValueError(f"output must be 4-D (B, K, H, W), got shape {tuple(output.shape)}")
        if target.shape != output.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from output shape {tuple(output.shape)}")
        return heatmap_gradient_loss(
            output,
            target,
            self._plane_mask(target, target_weights, mask),
            teacher=teacher,
            alpha=alpha,
            mse_weight=self.loss_weight,
            grad_weight=self.loss_weight * self.grad_weight,
            stencil=self.stencil,
            reduction="mean",
            backend=self.backend,
        )
