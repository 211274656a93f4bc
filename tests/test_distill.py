"""docs/spec.md section 5: the stepping schedule, the replay sampler, the prediction bank, the snapshot
teacher and the two distillation classes (replay, snapshot), on their own, end to end and under 2-process DDP."""

import io
import json
import math
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

import hgloss
from hgloss.distill import (
    PredictionBank,
    ReplayBatchSampler,
    ReplayDistillation,
    SeededBatchSampler,
    SnapshotDistillation,
    SnapshotTeacher,
    SteppingSchedule,
)


@pytest.fixture(autouse=True)
def single_thread():
    """The tensors here are tiny; a second intra-op thread only adds spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distances_under(schedule, lr_scheduler_factory, steps, base_lr=1.0):
    """The schedule's distance after each of `steps` optimizer steps of an SGD driven by a torch scheduler."""
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    lr_scheduler = lr_scheduler_factory(optimizer)
    lrs, distances = [], []
    for _ in range(steps):
        optimizer.step()
        lr_scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        schedule.observe_lr(lr)
        lrs.append(lr)
        distances.append(schedule.distance)
    return lrs, distances


def round_trip(state):
    """state through torch.save / torch.load (weights_only), as a checkpoint would take it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --------------------------------------------------------------------------------------------
# SteppingSchedule


def test_schedule_steps_once_per_multistep_drop():
    schedule = SteppingSchedule(distance0=1, step_factor=2)
    _, distances = distances_under(
        schedule, lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6, 9], gamma=0.1), 12
    )
    assert distances == [1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8]


def test_schedule_steps_once_per_halving_under_cosine():
    schedule = SteppingSchedule(distance0=3, step_factor=2)
    lrs, distances = distances_under(
        schedule, lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=64, eta_min=0.01), 64
    )
    # lr_t = 0.01 + 0.99 * (1 + cos(pi t / 64)) / 2, first observed at t = 1 (0.9994). Half of that
    # is first reached at t = 33 (0.4807), half of 0.4807 at t = 44, and so on; from lr_60 = 0.0195,
    # half is below eta_min, so there are 5 events.
    events = [step + 1 for step in range(1, 64) if distances[step] != distances[step - 1]]
    assert events == [33, 44, 51, 56, 60]
    assert distances[-1] == 3 * 2**5
    reference = lrs[0]
    for step in events:
        assert lrs[step - 1] <= 0.5 * reference < lrs[step - 2]
        reference = lrs[step - 1]


def test_schedule_follows_explicit_distances_and_holds_the_last():
    schedule = SteppingSchedule(distances=[1, 3, 8])
    _, distances = distances_under(
        schedule, lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 6], gamma=0.1), 7
    )
    assert distances == [1, 3, 3, 8, 8, 8, 8]


def test_schedule_hand_set_lrs():
    schedule = SteppingSchedule(distance0=1, step_factor=2, decay_ratio=0.5)
    observed = []
    # 0.06 is above half of 0.1: no event; 0.05 is exactly half: an event. The rise to 0.2 becomes
    # the new reference, so 0.1 is an event; 0.01 (10x) is a single event.
    for lr in [0.1, 0.1, 0.06, 0.05, 0.05, 0.2, 0.1, 0.01, 0.01]:
        schedule.observe_lr(lr)
        observed.append(schedule.distance)
    assert observed == [1, 1, 1, 2, 2, 2, 4, 8, 8]


def test_schedule_tracks_the_peak_of_a_warmup_from_zero():
    schedule = SteppingSchedule()
    lrs = [0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 0.6, 0.5, 0.3, 0.25]
    observed = []
    for lr in lrs:
        schedule.observe_lr(lr)
        observed.append(schedule.distance)
    assert observed == [1, 1, 1, 1, 1, 1, 1, 2, 2, 4]


def test_schedule_alpha_warmup_then_linear_ramp():
    schedule = SteppingSchedule(alpha=0.8, warmup_steps=2, alpha_ramp_steps=4)
    alphas = []
    for _ in range(8):
        alphas.append(schedule.alpha)
        schedule.observe_lr(1.0)
    assert alphas == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 0.8, 0.8])
    assert SteppingSchedule(alpha=0.3).alpha == 0.3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distance0": 0}, "distance0"),
        ({"distance0": 1.5}, "distance0"),
        ({"step_factor": 0}, "step_factor"),
        ({"decay_ratio": 1.0}, "decay_ratio"),
        ({"decay_ratio": 0.0}, "decay_ratio"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha_ramp_steps": -1}, "alpha_ramp_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"distances": []}, "distances"),
        ({"distances": [2, 1]}, "non-decreasing"),
        ({"distances": [0, 1]}, "distances"),
        ({"distances": [1, 2], "distance0": 2}, "either distances"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SteppingSchedule(**kwargs)


@pytest.mark.parametrize("lr", [-0.1, math.nan, math.inf])
def test_schedule_rejects_bad_lr(lr):
    with pytest.raises(ValueError, match="lr"):
        SteppingSchedule().observe_lr(lr)


def test_schedule_state_dict_round_trip():
    lrs = [1.0, 0.4, 0.4, 1.0, 0.3, 0.1, 0.05]
    original = SteppingSchedule(alpha=0.6, alpha_ramp_steps=5)
    for lr in lrs[:4]:
        original.observe_lr(lr)
    restored = SteppingSchedule(alpha=0.6, alpha_ramp_steps=5)
    restored.load_state_dict(round_trip(original.state_dict()))
    for lr in lrs[4:]:
        assert (restored.distance, restored.alpha) == (original.distance, original.alpha)
        original.observe_lr(lr)
        restored.observe_lr(lr)
    assert (restored.distance, restored.alpha, restored.steps) == (original.distance, original.alpha, 7)
    assert original.distance == 16  # events at 0.4, 0.3 (after the rise to 1.0), 0.1 and 0.05


DELETE = object()  # a field's value in the parametrizations below: the field is left out of the state


@pytest.mark.parametrize(
    "change, match",
    [
        ({"steps": DELETE}, r"state lacks 'steps'"),
        ({"steps": -1}, r"state\['steps'\] must be an int >= 0"),
        ({"steps": 2.0}, r"state\['steps'\] must be an int"),
        ({"stepping_events": 5}, r"state\['stepping_events'\] must not exceed"),
        ({"reference_lr": None}, r"state\['reference_lr'\] must be None exactly when"),
        ({"reference_lr": math.nan}, r"state\['reference_lr'\] must be a number"),
        ({"reference_lr": -1.0}, r"state\['reference_lr'\] must be a number"),
    ],
)
def test_schedule_load_state_dict_refuses_a_bad_state_and_changes_nothing(change, match):
    source = SteppingSchedule()
    for lr in [1.0, 0.4, 0.1]:
        source.observe_lr(lr)
    state = {field: value for field, value in {**source.state_dict(), **change}.items() if value is not DELETE}
    schedule = SteppingSchedule()
    schedule.observe_lr(1.0)
    before = schedule.state_dict()
    with pytest.raises(ValueError, match=match):
        schedule.load_state_dict(state)
    assert schedule.state_dict() == before


# --------------------------------------------------------------------------------------------
# ReplayBatchSampler


def fixed_distance(distance):
    return SteppingSchedule(distances=[distance])


def split(batch):
    fresh = [(index, seed) for index, seed, replayed in batch if not replayed]
    replays = [(index, seed) for index, seed, replayed in batch if replayed]
    return fresh, replays


def test_sampler_replays_the_fresh_samples_of_exactly_distance_batches_ago():
    sampler = ReplayBatchSampler(200, 8, fixed_distance(3), replay_fraction=0.5)
    batches = [split(batch) for batch in sampler]
    for iteration, (fresh, replays) in enumerate(batches):
        if iteration < 3:
            assert replays == [] and len(fresh) == 8  # nothing to replay yet: all fresh
        else:
            # same index *and* same aug seed, so the dataset reproduces the identical crop
            assert replays == batches[iteration - 3][0][:4]
            if iteration < len(batches) - 1:
                assert len(fresh) == 4
    assert len(batches) == len(sampler)


def test_sampler_every_index_fresh_exactly_once_per_epoch_with_new_seeds():
    sampler = ReplayBatchSampler(101, 6, fixed_distance(2))
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        fresh = [pair for batch in sampler for pair in split(batch)[0]]
        assert sorted(index for index, _ in fresh) == list(range(101))
        epochs.append(fresh)
    assert [index for index, _ in epochs[0]] != [index for index, _ in epochs[1]]
    assert {seed for _, seed in epochs[0]}.isdisjoint(seed for _, seed in epochs[1])


def test_sampler_is_deterministic_for_seed_and_epoch():
    def draw(seed, epoch):
        sampler = ReplayBatchSampler(50, 4, fixed_distance(2), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(7, 3) == draw(7, 3)
    assert draw(7, 3) != draw(8, 3)
    assert draw(7, 3) != draw(7, 4)


def test_sampler_without_shuffle_draws_in_order():
    sampler = ReplayBatchSampler(20, 4, fixed_distance(1), shuffle=False)
    fresh = [index for batch in sampler for index, _ in split(batch)[0]]
    assert fresh == list(range(20))


@pytest.mark.parametrize("dataset_size, drop_last", [(64, False), (67, False), (67, True)])
def test_sampler_shards_across_two_replicas_without_overlap(dataset_size, drop_last):
    schedule = fixed_distance(2)
    ranks = [
        list(ReplayBatchSampler(dataset_size, 4, schedule, num_replicas=2, rank=rank, drop_last=drop_last))
        for rank in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1])  # DDP needs the same number of iterations on every rank
    fresh = [[index for batch in batches for index, _ in split(batch)[0]] for batches in ranks]
    replayed = [[index for batch in batches for index, _ in split(batch)[1]] for batches in ranks]
    for rank in range(2):
        assert set(replayed[rank]) <= set(fresh[rank])  # replays stay on the rank that drew them
    if dataset_size % 2 == 0:
        assert set(fresh[0]).isdisjoint(fresh[1])
        assert sorted(fresh[0] + fresh[1]) == list(range(dataset_size))
    elif drop_last:
        # shards truncated to 33 each, and the incomplete last batch is not yielded
        assert set(fresh[0]).isdisjoint(fresh[1])
        assert len(fresh[0]) == len(fresh[1]) <= dataset_size // 2
        assert all(len(batch) == 4 for batches in ranks for batch in batches)
    else:
        # padded like DistributedSampler: one index repeats, on the other rank, with its own seed
        assert set(fresh[0] + fresh[1]) == set(range(dataset_size))
        assert len(fresh[0]) == len(fresh[1]) == math.ceil(dataset_size / 2)


def test_sampler_distance_change_mid_epoch():
    schedule = SteppingSchedule(distance0=2, step_factor=2)
    schedule.observe_lr(1.0)
    batches = []
    for iteration, batch in enumerate(ReplayBatchSampler(120, 4, schedule)):
        batches.append(split(batch))
        if iteration == 5:
            schedule.observe_lr(0.1)  # distance 2 -> 4 from batch 6 on
    assert schedule.distance == 4
    due = {}
    for iteration, (fresh, replays) in enumerate(batches):
        distance = 2 if iteration <= 5 else 4
        due[iteration + distance] = fresh[:2]
        assert replays == due.get(iteration, [])
    # batches 0-5 come back at distance 2 (the last two at 6 and 7), batches 6+ at distance 4:
    # nothing is due at 8 and 9, so those are all fresh
    assert batches[7][1] == batches[5][0][:2]
    assert batches[8][1] == batches[9][1] == []
    assert batches[10][1] == batches[6][0][:2]


def test_sampler_len_matches_iteration():
    for kwargs in [
        {"replay_fraction": 0.5},
        {"replay_fraction": 0.25, "drop_last": True},
        {"replay_fraction": 0.0},
        {"replay_fraction": 0.75},
    ]:
        sampler = ReplayBatchSampler(93, 8, fixed_distance(3), **kwargs)
        assert len(list(sampler)) == len(sampler)
    plain = list(ReplayBatchSampler(93, 8, fixed_distance(3), replay_fraction=0.0))
    assert len(plain) == 12 and all(not replayed for batch in plain for _, _, replayed in batch)


def test_sampler_high_replay_fraction_and_batch_size_one():
    # A fresh sample comes back once, so 6 replays per batch of 8 alternate with 2.
    counts = [len(split(batch)[1]) for batch in ReplayBatchSampler(200, 8, fixed_distance(1), replay_fraction=0.75)]
    assert counts[:5] == [0, 6, 2, 6, 2]
    # batch_size 1 cannot replay and still draw a fresh sample: it stays all fresh
    single = list(ReplayBatchSampler(10, 1, fixed_distance(1), replay_fraction=0.5))
    assert len(single) == 10 and all(not batch[0][2] for batch in single)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_size": 0}, "dataset_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"replay_fraction": 1.0}, "replay_fraction"),
        ({"replay_fraction": -0.1}, "replay_fraction"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"num_replicas": 2, "rank": 2}, "rank"),
        ({"schedule": None}, "schedule"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    arguments = {"dataset_size": 10, "batch_size": 2, "schedule": SteppingSchedule()}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ReplayBatchSampler(**arguments)


class SeededShiftDataset(Dataset):
    """Samples whose "augmentation" is a random value drawn from aug_seed."""

    def __len__(self):
        return 40

    def __getitem__(self, item):
        index, aug_seed, replayed = item
        augmentation = torch.rand(3, generator=torch.Generator().manual_seed(aug_seed))
        return augmentation, index, replayed


def test_sampler_in_a_dataloader_reproduces_augmentation():
    sampler = ReplayBatchSampler(40, 4, fixed_distance(2))
    sampler.set_epoch(1)
    loader = DataLoader(SeededShiftDataset(), batch_sampler=sampler)
    assert len(loader) == len(sampler)
    batches = list(loader)
    seen = {}
    replays = 0
    for augmentation, indices, replayed in batches:
        for row in range(len(indices)):
            index = int(indices[row])
            if replayed[row]:
                replays += 1
                assert torch.equal(augmentation[row], seen[index])
            else:
                seen[index] = augmentation[row]
    assert replays > 0 and sorted(seen) == list(range(40))


def test_sampler_state_dict_round_trip():
    original = ReplayBatchSampler(30, 4, fixed_distance(2))
    original.set_epoch(5)
    restored = ReplayBatchSampler(30, 4, fixed_distance(2))
    restored.load_state_dict(round_trip(original.state_dict()))
    assert restored.epoch == 5 and list(restored) == list(original)


@pytest.mark.parametrize(
    "state, match",
    [
        ({"epoch": 1, "dataset_size": 31, "batch_size": 4},
         r"state\['dataset_size'\] is 31, but this sampler has dataset_size=30: the state is of another run"),
        ({"epoch": 1, "dataset_size": 30, "batch_size": 8},
         r"state\['batch_size'\] is 8, but this sampler has batch_size=4"),
        ({"dataset_size": 30, "batch_size": 4}, r"state lacks 'epoch'"),
        ({"epoch": -1}, r"state\['epoch'\] must be an int >= 0"),
        ({"epoch": 1.5}, r"state\['epoch'\] must be an int >= 0"),
        ([1], "state must be a dict"),
    ],
)
def test_sampler_load_state_dict_refuses_another_run_and_changes_nothing(state, match):
    for sampler in (ReplayBatchSampler(30, 4, fixed_distance(2)), SeededBatchSampler(30, 4)):
        sampler.set_epoch(3)
        with pytest.raises(ValueError, match=match):
            sampler.load_state_dict(state)
        assert sampler.epoch == 3


def test_sampler_loads_a_state_saved_before_the_sizes_were_recorded():
    sampler = ReplayBatchSampler(30, 4, fixed_distance(2))
    sampler.load_state_dict({"epoch": 7})
    assert sampler.epoch == 7
    assert sampler.state_dict() == {"epoch": 7, "dataset_size": 30, "batch_size": 4}


# --------------------------------------------------------------------------------------------
# PredictionBank


def test_bank_round_trip_in_float16_with_mask():
    bank = PredictionBank(capacity_batches=4)
    stored = torch.rand(3, 2, 5, 4, requires_grad=True) * 1  # a non-leaf with a graph, like a prediction
    bank.store(torch.tensor([10, 11, 12]), stored)
    heatmaps, mask = bank.fetch([12, 99, 10, 7], torch.tensor([True, False, True, False]))
    assert heatmaps.dtype == torch.float16 and not heatmaps.requires_grad
    assert mask.tolist() == [True, False, True, False]
    torch.testing.assert_close(heatmaps[0].float(), stored[2].detach(), atol=1e-3, rtol=0)
    torch.testing.assert_close(heatmaps[2].float(), stored[0].detach(), atol=1e-3, rtol=0)
    assert not heatmaps[1].any() and not heatmaps[3].any()
    none, mask = bank.fetch([10, 11], [False, False])
    assert none is None and mask.tolist() == [False, False]


def test_bank_keeps_a_copy():
    bank = PredictionBank(2)
    source = torch.rand(1, 1, 3, 3, dtype=torch.float16)
    expected = source.clone()
    bank.store([0], source)
    source.zero_()
    assert torch.equal(bank.fetch([0], [True])[0], expected)


def test_bank_drops_batches_older_than_capacity():
    bank = PredictionBank(capacity_batches=2)
    for batch in range(3):
        bank.store([2 * batch, 2 * batch + 1], torch.full((2, 1, 2, 2), float(batch)))
    assert len(bank) == 4
    with pytest.raises(KeyError, match="key 1 "):
        bank.fetch([1], [True])
    assert bank.fetch([2, 5], [True, True])[0][:, 0, 0, 0].tolist() == [1.0, 2.0]
    bank.capacity_batches = 1
    with pytest.raises(KeyError, match="key 2 "):
        bank.fetch([2], [True])
    bank.capacity_batches = 3  # a larger capacity does not bring dropped entries back
    with pytest.raises(KeyError, match="key 3 "):
        bank.fetch([3], [True])


def test_bank_rejects_unknown_keys_and_bad_input():
    bank = PredictionBank(3)
    bank.store([1, 2], torch.zeros(2, 1, 2, 2))
    with pytest.raises(KeyError, match="key 42 is not in the prediction bank"):
        bank.fetch([1, 42], [True, True])
    with pytest.raises(ValueError, match="2 keys"):
        bank.store([3, 4], torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="distinct"):
        bank.store([3, 3], torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="capacity_batches"):
        PredictionBank(0)


def test_bank_restoring_a_key_replaces_it_and_survives_eviction_of_the_old_batch():
    bank = PredictionBank(2)
    bank.store([7], torch.zeros(1, 1, 1, 1))
    bank.store([7], torch.ones(1, 1, 1, 1))
    bank.store([8], torch.zeros(1, 1, 1, 1))  # evicts the first batch, which held the old 7
    assert bank.fetch([7], [True])[0].item() == 1.0


def test_bank_state_dict_round_trip():
    original = PredictionBank(2)
    for batch in range(3):
        original.store([batch], torch.full((1, 1, 2, 2), float(batch)))
    restored = PredictionBank(5)
    restored.load_state_dict(round_trip(original.state_dict()))
    assert restored.capacity_batches == 2 and len(restored) == 2
    assert torch.equal(restored.fetch([1, 2], [True, True])[0], original.fetch([1, 2], [True, True])[0])
    for bank in (original, restored):
        bank.store([3], torch.zeros(1, 1, 2, 2))  # both evict batch 1 next
        with pytest.raises(KeyError):
            bank.fetch([1], [True])


@pytest.mark.parametrize(
    "keys",
    [
        [1, 2.5],  # int() would make this key 2
        [2.0],  # integral floats too: a float key is a mistake whatever its value
        [True],  # would pass for key 1
        [torch.tensor(1.5)],
        np.array([0.0, 1.0]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([True, False]),
        torch.tensor([[0, 1]]),
        "01",
    ],
)
def test_keys_must_be_integers_for_every_call_that_takes_them(keys):
    bank = PredictionBank(2)
    bank.store([0, 1], torch.zeros(2, 1, 2, 2))
    schedule = fixed_distance(1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    distill = ReplayDistillation(schedule, optimizer, ReplayBatchSampler(8, 2, schedule))
    count = len(keys)
    calls = [
        lambda: bank.store(keys, torch.zeros(count, 1, 2, 2)),
        lambda: bank.fetch(keys, [True] * count),
        lambda: bank.discard(keys),
        lambda: distill.fetch_teacher(keys=keys, replayed=[False] * count),
        lambda: distill.store_predictions(torch.zeros(count, 1, 2, 2), keys=keys, replayed=[False] * count),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^keys must be .*got "):
            call()
    assert bank.stored_batches == 1 and len(bank) == 2 and len(distill.bank) == 0


def test_integer_keys_of_any_integer_type_are_accepted():
    bank = PredictionBank(2)
    bank.store([np.int64(3), torch.tensor(4)], torch.zeros(2, 1))
    bank.store(torch.tensor([5, 6], dtype=torch.int32), torch.ones(2, 1))
    assert bank.fetch(np.array([3, 6]), [True, True])[0][:, 0].tolist() == [0.0, 1.0]


def test_bank_discard_clear_and_row_shape():
    bank = PredictionBank(4)
    bank.store([1, 2], torch.zeros(2, 1, 2, 2))
    bank.store([3], torch.ones(1, 1, 2, 2))
    bank.discard([1, 99])  # a key not held is passed over
    assert len(bank) == 2
    with pytest.raises(KeyError, match="key 1 .*discarded"):
        bank.fetch([1], [True])
    bank.discard([2])  # the first batch's last key: its memory goes with it
    assert bank.state_dict()["batch_numbers"] == [1]
    with pytest.raises(ValueError, match=r"heatmaps must be \(1, 1, 2, 2\) like those held, got \(1, 1, 3, 3\)"):
        bank.store([4], torch.zeros(1, 1, 3, 3))
    bank.store([], torch.zeros(0, 1, 2, 2))  # a batch with nothing to keep still counts
    assert bank.stored_batches == 3
    bank.clear()
    assert len(bank) == 0 and bank.stored_batches == 3
    bank.store([4], torch.zeros(1, 1, 3, 3))  # an empty bank takes any shape


def test_bank_state_dict_holds_only_what_is_held():
    bank = PredictionBank(3)
    bank.store([1, 2, 3], torch.arange(3.0).view(3, 1))
    bank.store([2], torch.full((1, 1), 9.0))  # replaces 2
    bank.discard([3])
    state = round_trip(bank.state_dict())
    assert state["batch_numbers"] == [0, 1] and state["keys"] == [[1], [2]]
    assert [heatmaps[:, 0].tolist() for heatmaps in state["heatmaps"]] == [[0.0], [9.0]]


def valid_bank_state():
    """Batches 1-3 of two keys each, (1, 2, 2) heatmaps; batch 0 was evicted."""
    bank = PredictionBank(3)
    for batch in range(4):
        bank.store([10 * batch, 10 * batch + 1], torch.full((2, 1, 2, 2), float(batch)))
    return bank.state_dict()


def heatmaps_ending_with(last):
    return lambda state: [*state["heatmaps"][:2], last]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("keys", DELETE, r"state lacks 'keys'"),
        ("heatmaps", lambda state: state["heatmaps"][:2], r"one entry per batch, got lengths \[3, 3, 2\]"),
        ("heatmaps", "x", r"state\['heatmaps'\] must be a list"),
        ("keys", [[10, 11], [20], [30, 31]],
         r"state\['heatmaps'\]\[1\] must be a floating tensor with one row per key \(1 keys\)"),
        ("heatmaps", heatmaps_ending_with(torch.zeros(2, 1, 3, 3)),
         r"state\['heatmaps'\]\[2\] has rows of shape \(1, 3, 3\)"),
        ("heatmaps", heatmaps_ending_with(torch.zeros(2, 1, 2, 2, dtype=torch.long)),
         r"state\['heatmaps'\]\[2\] must be a floating tensor"),
        ("keys", [[10, 11], [20.0, 21], [30, 31]], r"state\['keys'\]\[1\] must be integers, got 20.0"),
        ("keys", [[10, 11], [20, 20], [30, 31]], r"state\['keys'\]\[1\] must be distinct"),
        ("batch_numbers", [1, 3, 2], r"state\['batch_numbers'\] must increase"),
        ("batch_numbers", [1, 2, 4], r"must increase and stay below stored_batches=4"),
        ("batch_numbers", [-1, 2, 3], r"state\['batch_numbers'\]\[0\] must be an int >= 0"),
        ("capacity_batches", 0, r"state\['capacity_batches'\] must be an int >= 1"),
        ("stored_batches", -4, r"state\['stored_batches'\] must be an int >= 0"),
    ],
)
def test_bank_load_state_dict_refuses_a_bad_state_and_changes_nothing(field, value, match):
    state = valid_bank_state()
    if value is DELETE:
        del state[field]
    else:
        state[field] = value(state) if callable(value) else value
    bank = PredictionBank(5)
    bank.store([7], torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=match):
        bank.load_state_dict(state)
    assert (bank.capacity_batches, bank.stored_batches, len(bank)) == (5, 1, 1)
    assert bank.fetch([7], [True])[0].eq(1).all()


def test_bank_loads_a_state_where_a_later_batch_holds_a_key_again():
    # Before entries were dropped on replacement, a state could hold a key in two batches; the
    # later one is the live entry.
    state = {"capacity_batches": 3, "stored_batches": 2, "batch_numbers": [0, 1], "keys": [[4, 5], [5]],
             "heatmaps": [torch.zeros(2, 1, dtype=torch.float16), torch.ones(1, 1, dtype=torch.float16)]}
    bank = PredictionBank(1)
    bank.load_state_dict(state)
    assert len(bank) == 2 and bank.fetch([4, 5], [True, True])[0][:, 0].tolist() == [0.0, 1.0]


# --------------------------------------------------------------------------------------------
# SnapshotTeacher


def step_counter_model():
    """y = bias: the teacher's output reveals which optimizer step its copy was taken at."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def test_snapshot_lags_between_one_and_distance_steps():
    schedule = SteppingSchedule(distance0=2, step_factor=2)
    schedule.observe_lr(1.0)
    student = step_counter_model()
    snapshot = SnapshotTeacher(student, schedule)
    lags, has_teacher = [], []
    for step in range(12):
        if step == 7:
            schedule.observe_lr(0.1)  # distance 2 -> 4
        has_teacher.append(snapshot.has_teacher)
        lags.append(step - snapshot(torch.zeros(1, 1)).item())
        with torch.no_grad():
            student.bias.fill_(step + 1)  # the optimizer step
        snapshot.after_step()
    assert has_teacher == [False] + [True] * 11
    assert lags == [0, 1, 2, 1, 2, 1, 2, 1, 2, 3, 4, 1]


