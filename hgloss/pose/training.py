"""The reference top-down pose trainer: configuration, data, loss choice, training loop,
evaluation, checkpoints and plots. `examples/train_pose.py` is its command line.

One run writes to its output folder: `config.yaml` (the resolved configuration), `log.jsonl`
(one json record per logged iteration and per evaluation), `last.pt` and `best.pt` (written
atomically: a temporary file, then a rename), `metrics.json` (the last evaluation),
`curves.png` (loss, learning rate and validation metrics) and `predictions.png` (predicted
keypoints and heatmaps on validation crops).

Losses (`loss`):
    mse    HRNet's JointsMSELoss, exactly (hgloss.compat, grad_weight 0)
    hg     the heatmap gradient loss: MSE plus grad_weight x the MSE of the gradient maps
    hg+sd  the same with self-distillation soft targets (`distill`: replay or snapshot)

Under torchrun the trainer runs DistributedDataParallel (gloo on CPU, nccl on GPU): each rank
trains on its shard, the validation predictions are gathered on rank 0, and rank 0 alone logs,
plots and writes checkpoints.
"""

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import hgloss
from hgloss.distill import SelfDistillation, SteppingSchedule

from . import codecs, datasets, evaluation, models
from .synthetic import write_synthetic_coco
from .transforms import COCO_FLIP_PAIRS, MPII_FLIP_PAIRS

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


# ------------------------------------------------------------------------------------------------
# Distributed helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _setup_distributed(device: torch.device) -> None:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _pick_device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Data


def _data(config: TrainConfig):
    """(train records, val records, val annotation file or None, flip pairs, upper body, head sizes)."""
    if config.dataset == "synthetic":
        root = Path(config.data_root or Path(config.out) / "data")
        marker = root / f"complete-{config.synthetic_seed}-{config.synthetic_train}-{config.synthetic_val}"
        if _rank() == 0 and not marker.exists():
            write_synthetic_coco(root, {"train": config.synthetic_train, "val": config.synthetic_val},
                                 seed=config.synthetic_seed)
            marker.touch()
        if _world() > 1:
            dist.barrier()
        train_images, train_annotations = root / "train", root / "annotations" / "person_keypoints_train.json"
        val_images, val_annotations = root / "val", root / "annotations" / "person_keypoints_val.json"
    else:
        train_images, train_annotations = config.train_images, config.train_annotations
        val_images, val_annotations = config.val_images, config.val_annotations
    input_size = tuple(config.input_size)
    if config.dataset == "mpii":
        train, train_report = datasets.mpii_records(str(train_annotations), str(train_images))
        val, val_report = datasets.mpii_records(str(val_annotations), str(val_images))
        head_sizes = None
        if config.mpii_head_boxes:
            head_sizes = evaluation.head_sizes_from_boxes(evaluation.load_mpii_head_boxes(config.mpii_head_boxes))
        return train, val, train_report, val_report, None, MPII_FLIP_PAIRS, datasets.MPII_UPPER_BODY, head_sizes
    train, train_report = datasets.coco_records(str(train_annotations), str(train_images), input_size)
    val, val_report = datasets.coco_records(
        str(val_annotations), str(val_images), input_size, detections=config.val_detections or None
    )
    return train, val, train_report, val_report, str(val_annotations), COCO_FLIP_PAIRS, datasets.COCO_UPPER_BODY, None


def _collate(samples: list[dict]) -> dict:
    return torch.utils.data.default_collate(samples)


# ------------------------------------------------------------------------------------------------
# Loss


