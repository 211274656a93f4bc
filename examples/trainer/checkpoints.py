"""The run's state and its checkpoints: written atomically (a temporary file, then a rename), so
that a kill mid-write never leaves a half-written last.pt, and holding only tensors, numbers,
strings, lists and dicts, so that resuming reads them with torch.load(weights_only=True) and a
checkpoint from elsewhere cannot run code."""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hgloss.pose.datasets import write_atomically


@dataclass
class RunState:
    """Where a run stands: the next epoch to train, the optimizer steps taken, the best value of
    the headline metric so far (AP, PCKh@0.5 or PCK: evaluate.headline_metric), and the seconds
    the run has taken (setting up, training, evaluating), summed over every part of a resumed run."""

    next_epoch: int = 0
    step: int = 0
    best_metric: float = float("-inf")
    seconds: float = 0.0


def save_atomically(state: dict, path: Path) -> None:
    """`state` to `path` through a temporary file and a rename; an interrupted write (an
    exception, Ctrl-C) removes the temporary file and leaves `path` as it was."""
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def check_output_folder(out: Path) -> None:
    """Raises NotADirectoryError or IsADirectoryError, before any work, when a run's outputs
    could not be written to `out`."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out} exists and is not a folder")
    for name in ("last.pt", "best.pt", "metrics.json", "config.yaml", "log.jsonl", "curves.png", "predictions.png"):
        if (out / name).is_dir():
            raise IsADirectoryError(f"{out / name} is a folder; the run writes a file there")


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


def truncate_log(path: Path, last_step: int) -> int:
    """Drops the records after optimizer step `last_step` from a run's log.jsonl (those of an
    epoch that was interrupted before its checkpoint), so that a resumed run does not log
    the same steps twice. Returns the number of records dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        write_atomically(path, lambda temporary: temporary.write_text("".join(kept)))
    return len(lines) - len(kept)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