def bn_model():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_snapshot_leaves_student_batchnorm_alone_and_gets_no_grad():
    torch.manual_seed(0)
    student = bn_model()
    snapshot = SnapshotTeacher(student, SteppingSchedule())
    before = {name: buffer.clone() for name, buffer in student.named_buffers()}
    images = torch.randn(4, 1, 8, 8)
    teacher = snapshot(images)
    assert snapshot.model.training  # train mode, see the class docstring
    assert not snapshot.model[1].running_mean.equal(before["1.running_mean"])  # the copy's statistics moved
    snapshot.after_step()
    snapshot(images + 1)  # and this call refreshes the copy from the student
    for name, buffer in student.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert not teacher.requires_grad
    loss = hgloss.heatmap_gradient_loss(student(images), torch.rand(4, 2, 8, 8), teacher=teacher, backend="reference")
    loss.backward()
    assert all(parameter.grad is not None for parameter in student.parameters())
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in snapshot.model.parameters())


def test_snapshot_copies_the_module_inside_a_wrapper():
    student = bn_model()
    snapshot = SnapshotTeacher(nn.DataParallel(student), SteppingSchedule())
    assert snapshot.student is student
    assert set(snapshot.model.state_dict()) == set(student.state_dict())


def test_snapshot_state_dict_round_trip():
    schedule = SteppingSchedule(distance0=3)
    student = step_counter_model()
    original = SnapshotTeacher(student, schedule)
    for step in range(4):
        original(torch.zeros(1, 1))
        with torch.no_grad():
            student.bias.fill_(step + 1)
        original.after_step()
    restored = SnapshotTeacher(step_counter_model(), schedule)
    restored.load_state_dict(round_trip(original.state_dict()))
    assert (restored.steps, restored.copy_step, restored.lag) == (4, 3, 1)
    assert restored(torch.zeros(1, 1)).item() == original(torch.zeros(1, 1)).item() == 3.0


