"""SteppingSchedule: the teacher-student distance, stepping up as the learning rate decays, and
the blend alpha."""

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch

from ._checks import check_fields, check_int, check_real


class SteppingSchedule:
    """Teacher-student distance that steps up as the learning rate decays, and the blend alpha.

    The distance is counted in optimizer steps (snapshot mode) or iterations (replay mode; one
    iteration is one optimizer step). It starts at ``distance0`` and, at each stepping event, is
    multiplied by ``step_factor`` or moves to the next entry of ``distances``. A stepping event
    happens when the learning rate has fallen to at most ``decay_ratio`` times the learning rate
    recorded at the previous event. With the default ``decay_ratio=0.5``, each 10x drop of
    MultiStepLR is one event, and a cosine or polynomial decay gives one event per halving.
    Nothing here depends on the scheduler: any change of the learning rate, by hand included,
    is judged the same way.

    A rise of the learning rate (linear warm-up, a restart, a hand-set increase) raises the
    recorded learning rate, so the next decay is measured from the peak. Without that, a warm-up
    that starts at 0.001x the base rate would leave the distance at ``distance0`` for the whole
    run. The distance never decreases.

    A decay towards zero (cosine with ``eta_min=0``) keeps halving to the last step and so keeps
    doubling the distance; an explicit ``distances`` list caps it, because its last entry holds.

    alpha, for the optimizer step about to be taken: 0 during the first ``warmup_steps`` steps,
    then a linear ramp to ``alpha`` over ``alpha_ramp_steps`` steps (PS-KD style: alpha / n,
    2 alpha / n, ..., alpha), then ``alpha``.

    Under DistributedDataParallel every rank observes the same learning rate, so every rank
    computes the same distance and alpha without communicating.

    Args:
        distance0: the first distance, an int >= 1.
        step_factor: the distance's multiplier at each stepping event, an int >= 1.
        distances: an explicit non-decreasing list of distances instead: the distance starts at
            ``distances[0]``, each event moves to the next entry, and the last entry holds. Leave
            ``distance0`` and ``step_factor`` at their defaults when giving it.
        decay_ratio: in (0, 1); the fraction of the recorded learning rate that triggers an event.
        alpha: the teacher's weight in the soft target once ramped up, in [0, 1].
        alpha_ramp_steps: steps of the linear ramp of alpha, >= 0 (0: no ramp).
        warmup_steps: steps with alpha = 0 before the ramp, >= 0.

    Example::

        >>> schedule = SteppingSchedule(distance0=1, step_factor=2, alpha=0.5, warmup_steps=500)
        >>> for images, targets in loader:
        ...     ...  # forward with schedule.distance and schedule.alpha, backward, step
        ...     lr_scheduler.step()
        ...     schedule.observe_lr(optimizer.param_groups[0]["lr"])
    """

    def __init__(
        self,
        distance0: int = 1,
        step_factor: int = 2,
        distances: Sequence[int] | None = None,
        decay_ratio: float = 0.5,
        alpha: float = 0.5,
        alpha_ramp_steps: int = 0,
        warmup_steps: int = 0,
    ) -> None:
        self.distance0 = check_int("distance0", distance0, 1)
        self.step_factor = check_int("step_factor", step_factor, 1)
        if distances is not None:
            if self.distance0 != 1 or self.step_factor != 2:
                raise ValueError(
                    "give either distances or distance0/step_factor, not both: distances[0] is the "
                    f"first distance (got distance0={distance0!r}, step_factor={step_factor!r})"
                )
            distances = [check_int("each entry of distances", entry, 1) for entry in distances]
            if not distances:
                raise ValueError("distances must not be empty")
            if any(later < earlier for earlier, later in zip(distances, distances[1:])):
                raise ValueError(f"distances must be non-decreasing, got {distances}")
        self.distances = distances
        self.decay_ratio = check_real("decay_ratio", decay_ratio, 0.0, 1.0, low_open=True, high_open=True)
        self.alpha_max = check_real("alpha", alpha, 0.0, 1.0)
        self.alpha_ramp_steps = check_int("alpha_ramp_steps", alpha_ramp_steps, 0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)

        self.steps = 0
        self.stepping_events = 0
        self.reference_lr: float | None = None

    @property
    def distance(self) -> int:
        """The current teacher-student distance, in optimizer steps."""
        if self.distances is not None:
            return self.distances[min(self.stepping_events, len(self.distances) - 1)]
        return self.distance0 * self.step_factor**self.stepping_events

    @property
    def alpha(self) -> float:
        """The blend for the optimizer step about to be taken (the ``steps``-th, 0-based)."""
        steps_after_warmup = self.steps - self.warmup_steps
        if steps_after_warmup < 0:
            return 0.0
        if steps_after_warmup < self.alpha_ramp_steps:
            return self.alpha_max * (steps_after_warmup + 1) / self.alpha_ramp_steps
        return self.alpha_max

    def observe_lr(self, lr: float) -> None:
        """Record the learning rate after an optimizer step; call exactly once per step."""
        lr = float(lr)
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        self.steps += 1
        if self.reference_lr is None or lr > self.reference_lr:
            self.reference_lr = lr
        elif self.reference_lr > 0 and lr <= self.decay_ratio * self.reference_lr:
            # One event however deep the drop, so a 10x MultiStepLR drop steps once, not 3 times.
            self.stepping_events += 1
            self.reference_lr = lr

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "stepping_events": self.stepping_events, "reference_lr": self.reference_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError and changes nothing."""
        self._checked_load(state, "state")()

    def _checked_load(self, state: Any, where: str) -> Callable[[], None]:
        """Check `state` (named `where` in errors) and return the function that loads it; nothing
        changes before that call, so a caller can check all the parts of its state first."""
        check_fields(where, state, ("steps", "stepping_events", "reference_lr"))
        steps = check_int(f"{where}['steps']", state["steps"], 0)
        stepping_events = check_int(f"{where}['stepping_events']", state["stepping_events"], 0)
        if stepping_events > steps:
            raise ValueError(
                f"{where}['stepping_events'] must not exceed {where}['steps'] ({steps}), since each event "
                f"happens at an observed step; got {stepping_events}"
            )
        reference_lr = state["reference_lr"]
        # The first observed lr becomes the reference, so it is None exactly while no step was observed.
        if (reference_lr is None) != (steps == 0):
            raise ValueError(
                f"{where}['reference_lr'] must be None exactly when {where}['steps'] is 0, "
                f"got {reference_lr!r} with {steps} steps"
            )
        if reference_lr is not None:
            reference_lr = check_real(f"{where}['reference_lr']", reference_lr, 0.0, math.inf, high_open=True)

        def load() -> None:
            self.steps, self.stepping_events, self.reference_lr = steps, stepping_events, reference_lr

        return load


def check_schedule(schedule: Any) -> SteppingSchedule:
    if not isinstance(schedule, SteppingSchedule):
        raise ValueError(f"schedule must be a SteppingSchedule, got {type(schedule).__name__}")
    return schedule


def check_optimizer(optimizer: Any) -> Any:
    """Refuse what is not an optimizer, and an optimizer with a bad learning rate in any group (at
    construction, rather than at the end of the first step)."""
    if not hasattr(optimizer, "param_groups"):
        raise ValueError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    largest_lr(optimizer)
    return optimizer


def largest_lr(optimizer: Any) -> float:
    """The learning rate a schedule observes: the largest over the optimizer's param groups.

    Every group's lr must be a finite number >= 0 (0 for a frozen group or the start of a warm-up).
    Each is checked, not only the largest: max() passes over a NaN that is not first, so a
    diverged second group would otherwise go unnoticed.
    """
    lrs = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:  # torch optimizers accept a tensor lr
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"optimizer.param_groups[{index}]['lr'] must be a finite number >= 0, got {lr!r}")
        lrs.append(float(lr))
    if not lrs:
        raise ValueError("optimizer has no param groups, so no learning rate to observe")
    return max(lrs)