class PoseLoss(nn.Module):
    """The configured loss of (heatmaps, targets, target weights, teacher, alpha)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.kind = config.loss
        self.grad_weight, self.grad_start_epoch = config.grad_weight, config.grad_start_epoch
        if config.loss == "mse":
            self.criterion = hgloss.compat.JointsMSELoss(use_target_weight=True, backend=config.backend)
        else:
            self.criterion = hgloss.HeatmapGradientLoss(
                grad_weight=config.grad_weight, stencil=config.stencil, backend=config.backend,
                gradient_form=config.gradient_form,
            )

    def set_epoch(self, epoch: int) -> None:
        """Switches the gradient term on once `epoch` reaches grad_start_epoch."""
        if self.kind != "mse":
            self.criterion.grad_weight = self.grad_weight if epoch >= self.grad_start_epoch else 0.0

    def forward(self, output, target, target_weight, teacher=None, alpha=None):
        if self.kind == "mse":
            return self.criterion(output, target, target_weight[..., None])
        if teacher is None:
            return self.criterion(output, target, target_weight)
        return self.criterion(output, target, target_weight, teacher=teacher, alpha=alpha)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, config: TrainConfig, device: torch.device, flip_pairs,
             annotation_file: str | None, head_sizes) -> tuple[dict[str, float], dict]:
    """Metrics on the validation loader (COCO AP, or MPII PCKh when head sizes are known, and
    PCK on heatmaps), and the first batch's crops and predictions for the plots."""
    model.eval()
    heatmap_size = tuple(config.heatmap_size)
    image_ids, keypoints, box_scores, areas, ground_truth, scales, shapes = [], [], [], [], [], [], []
    pck_hits = pck_count = 0.0
    first_batch = None
    for batch in loader:
        images = batch["image"].to(device)
        output = model(images).float()
        if config.flip_test:
            flipped = model(torch.flip(images, dims=[3])).float()
            output = (output + codecs.flip_back(flipped, flip_pairs, shift=True)) / 2
        output = output.cpu()
        coords, scores = codecs.decode(output, refine=config.decode)
        in_image = codecs.heatmap_to_image(coords, batch["center"].numpy(), batch["scale"].numpy(), heatmap_size,
                                           udp=config.codec == "udp")
        image_ids += batch["image_id"].tolist()
        keypoints.append(np.concatenate([in_image, scores[..., None]], axis=2))
        box_scores += batch["score"].tolist()
        areas += batch["area"].tolist()
        ground_truth.append(batch["joints"].numpy())
        scales.append(batch["scale"].numpy())
        shapes.append(evaluation.gaussian_fit(output.double().numpy()))
        if batch["target_weight"].sum() > 0:
            _, mean, counted = evaluation.heatmap_pck(output, batch["target"])
            pck_hits += mean * counted
            pck_count += counted
        if first_batch is None:
            stride = config.input_size[0] / heatmap_size[0]
            first_batch = {"images": batch["image"], "heatmaps": output, "keypoints": coords * stride,
                           "scores": scores}
    gathered = (image_ids, keypoints, box_scores, areas, ground_truth, pck_hits, pck_count, scales, shapes)
    if _world() > 1:
        everything = [None] * _world()
        dist.all_gather_object(everything, gathered)
        image_ids = sum((part[0] for part in everything), [])
        keypoints = sum((part[1] for part in everything), [])
        box_scores = sum((part[2] for part in everything), [])
        areas = sum((part[3] for part in everything), [])
        ground_truth = sum((part[4] for part in everything), [])
        pck_hits = sum(part[5] for part in everything)
        pck_count = sum(part[6] for part in everything)
        scales = sum((part[7] for part in everything), [])
        shapes = sum((part[8] for part in everything), [])
    metrics: dict[str, float] = {"pck": pck_hits / pck_count if pck_count else float("nan")}
    if _rank() == 0 and keypoints:
        all_keypoints = np.concatenate(keypoints)
        metrics.update(_heatmap_shape_metrics(all_keypoints, np.concatenate(ground_truth), np.concatenate(scales),
                                              shapes, heatmap_size[0]))
        if annotation_file is not None:
            results = evaluation.coco_results(np.asarray(image_ids), all_keypoints, np.asarray(box_scores),
                                              np.asarray(areas))
            metrics.update(evaluation.evaluate_coco(results, annotation_file))
        elif head_sizes is not None:
            truth = np.concatenate(ground_truth)
            pckh = evaluation.pckh(all_keypoints[..., :2], truth[..., :2], truth[..., 2] > 0,
                                   head_sizes[np.asarray(image_ids)])
            metrics.update({key: float(value) for key, value in pckh.items() if np.ndim(value) == 0})
    model.train()
    return metrics, first_batch


def _heatmap_shape_metrics(keypoints: np.ndarray, truth: np.ndarray, scales: np.ndarray, shapes: list[dict],
                           heatmap_width: int) -> dict[str, float]:
    """How the predicted heatmaps of the labelled joints look, averaged over those joints: their
    residual against the best-fitting isotropic Gaussian, its sigma, the peak value, and the
    localisation error in heatmap pixels."""
    labelled = truth[..., 2] > 0
    if not labelled.any():
        return {}
    fits = {key: np.concatenate([shape[key] for shape in shapes]) for key in ("residual", "sigma", "peak")}
    errors = evaluation.localisation_error(keypoints[..., :2], truth[..., :2], scales, heatmap_width)
    return {"gaussian_residual": float(fits["residual"][labelled].mean()),
            "fitted_sigma": float(fits["sigma"][labelled].mean()),
            "peak": float(fits["peak"][labelled].mean()),
            "localisation_error": float(errors[labelled].mean())}


