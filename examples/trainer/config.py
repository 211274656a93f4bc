"""The trainer's settings: TrainConfig (every setting of a run with its type, default, range and
help text) and load_config (defaults, then a YAML file, then overrides).

Each setting's declaration is the one place that says what it accepts: `coerce` turns a YAML or
command-line value into the setting's type and `TrainConfig.validate` checks ranges and choices,
both before any data is generated or any model is built. A bad value raises ConfigError, one
line naming the setting and what it accepts. The loss, backend and self-distillation settings
are checked by the library's own constructors (functional.check_settings,
hgloss.distill.SteppingSchedule), so each of those rules exists once.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from hgloss import functional
from hgloss.distill import SteppingSchedule
from hgloss.stencils import STENCILS
from hgloss.pose import codecs, models

LOSSES = ("mse", "hg", "hg+sd")

# Settings that may differ when a run is resumed: they change how it is run, logged or evaluated,
# not what it computes. Any other difference makes the resumed run a different experiment.
RESUMABLE_CHANGES = frozenset({
    "epochs", "eval_every", "log_every", "progress", "workers", "out", "device", "backend", "flip_test", "decode",
    "dark_kernel", "data_root", "train_images", "train_annotations", "val_images", "val_annotations",
    "val_detections", "mpii_head_boxes", "cache_images", "fused_targets",
})  # fmt: skip


class ConfigError(ValueError):
    """A setting with a value it does not accept; the message names the setting."""


def _setting(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
             maximum: float | None = None, above: float | None = None, length: int | None = None) -> Any:
    """A dataclass field that carries its help text and its accepted values: `choices`, or a range
    (`minimum` and `maximum` inclusive, `above` exclusive), and for lists the `length`."""
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
                "length": length}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a run; a YAML file and command-line flags set any of them."""

    # data
    dataset: str = _setting("synthetic", "synthetic (generated into data_root), coco or mpii",
                            choices=("synthetic", "coco", "mpii"))
    data_root: str = _setting("", "folder of the synthetic set (default: <out>/data)")
    train_images: str = _setting("", "folder of the training images (coco, mpii)")
    train_annotations: str = _setting("", "training annotation file (coco: keypoints json; mpii: HRNet's json)")
    val_images: str = _setting("", "folder of the validation images (coco, mpii)")
    val_annotations: str = _setting("", "validation annotation file")
    val_detections: str = _setting("", "COCO person detections (results json) to evaluate on instead of the "
                                       "ground-truth boxes")
    mpii_head_boxes: str = _setting("", "MPII head boxes for PCKh (gt_valid.mat or a json list)")
    synthetic_train: int = _setting(1000, "synthetic training persons", minimum=1)
    synthetic_val: int = _setting(200, "synthetic validation persons", minimum=1)
    synthetic_seed: int = _setting(0, "seed of the synthetic set", minimum=0)
    input_size: list[int] = _setting([192, 256], "crop width,height in pixels", minimum=1, length=2)
    heatmap_size: list[int] = _setting([48, 64], "heatmap width,height in pixels", minimum=1, length=2)
    sigma: float = _setting(2.0, "Gaussian target width in heatmap pixels", above=0.0)
    codec: str = _setting("msra", "target encoding: msra (HRNet) or udp (unbiased data processing)",
                          choices=("msra", "udp"))
    augment: bool = _setting(True, "HRNet's augmentation: scale, rotation, flip, half body")
    cache_images: bool = _setting(False, "keep decoded images in memory (small sets read every epoch)")
    # model
    model: str = _setting("simplebaseline_res18_small", "the network", choices=models.MODEL_NAMES)
    pretrained: str = _setting("", "backbone checkpoint to start from (ImageNet weights)")
    # optimisation: Adam with a multi-step learning rate, as HRNet's configs
    epochs: int = _setting(10, "epochs to train", minimum=1)
    batch_size: int = _setting(32, "samples per optimizer step (per process under torchrun)", minimum=1)
    lr: float = _setting(1e-3, "Adam's learning rate", above=0.0)
    lr_steps: list[int] = _setting([8, 9], "epochs after which the learning rate drops, increasing", minimum=1)
    lr_factor: float = _setting(0.1, "factor of each learning-rate drop", above=0.0, maximum=1.0)
    seed: int = _setting(0, "seed of the model's initialisation, the batch order and the augmentation", minimum=0)
    workers: int = _setting(2, "data-loading processes (0: in the training process)", minimum=0)
    # loss
    loss: str = _setting("hg+sd", "mse (HRNet's JointsMSELoss), hg (heatmap gradient loss) or hg+sd (with "
                                  "self-distillation)", choices=LOSSES)
    grad_weight: float = _setting(1.0, "weight of the gradient term (hg, hg+sd)", minimum=0.0)
    stencil: str = _setting("forward", "finite-difference stencil of the gradient maps", choices=STENCILS)
    gradient_form: str = _setting("components", "compare the gradient maps' components or their magnitudes",
                                  choices=("components", "magnitude"))
    grad_start_epoch: int = _setting(0, "epoch (0-based) from which the gradient term is on", minimum=0)
    backend: str = _setting("auto", "loss backend", choices=("auto",) + functional.BACKENDS)
    fused_targets: bool = _setting(True, "build the Gaussian targets inside the loss from keypoints "
                                         "(hgloss.keypoint_heatmap_loss) instead of painting heatmaps in the "
                                         "data loader: the same loss, less loader work; with gradient_form "
                                         "magnitude, which needs heatmaps, the loader paints them anyway")
    distill: str = _setting("replay", "self-distillation teacher: replay (the bank of earlier predictions) or "
                                      "snapshot (an earlier copy of the model)", choices=("replay", "snapshot"))
    alpha: float = _setting(0.5, "weight of the teacher in the blended target", minimum=0.0, maximum=1.0)
    distance0: int = _setting(1, "first teacher-student distance (epochs for snapshot, iterations for replay)",
                              minimum=1)
    step_factor: int = _setting(2, "factor by which the distance grows at each learning-rate drop", minimum=1)
    replay_fraction: float = _setting(0.5, "fraction of each replay batch that is replayed samples",
                                      minimum=0.0, maximum=0.999)
    distill_warmup_steps: int = _setting(0, "optimizer steps before the teacher is used", minimum=0)
    # evaluation
    flip_test: bool = _setting(True, "average the heatmaps of the crop and its mirror image")
    decode: str = _setting("dark", "sub-pixel decoding: dark or argmax (HRNet's quarter pixel)",
                           choices=("dark", "argmax"))
    dark_kernel: int = _setting(0, "blur size of dark decoding, odd; 0: matched to sigma (codecs.dark_kernel: 11 at "
                                   "sigma 2, 5 at sigma 1)", minimum=0)
    eval_every: int = _setting(1, "evaluate every this many epochs (and after the last)", minimum=1)
    # runtime
    device: str = _setting("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    amp: str = _setting("none", "mixed precision of the forward passes (CUDA only)", choices=("none", "bf16", "fp16"))
    out: str = _setting("runs/pose", "output folder")
    log_every: int = _setting(10, "write a train record every this many steps", minimum=1)
    progress: bool = _setting(True, "show progress bars")

    def validate(self) -> None:
        """Raises ConfigError for the first setting whose value is not accepted: its type, its
        range or choices, and the checks that involve several settings or the machine."""
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, coerce(spec, getattr(self, spec.name)))
            _check_range(spec, getattr(self, spec.name))
        if any(later <= earlier for earlier, later in zip(self.lr_steps, self.lr_steps[1:])):
            raise ConfigError(f"lr_steps must be increasing, got {self.lr_steps}")
        if self.dark_kernel % 2 == 0 and self.dark_kernel != 0:
            raise ConfigError(f"dark_kernel must be odd, or 0 to match sigma, got {self.dark_kernel}")
        if self.dataset in ("coco", "mpii"):
            missing = [name for name in ("train_images", "train_annotations", "val_images", "val_annotations")
                       if not getattr(self, name)]
            if missing:
                raise ConfigError(f"dataset {self.dataset!r} needs {', '.join(missing)}")
        device = self._device()
        if self.amp != "none" and device.type != "cuda":
            raise ConfigError(f"amp={self.amp!r} needs a CUDA device")
        self._check_with_the_library(device)

    @property
    def targets_in_loss(self) -> bool:
        """Whether the loss paints the targets from keypoints: fused_targets, where the loss can
        (the magnitude gradient form is computed from heatmap targets only)."""
        return self.fused_targets and self.gradient_form == "components"

    @property
    def decode_kernel(self) -> int:
        """The blur size dark decoding uses: dark_kernel, or the one matched to the targets' sigma."""
        return self.dark_kernel or codecs.dark_kernel(self.sigma)

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} needs CUDA, which this machine's torch does not have")
        return device

    def _check_with_the_library(self, device: torch.device) -> None:
        """The loss and self-distillation settings, by the constructors that will use them."""
        try:
            functional.check_settings(grad_weight=self.grad_weight, stencil=self.stencil, backend=self.backend,
                                      gradient_form=self.gradient_form)
            if self.backend != "auto":
                functional.resolve_backend(self.backend, device)
            if self.loss == "hg+sd":
                SteppingSchedule(self.distance0, self.step_factor, alpha=self.alpha,
                                 warmup_steps=self.distill_warmup_steps)
        except (ValueError, RuntimeError) as error:
            raise ConfigError(str(error)) from None