# --------------------------------------------------------------------------------------------
# ReplayDistillation and SnapshotDistillation


class BlobDataset(Dataset):
    """Images with one bright spot per joint; targets are Gaussian heatmaps at the spots.

    Augmentation (a shift of the spots) is seeded by aug_seed, so a replay is the same sample.
    """

    joints, size, sigma = 2, 12, 1.5

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def gaussian(self, centres):
        grid = torch.arange(self.size, dtype=torch.float32)
        ys, xs = grid.view(1, -1, 1), grid.view(1, 1, -1)
        cy, cx = centres[:, 0].view(-1, 1, 1), centres[:, 1].view(-1, 1, 1)
        return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * self.sigma**2))

    def __getitem__(self, item):
        index, aug_seed, replayed = item
        base = torch.rand(self.joints, 2, generator=torch.Generator().manual_seed(index)) * (self.size - 4) + 2
        shift = torch.randint(-1, 2, (self.joints, 2), generator=torch.Generator().manual_seed(aug_seed))
        heatmaps = self.gaussian((base + shift).float())
        image = heatmaps.amax(0, keepdim=True)
        return image, heatmaps, index, replayed


def tiny_pose_model():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, BlobDataset.joints, 1),
    )


def replay_distillation(schedule, optimizer, dataset_size, batch_size, **sampler_options):
    sampler = ReplayBatchSampler(dataset_size, batch_size, schedule, **sampler_options)
    return ReplayDistillation(schedule, optimizer, sampler)


