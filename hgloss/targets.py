"""Gaussian heatmap targets from keypoints, as the separable factors the fused backends read.

The codecs of hgloss.pose (MSRAHeatmap, UDPHeatmap) are this module's specification: for a
keypoint (x, y) in heatmap pixels, the target plane is

    G[i, j] = float32(gy[i] * gx[j]),   gx[j] = exp(-(j - px)^2 / (2 sigma^2)) on the window, else 0

with the window the int(3 sigma) pixels on either side of the rounded keypoint
mu = int(x + 0.5) (Python's int, which truncates towards zero), clipped to the heatmap, and the
peak px = mu ("msra") or px = x ("udp"); gy likewise along y. The factors are float64 and their
product is rounded to float32, the dtype the codecs store, so that a loss on these factors sees
the codecs' heatmaps value for value. A keypoint whose window misses the heatmap (start >= size
or end < 0, the end exclusive: the codecs' rule) contributes nothing: its plane weight is 0. A
plane of weight 0 has an all-zero target.

The reference backend multiplies the factors out (`materialise`); the fused backends evaluate
G[i, j] from them in registers, so the (B, K, H, W) target never exists. docs/spec.md section 7.
"""

import math
from numbers import Real

import torch

from .contract import SUPPORTED_DTYPES, _shape, check_dtype

ENCODINGS = ("msra", "udp")
# The dtype the codecs store their heatmaps in; G is the product of the factors rounded to it.
TARGET_DTYPE = torch.float32


def check_sigma(sigma) -> float:
    """sigma as a float: a real number, finite and > 0."""
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not 0.0 < float(sigma) < math.inf:
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    return float(sigma)


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {list(ENCODINGS)}")


def check_keypoints(pred: torch.Tensor, keypoints) -> None:
    """keypoints must be a floating (B, K, 2) tensor on the device of pred, a checked 4-D tensor."""
    if not isinstance(keypoints, torch.Tensor):
        raise TypeError(f"keypoints must be a tensor, got {type(keypoints).__name__}")
    if keypoints.dtype not in SUPPORTED_DTYPES:
        check_dtype("keypoints", keypoints)
    if keypoints.device != pred.device:
        raise ValueError(
            f"all tensors must be on one device, got pred on {pred.device}, keypoints on {keypoints.device}"
        )
    expected = (*pred.shape[:2], 2)
    if _shape(keypoints) != expected:
        raise ValueError(
            f"keypoints shape {_shape(keypoints)} is not (B, K, 2) = {expected} for pred shape {_shape(pred)}"
        )


def check_finite_where_weighted(keypoints: torch.Tensor, plane_weight: torch.Tensor | None) -> None:
    """Keypoints of planes with a nonzero weight must be finite; those of weight-0 planes are not
    read. One host synchronisation (the check needs the values)."""
    finite = torch.isfinite(keypoints).all(dim=-1)
    if plane_weight is not None:
        finite = finite | (plane_weight.detach().reshape(finite.shape) == 0)
    if not bool(finite.all()):
        bad = [tuple(index) for index in (~finite).nonzero().tolist()[:5]]
        raise ValueError(
            f"keypoints must be finite where the keypoint weight is not 0; (b, k) = {bad} are not"
        )


def _axis_factors(position: torch.Tensor, size: int, sigma: float, radius: int, encoding: str):
    """(B, K, size) float64 factors along one axis, and (B, K) whether the window reaches the
    axis's part of the heatmap (start < size and end >= 0)."""
    rounded = torch.trunc(position + 0.5)
    start, end = rounded - radius, rounded + radius + 1
    reaches = (start < size) & (end >= 0)
    peak = rounded if encoding == "msra" else position
    pixels = torch.arange(size, dtype=torch.float64, device=position.device)
    inside = (pixels >= start[..., None]) & (pixels < end[..., None])
    gaussian = torch.exp(-((pixels - peak[..., None]) ** 2) / (2.0 * sigma**2))
    return torch.where(inside, gaussian, 0.0), reaches


def gaussian_factors(
    keypoints: torch.Tensor, keypoint_weights: torch.Tensor | None, height: int, width: int, sigma: float,
    encoding: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target of each plane (b, k) as (rows (B, K, H), cols (B, K, W)) float64 factors, and
    the (B, K) float64 mask of the planes whose window reaches the heatmap (the codecs' weight
    rule). Planes of weight 0 or whose window misses get zero factors. No gradient flows to the
    keypoints."""
    keypoints = keypoints.detach().to(torch.float64)
    painted = torch.ones(keypoints.shape[:2], dtype=torch.bool, device=keypoints.device)
    if keypoint_weights is not None:
        painted = keypoint_weights.detach().reshape(painted.shape) != 0
    # Keypoints of unpainted planes may be anything (NaN for a missing joint): never read.
    keypoints = torch.where(painted[..., None], keypoints, 0.0)
    radius = int(3 * sigma)
    cols, reaches_x = _axis_factors(keypoints[..., 0], width, sigma, radius, encoding)
    rows, reaches_y = _axis_factors(keypoints[..., 1], height, sigma, radius, encoding)
    reaches = reaches_x & reaches_y
    keep = (reaches & painted)[..., None]
    return torch.where(keep, rows, 0.0), torch.where(keep, cols, 0.0), reaches.to(torch.float64)


def materialise(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The (B, K, H, W) target planes float32(rows[i] * cols[j]) of separable factors."""
    return (rows[..., :, None] * cols[..., None, :]).to(TARGET_DTYPE)
