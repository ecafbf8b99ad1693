"""Plan: exactly-once equal shares, locality, determinism, carry-over and resume, by property."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardloader import ConfigError, ResumeError
from shardloader.plan import (
    POLICIES,
    EpochPlan,
    PlanConfig,
    ResumePoint,
    Span,
    plan_carry_in,
    plan_epoch,
)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shard_sizes(draw: st.DrawFn) -> list[int]:
    """Small shards, often empty ones, sometimes one huge shard among them."""
    sizes = draw(st.lists(st.integers(0, 30) | st.just(0), max_size=12))
    if draw(st.booleans()):
        sizes.insert(draw(st.integers(0, len(sizes))), draw(st.integers(100, 400)))
    return sizes


configs = st.builds(
    PlanConfig,
    seed=st.integers(0, 2**40),
    shuffle=st.booleans(),
    shuffle_window=st.integers(1, 5),
    policy=st.sampled_from(POLICIES),
)
world_sizes = st.integers(1, 8)
worker_counts = st.integers(0, 4)
epochs = st.integers(0, 4)


def plan_all(sizes: list[int], config: PlanConfig, **kwargs: object) -> list[EpochPlan]:
    world_size = kwargs["world_size"]
    assert isinstance(world_size, int)
    return [plan_epoch(sizes, config=config, rank=r, **kwargs) for r in range(world_size)]


def served(plans: list[EpochPlan], *, padding: bool | None = False) -> Counter[int]:
    """Ids the plans serve: real ones (padding=False), padding repeats (True) or all (None)."""
    out: Counter[int] = Counter()
    for plan in plans:
        for worker in plan.workers:
            ids, mask = worker.sample_ids(), worker.padded_mask()
            if padding is not None:
                ids = ids[mask == padding]
            out.update(ids.tolist())
    return out


def shard_of(sizes: list[int], ids: np.ndarray) -> np.ndarray:
    first = np.concatenate([[0], np.cumsum(sizes)])
    return np.searchsorted(first, ids, side="right") - 1


def check_shape(
    plans: list[EpochPlan], config: PlanConfig, sizes: list[int], *, balanced: bool = True
) -> None:
    """Equal counts per rank, balanced workers, consistent windows, same leftover everywhere.

    Workers of an exact resume continue where each stopped, so they need not be balanced.
    """
    per_rank = {p.samples_per_rank for p in plans}
    assert len(per_rank) == 1
    for plan in plans:
        assert len(plan.workers) == max(plan.num_workers, 1)
        counts = [w.num_samples for w in plan.workers]
        assert sum(counts) == plan.samples_per_rank == len(plan.sample_ids())
        if balanced:
            assert counts == sorted(counts, reverse=True)
            assert counts[0] - counts[-1] <= 1
        assert np.array_equal(plan.leftover_ids, plans[0].leftover_ids)
        assert plan.num_dropped == len(plan.leftover_ids)
        for worker in plan.workers:
            for window in worker.iter_windows():
                assert len(window.shard_indices) <= config.shuffle_window
                shards = shard_of(sizes, window.sample_ids).tolist()
                assert sorted(window.shard_indices) == sorted(set(shards))
                assert len(window.sample_ids) == len(window.padded) > 0
    assert sum(sum(w.num_padded for w in p.workers) for p in plans) == plans[0].num_padded


# --- readable examples ---------------------------------------------------------------------

UNEVEN = [100, 250, 3, 0, 400, 150, 100]  # 7 shards, 1,003 samples


@pytest.mark.parametrize(
    ("world_size", "policy", "per_rank", "per_worker", "dropped", "padded"),
    [
        (2, "drop", 501, [251, 250], 1, 0),
        (3, "drop", 334, [167, 167], 1, 0),
        (2, "pad", 502, [251, 251], 0, 1),
        (3, "pad", 335, [168, 167], 0, 2),
    ],
)
def test_uneven_shards_split_equally(world_size, policy, per_rank, per_worker, dropped, padded):
    config = PlanConfig(seed=3, policy=policy)
    plans = plan_all(UNEVEN, config, epoch=0, world_size=world_size, num_workers=2)
    for plan in plans:
        assert plan.samples_per_rank == per_rank
        assert [w.num_samples for w in plan.workers] == per_worker
        assert (plan.num_dropped, plan.num_padded) == (dropped, padded)
    real = served(plans)
    assert sum(real.values()) == 1003 - dropped
    assert set(real) | set(plans[0].leftover_ids.tolist()) == set(range(1003))
    assert max(real.values()) == 1
    assert sum(served(plans, padding=True).values()) == padded


def test_manifest_order_without_shuffle():
    config = PlanConfig(shuffle=False)
    plan = plan_epoch([3, 0, 2], config=config, epoch=0, world_size=1, rank=0, num_workers=2)
    assert [w.sample_ids().tolist() for w in plan.workers] == [[0, 1, 2], [3, 4]]
    assert plan.workers[0].windows[0].spans == (Span(0, 0, 3),)


def test_leftover_is_served_first_next_epoch():
    config = PlanConfig(shuffle=False)
    epoch0 = plan_all([3, 2], config, epoch=0, world_size=2, num_workers=0)
    assert [p.sample_ids().tolist() for p in epoch0] == [[0, 1], [2, 3]]
    assert epoch0[0].leftover_ids.tolist() == [4]
    epoch1 = plan_all([3, 2], config, epoch=1, world_size=2, num_workers=0)
    # id 4 catches up the serving it missed: twice in epoch 1, so twice in two epochs
    assert [p.sample_ids().tolist() for p in epoch1] == [[4, 0, 1], [2, 3, 4]]
    assert (epoch1[0].num_carried, epoch1[0].num_dropped) == (1, 0)


def test_fewer_samples_than_ranks():
    drop = plan_all([2], PlanConfig(shuffle=False), epoch=0, world_size=5, num_workers=2)
    assert all(p.samples_per_rank == 0 for p in drop)
    assert drop[0].leftover_ids.tolist() == [0, 1]
    pad = plan_all([2], PlanConfig(policy="pad"), epoch=0, world_size=5, num_workers=2)
    assert [p.sample_ids().tolist() for p in pad] == [[0], [1], [0], [1], [0]]
    assert [p.workers[0].padded_mask().tolist() for p in pad] == [[False], [False]] + [[True]] * 3
    assert [p.workers[1].num_samples for p in pad] == [0] * 5


def test_output_is_pinned():
    """The same inputs give these ids on any machine and numpy version."""
    config = PlanConfig(seed=7, shuffle_window=2)
    plans = plan_all([3, 1, 4, 1, 5], config, epoch=2, world_size=2, num_workers=2)
    got = [[w.sample_ids().tolist() for w in p.workers] for p in plans]
    assert got == PINNED


PINNED = [[[10, 11, 9, 3], [13, 12, 8]], [[4, 2, 0, 1], [6, 5, 7]]]


def test_elastic_resume_example():
    config = PlanConfig(seed=1)
    sizes = [40, 0, 25, 35]
    before = plan_all(sizes, config, epoch=0, world_size=2, num_workers=2)
    consumed = np.array([[10, 7], [9, 9]])
    point = ResumePoint(epoch=0, world_size=2, num_workers=2, config=config, consumed=consumed)
    after = plan_all(sizes, config, epoch=0, world_size=3, num_workers=1, resume=point)
    assert [p.samples_per_rank for p in after] == [21, 21, 21]
    assert len(after[0].leftover_ids) == 2  # 100 - 35 consumed = 3 * 21 + 2
    seen = Counter()
    for plan, row in zip(before, consumed, strict=True):
        for worker, count in zip(plan.workers, row, strict=True):
            seen.update(worker.sample_ids()[:count].tolist())
    seen += served(after) + Counter(after[0].leftover_ids.tolist())
    assert seen == Counter(range(100))


# --- properties of one epoch ---------------------------------------------------------------


@PROPERTY
@given(shard_sizes(), configs, epochs, world_sizes, worker_counts, st.data())
def test_epoch_serves_each_id_once_in_equal_shares(
    sizes, config, epoch, world_size, num_workers, data
):
    total = sum(sizes)
    carry = plan_carry_in(sizes, config=config, epoch=epoch, world_size=world_size)
    assert len(carry) < world_size
    kwargs = {"epoch": epoch, "world_size": world_size, "num_workers": num_workers}
    if total and data.draw(st.booleans(), label="explicit carry_in"):
        # e.g. the leftover of an elastic resume: any ids, possibly more than world_size
        ids = st.integers(0, total - 1)
        carry = np.array(data.draw(st.lists(ids, max_size=2 * world_size)), dtype=np.int64)
        kwargs["carry_in"] = carry
    plans = plan_all(sizes, config, **kwargs)
    check_shape(plans, config, sizes)
    assert plans[0].num_carried == len(carry)
    expected = Counter(range(total)) + Counter(carry.tolist())
    expected.subtract(plans[0].leftover_ids.tolist())
    assert served(plans) == +expected
    assert min(expected.values(), default=0) >= 0  # the leftover came from this epoch
    pads = served(plans, padding=True)
    if config.policy == "drop":
        assert plans[0].num_dropped < world_size
        assert not pads
    else:
        assert plans[0].num_dropped == 0
        assert plans[0].num_padded == sum(pads.values()) < world_size
        if not config.shuffle and total:  # the repeats are the sequence's first ids
            sequence = [*carry.tolist(), *range(total)]
            repeats = (sequence[i % len(sequence)] for i in range(plans[0].num_padded))
            assert pads == Counter(repeats)
    # determinism: a second call gives the same reading order
    again = plan_epoch(sizes, config=config, rank=0, **kwargs)
    for a, b in zip(plans[0].workers, again.workers, strict=True):
        assert np.array_equal(a.sample_ids(), b.sample_ids())
        assert np.array_equal(a.padded_mask(), b.padded_mask())


@PROPERTY
@given(shard_sizes(), configs, epochs, world_sizes, worker_counts)
def test_ranks_touch_only_their_shards(sizes, config, epoch, world_size, num_workers):
    plans = plan_all(sizes, config, epoch=epoch, world_size=world_size, num_workers=num_workers)
    carry = plan_carry_in(sizes, config=config, epoch=epoch, world_size=world_size)
    carry_shards = len(set(shard_of(sizes, carry).tolist()))
    total_touched = total_bound = 0
    for plan in plans:
        touched = {s for w in plan.workers for win in w.iter_windows() for s in win.shard_indices}
        ids = Counter(plan.sample_ids().tolist())
        starts = np.cumsum([0, *sizes]).tolist()
        full = sum(
            1
            for s, size in enumerate(sizes)
            if size and all(i in ids for i in range(starts[s], starts[s] + size))
        )
        pad_ids = np.concatenate([w.sample_ids()[w.padded_mask()] for w in plan.workers])
        pad_shards = len(set(shard_of(sizes, pad_ids).tolist()))
        assert len(touched) <= full + 2 + carry_shards + pad_shards
        total_touched += len(touched)
        total_bound += pad_shards
    nonempty = sum(1 for s in sizes if s)
    assert total_touched <= nonempty + world_size - 1 + carry_shards + total_bound


@PROPERTY
@given(
    shard_sizes().filter(lambda s: sum(s) >= 12 and sum(1 for x in s if x) >= 2),
    st.integers(0, 2**40),
    st.integers(1, 4),
    epochs,
)
def test_epochs_and_seeds_change_the_order(sizes, seed, shuffle_window, epoch):
    def order(seed: int, epoch: int) -> list[int]:
        config = PlanConfig(seed=seed, shuffle_window=shuffle_window)
        plan = plan_epoch(sizes, config=config, epoch=epoch, world_size=1, rank=0, num_workers=0)
        return plan.sample_ids().tolist()

    assert order(seed, epoch) != order(seed, epoch + 1)
    assert order(seed, epoch) != order(seed + 1, epoch)
    assert sorted(order(seed, epoch)) == list(range(sum(sizes)))


@PROPERTY
@given(
    shard_sizes(),
    st.integers(0, 2**40),
    st.booleans(),
    world_sizes,
    worker_counts,
    st.integers(1, 5),
)
def test_drop_policy_loses_nothing_over_epochs(sizes, seed, shuffle, world_size, num_workers, n):
    config = PlanConfig(seed=seed, shuffle=shuffle)
    total = sum(sizes)
    count: Counter[int] = Counter()
    leftover = np.empty(0, dtype=np.int64)
    for epoch in range(n):
        carry = plan_carry_in(sizes, config=config, epoch=epoch, world_size=world_size)
        assert np.array_equal(carry, leftover)  # the replayed chain is the real one
        plans = plan_all(sizes, config, epoch=epoch, world_size=world_size, num_workers=num_workers)
        for ids, times in served(plans).items():  # no id more than once plus its carry
            assert times <= 1 + list(carry).count(ids)
        count += served(plans)
        leftover = plans[0].leftover_ids
    behind = Counter({i: n - count[i] for i in range(total) if count[i] != n})
    assert all(v > 0 for v in behind.values())
    assert behind == Counter(leftover.tolist())
    assert sum(behind.values()) <= world_size - 1
    if total >= world_size - 1:
        assert max(behind.values(), default=0) <= 1


def test_fast_carry_chain_matches_the_full_sequence():
    """Many shards (most empty) take the partial-sort path; it must agree with the plans."""
    rng = np.random.default_rng(5)
    sizes = (rng.integers(0, 4, 300) * (rng.random(300) < 0.2)).tolist()
    for world_size in (7, 64):
        config = PlanConfig(seed=11)
        carry = np.empty(0, dtype=np.int64)
        for epoch in range(4):
            assert np.array_equal(
                plan_carry_in(sizes, config=config, epoch=epoch, world_size=world_size), carry
            )
            plan = plan_epoch(
                sizes,
                config=config,
                epoch=epoch,
                world_size=world_size,
                rank=0,
                num_workers=1,
                carry_in=carry,
            )
            carry = plan.leftover_ids
        assert len(carry)  # not vacuous


# --- resume --------------------------------------------------------------------------------


def draw_consumed(data: st.DataObject, plans: list[EpochPlan], *, equal: bool) -> np.ndarray:
    """Random consumed counts; with ``equal``, every rank consumed as many as rank 0.

    With ``equal``, a rank whose workers were planned other counts than rank 0's (after an
    elastic re-split, ranks hold equal samples but may divide them differently among their
    workers) takes rank 0's total, its workers filled in order.
    """
    rows = []
    for plan in plans[: 1 if equal else None]:
        rows.append([data.draw(st.integers(0, w.num_samples)) for w in plan.workers])
    for plan in plans[1:] if equal else []:
        planned = [w.num_samples for w in plan.workers]
        row = list(rows[0])
        if any(c > p for c, p in zip(row, planned, strict=True)):
            left, row = sum(rows[0]), []
            for p in planned:
                row.append(min(left, p))
                left -= row[-1]
            assert left == 0, "ranks hold equal samples"
        rows.append(row)
    return np.array(rows, dtype=np.int64)


def consumed_ids(plans: list[EpochPlan], consumed: np.ndarray, *, padding: bool) -> Counter[int]:
    out: Counter[int] = Counter()
    for plan, row in zip(plans, consumed, strict=True):
        for worker, count in zip(plan.workers, row, strict=True):
            mask = worker.padded_mask()[:count]
            out.update(worker.sample_ids()[:count][mask == padding].tolist())
    return out


@PROPERTY
@given(shard_sizes(), configs, epochs, world_sizes, worker_counts, st.data())
def test_resume_same_topology_continues_exactly(sizes, config, epoch, world_size, workers, data):
    kwargs = {"epoch": epoch, "world_size": world_size, "num_workers": workers}
    before = plan_all(sizes, config, **kwargs)
    consumed = draw_consumed(data, before, equal=True)
    point = ResumePoint(config=config, consumed=consumed, **kwargs)
    after = plan_all(sizes, config, resume=point, **kwargs)
    check_shape(after, config, sizes, balanced=False)
    for old, new, row in zip(before, after, consumed, strict=True):
        assert new.samples_per_rank == old.samples_per_rank - row.sum()
        assert np.array_equal(new.leftover_ids, old.leftover_ids)
        for a, b, count in zip(old.workers, new.workers, row, strict=True):
            assert np.array_equal(a.sample_ids()[count:], b.sample_ids())
            assert np.array_equal(a.padded_mask()[count:], b.padded_mask())
            assert all(w.ids is None for w in b.windows[1:])  # untouched windows stay spans


def check_rest(before: list[EpochPlan], consumed: np.ndarray, after: list[EpochPlan]) -> None:
    """Consumed + the resumed plans + what they leave over == what ``before`` planned."""
    planned = served(before) + Counter(before[0].leftover_ids.tolist())
    rest = served(after) + Counter(after[0].leftover_ids.tolist())
    assert consumed_ids(before, consumed, padding=False) + rest == planned
    old_left = before[0].leftover_ids
    assert np.array_equal(after[0].leftover_ids[: len(old_left)], old_left)
    assert len(after[0].leftover_ids) - len(old_left) < max(
        before[0].world_size, after[0].world_size
    )
    assert after[0].num_padded < max(before[0].world_size, after[0].world_size)


@PROPERTY
@given(
    shard_sizes(),
    configs,
    epochs,
    world_sizes,
    worker_counts,
    world_sizes,
    worker_counts,
    st.data(),
)
def test_elastic_resume_serves_the_rest_once(sizes, config, epoch, w1, k1, w2, k2, data):
    before = plan_all(sizes, config, epoch=epoch, world_size=w1, num_workers=k1)
    consumed = draw_consumed(data, before, equal=False)
    point = ResumePoint(
        epoch=epoch, world_size=w1, num_workers=k1, config=config, consumed=consumed
    )
    after = plan_all(sizes, config, epoch=epoch, world_size=w2, num_workers=k2, resume=point)
    # same topology and consumption per rank: an exact resume, whose workers continue as they were
    exact = (w1, max(k1, 1)) == (w2, max(k2, 1)) and len(set(consumed.sum(axis=1))) == 1
    check_shape(after, config, sizes, balanced=not exact)
    check_rest(before, consumed, after)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shard_sizes(), configs, world_sizes, world_sizes, world_sizes, worker_counts, st.data())
def test_resume_of_a_resumed_run(sizes, config, w1, w2, w3, workers, data):
    first = plan_all(sizes, config, epoch=1, world_size=w1, num_workers=workers)
    consumed1 = draw_consumed(data, first, equal=False)
    point1 = ResumePoint(
        epoch=1, world_size=w1, num_workers=workers, config=config, consumed=consumed1
    )
    second = plan_all(sizes, config, epoch=1, world_size=w2, num_workers=2, resume=point1)
    consumed2 = draw_consumed(data, second, equal=data.draw(st.booleans()))
    point2 = ResumePoint(
        epoch=1, world_size=w2, num_workers=2, config=config, consumed=consumed2, previous=point1
    )
    third = plan_all(sizes, config, epoch=1, world_size=w3, num_workers=1, resume=point2)
    check_shape(third, config, sizes)
    check_rest(second, consumed2, third)


def test_next_epoch_takes_the_resumed_leftover():
    config = PlanConfig(seed=2)
    sizes = [13, 0, 29, 7]
    before = plan_all(sizes, config, epoch=0, world_size=3, num_workers=2)
    consumed = np.array([[3, 2], [4, 1], [0, 5]])
    point = ResumePoint(epoch=0, world_size=3, num_workers=2, config=config, consumed=consumed)
    after = plan_all(sizes, config, epoch=0, world_size=2, num_workers=1, resume=point)
    carry = after[0].leftover_ids
    # one left at the start (49 = 3 * 16 + 1), one by the re-split (48 - 15 = 2 * 16 + 1)
    assert len(carry) == 2
    assert carry[0] == before[0].leftover_ids[0]
    nxt = plan_all(sizes, config, epoch=1, world_size=2, num_workers=1, carry_in=carry)
    assert nxt[0].num_carried == 2
    assert nxt[0].num_dropped == 1  # (2 + 49) % 2
    total = consumed_ids(before, consumed, padding=False) + served(after) + served(nxt)
    total.update(nxt[0].leftover_ids.tolist())
    assert total == Counter({i: 2 for i in range(49)})


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 4}, "rank 4 is out of range for world_size 4"),
        ({"world_size": 0}, "world_size is 0; expected an integer >= 1"),
        ({"num_workers": -1}, "num_workers is -1"),
        ({"epoch": 1.5}, "epoch is 1.5; expected an integer"),
        ({"shard_sizes": [3, -2]}, r"shard_sizes\[1\] is -2; expected a sample count >= 0"),
        ({"shard_sizes": [[1, 2]]}, r"shard_sizes has shape \(1, 2\)"),
        ({"shard_sizes": [1.5]}, "dtype float64"),
        ({"carry_in": [5]}, r"carry_in\[0\] is 5, out of range for 5 samples"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"shard_sizes": [2, 3], "epoch": 0, "world_size": 4, "rank": 0, "num_workers": 1}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        plan_epoch(args.pop("shard_sizes"), config=PlanConfig(), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "repeat"}, "PlanConfig.policy is 'repeat'; expected one of 'drop', 'pad'"),
        ({"shuffle_window": 0}, "PlanConfig.shuffle_window is 0; expected an integer >= 1"),
        ({"seed": -1}, "PlanConfig.seed is -1"),
        ({"shuffle": 1}, "PlanConfig.shuffle is 1; expected True or False"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PlanConfig(**kwargs)


def test_config_must_be_a_plan_config():
    with pytest.raises(ConfigError, match="config is a dict; expected a PlanConfig"):
        plan_epoch([1], config={"seed": 1}, epoch=0, world_size=1, rank=0, num_workers=0)


def test_resume_point_that_does_not_fit():
    config = PlanConfig()
    sizes = [10, 10]

    def point(consumed: list[list[int]], **kwargs: object) -> ResumePoint:
        fields = {"epoch": 0, "world_size": 2, "num_workers": 2, "config": config}
        fields.update(kwargs)
        return ResumePoint(consumed=np.array(consumed), **fields)

    with pytest.raises(ConfigError, match=r"shape \(2, 1\).*expected integers of shape \(2, 2\)"):
        point([[1], [1]])
    with pytest.raises(ConfigError, match=r"consumed\[1, 0\] is -1"):
        point([[1, 1], [-1, 1]])
    kwargs = {"epoch": 0, "world_size": 2, "rank": 0, "num_workers": 2}
    with pytest.raises(ResumeError, match="rank 0 worker 1 consumed 6 samples but was planned 5"):
        plan_epoch(sizes, config=config, resume=point([[0, 6], [0, 0]]), **kwargs)
    with pytest.raises(ResumeError, match="resume point is for epoch 3, this plan is for epoch 0"):
        plan_epoch(sizes, config=config, resume=point([[0, 0], [0, 0]], epoch=3), **kwargs)
    other = point([[0, 0], [0, 0]], config=PlanConfig(seed=1))
    with pytest.raises(ResumeError, match="planned with PlanConfig"):
        plan_epoch(sizes, config=config, resume=other, **kwargs)