def test_replay_alpha_is_per_sample():
    schedule = SteppingSchedule(distance0=1, alpha=0.7)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    distill = replay_distillation(schedule, optimizer, 16, 4)
    batches = list(distill.batch_sampler)
    for iteration, batch in enumerate(batches[:3]):
        keys = torch.tensor([index for index, _, _ in batch])
        replayed = torch.tensor([flag for _, _, flag in batch])
        predictions = torch.rand(4, 2, 3, 3)
        teacher, alpha = distill.fetch_teacher(keys=keys, replayed=replayed)
        distill.store_predictions(predictions, keys=keys, replayed=replayed)
        assert alpha.dtype == torch.float32
        assert alpha.tolist() == pytest.approx([0.7 if flag else 0.0 for flag in replayed.tolist()])
        assert (teacher is None) == (iteration == 0)
        distill.after_step()


@pytest.mark.parametrize("mode", ["replay", "snapshot"])
def test_end_to_end_loss_decreases_and_only_the_student_learns(mode):
    torch.manual_seed(0)
    model = tiny_pose_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[20], gamma=0.1)
    schedule = SteppingSchedule(distance0=2, alpha=0.5, alpha_ramp_steps=4)
    dataset = BlobDataset(128)
    if mode == "replay":
        distill = replay_distillation(schedule, optimizer, len(dataset), 8)
        sampler = distill.batch_sampler
    else:
        distill = SnapshotDistillation(schedule, optimizer, model)
        sampler = SeededBatchSampler(len(dataset), 8)  # any pipeline works with a snapshot teacher
    loader = DataLoader(dataset, batch_sampler=sampler)

    losses, teacher_alphas = [], []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for images, targets, indices, replayed in loader:
            outputs = model(images)
            # The same calls for both classes: each takes what it needs.
            teacher, alpha = distill.fetch_teacher(inputs=images, keys=indices, replayed=replayed)
            distill.store_predictions(outputs, keys=indices, replayed=replayed)
            if teacher is not None:
                assert not teacher.requires_grad and teacher.grad_fn is None
                teacher_alphas.append(alpha.max().item())
            loss = hgloss.heatmap_gradient_loss(outputs, targets, teacher=teacher, alpha=alpha, backend="auto")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            distill.after_step()
            losses.append(loss.item())
            if len(losses) == 36:
                break
        if len(losses) == 36:
            break
    assert len(losses) == 36
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert max(teacher_alphas) == 0.5  # the teacher did take part, at the full alpha
    assert schedule.distance == 4  # the lr drop at step 20 widened the distance
    if mode == "snapshot":
        assert all(parameter.grad is None for parameter in distill.snapshot.model.parameters())
    else:
        assert all(not heatmaps.requires_grad for heatmaps in distill.bank.state_dict()["heatmaps"])