def accepted(spec: dataclasses.Field) -> str:
    """What a setting accepts, in words, for help texts and error messages."""
    kind = _kind(spec)
    meta = spec.metadata
    if meta["choices"]:
        return f"one of {list(meta['choices'])}"
    if kind is bool:
        return "true or false"
    words = {int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        how_many = f"{meta['length']} " if meta["length"] else "a list of "
        example = ",".join(str(n) for n in spec.default_factory())
        return f"{how_many}{'integers' if item is int else 'numbers'}{_range_words(meta)}, e.g. {example}"
    return words[kind] + _range_words(meta)


def _range_words(meta: dict) -> str:
    parts = []
    if meta["above"] is not None:
        parts.append(f"> {meta['above']:g}")
    if meta["minimum"] is not None:
        parts.append(f">= {meta['minimum']:g}")
    if meta["maximum"] is not None:
        parts.append(f"<= {meta['maximum']:g}")
    return (" " + " and ".join(parts)) if parts else ""


def _kind(spec: dataclasses.Field):
    return typing.get_type_hints(TrainConfig)[spec.name]


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(spec: dataclasses.Field, value: Any) -> Any:
    """`value` as the setting's type; text (command line, or YAML that PyYAML leaves as a string,
    such as 1e-3) is parsed. Raises ConfigError naming the setting and what it accepts."""
    kind = _kind(spec)

    def refuse() -> typing.NoReturn:
        raise ConfigError(f"{spec.name} must be {accepted(spec)}, got {value!r}")

    if typing.get_origin(kind) is list:
        item_kind = typing.get_args(kind)[0]
        items = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            refuse()
        try:
            return [_scalar(item_kind, item) for item in items]
        except (TypeError, ValueError):
            refuse()
    if kind is str and value is None:  # an empty YAML value
        return ""
    try:
        return _scalar(kind, value)
    except (TypeError, ValueError):
        refuse()


def _scalar(kind: type, value: Any) -> Any:
    """`value` as a bool, int, float or str; TypeError or ValueError when it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int to Python, never a number of epochs
        raise TypeError(value)
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError(value)
    if kind is float:
        number = float(value.strip()) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError(value)
        return float(number)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _check_range(spec: dataclasses.Field, value: Any) -> None:
    """Raises ConfigError when a coerced value is outside its setting's choices or range (each
    entry of a list) or a list has the wrong length."""
    meta = spec.metadata
    values = value if isinstance(value, list) else [value]
    if (
        (meta["choices"] and value not in meta["choices"])
        or (meta["length"] is not None and len(values) != meta["length"])
        or any(meta["minimum"] is not None and n < meta["minimum"] for n in values)
        or any(meta["maximum"] is not None and n > meta["maximum"] for n in values)
        or any(meta["above"] is not None and n <= meta["above"] for n in values)
    ):
        raise ConfigError(f"{spec.name} must be {accepted(spec)}, got {value!r}")


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The defaults, then the YAML file's values, then `overrides` (None values ignored); every
    value coerced to its setting's type and checked. Raises ConfigError (a ValueError) for an
    unknown setting, a bad value or an unreadable file."""
    values: dict[str, Any] = {}
    if path:
        values.update(_read_yaml(path))
    values.update({key: value for key, value in overrides.items() if value is not None})
    specs = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise ConfigError(f"unknown settings {unknown}{f' in {path}' if path else ''}; known: {sorted(specs)}")
    try:
        config = TrainConfig(**{name: coerce(specs[name], value) for name, value in values.items()})
        config.validate()
    except ConfigError as error:
        raise ConfigError(f"{error}{f' (settings from {path} and the flags)' if path else ''}") from None
    return config


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded
