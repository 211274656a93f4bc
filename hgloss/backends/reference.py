"""The reference backend: docs/spec.md section 1 in plain PyTorch, written to be read.

It is the oracle the fused backends are tested against, so it favours clarity over speed: it
materialises the soft target, the difference and both gradient maps, and autograd derives every
gradient (double backward included).
"""

import torch

from .. import stencils
from ..contract import accumulation_dtype


def gradient_maps(diff: torch.Tensor, stencil: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ax and Ay of an (..., H, W) tensor, each on its valid positions only."""
    height, width = diff.shape[-2:]
    maps = []
    for axis in stencils.AXES:
        rows, cols = stencils.valid_shape(height, width, stencil, axis)
        top, _, left, _ = stencils.margins(stencil, axis)

        def shifted(tap: stencils.Tap) -> torch.Tensor:
            # D[i + u, j + v] for every valid position (i, j) of the map.
            return diff[..., top + tap.row : top + tap.row + rows, left + tap.col : left + tap.col + cols]

        maps.append(stencils.scale(stencil) * sum(tap.weight * shifted(tap) for tap in stencils.taps(stencil, axis)))
    return maps[0], maps[1]


def plane_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: torch.Tensor | None,
    mse_weight: float,
    grad_weight: float,
    stencil: str,
) -> torch.Tensor:
    """mse_weight * V + grad_weight * R for every plane, shape (B, K)."""
    dtype = accumulation_dtype(pred)
    soft_target = target.to(dtype)
    if teacher is not None:
        blend = alpha.to(dtype).view(-1, 1, 1, 1)
        soft_target = (1 - blend) * soft_target + blend * teacher.to(dtype)
    diff = pred.to(dtype) - soft_target

    value_term = diff.pow(2).mean(dim=(-2, -1))

    ax, ay = gradient_maps(diff, stencil)
    count = stencils.gradient_count(*diff.shape[-2:], stencil)
    if count == 0:
        gradient_term = torch.zeros_like(value_term)
    else:
        gradient_term = (ax.pow(2).sum(dim=(-2, -1)) + ay.pow(2).sum(dim=(-2, -1))) / count

    return mse_weight * value_term + grad_weight * gradient_term
