"""The process's place in a torchrun job: its device, rank and world size (1 and rank 0 when
not distributed), and the collectives the trainer needs."""

import os

import torch
import torch.distributed as dist

from .config import TrainConfig


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def pick_device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def set_up(config: TrainConfig) -> torch.device:
    """The run's device; joins the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    device = pick_device(config)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def gather_lists(parts: dict[str, list]) -> dict[str, list]:
    """Each list concatenated over the ranks, in rank order (the lists themselves when alone)."""
    if world() == 1:
        return parts
    everything = [None] * world()
    dist.all_gather_object(everything, parts)
    return {key: sum((part[key] for part in everything), []) for key in parts}