def test_replay_with_dataloader_workers_and_a_distance_change():
    # Workers prefetch, so the sampler reads the distance a few iterations before training uses
    # the batch; the bank must still hold every replay.
    torch.manual_seed(0)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6, 9], gamma=0.1)
    schedule = SteppingSchedule(distance0=1, step_factor=3)
    distill = replay_distillation(schedule, optimizer, 160, 4)
    loader = DataLoader(BlobDataset(160), batch_sampler=distill.batch_sampler, num_workers=2, prefetch_factor=2)
    replays = 0
    for images, targets, indices, replayed in loader:
        teacher, alpha = distill.fetch_teacher(keys=indices, replayed=replayed)
        distill.store_predictions(targets, keys=indices, replayed=replayed)
        if teacher is not None:
            replays += int(replayed.sum())
            # the bank returns exactly what was stored for the same crop
            torch.testing.assert_close(teacher[replayed].float(), targets[replayed], atol=1e-3, rtol=0)
        optimizer.step()
        lr_scheduler.step()
        distill.after_step()
    assert schedule.distance == 27 and replays > 20


def test_distillation_rejects_bad_arguments():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = SteppingSchedule()
    with pytest.raises(ValueError, match="schedule must be a SteppingSchedule"):
        SnapshotDistillation(None, optimizer, tiny_pose_model())
    with pytest.raises(ValueError, match="optimizer must be a torch optimizer"):
        ReplayDistillation(schedule, None, ReplayBatchSampler(8, 2, schedule))
    with pytest.raises(ValueError, match="batch_sampler must be a ReplayBatchSampler built on the same schedule"):
        ReplayDistillation(schedule, optimizer, ReplayBatchSampler(8, 2, SteppingSchedule()))
    with pytest.raises(ValueError, match="batch_sampler must be a ReplayBatchSampler"):
        ReplayDistillation(schedule, optimizer, SeededBatchSampler(8, 2))
    distill = replay_distillation(schedule, optimizer, 8, 2)
    with pytest.raises(ValueError, match="got 2 keys and 2 replayed flags for a batch of 3"):
        distill.store_predictions(torch.zeros(3, 1, 2, 2), keys=[0, 1], replayed=[False, False])


