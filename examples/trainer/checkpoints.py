"""The run's state and its checkpoints: written atomically (a temporary file, then a rename), so
that a kill mid-write never leaves a half-written last.pt, and holding only tensors, numbers,
strings, lists and dicts, so that resuming reads them with torch.load(weights_only=True) and a
checkpoint from elsewhere cannot run code."""

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class RunState:
    """Where a run stands: the next epoch to train, the optimizer steps taken, and the best
    value of the headline metric so far (AP, PCKh@0.5 or PCK: evaluate.headline_metric)."""

    next_epoch: int = 0
    step: int = 0
    best_metric: float = float("-inf")


def save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def rng_state() -> dict[str, Any]:
    """The global generators' states; numpy's key array as a list, which weights_only loading accepts."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, key.tolist(), position, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])


def load_checkpoint(path: str, device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, read without running any code it might hold (weights_only)."""
    return torch.load(path, map_location=device, weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
