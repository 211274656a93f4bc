"""Replay self-distillation: PredictionBank keeps the predictions of fresh samples until they come
back, and ReplayDistillation ties the bank, the ReplayBatchSampler and the schedule together."""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ._checks import as_flag_list, as_key_list, check_int
from .sampler import ReplayBatchSampler
from .schedule import SteppingSchedule, check_optimizer, check_schedule, largest_lr


class PredictionBank:
    """Detached predictions of fresh samples, kept until they are replayed as teacher heatmaps.

    Storage is float16 (``STORAGE_DTYPE``) on the device the predictions came from: heatmaps
    lie in about [0, 1], where float16 keeps three significant digits, and the bank costs half
    the memory of float32. The loss accepts the float16 teacher as it is.

    Eviction: every ``store`` call is one batch. The bank keeps the last ``capacity_batches``
    batches and drops older ones, so a key stored at iteration j can be fetched up to iteration
    j + capacity_batches when the fetch comes before the store of that iteration (as in
    ReplayDistillation). Keep ``capacity_batches`` at least the largest distance in use; memory is
    at most ``capacity_batches * fresh samples per batch * K * H * W * 2`` bytes. Storing a key
    again replaces its entry.

    Args:
        capacity_batches: the number of most recent batches kept, >= 1; may be raised or lowered
            later by assignment.
    """

    STORAGE_DTYPE = torch.float16

    def __init__(self, capacity_batches: int) -> None:
        self._batches: OrderedDict[int, tuple[list[int], torch.Tensor]] = OrderedDict()
        self._location: dict[int, tuple[int, int]] = {}
        self.stored_batches = 0
        self.capacity_batches = capacity_batches

    @property
    def capacity_batches(self) -> int:
        return self._capacity_batches

    @capacity_batches.setter
    def capacity_batches(self, value: int) -> None:
        self._capacity_batches = check_int("capacity_batches", value, 1)
        self._evict()

    def __len__(self) -> int:
        """The number of keys held."""
        return len(self._location)

    def _evict(self) -> None:
        oldest_kept = self.stored_batches - self._capacity_batches
        while self._batches and next(iter(self._batches)) < oldest_kept:
            batch_number, (keys, _) = self._batches.popitem(last=False)
            for key in keys:
                if self._location[key][0] == batch_number:
                    del self._location[key]

    def store(self, keys: torch.Tensor | Sequence[int], heatmaps: torch.Tensor) -> None:
        """Keep ``heatmaps[i]`` (detached, float16) under ``keys[i]``; counts as one batch.

        Args:
            keys: n distinct integer keys, e.g. the sample indices of the fresh samples.
            heatmaps: (n, ...) predictions of those samples, any floating dtype.
        """
        keys = as_key_list(keys)
        if not heatmaps.is_floating_point():
            raise TypeError(f"heatmaps must have a floating dtype, got {heatmaps.dtype}")
        if heatmaps.dim() < 1 or heatmaps.shape[0] != len(keys):
            raise ValueError(f"got {len(keys)} keys for heatmaps of shape {tuple(heatmaps.shape)}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct within a batch, got {keys}")
        batch_number = self.stored_batches
        self.stored_batches += 1
        # copy=True: a float16 prediction would otherwise be kept by reference and could change.
        self._batches[batch_number] = (keys, heatmaps.detach().to(self.STORAGE_DTYPE, copy=True))
        for row, key in enumerate(keys):
            self._location[key] = (batch_number, row)
        self._evict()

    def fetch(
        self, keys: torch.Tensor | Sequence[int], replayed: torch.Tensor | Sequence[bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The stored heatmaps of a batch's replayed samples.

        Args:
            keys: the B keys of the batch.
            replayed: B flags; only the flagged keys are looked up.

        Returns:
            heatmaps: (B, ...) float16 on the stored predictions' device, the stored heatmap
                where replayed and zeros elsewhere; None when no sample is replayed.
            mask: (B,) bool, True where a heatmap was returned; on the heatmaps' device, or on
                the device of ``replayed`` (CPU for a sequence) when heatmaps is None.

        Raises:
            KeyError: naming a replayed key that is not held (never stored, or evicted).
        """
        keys = as_key_list(keys)
        flags = as_flag_list(replayed)
        if len(flags) != len(keys):
            raise ValueError(f"got {len(keys)} keys and {len(flags)} replayed flags")
        mask = torch.tensor(flags, dtype=torch.bool)
        if isinstance(replayed, torch.Tensor):
            mask = mask.to(replayed.device)
        positions = [position for position, flag in enumerate(flags) if flag]
        if not positions:
            return None, mask
        rows = []
        for position in positions:
            key = keys[position]
            if key not in self._location:
                raise KeyError(
                    f"key {key} is not in the prediction bank: it was never stored, or it was stored "
                    f"more than capacity_batches={self._capacity_batches} batches ago and dropped"
                )
            batch_number, row = self._location[key]
            rows.append(self._batches[batch_number][1][row])
        stacked = torch.stack(rows)
        heatmaps = stacked.new_zeros((len(keys), *stacked.shape[1:]))
        heatmaps[torch.tensor(positions, device=stacked.device)] = stacked
        return heatmaps, mask.to(stacked.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity_batches": self._capacity_batches,
            "stored_batches": self.stored_batches,
            "batch_numbers": list(self._batches),
            "keys": [keys for keys, _ in self._batches.values()],
            "heatmaps": [heatmaps for _, heatmaps in self._batches.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = OrderedDict(
            (int(number), (list(keys), heatmaps))
            for number, keys, heatmaps in zip(state["batch_numbers"], state["keys"], state["heatmaps"])
        )
        self._location = {
            key: (number, row) for number, (keys, _) in self._batches.items() for row, key in enumerate(keys)
        }
        self.stored_batches = int(state["stored_batches"])
        self.capacity_batches = int(state["capacity_batches"])



class ReplayDistillation:
    """Self-distillation without an extra forward pass: the teacher of a replayed sample is the
    prediction the student made for it, with the same augmentation, ``distance`` iterations
    earlier.

    ``batch_sampler`` (a ReplayBatchSampler) feeds the DataLoader; ``bank`` (a PredictionBank,
    its capacity following the distance) keeps the predictions. Per iteration, call
    ``fetch_teacher`` before the loss, ``store_predictions`` with the batch's predictions, and
    ``after_step`` after the optimizer step (and after a per-iteration lr scheduler's step). The
    same three calls drive SnapshotDistillation, so a training loop need not know which one it
    has: each takes the arguments it needs and ignores the others.

    Under DistributedDataParallel, build one per rank: the learning rate is the same on every
    rank, so the schedules agree without communication; the sampler shards the data like
    DistributedSampler and every rank draws the same number of batches.

    Args:
        schedule: the SteppingSchedule.
        optimizer: the optimizer whose learning rate drives the schedule.
        batch_sampler: the ReplayBatchSampler of the training loader, built on ``schedule``.

    Example::

        class PoseDataset(torch.utils.data.Dataset):
            def __getitem__(self, item):
                index, aug_seed, replayed = item
                rng = np.random.default_rng(aug_seed)     # a replayed sample gets the same crop
                image, target, target_weight = self.load_and_augment(index, rng)
                return image, target, target_weight, index, replayed

        schedule = SteppingSchedule(distance0=1, step_factor=2, alpha=0.5, warmup_steps=1000)
        sampler = ReplayBatchSampler(len(dataset), 32, schedule, replay_fraction=0.5)
        distill = ReplayDistillation(schedule, optimizer, sampler)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=8)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for images, targets, target_weights, indices, replayed in loader:
                outputs = model(images)
                teacher, alpha = distill.fetch_teacher(keys=indices, replayed=replayed)
                distill.store_predictions(outputs, keys=indices, replayed=replayed)
                loss = hgloss.heatmap_gradient_loss(outputs, targets, target_weights,
                                                    teacher=teacher, alpha=alpha)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                distill.after_step()
            lr_scheduler.step()
            torch.save({"model": model.state_dict(), "distill": distill.state_dict()}, path)
    """

    def __init__(self, schedule: SteppingSchedule, optimizer: torch.optim.Optimizer,
                 batch_sampler: ReplayBatchSampler) -> None:
        check_schedule(schedule)
        check_optimizer(optimizer)
        if not isinstance(batch_sampler, ReplayBatchSampler) or batch_sampler.schedule is not schedule:
            raise ValueError("batch_sampler must be a ReplayBatchSampler built on the same schedule")
        self.schedule = schedule
        self.optimizer = optimizer
        self.batch_sampler = batch_sampler
        self.bank = PredictionBank(schedule.distance)

    def fetch_teacher(self, *, keys: torch.Tensor | Sequence[int], replayed: torch.Tensor | Sequence[bool],
                      **_unused: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher heatmaps of the batch (the stored predictions of its replayed samples,
        zeros elsewhere; None when nothing is replayed) and the (B,) float32 alpha:
        ``schedule.alpha`` where a sample has a teacher, 0 elsewhere.

        Args:
            keys: the sample indices of the batch (the sampler's first element).
            replayed: the sampler's replayed flags of the batch.
        """
        teacher, has_teacher = self.bank.fetch(keys, replayed)
        return teacher, has_teacher.to(torch.float32) * self.schedule.alpha

    def store_predictions(self, predictions: torch.Tensor, *, keys: torch.Tensor | Sequence[int],
                          replayed: torch.Tensor | Sequence[bool], **_unused: Any) -> None:
        """Keep the (detached) predictions of the batch's fresh samples until they are replayed;
        call after fetch_teacher, once per iteration."""
        key_list, flags = as_key_list(keys), as_flag_list(replayed)
        if len(key_list) != predictions.shape[0] or len(flags) != predictions.shape[0]:
            raise ValueError(f"got {len(key_list)} keys and {len(flags)} replayed flags for a batch of "
                             f"{predictions.shape[0]}")
        fresh = [position for position, flag in enumerate(flags) if not flag]
        self.bank.store([key_list[position] for position in fresh],
                        predictions.detach()[torch.tensor(fresh, dtype=torch.long, device=predictions.device)])

    def after_step(self) -> None:
        """Feed the learning rate to the schedule (the largest over param groups) and let the
        bank's capacity follow the distance."""
        self.schedule.observe_lr(largest_lr(self.optimizer))
        self.bank.capacity_batches = self.schedule.distance

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "sampler": self.batch_sampler.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.batch_sampler.load_state_dict(state["sampler"])
        self.bank.load_state_dict(state["bank"])
