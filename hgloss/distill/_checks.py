"""Argument checks shared by the self-distillation classes."""

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
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


def check_fields(where: str, state: Any, fields: Sequence[str]) -> None:
    """Refuse a state that is not a dict or lacks one of `fields`; `where` names it in the error."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
    missing = [field for field in fields if field not in state]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(repr(field) for field in missing)}")


def _integer(value: Any) -> int | None:
    """`value` as an int when it is an integer (an int, a NumPy integer, an integer 0-d tensor), else None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)  # refuses floats, 2.0 included, instead of truncating them
    except TypeError:
        return None


def as_key_list(keys: torch.Tensor | Sequence[int], name: str = "keys") -> list[int]:
    """`keys` as a list of Python ints.

    Only integers are keys: int() would turn 2.5 into 2, another sample's key, and a bool would
    pass for the key 0 or 1. Integral floats such as 2.0 are refused as well, so that a float
    tensor of sample indices is caught however its values happen to look.
    """
    if isinstance(keys, torch.Tensor):
        if keys.dim() != 1 or keys.dtype == torch.bool or keys.is_floating_point() or keys.is_complex():
            raise ValueError(
                f"{name} must be a 1-D integer tensor or a sequence of ints, "
                f"got a {keys.dtype} tensor of shape {tuple(keys.shape)}"
            )
        return keys.tolist()
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
        raise ValueError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {type(keys).__name__}")
    key_list = []
    for position, key in enumerate(keys):
        index = _integer(key)
        if index is None:
            raise ValueError(f"{name} must be integers, got {key!r} ({type(key).__name__}) at position {position}")
        key_list.append(index)
    return key_list


def as_flag_list(flags: torch.Tensor | Sequence[bool]) -> list[bool]:
    if isinstance(flags, torch.Tensor):
        return flags.bool().flatten().tolist()
    return [bool(flag) for flag in flags]


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the weights: DistributedDataParallel and DataParallel keep it in .module."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model
