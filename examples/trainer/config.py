"""The trainer's settings: TrainConfig (every setting of a run, with its default) and load_config
(defaults, then a YAML file, then overrides; unknown keys are errors)."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from hgloss.pose import models

LOSSES = ("mse", "hg", "hg+sd")


@dataclass
class TrainConfig:
    """Every setting of a run; a YAML file and command-line flags set any of them."""

    # data: "synthetic" (generated into data_root), "coco" or "mpii"
    dataset: str = "synthetic"
    data_root: str = ""
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    val_detections: str = ""
    mpii_head_boxes: str = ""
    synthetic_train: int = 1000
    synthetic_val: int = 200
    synthetic_seed: int = 0
    input_size: list[int] = field(default_factory=lambda: [192, 256])
    heatmap_size: list[int] = field(default_factory=lambda: [48, 64])
    sigma: float = 2.0
    codec: str = "msra"
    augment: bool = True
    cache_images: bool = False  # keep decoded images in memory (small sets read every epoch)
    # model
    model: str = "simplebaseline_res18_small"
    pretrained: str = ""
    # optimisation: Adam with a multi-step learning rate, as HRNet's configs
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    lr_steps: list[int] = field(default_factory=lambda: [8, 9])
    lr_factor: float = 0.1
    seed: int = 0
    workers: int = 2
    # loss
    loss: str = "hg+sd"
    grad_weight: float = 1.0
    stencil: str = "forward"
    gradient_form: str = "components"
    grad_start_epoch: int = 0  # the gradient term is switched on from this epoch (0-based) on
    backend: str = "auto"
    distill: str = "replay"
    alpha: float = 0.5
    distance0: int = 1
    step_factor: int = 2
    replay_fraction: float = 0.5
    distill_warmup_steps: int = 0
    # evaluation
    flip_test: bool = True
    decode: str = "dark"
    eval_every: int = 1
    # runtime
    device: str = "auto"
    amp: str = "none"
    out: str = "runs/pose"
    log_every: int = 10
    progress: bool = True

    def validate(self) -> None:
        checks = {
            "dataset": (self.dataset, ("synthetic", "coco", "mpii")),
            "loss": (self.loss, LOSSES),
            "distill": (self.distill, ("replay", "snapshot")),
            "codec": (self.codec, ("msra", "udp")),
            "gradient_form": (self.gradient_form, ("components", "magnitude")),
            "decode": (self.decode, ("dark", "argmax")),
            "amp": (self.amp, ("none", "bf16", "fp16")),
            "model": (self.model, models.MODEL_NAMES),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.grad_start_epoch < 0:
            raise ValueError(f"grad_start_epoch must be >= 0, got {self.grad_start_epoch}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.dataset in ("coco", "mpii"):
            missing = [name for name in ("train_images", "train_annotations", "val_images", "val_annotations")
                       if not getattr(self, name)]
            if missing:
                raise ValueError(f"dataset {self.dataset!r} needs {', '.join(missing)}")
        if self.amp != "none" and not torch.cuda.is_available():
            raise ValueError(f"amp={self.amp!r} needs a CUDA device")


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The defaults, then the YAML file's values, then `overrides`; unknown keys are errors."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        values.update(loaded)
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}{f' in {path}' if path else ''}; known: {sorted(known)}")
    config = TrainConfig(**values)
    config.validate()
    return config