def test_the_seeded_sampler_draws_the_replay_samplers_fresh_order():
    schedule = SteppingSchedule()
    for options in ({}, {"drop_last": True}, {"num_replicas": 3, "rank": 1}, {"shuffle": False}):
        plain = SeededBatchSampler(50, 8, seed=3, **options)
        replay = ReplayBatchSampler(50, 8, schedule, replay_fraction=0.0, seed=3, **options)
        for epoch in (0, 4):
            plain.set_epoch(epoch)
            replay.set_epoch(epoch)
            assert list(plain) == list(replay) and len(plain) == len(list(plain)) == len(replay)


@pytest.mark.parametrize("mode", ["replay", "snapshot"])
def test_distillation_state_dict_round_trip(mode):
    def build(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        schedule = SteppingSchedule(alpha=0.5)
        if mode == "replay":
            return replay_distillation(schedule, optimizer, 32, 4), optimizer
        return SnapshotDistillation(schedule, optimizer, model), optimizer

    torch.manual_seed(0)
    model = tiny_pose_model()
    original, optimizer = build(model)
    dataset = BlobDataset(32)
    if mode == "replay":
        original.batch_sampler.set_epoch(2)
        batches = list(original.batch_sampler)[:4]
    else:
        batches = [[(i, i, False) for i in range(4)]] * 4

    def teacher_for(distill, batch):
        images, _, indices, replayed = torch.utils.data.default_collate([dataset[item] for item in batch])
        predictions = model(images).detach()
        teacher = distill.fetch_teacher(inputs=images, keys=indices, replayed=replayed)
        distill.store_predictions(predictions, keys=indices, replayed=replayed)
        return teacher

    for step, batch in enumerate(batches[:3]):
        teacher_for(original, batch)
        optimizer.param_groups[0]["lr"] = 0.4 if step else 1.0
        original.after_step()

    restored, _ = build(tiny_pose_model())
    restored.load_state_dict(round_trip(original.state_dict()))
    assert restored.schedule.distance == original.schedule.distance == 2
    expected, got = teacher_for(original, batches[3]), teacher_for(restored, batches[3])
    assert expected[0] is not None
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def two_group_optimizer(lr0=0.1, lr1=0.1):
    return torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr0},
                            {"params": [nn.Parameter(torch.zeros(1))], "lr": lr1}])


