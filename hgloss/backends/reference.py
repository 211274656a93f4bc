"""The reference backend: SPEC section 1 in plain PyTorch, written to be read.

It is the oracle the fused backends are tested against, so it favours clarity over speed: it
materialises the soft target, the difference and both gradient maps, and autograd derives every
gradient (double backward included).
"""

import torch


def accumulation_dtype(pred: torch.Tensor) -> torch.dtype:
    """float64 for a float64 pred, else float32: the dtype of every sum and of the loss."""
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def gradient_maps(diff: torch.Tensor, stencil: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ax and Ay of an (..., H, W) tensor, each on its valid positions only."""
    height, width = diff.shape[-2:]
    if stencil == "forward":
        ax = diff[..., :, 1:] - diff[..., :, :-1]
        ay = diff[..., 1:, :] - diff[..., :-1, :]
    elif stencil == "central":
        ax = (diff[..., :, 2:] - diff[..., :, :-2]) / 2
        ay = (diff[..., 2:, :] - diff[..., :-2, :]) / 2
    elif stencil == "sobel":
        if height < 3 or width < 3:
            empty = diff[..., :0, :0]
            return empty, empty

        def shifted(u: int, v: int) -> torch.Tensor:
            # D[i + u, j + v] for every interior position (i, j).
            return diff.narrow(-2, 1 + u, height - 2).narrow(-1, 1 + v, width - 2)

        ax = sum(v * (2 - abs(u)) * shifted(u, v) for u in (-1, 0, 1) for v in (-1, 1)) / 8
        ay = sum(u * (2 - abs(v)) * shifted(u, v) for u in (-1, 1) for v in (-1, 0, 1)) / 8
    else:
        raise ValueError(f"unknown stencil {stencil!r}")
    return ax, ay


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
    count = ax.shape[-2] * ax.shape[-1] + ay.shape[-2] * ay.shape[-1]
    if count == 0:
        gradient_term = torch.zeros_like(value_term)
    else:
        gradient_term = (ax.pow(2).sum(dim=(-2, -1)) + ay.pow(2).sum(dim=(-2, -1))) / count

    return mse_weight * value_term + grad_weight * gradient_term
