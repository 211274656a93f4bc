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


def map_window(plane: torch.Tensor, stencil: str, axis: str) -> torch.Tensor:
    """The entries of an (..., H, W) tensor at the valid positions (i, j) of the stencil's x or
    y map, in the map's layout: the pixel weights of the map's own entries."""
    height, width = plane.shape[-2:]
    rows, cols = stencils.valid_shape(height, width, stencil, axis)
    top, _, left, _ = stencils.margins(stencil, axis)
    return plane[..., top : top + rows, left : left + cols]


def _common_range(height: int, width: int, stencil: str) -> tuple[int, int, int, int]:
    """(top, rows, left, cols) of the positions where both gradient maps are defined."""
    x_margins, y_margins = stencils.margins(stencil, "x"), stencils.margins(stencil, "y")
    top, bottom, left, right = (max(x, y) for x, y in zip(x_margins, y_margins))
    rows, cols = height - top - bottom, width - left - right
    if rows <= 0 or cols <= 0:
        rows = cols = 0
    return top, rows, left, cols


def magnitude_maps(heatmaps: torch.Tensor, stencil: str) -> torch.Tensor:
    """|grad X| = sqrt(Ax^2 + Ay^2) of an (..., H, W) tensor on the positions where both gradient
    maps are defined. A tiny floor under the square root keeps its gradient finite on flat
    regions, where Ax = Ay = 0."""
    height, width = heatmaps.shape[-2:]
    ax, ay = gradient_maps(heatmaps, stencil)
    x_margins, y_margins = stencils.margins(stencil, "x"), stencils.margins(stencil, "y")
    top, rows, left, cols = _common_range(height, width, stencil)

    def common(component: torch.Tensor, margins: tuple[int, int, int, int]) -> torch.Tensor:
        row, col = top - margins[0], left - margins[2]
        return component[..., row : row + rows, col : col + cols]

    squared = common(ax, x_margins).pow(2) + common(ay, y_margins).pow(2)
    return torch.sqrt(squared + torch.finfo(heatmaps.dtype).tiny)


def plane_terms(
    pred: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: torch.Tensor | None,
    mse_weight: float,
    grad_weight: float,
    stencil: str,
    gradient_form: str = "components",
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """mse_weight * V + grad_weight * R for every plane, shape (B, K). R compares the gradient
    maps component by component ("components", on D = P - T) or by their magnitudes
    ("magnitude": the mean of (|grad P| - |grad T|)^2, which cannot be written on D).

    A pixel_weight M (broadcastable to (B, K, H, W)) weights each squared entry at its own index:
    D[i, j]^2 by M[i, j], and each gradient-map entry Ax[i, j], Ay[i, j] (or magnitude gap) by
    M[i, j], with (i, j) the map's index as docs/spec.md section 1 defines it; the denominators
    H*W and Nx + Ny stay as they are."""
    dtype = accumulation_dtype(pred)
    soft_target = target.to(dtype)
    if teacher is not None:
        blend = alpha.to(dtype).view(-1, 1, 1, 1)
        soft_target = (1 - blend) * soft_target + blend * teacher.to(dtype)
    diff = pred.to(dtype) - soft_target
    # Expanded, never copied: a stride-0 M stays stride-0.
    weight = None if pixel_weight is None else pixel_weight.to(dtype).expand(diff.shape)

    def weighted(squares: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
        return squares if window is None else window * squares

    value_term = weighted(diff.pow(2), weight).mean(dim=(-2, -1))

    if gradient_form == "magnitude":
        magnitude_gap = magnitude_maps(pred.to(dtype), stencil) - magnitude_maps(soft_target, stencil)
        if magnitude_gap.numel() == 0:
            gradient_term = torch.zeros_like(value_term)
        else:
            window = None
            if weight is not None:
                top, rows, left, cols = _common_range(*diff.shape[-2:], stencil)
                window = weight[..., top : top + rows, left : left + cols]
            gradient_term = weighted(magnitude_gap.pow(2), window).mean(dim=(-2, -1))
        return mse_weight * value_term + grad_weight * gradient_term

    ax, ay = gradient_maps(diff, stencil)
    count = stencils.gradient_count(*diff.shape[-2:], stencil)
    if count == 0:
        gradient_term = torch.zeros_like(value_term)
    else:
        x_window = None if weight is None else map_window(weight, stencil, "x")
        y_window = None if weight is None else map_window(weight, stencil, "y")
        gradient_term = (
            weighted(ax.pow(2), x_window).sum(dim=(-2, -1)) + weighted(ay.pow(2), y_window).sum(dim=(-2, -1))
        ) / count

    return mse_weight * value_term + grad_weight * gradient_term