def both_distillations(optimizer):
    schedule = SteppingSchedule()
    yield ReplayDistillation(schedule, optimizer, ReplayBatchSampler(8, 2, schedule))
    yield SnapshotDistillation(SteppingSchedule(), optimizer, nn.Linear(1, 1))


@pytest.mark.parametrize("bad_lr", [math.nan, math.inf, -0.01])
def test_every_param_groups_lr_is_checked(bad_lr):
    # max(0.1, nan) is 0.1: a NaN in a group other than the first would go unnoticed.
    schedule = SteppingSchedule()
    with pytest.raises(ValueError, match=r"optimizer.param_groups\[1\]\['lr'\] must be a finite number >= 0"):
        ReplayDistillation(schedule, two_group_optimizer(lr1=bad_lr), ReplayBatchSampler(8, 2, schedule))
    optimizer = two_group_optimizer()
    for distill in both_distillations(optimizer):
        optimizer.param_groups[1]["lr"] = bad_lr
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\] must be a finite number >= 0, got"):
            distill.after_step()
        assert distill.schedule.steps == 0  # nothing observed
        optimizer.param_groups[1]["lr"] = 0.0  # a frozen group is fine
        distill.after_step()
        assert distill.schedule.steps == 1 and distill.schedule.reference_lr == 0.1


def test_distillation_load_state_dict_is_all_or_nothing():
    torch.manual_seed(0)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    source = replay_distillation(SteppingSchedule(), optimizer, 16, 4)
    batches = list(source.batch_sampler)
    for lr, batch in zip([1.0, 0.4, 0.1], batches):
        keys, replayed = [index for index, _, _ in batch], [flag for _, _, flag in batch]
        source.fetch_teacher(keys=keys, replayed=replayed)
        source.store_predictions(torch.rand(4, 1, 2, 2), keys=keys, replayed=replayed)
        optimizer.param_groups[0]["lr"] = lr
        source.after_step()
    good = source.state_dict()
    assert len(source.bank) and source.schedule.stepping_events == 2

    target = replay_distillation(SteppingSchedule(), optimizer, 16, 4)
    target.batch_sampler.set_epoch(4)
    before = target.state_dict()
    bad_bank = {**good["bank"], "keys": good["bank"]["keys"][:-1]}
    for state, match in [
        ({**good, "bank": bad_bank}, r"state\['bank'\]: batch_numbers, keys and heatmaps must have one entry"),
        ({**good, "sampler": {**good["sampler"], "dataset_size": 17}}, r"state\['sampler'\]\['dataset_size'\] is 17"),
        ({"schedule": good["schedule"], "bank": good["bank"]}, r"state lacks 'sampler'"),
    ]:
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(state)
        assert target.state_dict() == before  # the schedule, checked first, was not loaded either

    model = nn.Linear(2, 1)
    snapshot = SnapshotDistillation(SteppingSchedule(), optimizer, model)
    before_schedule, weights = snapshot.schedule.state_dict(), model.weight.detach().clone()
    other = SnapshotDistillation(SteppingSchedule(), optimizer, nn.Linear(3, 1))
    bad = {"schedule": good["schedule"], "snapshot": other.snapshot.state_dict()}
    with pytest.raises(ValueError, match=r"\['snapshot'\]\['model'\]\['weight'\] must have shape \(1, 2\), got \(1, 3"):
        snapshot.load_state_dict(bad)
    bad = {"schedule": good["schedule"], "snapshot": {**snapshot.snapshot.state_dict(), "copy_step": 5}}
    with pytest.raises(ValueError, match=r"state\['snapshot'\]\['copy_step'\] must not exceed"):
        snapshot.load_state_dict(bad)
    assert snapshot.schedule.state_dict() == before_schedule
    assert torch.equal(snapshot.snapshot.model.weight, weights)


def run_replay(distill, optimizer, epochs):
    """Train-loop stand-in; the predictions are random but seeded, so a resumed run must reproduce
    the teachers of an uninterrupted one."""
    generator = torch.Generator().manual_seed(1234)
    teachers = []
    for epoch in epochs:
        distill.batch_sampler.set_epoch(epoch)
        for batch in distill.batch_sampler:
            keys = torch.tensor([index for index, _, _ in batch])
            replayed = torch.tensor([flag for _, _, flag in batch])
            teachers.append(distill.fetch_teacher(keys=keys, replayed=replayed))
            distill.store_predictions(torch.rand(len(batch), 1, 2, 2, generator=generator), keys=keys,
                                      replayed=replayed)
            optimizer.step()
            distill.after_step()
    return teachers


