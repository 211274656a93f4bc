"""The Trainer: assembled from small build functions, each usable alone, then the training loop."""

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hgloss.distill import (
    ReplayBatchSampler,
    ReplayDistillation,
    SeededBatchSampler,
    SnapshotDistillation,
    SteppingSchedule,
)
from hgloss.pose import models

from . import distributed
from .checkpoints import (
    RunState,
    check_output_folder,
    load_checkpoint,
    rng_state,
    save_atomically,
    seed_everything,
    set_rng_state,
    truncate_log,
)
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from .data import DataSplit, build_codec, build_datasets, build_loaders, load_split
from .evaluate import evaluate, headline_metric, target_pck
from .loss import PoseLoss

# ------------------------------------------------------------------------------------------------
# The pieces


def build_model(config: TrainConfig, num_joints: int, device: torch.device) -> nn.Module:
    """The configured network on `device`, with its pretrained backbone when given. Raises
    ValueError when the model's heatmaps would not have heatmap_size (ResNet backbones need
    input sizes that are multiples of 32)."""
    model = models.build_model(config.model, num_joints).to(device)
    width, height = config.input_size
    model.eval()
    with torch.no_grad():
        produced = model(torch.zeros(1, 3, height, width, device=device)).shape[-2:]
    model.train()
    expected = (config.heatmap_size[1], config.heatmap_size[0])
    if tuple(produced) != expected:
        raise ValueError(
            f"model {config.model} turns {width}x{height} crops into {produced[1]}x{produced[0]} heatmaps, "
            f"but heatmap_size is {expected[1]}x{expected[0]}; pick an input size the model divides evenly"
        )
    if config.pretrained:
        report = models.load_pretrained_backbone(model, config.pretrained)
        _say(f"pretrained backbone {config.pretrained}: {len(report['loaded'])} tensors loaded, "
             f"{len(report['missing'])} left at their initial values")
    return model


