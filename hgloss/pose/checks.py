"""Argument checks shared by the pose toolkit (and the trainer's plots): arrays of a given shape,
whose lettered sizes must agree between the arguments of one call, and finite numbers."""

import math
from typing import Any

import numpy as np
import torch

Shape = tuple[int | str, ...]


def spell_shape(shape: Shape) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ("," if len(shape) == 1 else "") + ")"


def checked_array(name: str, value: Any, shape: Shape, sizes: dict[str, int], dtype: Any = np.float64) -> np.ndarray:
    """``value`` as a numpy array of ``dtype`` with the given shape.

    Integers in ``shape`` are required sizes; letters are sizes shared between the arguments of
    one call, recorded in ``sizes`` by the first argument that has them.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # numpy has no bfloat16; float64 holds every floating dtype torch has exactly.
        value = (value.double() if value.is_floating_point() else value).numpy()
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array of shape {spell_shape(shape)}: {error}") from None
    if array.ndim != len(shape):
        raise ValueError(f"{name} must have shape {spell_shape(shape)}, got {array.shape}")
    for dim, size in zip(shape, array.shape):
        if isinstance(dim, int) and size != dim:
            raise ValueError(f"{name} must have shape {spell_shape(shape)}, got {array.shape}")
        if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
            raise ValueError(
                f"{name} must have shape {spell_shape(shape)} with {dim} = {sizes[dim]} as in the arguments before it, "
                f"got {array.shape}"
            )
    return array


def checked_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False) -> float:
    """``value`` as a finite float, at least ``minimum`` or above zero when asked."""
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (minimum is not None and number < minimum) or (positive and number <= 0):
        bound = " > 0" if positive else f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return number
