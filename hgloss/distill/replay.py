"""Replay self-distillation: PredictionBank keeps the predictions of fresh samples until they come
back, and ReplayDistillation ties the bank, the ReplayBatchSampler and the schedule together."""

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._checks import as_flag_list, as_key_list, check_fields, check_int
from .sampler import ReplayBatchSampler
from .schedule import SteppingSchedule, check_optimizer, check_schedule, largest_lr


class PredictionBank:
    """Detached predictions of fresh samples, kept until they are replayed as teacher heatmaps.

    Storage is float16 (``STORAGE_DTYPE``) on the device the predictions came from: heatmaps
    lie in about [0, 1], where float16 keeps three significant digits, and the bank costs half
    the memory of float32. The loss accepts the float16 teacher as it is.

    Every ``store`` call is one batch. An entry leaves the bank when

    - ``discard`` names its key (ReplayDistillation discards a replayed sample's entry, which
      has served: a sample comes back once per time it is fresh);
    - ``clear`` is called (ReplayDistillation clears the bank when the sampler begins a new pass,
      since replays never cross one);
    - its key is stored again (the new entry replaces it);
    - its batch falls out of the last ``capacity_batches`` batches. A key stored at iteration j
      can thus be fetched up to iteration j + capacity_batches when the fetch comes before the
      store of that iteration (as in ReplayDistillation); keep ``capacity_batches`` at least the
      largest distance in use.

    A batch's memory is freed when its last entry leaves. Memory is at most
    ``capacity_batches * keys per batch * K * H * W * 2`` bytes; under ReplayDistillation, which
    stores only the samples scheduled to come back, it is that of the pending replays.

    Args:
        capacity_batches: the number of most recent batches kept, >= 1; may be raised or lowered
            later by assignment.
    """

    STORAGE_DTYPE = torch.float16

    def __init__(self, capacity_batches: int) -> None:
        # batch number -> (keys, heatmaps) as stored; rows of keys that have left stay until the batch goes
        self._batches: OrderedDict[int, tuple[list[int], torch.Tensor]] = OrderedDict()
        self._location: dict[int, tuple[int, int]] = {}  # key -> (batch number, row) of its entry
        self._held: dict[int, int] = {}  # batch number -> how many of its keys are still held
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

    def _forget(self, key: int) -> None:
        batch_number, _ = self._location.pop(key)
        self._held[batch_number] -= 1
        if not self._held[batch_number]:
            del self._held[batch_number], self._batches[batch_number]

    def _evict(self) -> None:
        oldest_kept = self.stored_batches - self._capacity_batches
        while self._batches and next(iter(self._batches)) < oldest_kept:
            batch_number, (keys, _) = self._batches.popitem(last=False)
            del self._held[batch_number]
            for key in keys:
                if self._location.get(key, (None,))[0] == batch_number:
                    del self._location[key]

    def _add(self, batch_number: int, keys: list[int], heatmaps: torch.Tensor) -> None:
        for key in keys:
            if key in self._location:
                self._forget(key)
        self._batches[batch_number] = (keys, heatmaps)
        self._held[batch_number] = len(keys)
        for row, key in enumerate(keys):
            self._location[key] = (batch_number, row)

    def _row_shape(self) -> torch.Size | None:
        """The shape of one held heatmap, None when the bank is empty."""
        return next(iter(self._batches.values()))[1].shape[1:] if self._batches else None

    def store(self, keys: torch.Tensor | Sequence[int], heatmaps: torch.Tensor) -> None:
        """Keep ``heatmaps[i]`` (detached, float16) under ``keys[i]``; counts as one batch.

        Args:
            keys: n distinct integer keys, e.g. the sample indices of the fresh samples; n may be 0.
            heatmaps: (n, ...) predictions of those samples, any floating dtype, each of the shape
                of the heatmaps already held.
        """
        keys = as_key_list(keys)
        if not heatmaps.is_floating_point():
            raise TypeError(f"heatmaps must have a floating dtype, got {heatmaps.dtype}")
        if heatmaps.dim() < 1 or heatmaps.shape[0] != len(keys):
            raise ValueError(f"got {len(keys)} keys for heatmaps of shape {tuple(heatmaps.shape)}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"keys must be distinct within a batch, got {keys}")
        row_shape = self._row_shape()
        if keys and row_shape is not None and heatmaps.shape[1:] != row_shape:
            # fetch stacks entries of different batches, so they must agree
            raise ValueError(
                f"heatmaps must be ({len(keys)}, {', '.join(map(str, row_shape))}) like those held, "
                f"got {tuple(heatmaps.shape)}"
            )
        batch_number = self.stored_batches
        self.stored_batches += 1
        if keys:
            # copy=True: a float16 prediction would otherwise be kept by reference and could change.
            self._add(batch_number, keys, heatmaps.detach().to(self.STORAGE_DTYPE, copy=True))
        self._evict()

    def discard(self, keys: torch.Tensor | Sequence[int]) -> None:
        """Drop the entries of ``keys`` (integer keys); keys not held are passed over."""
        for key in as_key_list(keys):
            if key in self._location:
                self._forget(key)

    def clear(self) -> None:
        """Drop every entry; ``stored_batches`` goes on counting."""
        self._batches.clear()
        self._location.clear()
        self._held.clear()

    def fetch(
        self, keys: torch.Tensor | Sequence[int], replayed: torch.Tensor | Sequence[bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The stored heatmaps of a batch's replayed samples.

        Args:
            keys: the B integer keys of the batch.
            replayed: B flags; only the flagged keys are looked up.

        Returns:
            heatmaps: (B, ...) float16 on the stored predictions' device, the stored heatmap
                where replayed and zeros elsewhere; None when no sample is replayed.
            mask: (B,) bool, True where a heatmap was returned; on the heatmaps' device, or on
                the device of ``replayed`` (CPU for a sequence) when heatmaps is None.

        Raises:
            KeyError: naming a replayed key that is not held (never stored, discarded, cleared
                or evicted).
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
                    f"key {key} is not in the prediction bank: it was never stored, it was discarded or "
                    f"cleared, or it was stored more than capacity_batches={self._capacity_batches} batches "
                    "ago and dropped"
                )
            batch_number, row = self._location[key]
            rows.append(self._batches[batch_number][1][row])
        stacked = torch.stack(rows)
        heatmaps = stacked.new_zeros((len(keys), *stacked.shape[1:]))
        heatmaps[torch.tensor(positions, device=stacked.device)] = stacked
        return heatmaps, mask.to(stacked.device)

    def state_dict(self) -> dict[str, Any]:
        """The held entries, batch by batch, with the counters that decide eviction."""
        batch_numbers, key_lists, heatmap_list = [], [], []
        for batch_number, (keys, heatmaps) in self._batches.items():
            rows = [row for row, key in enumerate(keys) if self._location.get(key) == (batch_number, row)]
            if len(rows) < len(keys):  # only what is still held
                keys, heatmaps = [keys[row] for row in rows], heatmaps[rows]
            batch_numbers.append(batch_number)
            key_lists.append(keys)
            heatmap_list.append(heatmaps)
        return {
            "capacity_batches": self._capacity_batches,
            "stored_batches": self.stored_batches,
            "batch_numbers": batch_numbers,
            "keys": key_lists,
            "heatmaps": heatmap_list,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError and changes nothing."""
        self._checked_load(state, "state")()

    def _checked_load(self, state: Any, where: str) -> Callable[[], None]:
        """Check `state` (named `where` in errors) and return the function that loads it; nothing
        changes before that call, so a caller can check all the parts of its state first.

        A key may be held by two batches in states saved before entries were dropped on
        replacement; the later batch's entry is the one kept, as it was then.
        """
        fields = ("batch_numbers", "keys", "heatmaps")
        check_fields(where, state, ("capacity_batches", "stored_batches", *fields))
        capacity_batches = check_int(f"{where}['capacity_batches']", state["capacity_batches"], 1)
        stored_batches = check_int(f"{where}['stored_batches']", state["stored_batches"], 0)
        for field in fields:
            if not isinstance(state[field], (list, tuple)):
                raise ValueError(f"{where}['{field}'] must be a list, got {type(state[field]).__name__}")
        lengths = [len(state[field]) for field in fields]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"{where}: batch_numbers, keys and heatmaps must have one entry per batch, got lengths {lengths}"
            )
        batches = []
        row_shape = None
        previous = -1
        for position, (batch_number, keys, heatmaps) in enumerate(zip(*(state[field] for field in fields))):
            batch_number = check_int(f"{where}['batch_numbers'][{position}]", batch_number, 0)
            if not previous < batch_number < stored_batches:
                raise ValueError(
                    f"{where}['batch_numbers'] must increase and stay below stored_batches={stored_batches}, "
                    f"got {list(state['batch_numbers'])}"
                )
            previous = batch_number
            keys = as_key_list(keys, f"{where}['keys'][{position}]")
            if len(set(keys)) != len(keys):
                raise ValueError(f"{where}['keys'][{position}] must be distinct, got {keys}")
            if not (isinstance(heatmaps, torch.Tensor) and heatmaps.is_floating_point() and heatmaps.dim() >= 1
                    and heatmaps.shape[0] == len(keys)):
                described = (f"a {heatmaps.dtype} tensor of shape {tuple(heatmaps.shape)}"
                             if isinstance(heatmaps, torch.Tensor) else type(heatmaps).__name__)
                raise ValueError(
                    f"{where}['heatmaps'][{position}] must be a floating tensor with one row per key "
                    f"({len(keys)} keys), got {described}"
                )
            if not keys:
                continue  # an empty batch holds nothing
            if row_shape is not None and heatmaps.shape[1:] != row_shape:
                raise ValueError(
                    f"{where}['heatmaps'][{position}] has rows of shape {tuple(heatmaps.shape[1:])}, "
                    f"earlier batches {tuple(row_shape)}"
                )
            row_shape = heatmaps.shape[1:]
            batches.append((batch_number, keys, heatmaps.detach().to(self.STORAGE_DTYPE)))

        def load() -> None:
            self.clear()
            for batch_number, keys, heatmaps in batches:
                self._add(batch_number, keys, heatmaps)
            self.stored_batches = stored_batches
            self.capacity_batches = capacity_batches

        return load


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

    The bank holds only the predictions of replays that the sampler has scheduled and not yet
    made: those of the fresh samples scheduled to come back (the first ``replays_per_batch``
    fresh samples of a batch, in the sampler's order, which a DataLoader keeps), each until its
    replay. Replays still pending when a pass runs out of fresh samples never come; their
    predictions are dropped when the sampler begins its next pass. The bank thus holds at most
    ``distance * replays_per_batch`` keys, however long the run.

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
        self._sampler_pass = batch_sampler.passes

    def _follow_sampler_pass(self) -> None:
        """Empty the bank when the sampler has begun a new pass: replays never cross a pass, so
        what the bank holds can no longer be replayed."""
        if self.batch_sampler.passes != self._sampler_pass:
            self._sampler_pass = self.batch_sampler.passes
            self.bank.clear()

    def fetch_teacher(self, *, keys: torch.Tensor | Sequence[int], replayed: torch.Tensor | Sequence[bool],
                      **_unused: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The teacher heatmaps of the batch (the stored predictions of its replayed samples,
        zeros elsewhere; None when nothing is replayed) and the (B,) float32 alpha:
        ``schedule.alpha`` where a sample has a teacher, 0 elsewhere.

        Args:
            keys: the sample indices of the batch (the sampler's first element), integers.
            replayed: the sampler's replayed flags of the batch.

        Raises:
            KeyError: a replayed sample whose prediction is not in the bank, e.g. because the
                batch did not reach ``store_predictions`` in the sampler's order.
        """
        self._follow_sampler_pass()
        teacher, has_teacher = self.bank.fetch(keys, replayed)
        return teacher, has_teacher.to(torch.float32) * self.schedule.alpha

    def store_predictions(self, predictions: torch.Tensor, *, keys: torch.Tensor | Sequence[int],
                          replayed: torch.Tensor | Sequence[bool], **_unused: Any) -> None:
        """Keep the (detached) predictions of the batch's fresh samples that the sampler scheduled
        to come back, and drop those of its replayed samples, which have served; call after
        fetch_teacher, once per iteration, with keys and replayed in the sampler's order."""
        key_list, flags = as_key_list(keys), as_flag_list(replayed)
        if len(key_list) != predictions.shape[0] or len(flags) != predictions.shape[0]:
            raise ValueError(f"got {len(key_list)} keys and {len(flags)} replayed flags for a batch of "
                             f"{predictions.shape[0]}")
        self._follow_sampler_pass()
        self.bank.discard([key for key, flag in zip(key_list, flags) if flag])
        # The sampler schedules the first replays_per_batch fresh samples of a batch to come back;
        # the others never do.
        fresh = [position for position, flag in enumerate(flags) if not flag]
        scheduled = fresh[: self.batch_sampler.replays_per_batch]
        self.bank.store([key_list[position] for position in scheduled],
                        predictions.detach()[torch.tensor(scheduled, dtype=torch.long, device=predictions.device)])

    def after_step(self) -> None:
        """Feed the learning rate to the schedule (the largest over param groups, each checked) and
        let the bank's capacity follow the distance."""
        self.schedule.observe_lr(largest_lr(self.optimizer))
        self.bank.capacity_batches = self.schedule.distance

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "sampler": self.batch_sampler.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError naming the field, and
        then neither the schedule, the sampler nor the bank has changed."""
        check_fields("state", state, ("schedule", "sampler", "bank"))
        loads = [self.schedule._checked_load(state["schedule"], "state['schedule']"),
                 self.batch_sampler._checked_load(state["sampler"], "state['sampler']"),
                 self.bank._checked_load(state["bank"], "state['bank']")]
        for load in loads:
            load()
