"""Argument checks shared by the self-distillation classes."""

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_real(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    in_range = (
        not isinstance(value, bool)
        and isinstance(value, Real)
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and (value < high if high_open else value <= high)
    )
    if not in_range:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def as_key_list(keys: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 1 or keys.is_floating_point() or keys.is_complex():
            raise ValueError(
                "keys must be a 1-D integer tensor or a sequence of ints, "
                f"got {keys.dtype} of shape {tuple(keys.shape)}"
            )
        return keys.tolist()
    return [int(key) for key in keys]


def as_flag_list(flags: torch.Tensor | Sequence[bool]) -> list[bool]:
    if isinstance(flags, torch.Tensor):
        return flags.bool().flatten().tolist()
    return [bool(flag) for flag in flags]


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the weights: DistributedDataParallel and DataParallel keep it in .module."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model

