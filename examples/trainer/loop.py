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
from hgloss.pose import evaluation, models

from . import distributed
from .checkpoints import RunState, load_checkpoint, rng_state, save_atomically, seed_everything, set_rng_state
from .config import TrainConfig
from .data import DataSplit, build_codec, build_datasets, build_loaders, load_split
from .evaluate import evaluate, headline_metric
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


def _say(text: str) -> None:
    if distributed.rank() == 0:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains, evaluates and writes the outputs."""

    def __init__(self, config: TrainConfig, resume: str | None = None) -> None:
        self.config = config
        self.device = distributed.set_up(config)
        self.rank, self.world = distributed.rank(), distributed.world()
        self.out = Path(config.out)
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
        self.state = RunState()
        if resume:
            self._resume(resume)

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, metrics: dict) -> dict:
        return {
            "run": dataclasses.asdict(self.state), "metrics": metrics, "config": dataclasses.asdict(self.config),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "batch_sampler": self.batch_sampler.state_dict(),
            "distillation": self.distillation.state_dict() if self.distillation else None, "rng": rng_state(),
        }  # fmt: skip

    def _resume(self, path: str) -> None:
        if path == "auto":
            path = str(self.out / "last.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        checkpoint = load_checkpoint(path, self.device)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.batch_sampler.load_state_dict(checkpoint["batch_sampler"])
        if self.distillation is not None:
            self.distillation.load_state_dict(checkpoint["distillation"])
        set_rng_state(checkpoint["rng"])
        self.state = RunState(**checkpoint["run"])
        _say(f"resumed from {path} after epoch {self.state.next_epoch}")

    # -- logging ----------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def _log_step(self, epoch: int, loss: float, lr: float, rate: float, output, target) -> None:
        """A train record, with HRNet's PCK of the batch's heatmaps against its targets."""
        _, pck, _ = evaluation.heatmap_pck(output.detach().float().cpu(), target.cpu())
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
            loss = self.criterion(output, batch.target, batch.target_weight, teacher, alpha)
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
                self._log_step(epoch, losses[-1], lr, rate, output, batch.target)
        if self.state.step % config.log_every != 0:  # the epoch's last iteration, so every epoch is in the log
            self._log_step(epoch, losses[-1], lr, rate, output, batch.target)
        return losses

    def fit(self) -> dict[str, float]:
        """Trains from the start (or the resumed epoch) to `epochs`, evaluating every
        `eval_every` epochs and after the last; returns the last metrics."""
        config = self.config
        if self.rank == 0:
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        _say(f"train: {self.split.train_report}; val: {self.split.val_report}; {self.world} process(es) on "
             f"{self.device}")
        metrics: dict[str, float] = {}
        for epoch in range(self.state.next_epoch, config.epochs):
            losses = self._train_epoch(epoch)
            self.scheduler.step()
            if (epoch + 1) % config.eval_every == 0 or epoch == config.epochs - 1:
                metrics = self._evaluate(epoch, losses)
            self.state.next_epoch = epoch + 1
            if self.rank == 0:
                save_atomically(self._checkpoint(metrics), self.out / "last.pt")
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
