"""nn.Module wrappers with the call order of HRNet's JointsMSELoss and mmpose's KeypointMSELoss."""

import torch
from torch import nn

from . import targets
from .contract import reduce_plane_losses
from .functional import check_settings, heatmap_gradient_loss, keypoint_heatmap_loss


def hardest_mean(plane_losses: torch.Tensor, topk: int, name: str = "topk") -> torch.Tensor:
    """Online hard keypoint mining: per sample, the mean of the ``topk`` largest of its (B, K)
    plane losses, shape (B,)."""
    joints = plane_losses.shape[1]
    if topk > joints:
        raise ValueError(f"{name}={topk} exceeds the number of keypoints K={joints}")
    return plane_losses.topk(topk, dim=1, sorted=False).values.mean(dim=1)


class HeatmapGradientLoss(nn.Module):
    """Heatmap MSE with the heatmap-gradient constraint and optional soft targets.

    See hgloss.heatmap_gradient_loss for the formula. Called as
    ``loss(output, target, target_weight)``, like HRNet's and mmpose's heatmap losses.

    Args:
        mse_weight, grad_weight, stencil, backend, gradient_form: as in
            hgloss.heatmap_gradient_loss; checked
            here, so a bad value fails at construction rather than at the first call.
        use_target_weight: apply the (B, K[, 1[, 1]]) target weight when one is passed. A
            ``pixel_weight`` passed to forward is applied whatever this says.
        reduction: "mean", "sum" or "none".
        ohkm_topk: online hard keypoint mining: per sample, keep the ``ohkm_topk`` largest plane
            losses and average them; ``reduction`` then applies over the batch ("none" returns
            the (B,) per-sample losses). With ``mse_weight=0.5, grad_weight=0`` and the target
            weight squared this equals HRNet's ``JointsOHKMMSELoss``; the drop-ins for HRNet's
            and mmpose's OHKM losses, weights included, are ``hgloss.compat.JointsOHKMMSELoss``
            and ``hgloss.compat.KeypointOHKMMSELoss``.

    Example::

        >>> criterion = hgloss.HeatmapGradientLoss(grad_weight=1.0, use_target_weight=True)
        >>> loss = criterion(output, target, target_weight)
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        grad_weight: float = 1.0,
        stencil: str = "forward",
        use_target_weight: bool = True,
        reduction: str = "mean",
        ohkm_topk: int | None = None,
        backend: str = "auto",
        gradient_form: str = "components",
    ) -> None:
        super().__init__()
        mse_weight, grad_weight = check_settings(
            mse_weight=mse_weight, grad_weight=grad_weight, stencil=stencil, reduction=reduction, backend=backend,
            gradient_form=gradient_form,
        )
        if ohkm_topk is not None and (isinstance(ohkm_topk, bool) or not isinstance(ohkm_topk, int) or ohkm_topk < 1):
            raise ValueError(f"ohkm_topk must be a positive int or None, got {ohkm_topk!r}")
        self.mse_weight = mse_weight
        self.grad_weight = grad_weight
        self.stencil = stencil
        self.use_target_weight = use_target_weight
        self.reduction = reduction
        self.ohkm_topk = ohkm_topk
        self.backend = backend
        self.gradient_form = gradient_form

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        target_weight: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
        pixel_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plane_losses = heatmap_gradient_loss(
            pred,
            target,
            target_weight if self.use_target_weight else None,
            teacher=teacher,
            alpha=alpha,
            mse_weight=self.mse_weight,
            grad_weight=self.grad_weight,
            stencil=self.stencil,
            reduction="none" if self.ohkm_topk is not None else self.reduction,
            backend=self.backend,
            gradient_form=self.gradient_form,
            pixel_weight=pixel_weight,
        )
        if self.ohkm_topk is None:
            return plane_losses
        return reduce_plane_losses(hardest_mean(plane_losses, self.ohkm_topk, "ohkm_topk"), self.reduction)

    def extra_repr(self) -> str:
        return (
            f"mse_weight={self.mse_weight}, grad_weight={self.grad_weight}, stencil={self.stencil!r}, "
            f"use_target_weight={self.use_target_weight}, reduction={self.reduction!r}, "
            f"ohkm_topk={self.ohkm_topk}, backend={self.backend!r}, gradient_form={self.gradient_form!r}"
        )


class KeypointHeatmapLoss(nn.Module):
    """The heatmap gradient loss with the Gaussian targets built from keypoints inside the loss.

    See hgloss.keypoint_heatmap_loss. Called as ``loss(output, keypoints, keypoint_weights)``:
    the data loader hands over (B, K, 2) keypoints in heatmap pixels instead of (B, K, H, W)
    heatmaps.

    Args:
        sigma, encoding: the targets' Gaussian, as the codecs of hgloss.pose.codecs take them
            (sigma in heatmap pixels; "msra" or "udp").
        mse_weight, grad_weight, stencil, reduction, backend: as in hgloss.heatmap_gradient_loss;
            checked here, so a bad value fails at construction rather than at the first call.

    Example::

        >>> criterion = hgloss.KeypointHeatmapLoss(sigma=2.0, grad_weight=0.1)
        >>> loss = criterion(output, keypoints, keypoint_weights)
    """

    def __init__(
        self,
        sigma: float = 2.0,
        encoding: str = "msra",
        mse_weight: float = 1.0,
        grad_weight: float = 1.0,
        stencil: str = "forward",
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.mse_weight, self.grad_weight = check_settings(
            mse_weight=mse_weight, grad_weight=grad_weight, stencil=stencil, reduction=reduction, backend=backend
        )
        self.sigma = targets.check_sigma(sigma)
        targets.check_encoding(encoding)
        self.encoding = encoding
        self.stencil = stencil
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        pred: torch.Tensor,
        keypoints: torch.Tensor,
        keypoint_weights: torch.Tensor | None = None,
        teacher: torch.Tensor | None = None,
        alpha: float | torch.Tensor = 0.5,
    ) -> torch.Tensor:
        return keypoint_heatmap_loss(
            pred, keypoints, keypoint_weights, sigma=self.sigma, encoding=self.encoding, teacher=teacher, alpha=alpha,
            mse_weight=self.mse_weight, grad_weight=self.grad_weight, stencil=self.stencil,
            reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"sigma={self.sigma}, encoding={self.encoding!r}, mse_weight={self.mse_weight}, "
            f"grad_weight={self.grad_weight}, stencil={self.stencil!r}, reduction={self.reduction!r}, "
            f"backend={self.backend!r}"
        )
