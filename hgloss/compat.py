"""Drop-in replacements for the heatmap losses of HRNet and mmpose 1.x.

At ``grad_weight=0`` they return the anchors' numbers (to floating-point rounding of a different
summation order); a positive ``grad_weight`` adds the gradient term under the anchor's own
weighting and scaling.

| anchor | drop-in |
| --- | --- |
| HRNet ``lib/core/loss.py`` ``JointsMSELoss`` | ``JointsMSELoss`` |
| HRNet ``JointsOHKMMSELoss`` | ``JointsOHKMMSELoss`` |
| mmpose 1.x ``KeypointMSELoss`` (models/losses/heatmap_loss.py) | ``KeypointMSELoss`` |
| mmpose 1.x ``KeypointOHKMMSELoss`` | ``KeypointOHKMMSELoss`` |
"""

import torch
from torch import nn

from .contract import broadcasts_to, check_term_weight, reduce_plane_losses
from .functional import check_settings, heatmap_gradient_loss
from .modules import hardest_mean


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


def _check_topk(topk) -> int:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    return topk


class JointsOHKMMSELoss(nn.Module):
    """HRNet's ``JointsOHKMMSELoss`` (online hard keypoint mining).

    Per sample and joint ``0.5 * mean_ij(w^2 * D^2)`` (HRNet multiplies prediction and target by
    the weight, so it enters squared), then per sample the mean of the ``topk`` largest joint
    losses, then the mean over the batch. With ``grad_weight`` the joint loss is
    ``0.5 * w^2 * (V + grad_weight * R)`` and the hardest joints are chosen on it.

    Example::

        >>> criterion = hgloss.compat.JointsOHKMMSELoss(use_target_weight=True, topk=8)
        >>> loss = criterion(output, target, target_weight)   # target_weight: (B, K, 1)
    """

    # HRNet halves each joint's MSE; mmpose's KeypointOHKMMSELoss does not.
    _term_scale = 0.5

    def __init__(
        self,
        use_target_weight: bool,
        topk: int = 8,
        grad_weight: float = 0.0,
        stencil: str = "forward",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _, grad_weight = check_settings(grad_weight=grad_weight, stencil=stencil, backend=backend)
        self.use_target_weight = use_target_weight
        self.topk = _check_topk(topk)
        self.grad_weight = grad_weight
        self.stencil = stencil
        self.backend = backend
        self.loss_weight = 1.0

    def forward(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        target_weight: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
    ) -> torch.Tensor:
        return self._hardest_joints_loss(output, target, target_weight, "target_weight", teacher, alpha)

    def _hardest_joints_loss(self, output, target, weights, weights_name, teacher, alpha) -> torch.Tensor:
        squared_weights = None
        if self.use_target_weight:
            if weights is None:
                raise ValueError(f"{type(self).__name__}(use_target_weight=True) needs {weights_name}")
            squared_weights = weights.square()
        joint_losses = heatmap_gradient_loss(
            output,
            target,
            squared_weights,
            teacher=teacher,
            alpha=alpha,
            mse_weight=self._term_scale,
            grad_weight=self._term_scale * self.grad_weight,
            stencil=self.stencil,
            reduction="none",
            backend=self.backend,
        )
        return reduce_plane_losses(hardest_mean(joint_losses, self.topk), "mean") * self.loss_weight


class KeypointMSELoss(nn.Module):
    """mmpose 1.x ``KeypointMSELoss``: ``loss_weight * mean_{b,k,i,j}(M * D^2)``.

    The mask M is mmpose's (``_get_mask``): the product of

    - ``target_weights`` whenever they are passed (mmpose never reads ``use_target_weight``; it
      is kept for the constructor's sake): (B, K) per keypoint, or (B, K, H, W) per pixel;
    - ``mask``, any shape that broadcasts to (B, K, H, W) with 4 dimensions, e.g. (B, 1, H, W);
    - with ``skip_empty_channel``, 0 for the channels whose target is all zero, else 1.

    Without any of them the loss is ``loss_weight * F.mse_loss(output, target)``. With
    ``grad_weight`` the plane loss becomes ``loss_weight * (V_M + grad_weight * R_M)``, where
    the per-plane factors of M weight the plane and the per-pixel ones weight each entry
    (hgloss.heatmap_gradient_loss's target_weight and pixel_weight).

    Every backend computes every form. A per-pixel weight or mask that requires grad is
    differentiated by the reference backend only (``backend="auto"`` picks it; a fused backend
    named at construction raises ValueError then).
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

    def _weights(self, target, target_weights, mask):
        """mmpose's mask split into a (B, K) plane weight and a per-pixel weight (either None)."""
        batch, joints = target.shape[:2]
        plane = pixel = None
        if mask is not None:
            if mask.dim() != 4 or not broadcasts_to(tuple(mask.shape), tuple(target.shape)):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not broadcast to target shape {tuple(target.shape)}: "
                    "it needs 4 dimensions, each equal to the target's or 1, e.g. (B, K, H, W) or (B, 1, H, W)"
                )
            if mask.shape[2:] == (1, 1):
                plane = mask.reshape(mask.shape[:2])
            else:
                pixel = mask
        if target_weights is not None:
            if target_weights.dim() not in (2, 4) or target_weights.shape != target.shape[: target_weights.dim()]:
                raise ValueError(
                    f"target_weights shape {tuple(target_weights.shape)} is neither (B, K) = {(batch, joints)} "
                    f"nor (B, K, H, W) = {tuple(target.shape)} for target shape {tuple(target.shape)}"
                )
            if target_weights.dim() == 2:
                plane = target_weights if plane is None else plane * target_weights
            else:
                pixel = target_weights if pixel is None else pixel * target_weights
        if self.skip_empty_channel:
            non_empty = (target != 0).flatten(2).any(dim=2)
            plane = non_empty if plane is None else plane * non_empty
        floating = target.dtype if target.is_floating_point() else torch.float32
        if plane is not None:
            plane = plane.expand(batch, joints).contiguous()  # a (B, 1) mask comes expanded
            if not plane.is_floating_point():
                plane = plane.to(floating)
        if pixel is not None and not pixel.is_floating_point():
            pixel = pixel.to(floating)
        return plane, pixel

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
        plane, pixel = self._weights(target, target_weights, mask)
        return heatmap_gradient_loss(
            output,
            target,
            plane,
            teacher=teacher,
            alpha=alpha,
            mse_weight=self.loss_weight,
            grad_weight=self.loss_weight * self.grad_weight,
            stencil=self.stencil,
            reduction="mean",
            backend=self.backend,
            pixel_weight=pixel,
        )


