"""Snapshot self-distillation: SnapshotTeacher is a frozen copy of the model, refreshed every
`distance` optimizer steps, and SnapshotDistillation drives it from the schedule."""

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._checks import check_fields, check_int, unwrap
from .schedule import SteppingSchedule, check_optimizer, check_schedule, largest_lr


class SnapshotTeacher:
    """A frozen copy of the model, at most ``schedule.distance`` optimizer steps behind it.

    ``teacher(inputs)`` runs the copy under ``torch.no_grad()``. The copy has its own parameters
    and buffers (requires_grad off, never seen by the optimizer), so it neither receives gradients
    nor touches the student's BatchNorm statistics. For a model wrapped in DistributedDataParallel
    or DataParallel, the underlying ``.module`` is copied, so teacher calls do not go through the
    wrapper's gradient synchronisation.

    Train mode: the copy always runs in train mode. Then S is what the network computed for the
    sample during training, as in replay mode (the bank stores training-forward predictions),
    and BatchNorm normalises with the batch's statistics on both sides, so teacher and student
    differ only by the weights. Eval mode would use running statistics, which lag behind the
    weights early in training. This is a design choice, not a measured result. Consequences:
    dropout and drop-path are active in the teacher too, and SyncBatchNorm layers in the copy
    synchronise, so every rank must call the teacher equally often (SnapshotDistillation calls it
    once per iteration on every rank). The copy's own running statistics are updated by its
    forward passes and overwritten at the next refresh.

    Lag: let ``lag`` be the number of optimizer steps between the copy's weights and the
    student's. ``after_step()`` counts a step. Once ``lag >= schedule.distance``, the next
    teacher call first computes its output with the old copy and then refreshes the copy from
    the student's current weights (those of this iteration's student forward). So the outputs
    come from a copy 1, 2, ..., ``distance`` steps old, in turn. Refreshing inside
    ``after_step()`` instead would copy the weights the student is about to use, a lag of 0 at
    the next iteration and no teacher at all at distance 1. Call the teacher once per
    iteration; a second call after a refresh would see lag 0. At the very start the copy equals
    the student (lag 0); ``has_teacher`` is false until one step has passed.

    Args:
        model: the student, plain or wrapped in (Distributed)DataParallel.
        schedule: supplies the distance, read at each teacher call.
    """

    def __init__(self, model: nn.Module, schedule: SteppingSchedule) -> None:
        self.student = unwrap(model)
        self.schedule = schedule
        self.model = copy.deepcopy(self.student)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        self.model.train()
        self.steps = 0
        self.copy_step = 0

    @property
    def lag(self) -> int:
        """Optimizer steps between the copy's weights and the student's."""
        return self.steps - self.copy_step

    @property
    def has_teacher(self) -> bool:
        """Whether the copy differs from the student, i.e. at least one step has passed."""
        return self.lag >= 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            outputs = self.model(*args, **kwargs)
        if self.lag >= self.schedule.distance:
            self.model.load_state_dict(self.student.state_dict())
            self.copy_step = self.steps
        return outputs

    def after_step(self) -> None:
        """Count one optimizer step; call after each ``optimizer.step()``."""
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "steps": self.steps, "copy_step": self.copy_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError and changes nothing."""
        self._checked_load(state, "state")()

    def _checked_load(self, state: Any, where: str) -> Callable[[], None]:
        """Check `state` (named `where` in errors) and return the function that loads it; nothing
        changes before that call, so a caller can check all the parts of its state first.

        The copy's tensors are checked here by name and shape: Module.load_state_dict reports a
        shape mismatch only after copying the tensors before it.
        """
        check_fields(where, state, ("model", "steps", "copy_step"))
        model_state, own = state["model"], self.model.state_dict()
        if not isinstance(model_state, Mapping):
            raise ValueError(f"{where}['model'] must be a state dict, got {type(model_state).__name__}")
        missing, unexpected = sorted(set(own) - set(model_state)), sorted(set(model_state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{where}['model'] is of another model: missing {missing}, unexpected {unexpected}")
        for name, tensor in own.items():
            loaded = model_state[name]
            if not isinstance(loaded, torch.Tensor) or loaded.shape != tensor.shape:
                shape = tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else type(loaded).__name__
                raise ValueError(f"{where}['model'][{name!r}] must have shape {tuple(tensor.shape)}, got {shape}")
        steps = check_int(f"{where}['steps']", state["steps"], 0)
        copy_step = check_int(f"{where}['copy_step']", state["copy_step"], 0)
        if copy_step > steps:
            raise ValueError(f"{where}['copy_step'] must not exceed {where}['steps'] ({steps}), got {copy_step}")

        def load() -> None:
            self.model.load_state_dict(model_state)
            self.steps, self.copy_step = steps, copy_step

        return load


class SnapshotDistillation:
    """Self-distillation with any model and any data pipeline: the teacher is a frozen copy of the
    student (SnapshotTeacher), refreshed every ``distance`` optimizer steps, run without grad on
    the batch's inputs: one extra forward pass per iteration.

    The calls are ReplayDistillation's: ``fetch_teacher`` before the loss, ``store_predictions``
    (nothing to store here), ``after_step`` after the optimizer step.

    Args:
        schedule: the SteppingSchedule.
        optimizer: the optimizer whose learning rate drives the schedule.
        model: the student, plain or DDP-wrapped; its output must be the (B, K, H, W) heatmaps.

    Example::

        distill = SnapshotDistillation(SteppingSchedule(distance0=500), optimizer, model)
        for images, targets, target_weights in loader:
            outputs = model(images)
            teacher, alpha = distill.fetch_teacher(inputs=images)
            loss = hgloss.heatmap_gradient_loss(outputs, targets, target_weights, teacher=teacher, alpha=alpha)
            ...
            optimizer.step()
            distill.after_step()
    """

    def __init__(self, schedule: SteppingSchedule, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        check_schedule(schedule)
        check_optimizer(optimizer)
        self.schedule = schedule
        self.optimizer = optimizer
        self.snapshot = SnapshotTeacher(model, schedule)

    def fetch_teacher(self, *, inputs: Any, **_unused: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy's heatmaps for `inputs` and the (B,) float32 alpha: ``schedule.alpha`` once one
        step has passed (the copy then differs from the student), 0 before."""
        has_teacher = self.snapshot.has_teacher  # read before the call, which may refresh the copy
        teacher = self.snapshot(inputs)
        alpha = self.schedule.alpha if has_teacher else 0.0
        return teacher, torch.full((teacher.shape[0],), alpha, dtype=torch.float32, device=teacher.device)

    def store_predictions(self, predictions: torch.Tensor, **_unused: Any) -> None:
        """Nothing to keep: the snapshot predicts its teacher afresh."""

    def after_step(self) -> None:
        """Feed the learning rate to the schedule (the largest over param groups, each checked) and
        count the step for the snapshot."""
        self.schedule.observe_lr(largest_lr(self.optimizer))
        self.snapshot.after_step()

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "snapshot": self.snapshot.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError naming the field, and
        then neither the schedule nor the snapshot has changed."""
        check_fields("state", state, ("schedule", "snapshot"))
        loads = [self.schedule._checked_load(state["schedule"], "state['schedule']"),
                 self.snapshot._checked_load(state["snapshot"], "state['snapshot']")]
        for load in loads:
            load()
