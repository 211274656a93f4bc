"""The run's state and its checkpoints: written atomically (a temporary file, then a rename), so
that a kill mid-write never leaves a half-written last.pt."""

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
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