# ------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains, evaluates and writes the outputs."""

    def __init__(self, config: TrainConfig, resume: str | None = None) -> None:
        self.config = config
        self.device = _pick_device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        _setup_distributed(self.device)
        self.rank, self.world = _rank(), _world()
        self.out = Path(config.out)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)

        (train, val, self.train_report, self.val_report, self.annotation_file, self.flip_pairs, upper_body,
         self.head_sizes) = _data(config)
        codec_class = codecs.UDPHeatmap if config.codec == "udp" else codecs.MSRAHeatmap
        codec = codec_class(tuple(config.input_size), tuple(config.heatmap_size), config.sigma)
        augmentation = datasets.Augmentation() if config.augment else None
        udp = config.codec == "udp"
        self.train_set = datasets.TopDownDataset(train, codec, tuple(config.input_size), augmentation,
                                                 self.flip_pairs, upper_body, udp, config.cache_images)
        self.val_set = datasets.TopDownDataset(val, codec, tuple(config.input_size), None, self.flip_pairs,
                                               upper_body, udp, config.cache_images)
        num_joints = len(train[0].joints)

        self.model = models.build_model(config.model, num_joints).to(self.device)
        self._check_output_size()
        if config.pretrained:
            report = models.load_pretrained_backbone(self.model, config.pretrained)
            self._say(f"pretrained backbone {config.pretrained}: {len(report['loaded'])} tensors loaded, "
                      f"{len(report['missing'])} left at their initial values")
        self.student = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                        if self.world > 1 else self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, config.lr_steps, config.lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
        self.criterion = PoseLoss(config)

        distilling = config.loss == "hg+sd"
        self.schedule = SteppingSchedule(config.distance0, config.step_factor, alpha=config.alpha,
                                         warmup_steps=config.distill_warmup_steps)
        replaying = distilling and config.distill == "replay"
        # Every loss draws its batches from the same seeded sampler, replay or not, so that runs
        # differ only in the loss.
        self.distill = None
        if distilling:
            self.distill = SelfDistillation(
                config.distill, self.schedule, optimizer=self.optimizer, model=self.student,
                dataset_size=len(self.train_set), batch_size=config.batch_size,
                replay_fraction=config.replay_fraction if replaying else 0.0, seed=config.seed,
            )
            self.sampler = self.distill.batch_sampler if replaying else None
        else:
            self.sampler = None
        if self.sampler is None:
            from hgloss.distill import ReplayBatchSampler

            self.sampler = ReplayBatchSampler(len(self.train_set), config.batch_size, self.schedule, 0.0,
                                              seed=config.seed)
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=config.workers, collate_fn=_collate,
            persistent_workers=config.workers > 0,
        )
        val_sampler = (torch.utils.data.distributed.DistributedSampler(self.val_set, shuffle=False)
                       if self.world > 1 else None)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=config.batch_size, sampler=val_sampler, num_workers=config.workers,
            collate_fn=_collate,
        )
        self.start_epoch, self.step, self.best_ap = 0, 0, -math.inf
        if resume:
            self._resume(resume)

    def _check_output_size(self) -> None:
        """The model's heatmaps must have the codec's size, which a wrong input size would break
        (ResNet backbones need multiples of 32)."""
        width, height = self.config.input_size
        self.model.eval()
        with torch.no_grad():
            produced = self.model(torch.zeros(1, 3, height, width, device=self.device)).shape[-2:]
        self.model.train()
        expected = (self.config.heatmap_size[1], self.config.heatmap_size[0])
        if tuple(produced) != expected:
            raise ValueError(
                f"model {self.config.model} turns {width}x{height} crops into {produced[1]}x{produced[0]} heatmaps, "
                f"but heatmap_size is {expected[1]}x{expected[0]}; pick an input size the model divides evenly"
            )

    # -- bookkeeping ------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, file=sys.stderr, flush=True)

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _state(self, epoch: int, metrics: dict) -> dict:
        return {
            "epoch": epoch, "step": self.step, "best_ap": self.best_ap, "metrics": metrics,
            "config": dataclasses.asdict(self.config), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "schedule": self.schedule.state_dict(),
            "distill": self.distill.state_dict() if self.distill else None, "rng": _rng_state(),
        }  # fmt: skip

    def _resume(self, path: str) -> None:
        if path == "auto":
            path = str(self.out / "last.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.schedule.load_state_dict(state["schedule"])
        if self.distill is not None:
            self.distill.load_state_dict(state["distill"])
        _set_rng_state(state["rng"])
        self.start_epoch, self.step, self.best_ap = state["epoch"] + 1, state["step"], state["best_ap"]
        self._say(f"resumed from {path} after epoch {state['epoch'] + 1}")

    # -- the loop ---------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> list[float]:
        from tqdm import tqdm

        config = self.config
        self.sampler.set_epoch(epoch)
        self.criterion.set_epoch(epoch)
        self.student.train()
        losses = []
        started, samples = time.perf_counter(), 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not config.progress or self.rank != 0, file=sys.stderr)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        for batch in bar:
            images = batch["image"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            weight = batch["target_weight"].to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = self.student(images)
            teacher = alpha = None
            if self.distill is not None:
                if self.distill.mode == "replay":
                    teacher, alpha = self.distill.teacher(output, keys=batch["index"], replayed=batch["replayed"])
                else:
                    with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        teacher, alpha = self.distill.teacher(output, inputs=images)
            loss = self.criterion(output, target, weight, teacher, alpha)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.distill is not None:
                self.distill.after_step()
            self.step += 1
            samples += images.shape[0] * self.world
            losses.append(loss.item())
            rate = samples / max(time.perf_counter() - started, 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{losses[-1]:.3g}", lr=f"{lr:.2g}", samples_per_s=f"{rate:.0f}")
            if self.step % config.log_every == 0:
                self._log_step(epoch, losses[-1], lr, rate, output, target)
        if self.step % config.log_every != 0:  # the epoch's last iteration, so every epoch is in the log
            self._log_step(epoch, losses[-1], lr, rate, output, target)
        return losses

    def _log_step(self, epoch: int, loss: float, lr: float, rate: float, output: torch.Tensor,
                  target: torch.Tensor) -> None:
        """A train record, with HRNet's PCK of the batch's heatmaps against its targets."""
        _, pck, _ = evaluation.heatmap_pck(output.detach().float().cpu(), target.cpu())
        self._log({"kind": "train", "epoch": epoch + 1, "step": self.step, "loss": loss, "lr": lr,
                   "samples_per_s": rate, "pck": pck})

    def fit(self) -> dict[str, float]:
        """Trains from the start (or the resumed epoch) to `epochs`, evaluating every
        `eval_every` epochs and after the last; returns the last metrics."""
        config = self.config
        if self.rank == 0:
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        self._say(f"train: {self.train_report}; val: {self.val_report}; {self.world} process(es) on {self.device}")
        metrics: dict[str, float] = {}
        for epoch in range(self.start_epoch, config.epochs):
            losses = self._train_epoch(epoch)
            self.scheduler.step()
            last = epoch == config.epochs - 1
            if (epoch + 1) % config.eval_every == 0 or last:
                metrics, first_batch = evaluate(self.student, self.val_loader, config, self.device, self.flip_pairs,
                                                self.annotation_file, self.head_sizes)
                metrics = {key: float(value) for key, value in metrics.items()}
                self._log({"kind": "val", "epoch": epoch + 1, "step": self.step, **metrics})
                headline = metrics.get("AP", metrics.get("PCKh@0.5", metrics["pck"]))
                self._say(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4g}, "
                          + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key in
                                      ("AP", "AP50", "PCKh@0.5", "pck")))
                if self.rank == 0 and headline > self.best_ap:
                    self.best_ap = headline
                    _save_atomically(self._state(epoch, metrics), self.out / "best.pt")
                if self.rank == 0 and first_batch is not None:
                    self._plot(first_batch)
            if self.rank == 0:
                _save_atomically(self._state(epoch, metrics), self.out / "last.pt")
        if self.rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self._say(f"metrics, plots, log and checkpoints are in {self.out.resolve()}")
        return metrics

    def close(self) -> None:
        """Ends a distributed run: the DDP model is released while the process group still exists,
        then the group is destroyed (the other order can leave gloo waiting for a peer at exit)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            self.student = self.distill = None
            dist.destroy_process_group()

    def _plot(self, first_batch: dict) -> None:
        from . import plots

        plots.plot_training_curves(self.out / "log.jsonl", self.out / "curves.png")
        plots.plot_predictions(first_batch["images"], first_batch["heatmaps"], first_batch["keypoints"],
                               first_batch["scores"], self.out / "predictions.png")