def test_replay_bank_holds_only_the_pending_replays_over_a_long_run():
    # 30 epochs, lr drops at 10 and 20 (distance 1, 2, 4). The bank used to keep every fresh
    # sample for `distance` batches, across epoch boundaries: up to 64 keys for at most 32 pending.
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.1)
    schedule = SteppingSchedule(distance0=1, step_factor=2)
    distill = replay_distillation(schedule, optimizer, 200, 16)
    sampler = distill.batch_sampler
    largest, replays = 0, 0
    for epoch in range(30):
        sampler.set_epoch(epoch)
        pending = {}  # key -> iteration of its replay, as the sampler's docstring schedules it
        for iteration, batch in enumerate(sampler):
            keys = torch.tensor([index for index, _, _ in batch])
            replayed = torch.tensor([flag for _, _, flag in batch])
            distill.fetch_teacher(keys=keys, replayed=replayed)
            distill.store_predictions(torch.rand(len(batch), 1, 2, 2), keys=keys, replayed=replayed)
            for index in keys[replayed].tolist():
                assert pending.pop(index) == iteration
            for index in keys[~replayed].tolist()[: sampler.replays_per_batch]:
                pending[index] = iteration + schedule.distance  # the distance the sampler read for the batch
            assert len(distill.bank) <= len(pending)
            largest, replays = max(largest, len(distill.bank)), replays + int(replayed.sum())
            optimizer.step()
            distill.after_step()
        lr_scheduler.step()
    assert schedule.distance == 4 and replays > 2000
    assert largest == 4 * sampler.replays_per_batch  # the last distance's worth of scheduled samples


def test_replay_resumed_at_an_epoch_boundary_continues_identically():
    def build():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        return replay_distillation(SteppingSchedule(distance0=3, alpha=0.5), optimizer, 40, 4), optimizer

    original, optimizer = build()
    run_replay(original, optimizer, [0])
    checkpoint = round_trip(original.state_dict())
    assert len(original.bank)  # the replays the end of the epoch cancelled are still held here
    restored, restored_optimizer = build()
    restored.load_state_dict(checkpoint)
    expected = run_replay(original, optimizer, [1, 2])
    got = run_replay(restored, restored_optimizer, [1, 2])
    assert len(got) == len(expected) and any(teacher is not None for teacher, _ in got)
    for (teacher, alpha), (expected_teacher, expected_alpha) in zip(got, expected):
        assert torch.equal(alpha, expected_alpha)
        assert (teacher is None and expected_teacher is None) or torch.equal(teacher, expected_teacher)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel, 2 processes on gloo


def _ddp_worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(tiny_pose_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 12], gamma=0.1)
        schedule = SteppingSchedule(alpha=0.5, alpha_ramp_steps=3)
        dataset = BlobDataset(96)
        # num_replicas and rank come from the initialised process group
        distill = replay_distillation(schedule, optimizer, len(dataset), 4)
        record = {"distances": [], "alphas": [], "fresh": [], "replayed": [], "losses": []}
        for images, targets, indices, replayed in DataLoader(dataset, batch_sampler=distill.batch_sampler):
            outputs = model(images)
            teacher, alpha = distill.fetch_teacher(keys=indices, replayed=replayed)
            distill.store_predictions(outputs, keys=indices, replayed=replayed)
            loss = hgloss.heatmap_gradient_loss(outputs, targets, teacher=teacher, alpha=alpha, backend="reference")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            distill.after_step()
            record["distances"].append(schedule.distance)
            record["alphas"].append(alpha.max().item())
            record["fresh"] += indices[~replayed].tolist()
            record["replayed"] += indices[replayed].tolist()
            record["losses"].append(loss.item())

        snapshot_schedule = SteppingSchedule(distance0=2, alpha=0.5)
        snapshot_distill = SnapshotDistillation(snapshot_schedule, optimizer, model)
        record["snapshot_distances"] = []
        for step in range(6):
            images, targets, _, _ = dataset[(rank * 6 + step, step, False)]
            images, targets = images[None], targets[None]
            outputs = model(images)
            teacher, alpha = snapshot_distill.fetch_teacher(inputs=images)
            loss = hgloss.heatmap_gradient_loss(outputs, targets, teacher=teacher, alpha=alpha, backend="reference")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            snapshot_distill.after_step()
            record["snapshot_distances"].append(snapshot_schedule.distance)
        record["snapshot_grads"] = sum(p.grad is not None for p in snapshot_distill.snapshot.model.parameters())
        record["weights"] = [p.detach().sum().item() for p in model.parameters()]
        with open(f"{out_dir}/rank{rank}.json", "w") as file:
            json.dump(record, file)
        # Tear DDP down while the process group still exists: a DDP model destroyed after
        # destroy_process_group() can leave gloo waiting for a peer that has already gone.
        dist.barrier()
        del model, distill, snapshot_distill, optimizer
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_two_processes_agree_on_the_schedule_and_shard_the_replays(tmp_path):
    world_size, deadline = 2, time.monotonic() + 60
    context = mp.start_processes(
        _ddp_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=False, start_method="spawn"
    )
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process DDP run did not finish in 60 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]
    first, second = records
    assert first["distances"] == second["distances"] and first["alphas"] == second["alphas"]
    assert first["distances"][-1] == 4  # both lr drops stepped the distance, on both ranks
    assert max(first["alphas"]) == 0.5
    assert set(first["fresh"]).isdisjoint(second["fresh"])
    assert sorted(first["fresh"] + second["fresh"]) == list(range(96))
    assert set(first["replayed"]).isdisjoint(second["replayed"])
    assert first["replayed"] and set(first["replayed"]) <= set(first["fresh"])
    assert all(math.isfinite(loss) for record in records for loss in record["losses"])
    assert first["snapshot_distances"] == second["snapshot_distances"]
    assert first["snapshot_grads"] == second["snapshot_grads"] == 0
    assert first["weights"] == second["weights"]  # DDP kept the replicas in step