def build_optimizer(config: TrainConfig, model: nn.Module):
    """Adam with a multi-step learning rate, as HRNet's configs, and the fp16 gradient scaler."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.lr_steps, config.lr_factor)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
    return optimizer, scheduler, scaler


def build_distillation(config: TrainConfig, optimizer, student: nn.Module, dataset_size: int):
    """(distillation or None, the training batch sampler). Every loss draws its batches in the
    same seeded order (replay adds its replays to it), so runs differ only in the loss."""
    if config.loss != "hg+sd":
        return None, SeededBatchSampler(dataset_size, config.batch_size, seed=config.seed)
    schedule = SteppingSchedule(config.distance0, config.step_factor, alpha=config.alpha,
                                warmup_steps=config.distill_warmup_steps)
    if config.distill == "replay":
        sampler = ReplayBatchSampler(dataset_size, config.batch_size, schedule, config.replay_fraction,
                                     seed=config.seed)
        return ReplayDistillation(schedule, optimizer, sampler), sampler
    return (SnapshotDistillation(schedule, optimizer, student),
            SeededBatchSampler(dataset_size, config.batch_size, seed=config.seed))


class TrainingDiverged(RuntimeError):
    """The model's heatmaps or the loss stopped being finite; the message says where, and which
    checkpoint holds the last good state."""


def read_resume_checkpoint(config: TrainConfig, resume: str | None, device: torch.device) -> dict | None:
    """The checkpoint to continue from, checked against `config`, or None for a fresh start.

    `resume="auto"` takes <out>/last.pt and starts fresh (saying so) when there is none, so a
    restart loop can always pass it; a path must exist. The checkpoint is read with
    weights_only (it cannot run code), and its settings must equal `config`'s except those in
    RESUMABLE_CHANGES: a run resumed with another batch size or learning rate would be neither
    the old experiment nor a new one. Raises FileNotFoundError or ConfigError."""
    if not resume:
        return None
    path = Path(config.out) / "last.pt" if resume == "auto" else Path(resume)
    if not path.is_file():
        if resume == "auto":
            _say(f"no checkpoint at {path}: starting a fresh run")
            return None
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    checkpoint = load_checkpoint(str(path), device)
    saved, current = checkpoint["config"], dataclasses.asdict(config)
    changed = [f"{name} {saved[name]!r} -> {current[name]!r}" for name in current
               if name in saved and name not in RESUMABLE_CHANGES and saved[name] != current[name]]
    if changed:
        raise ConfigError(f"{path} was trained with other settings than these: {', '.join(changed)}; resume with "
                          "the run's settings, or start a new run in another out folder")
    checkpoint["path"] = str(path)
    return checkpoint


def _say(text: str) -> None:
    if distributed.rank() == 0:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains, evaluates and writes the outputs.

    Every setting, the output folder and the checkpoint to resume from are checked before any
    data is generated or read. Resuming a run that has already trained `epochs` epochs builds
    nothing: `fit()` says so and returns its last metrics, leaving its folder as it is.
    """

    def __init__(self, config: TrainConfig, resume: str | None = None) -> None:
        started = time.perf_counter()
        config.validate()
        self.config = config
        self.out = Path(config.out)
        check_output_folder(self.out)
        self.device = distributed.set_up(config)
        self.rank, self.world = distributed.rank(), distributed.world()
        checkpoint = read_resume_checkpoint(config, resume, self.device)
        self.state = RunState(**checkpoint["run"]) if checkpoint else RunState()
        self._clock = (started, self.state.seconds)  # when this part of the run began, and the time before it
        self.finished_metrics = checkpoint["metrics"] if self.state.next_epoch >= config.epochs else None
        self.saved_epoch = self.state.next_epoch if checkpoint else None  # of <out>/last.pt, for messages
        if self.finished_metrics is not None:
            return
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.split: DataSplit = load_split(config)
        self.codec = build_codec(config)
        self.train_set, self.val_set = build_datasets(config, self.split, self.codec)
        self.model = build_model(config, self.split.num_joints, self.device)
        self.student = (nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
            if self.world > 1 else self.model)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(config, self.model)
        self.criterion = PoseLoss(config)
        self.distillation, self.batch_sampler = build_distillation(config, self.optimizer, self.student,
                                                                   len(self.train_set))
        self.train_loader, self.val_loader = build_loaders(config, self.train_set, self.val_set, self.batch_sampler,
                                                           self.world)
        if checkpoint:
            self._resume(checkpoint)

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, metrics: dict) -> dict:
        started, seconds_before = self._clock
        self.state.seconds = seconds_before + time.perf_counter() - started
        return {
            "run": dataclasses.asdict(self.state), "metrics": metrics, "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "batch_sampler": self.batch_sampler.state_dict(),
            "distillation": self.distillation.state_dict() if self.distillation else None, "rng": rng_state(),
        }  # fmt: skip

    def _resume(self, checkpoint: dict) -> None:
        """Continues from a checkpoint of read_resume_checkpoint: every state, and the log
        truncated to the checkpoint's step."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.batch_sampler.load_state_dict(checkpoint["batch_sampler"])
        if self.distillation is not None:
            self.distillation.load_state_dict(checkpoint["distillation"])
        set_rng_state(checkpoint["rng"])
        dropped = truncate_log(self.out / "log.jsonl", self.state.step) if self.rank == 0 else 0
        _say(f"resumed from {checkpoint['path']} after epoch {self.state.next_epoch}"
             + (f"; {dropped} log records of the interrupted epoch dropped" if dropped else ""))

    def where_to_resume(self) -> str:
        """A line for the user after an interruption: what is saved and how to continue."""
        if self.saved_epoch is None:
            return f"nothing was saved in {self.out} yet (a checkpoint is written after each epoch)"
        return (f"{self.out / 'last.pt'} holds the run after epoch {self.saved_epoch}; continue with "
                f"--out {self.out} --resume auto")

    # -- logging ----------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _log_step(self, epoch: int, loss: float, lr: float, rate: float, output, batch) -> None:
        """A train record, with HRNet's PCK of the batch's heatmaps against its targets."""
        _, pck, _ = target_pck(output, batch, self.codec)
        self._log({"kind": "train", "epoch": epoch + 1, "step": self.state.step, "loss": loss, "lr": lr,
                   "samples_per_s": rate, "pck": pck})

    # -- the loop ---------------------------------------------------------------------------------

    def _autocast(self):
        """Mixed precision for the forward passes when `amp` asks for it (CUDA only)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _train_epoch(self, epoch: int) -> list[float]:
        from tqdm import tqdm

        config = self.config
        self.batch_sampler.set_epoch(epoch)
        self.criterion.set_epoch(epoch)
        self.student.train()
        losses, samples, started = [], 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not config.progress or self.rank != 0, file=sys.stderr)
        for batch in bar:
            batch = batch.to(self.device)
            with self._autocast():
                output = self.student(batch.image)
            teacher = alpha = None
            if self.distillation is not None:
                with self._autocast():
                    teacher, alpha = self.distillation.fetch_teacher(inputs=batch.image, keys=batch.index,
                                                                     replayed=batch.replayed)
                self.distillation.store_predictions(output, keys=batch.index, replayed=batch.replayed)
            self._check_finite("the model's heatmaps are", [output], epoch, self.state.step + 1)
            target, target_weight = batch.targets
            loss = self.criterion(output, target, target_weight, teacher, alpha)
            self._check_finite("the loss is", [loss], epoch, self.state.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.distillation is not None:
                self.distillation.after_step()
            self.state.step += 1
            samples += batch.image.shape[0] * self.world
            losses.append(loss.item())
            rate, lr = samples / max(time.perf_counter() - started, 1e-9), self.optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{losses[-1]:.3g}", lr=f"{lr:.2g}", samples_per_s=f"{rate:.0f}")
            if self.state.step % config.log_every == 0:
                self._log_step(epoch, losses[-1], lr, rate, output, batch)
        if self.state.step % config.log_every != 0:  # the epoch's last iteration, so every epoch is in the log
            self._log_step(epoch, losses[-1], lr, rate, output, batch)
        return losses

    def _check_finite(self, what: str, tensors: list[torch.Tensor], epoch: int, step: int) -> None:
        """Raises TrainingDiverged when `tensors` hold a NaN or an infinity. The checkpoints on
        disk are of earlier epochs, checked the same way, and are kept."""
        if not bool(torch.stack([torch.isfinite(tensor.detach()).all() for tensor in tensors]).all()):
            raise TrainingDiverged(
                f"the loss diverged at step {step} (epoch {epoch + 1}): {what} not finite; "
                + self.where_to_resume().replace("continue with", "lower the learning rate, or continue with"))

    def fit(self) -> dict[str, float]:
        """Trains from the start (or the resumed epoch) to `epochs`, evaluating every
        `eval_every` epochs and after the last; returns the last metrics. A run that has
        trained `epochs` epochs already returns its metrics and writes nothing."""
        config = self.config
        if self.finished_metrics is not None:
            _say(f"the run in {self.out} has trained its {config.epochs} epochs; nothing to do (raise --epochs to "
                 "train on)")
            return self.finished_metrics
        if self.rank == 0:
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        _say(f"train: {self.split.train_report}; val: {self.split.val_report}; {self.world} process(es) on "
             f"{self.device}")
        metrics: dict[str, float] = {}
        for epoch in range(self.state.next_epoch, config.epochs):
            losses = self._train_epoch(epoch)
            self._check_finite("the weights are", list(self.model.parameters()), epoch, self.state.step)
            self.scheduler.step()
            if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
                metrics = self._evaluate(epoch, losses)
            self.state.next_epoch = epoch + 1
            if self.rank == 0:
                save_atomically(self._checkpoint(metrics), self.out / "last.pt")
                self.saved_epoch = epoch + 1
        if self.rank == 0:
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
            _say(f"metrics, plots, log and checkpoints are in {self.out.resolve()}")
        return metrics

    def _evaluate(self, epoch: int, losses: list[float]) -> dict[str, float]:
        """Validation metrics after `epoch`: logged, printed, plotted, and a new best.pt when the
        headline metric improved."""
        metrics, first_batch = evaluate(self.student, self.val_loader, self.config, self.device, self.split,
                                        self.codec)
        metrics = {key: float(value) for key, value in metrics.items()}
        self._log({"kind": "val", "epoch": epoch + 1, "step": self.state.step, **metrics})
        _say(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4g}, "
             + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key in ("AP", "AP50", "PCKh@0.5", "pck")))
        _, headline = headline_metric(metrics)
        if self.rank == 0 and headline > self.state.best_metric:
            self.state.best_metric = headline
            self.state.next_epoch = epoch + 1
            save_atomically(self._checkpoint(metrics), self.out / "best.pt")
        if self.rank == 0 and first_batch is not None:
            self._plot(first_batch)
        return metrics

    def close(self) -> None:
        """Ends a distributed run: the DDP model is released while the process group still exists,
        then the group is destroyed (the other order can leave gloo waiting for a peer at exit)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            self.student = self.distillation = None
            torch.distributed.destroy_process_group()

    def _plot(self, first_batch: dict) -> None:
        from . import plots

        plots.plot_training_curves(self.out / "log.jsonl", self.out / "curves.png")
        plots.plot_predictions(first_batch["images"], first_batch["heatmaps"], first_batch["keypoints"],
                               first_batch["scores"], self.out / "predictions.png")
