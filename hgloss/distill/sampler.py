"""Batch samplers that hand each sample an augmentation seed: SeededBatchSampler (plain batches)
and ReplayBatchSampler (part of each batch replays samples seen a few iterations earlier)."""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ._checks import check_fields, check_int, check_real
from .schedule import SteppingSchedule, check_schedule

_Item = TypeVar("_Item")


class SeededBatchSampler:
    """Shuffled batches in which every sample carries an augmentation seed.

    Each iteration yields a list of ``(index, aug_seed, False)`` triples (the last element says
    the sample is not replayed); use it as ``DataLoader(dataset, batch_sampler=sampler)``. The
    dataset seeds its augmentation from ``aug_seed``. Per epoch, every index of this rank's shard
    comes once, in an order and with aug seeds fixed by ``seed`` and the epoch (``set_epoch``),
    so two runs with the same seed see the same crops in the same order whatever their loss.
    ReplayBatchSampler draws its fresh samples from the same order.

    Sharding follows DistributedSampler: the permutation is shared by all ranks, padded by
    repeating indices to a multiple of ``num_replicas`` (or truncated with ``drop_last``), and
    rank r takes positions r, r + num_replicas, ...

    Args:
        dataset_size: the number of samples, >= 1.
        batch_size: samples per batch, >= 1.
        shuffle: draw the samples in a random order (else 0, 1, 2, ...).
        seed: base of the per-epoch random order and aug seeds; the same on every rank.
        num_replicas, rank: the shard; default from torch.distributed when initialised, else 1, 0.
        drop_last: drop the tail so that every batch is full and no index repeats: the shard is
            truncated instead of padded, and a final incomplete batch is not yielded.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.dataset_size = check_int("dataset_size", dataset_size, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.shuffle = bool(shuffle)
        self.seed = check_int("seed", seed, 0)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.num_replicas = check_int("num_replicas", num_replicas, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.drop_last = bool(drop_last)
        self.epoch = 0

        if self.drop_last:
            self.shard_size = self.dataset_size // self.num_replicas
        else:
            self.shard_size = math.ceil(self.dataset_size / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch's order and aug seeds; call before each epoch, like DistributedSampler."""
        self.epoch = check_int("epoch", epoch, 0)

    def _shard(self) -> list[tuple[int, int]]:
        """This rank's fresh (index, aug_seed) pairs for the epoch, in draw order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        total = self.shard_size * self.num_replicas
        if total > self.dataset_size:
            order = order.repeat(math.ceil(total / self.dataset_size))
        order = order[:total]
        # One seed per position, so a padded repeat of an index gets a crop of its own.
        aug_seeds = torch.randint(0, 2**62, (total,), generator=generator)
        shard = slice(self.rank, None, self.num_replicas)
        return list(zip(order[shard].tolist(), aug_seeds[shard].tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        shard = self._shard()
        for start in range(0, len(shard), self.batch_size):
            batch = shard[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield [(index, aug_seed, False) for index, aug_seed in batch]

    def __len__(self) -> int:
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The epoch, and the dataset and batch sizes that the state is only valid for."""
        return {"epoch": self.epoch, "dataset_size": self.dataset_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); a state that does not fit raises ValueError and changes nothing."""
        self._checked_load(state, "state")()

    def _checked_load(self, state: Any, where: str) -> Callable[[], None]:
        """Check `state` (named `where` in errors) and return the function that loads it; nothing
        changes before that call, so a caller can check all the parts of its state first.

        A state of another dataset size or batch size is refused: its epoch would draw other
        batches, and replay keys would name other samples. States saved before the sizes were
        recorded hold only the epoch and cannot be checked.
        """
        check_fields(where, state, ("epoch",))
        epoch = check_int(f"{where}['epoch']", state["epoch"], 0)
        for field in ("dataset_size", "batch_size"):
            if field in state and check_int(f"{where}['{field}']", state[field], 1) != getattr(self, field):
                raise ValueError(
                    f"{where}['{field}'] is {state[field]}, but this sampler has {field}={getattr(self, field)}: "
                    "the state is of another run"
                )
        return lambda: self.set_epoch(epoch)


class ReplayBatchSampler(SeededBatchSampler):
    """Batches whose replayed part repeats the samples that were fresh ``distance`` iterations ago.

    Each iteration yields a list of ``(index, aug_seed, replayed)`` triples; use it as
    ``DataLoader(dataset, batch_sampler=sampler)``. The dataset receives the triple and seeds its
    augmentation from ``aug_seed``, so a replayed sample gets the identical crop, flip and
    scaling, and the prediction made for it when it was fresh is a valid teacher for it now.

    Per epoch, every index of this rank's shard is fresh exactly once, in the order and with the
    aug seeds of SeededBatchSampler (same seed, same epoch). When a batch is drawn, the distance d
    is read from the schedule, and the first ``round(replay_fraction * batch_size)`` of the
    batch's fresh samples are scheduled to come back d iterations later. A batch holds the
    replays scheduled for it and is filled up with fresh samples to ``batch_size``. The first
    d batches of an epoch have nothing to replay and are all fresh; replays never cross an epoch
    boundary, and those still pending when the fresh samples run out are dropped.

    A change of distance in the middle of an epoch: batches drawn before the change still come
    back at the old distance, those drawn after it at the new one. The distance never decreases,
    so no two batches are due at the same iteration; after an increase from d to d', the
    d' - d batches that no earlier batch is due at are all fresh. Every sample thus comes back
    exactly the distance that was in force when it was fresh, at most the current distance, so the
    bank of ReplayDistillation, whose capacity is the current distance, still holds its prediction.

    Replays take batch slots: with ``replay_fraction`` f <= 0.5, an epoch has about 1 / (1 - f)
    times as many batches as plain batching (twice as many at the default 0.5).

    Each fresh sample comes back at most once, so replays cannot outnumber fresh samples over
    time: a ``replay_fraction`` above 0.5 makes batches alternate between more and fewer replays,
    averaging at most one half. The replayed count is capped at ``batch_size - 1`` so every
    batch draws at least one fresh sample.

    Sharding is SeededBatchSampler's. Replays stay on the rank that drew them fresh. Ranks see
    the same distances (SteppingSchedule), so they yield the same number of batches.

    With DataLoader workers, batches are drawn a few iterations ahead of training (prefetching),
    so the distance read may lag the schedule by those iterations; replays remain consistent
    because they are scheduled from what was read.

    ``passes`` counts the passes over the sampler begun in this process: each ``iter()`` is one,
    counted when its first batch is drawn. Replays never cross a pass, so when a new pass begins,
    ReplayDistillation drops what its bank holds for the previous one. It is not part of the state.

    Args:
        dataset_size, batch_size, shuffle, seed, num_replicas, rank, drop_last: as for
            SeededBatchSampler.
        schedule: supplies the distance, read once per batch.
        replay_fraction: the share of a batch that is replayed, in [0, 1).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        schedule: SteppingSchedule,
        replay_fraction: float = 0.5,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset_size, batch_size, shuffle, seed, num_replicas, rank, drop_last)
        self.schedule = check_schedule(schedule)
        self.replay_fraction = check_real("replay_fraction", replay_fraction, 0.0, 1.0, high_open=True)
        self.replays_per_batch = min(math.floor(self.replay_fraction * self.batch_size + 0.5), self.batch_size - 1)
        self.passes = 0

    def _compose(
        self, fresh: Sequence[_Item], distance: Callable[[], int]
    ) -> Iterator[tuple[Sequence[_Item], Sequence[_Item]]]:
        """(fresh part, replayed part) of each batch, drawing from `fresh` in order."""
        due: dict[int, Sequence[_Item]] = {}
        cursor = 0
        iteration = 0
        while cursor < len(fresh):
            replays = due.pop(iteration, fresh[:0])  # empty, of the same sequence type as `fresh`
            fresh_count = self.batch_size - len(replays)
            batch_fresh = fresh[cursor : cursor + fresh_count]
            if self.drop_last and len(batch_fresh) < fresh_count:
                return
            cursor += fresh_count
            if self.replays_per_batch:
                due[iteration + distance()] = batch_fresh[: self.replays_per_batch]
            yield batch_fresh, replays
            iteration += 1

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        self.passes += 1  # in the generator's body: counted when the first batch is drawn
        for batch_fresh, replays in self._compose(self._shard(), lambda: self.schedule.distance):
            yield [(index, aug_seed, False) for index, aug_seed in batch_fresh] + [
                (index, aug_seed, True) for index, aug_seed in replays
            ]

    def __len__(self) -> int:
        """Batches in the epoch if the distance stays at its current value.

        An increase of the distance during the epoch changes the count. With replay_fraction
        <= 0.5 it can only shorten the epoch: the all-fresh batches it adds take more fresh
        samples each.
        """
        distance = self.schedule.distance
        return sum(1 for _ in self._compose(range(self.shard_size), lambda: distance))
