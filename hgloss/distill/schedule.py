"""SteppingSchedule: the teacher-student distance, stepping up as the learning rate decays, and
the blend alpha."""

import math
from collections.abc import Sequence
from typing import Any

from ._checks import check_int, check_real


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
        self.steps = int(state["steps"])
        self.stepping_events = int(state["stepping_events"])
        self.reference_lr = None if state["reference_lr"] is None else float(state["reference_lr"])


def check_schedule(schedule: Any) -> SteppingSchedule:
    if not isinstance(schedule, SteppingSchedule):
        raise ValueError(f"schedule must be a SteppingSchedule, got {type(schedule).__name__}")
    return schedule


def check_optimizer(optimizer: Any) -> Any:
    if not hasattr(optimizer, "param_groups"):
        raise ValueError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def largest_lr(optimizer: Any) -> float:
    """The learning rate a schedule observes: the largest over the optimizer's param groups."""
    return max(group["lr"] for group in optimizer.param_groups)