class KeypointOHKMMSELoss(JointsOHKMMSELoss):
    """mmpose 1.x ``KeypointOHKMMSELoss`` (online hard keypoint mining).

    Per sample and keypoint ``mean_ij(w^2 * D^2)`` with ``use_target_weight`` (mmpose multiplies
    output and target by the (B, K) weight, so it enters squared; without it the weights are
    ignored), then per sample the mean of the ``topk`` largest keypoint losses, the mean over
    the batch, times ``loss_weight``. With ``grad_weight`` the keypoint loss is
    ``w^2 * (V + grad_weight * R)`` and the hardest keypoints are chosen on it.
    """

    _term_scale = 1.0

    def __init__(
        self,
        use_target_weight: bool = False,
        topk: int = 8,
        loss_weight: float = 1.0,
        grad_weight: float = 0.0,
        stencil: str = "forward",
        backend: str = "auto",
    ) -> None:
        super().__init__(use_target_weight, topk, grad_weight, stencil, backend)
        self.loss_weight = check_term_weight("loss_weight", loss_weight)

    def forward(
        self,
        output: torch.Tensor,
        target: torch.Tensor,
        target_weights: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
    ) -> torch.Tensor:
        return self._hardest_joints_loss(output, target, target_weights, "target_weights", teacher, alpha)
