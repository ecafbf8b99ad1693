"""The spread order computed per shard is the full sort of every block's key, queried cheaply."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardloader.errors import ConfigError
from shardloader.plan import (
    EpochStart,
    PlanConfig,
    ResumePoint,
    plan_carry_in,
    plan_epoch,
    prepare_units,
)
from shardloader.plan_spans import permutation, spread_permutation
from shardloader.plan_spread import CELL_BITS, PlanUnits, SpreadOrder

BLOCKS = st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=12), min_size=1, max_size=25)


def units_of(blocks: list[list[int]]) -> PlanUnits:
    sizes = [n for b in blocks for n in b]
    groups = np.repeat(np.arange(len(blocks)), [len(b) for b in blocks])
    return prepare_units(sizes, unit_groups=groups)


def full_order(order: SpreadOrder, units: PlanUnits) -> np.ndarray:
    """Every block, sorted by (key, block index): what the per-shard queries must reproduce."""
    assert units.groups is not None
    assert units.group_starts is not None
    shard = units.groups
    index = np.arange(len(shard)) - units.group_starts[shard]
    # block i of a shard sits in slot (i + turn) mod m, i.e. slot - head = i (mod m)
    head = order._heads(shard)
    counts = units.group_counts[shard]  # type: ignore[index]
    slot = (index - head) % counts
    keys = order.keys(shard, slot)
    return np.lexsort((np.arange(len(shard)), keys))


@settings(max_examples=200, deadline=None)
@given(blocks=BLOCKS, seed=st.integers(0, 2**32), data=st.data())
def test_a_segment_is_the_full_sort_cut_at_its_positions(
    blocks: list[list[int]], seed: int, data: st.DataObject
) -> None:
    units = units_of(blocks)
    order = SpreadOrder(units, (3, seed, 0))
    expect = full_order(order, units)
    ends = np.cumsum(units.sizes[expect])
    total = int(units.first[-1])
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    got, pos = order.segment(start, stop)
    # The segment is a run of the full order that starts at ``pos`` and covers [start, stop).
    if len(got):
        i = int(np.flatnonzero(expect == got[0])[0])
        assert np.array_equal(got, expect[i : i + len(got)])
        assert pos == (ends[i - 1] if i else 0)
    assert pos <= start
    assert pos + int(units.sizes[got].sum()) >= stop


@settings(max_examples=100, deadline=None)
@given(blocks=BLOCKS, seed=st.integers(0, 2**32))
def test_slot_counts_match_the_keys_at_every_boundary(blocks: list[list[int]], seed: int) -> None:
    """At and around every slot boundary j/m (where rounding matters), counts are exact."""
    units = units_of(blocks)
    order = SpreadOrder(units, (3, seed, 1))
    counts = units.group_counts
    assert counts is not None
    times = {0.0, 1.0, 0.5, 1e-300}
    for m in set(counts.tolist()):
        for j in range(m + 1):
            t = j / m
            times |= {t, np.nextafter(t, 0.0), np.nextafter(t, 2.0)}
    shards = np.repeat(np.arange(len(counts)), counts)
    slots = np.arange(len(shards)) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = order.keys(shards, slots)
    assert (np.diff(keys)[np.diff(shards) == 0] >= 0).all()  # keys rise with the slot
    for t in times:
        brute = np.bincount(shards[keys < t], minlength=len(counts))
        assert np.array_equal(order.slots_before(float(t)), brute), t


def test_the_order_is_the_same_for_the_same_seed_and_epoch_only() -> None:
    units = units_of([[3] * 7, [2] * 5, [4] * 9])
    a = SpreadOrder(units, (3, 1, 0)).segment(0, 58)[0]
    assert np.array_equal(a, SpreadOrder(units, (3, 1, 0)).segment(0, 58)[0])
    assert not np.array_equal(a, SpreadOrder(units, (3, 1, 1)).segment(0, 58)[0])
    assert not np.array_equal(a, SpreadOrder(units, (3, 2, 0)).segment(0, 58)[0])
    # Known values: the order must not change across machines or numpy versions.
    assert a[:8].tolist() == [6, 7, 15, 16, 0, 1, 17, 8]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_stretch_of_the_epoch_holds_an_equal_share_of_each_run_of_neighbouring_shards(
    seed: int,
) -> None:
    """Stratified over runs of 64 shards: before any time ``T``, a run of 64 shards of ``m``
    blocks has ``64 * m * T`` slots, give or take one (independent places were off by about
    sqrt(64 * T * (1 - T)), up to 4 here), and every run's slot takes each cell once."""
    runs, m = 5, 16
    units = units_of([[1] * m] * (runs << CELL_BITS))
    order = SpreadOrder(units, (3, seed, 0))
    for t in np.linspace(0.0, 1.0, 97)[1:-1]:
        per_run = order.slots_before(float(t)).reshape(runs, -1).sum(axis=1)
        assert np.abs(per_run - (64 * m * t)).max() <= 1.0 + 1e-9, t
    for slot in range(m):
        keys = order.keys(np.arange(runs << CELL_BITS), np.full(runs << CELL_BITS, slot))
        cells = np.floor((keys * m - slot) * 64).astype(np.int64).reshape(runs, -1)
        assert all(len(set(row.tolist())) == 64 for row in cells), slot


def test_prepared_units_plan_as_the_raw_arrays_do() -> None:
    rng = np.random.default_rng(3)
    blocks = [rng.integers(0, 30, rng.integers(1, 12)).tolist() for _ in range(60)]
    sizes = [n for b in blocks for n in b]
    groups = np.repeat(np.arange(len(blocks)), [len(b) for b in blocks])
    unit_bytes = rng.integers(0, 5000, len(sizes))
    units = prepare_units(sizes, unit_bytes=unit_bytes, unit_groups=groups)
    config = PlanConfig(seed=4, shuffle_unit="block", shuffle_window=9, shuffle_bytes=20_000)
    for epoch in (0, 3):
        kwargs = {"config": config, "epoch": epoch, "world_size": 7, "num_workers": 3}
        for rank in (0, 6):
            raw = plan_epoch(sizes, rank=rank, unit_bytes=unit_bytes, unit_groups=groups, **kwargs)
            prepared = plan_epoch(units, rank=rank, **kwargs)
            assert np.array_equal(raw.sample_ids(), prepared.sample_ids())
            assert np.array_equal(raw.leftover_ids, prepared.leftover_ids)
    with pytest.raises(ConfigError, match="pass them to prepare_units"):
        plan_epoch(units, unit_groups=groups, rank=0, **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    blocks=BLOCKS,
    world_size=st.integers(1, 9),
    num_workers=st.integers(0, 3),
    seed=st.integers(0, 1000),
    epochs=st.integers(1, 5),
)
def test_block_carry_chain_matches_the_plans(
    blocks: list[list[int]], world_size: int, num_workers: int, seed: int, epochs: int
) -> None:
    """The replayed carry-in (per-shard tails) equals each epoch's real leftover, and over the
    epochs every id is served as often as the carry-over guarantee says."""
    units = units_of(blocks)
    total = int(units.first[-1])
    config = PlanConfig(seed=seed, shuffle_unit="block", shuffle_window=3)
    carry = np.empty(0, dtype=np.int64)
    served = np.zeros(total, dtype=np.int64)
    for epoch in range(epochs):
        assert np.array_equal(
            plan_carry_in(units, config=config, epoch=epoch, world_size=world_size), carry
        )
        plans = [
            plan_epoch(
                units,
                config=config,
                epoch=epoch,
                world_size=world_size,
                rank=r,
                num_workers=num_workers,
            )
            for r in range(world_size)
        ]
        counts = {p.samples_per_rank for p in plans}
        assert len(counts) == 1
        ids = np.concatenate([p.sample_ids() for p in plans])
        served += np.bincount(ids, minlength=total)
        carry = plans[0].leftover_ids
    behind = epochs - served
    assert (behind >= 0).all()
    assert np.array_equal(np.bincount(carry, minlength=total), behind)


def test_an_exact_resume_over_prepared_blocks_continues_each_worker() -> None:
    rng = np.random.default_rng(8)
    blocks = [rng.integers(1, 40, rng.integers(1, 20)).tolist() for _ in range(200)]
    units = units_of(blocks)
    config = PlanConfig(seed=2, shuffle_unit="block", shuffle_window=16)
    world = {"world_size": 5, "num_workers": 2}
    plans = [plan_epoch(units, config=config, epoch=4, rank=r, **world) for r in range(5)]
    consumed = np.array([[w.num_samples // 3 for w in p.workers] for p in plans])
    consumed[:] = consumed[0]
    point = ResumePoint(epoch=4, config=config, consumed=consumed, **world)
    for r, plan in enumerate(plans):
        rest = plan_epoch(units, config=config, epoch=4, rank=r, resume=point, **world)
        for before, after in zip(plan.workers, rest.workers, strict=True):
            k = int(consumed[r, before.worker_id])
            assert np.array_equal(before.sample_ids()[k:], after.sample_ids())


@settings(max_examples=60, deadline=None)
@given(
    blocks=BLOCKS,
    world_size=st.integers(1, 6),
    new_world=st.integers(1, 6),
    seed=st.integers(0, 1000),
    in_blocks=st.booleans(),
    new_workers=st.integers(1, 2),
    data=st.data(),
)
def test_carry_in_since_a_resumed_epoch_is_the_leftover_of_the_plans(
    blocks: list[list[int]],
    world_size: int,
    new_world: int,
    seed: int,
    in_blocks: bool,
    new_workers: int,
    data: st.DataObject,
) -> None:
    """plan_carry_in(since=...) gives what planning each epoch after the state in full gives."""
    units = units_of(blocks)
    if not in_blocks:
        units = prepare_units([sum(b) for b in blocks])
    unit = "block" if in_blocks else "shard"
    config = PlanConfig(seed=seed, shuffle_unit=unit, shuffle_window=2)
    carry = plan_carry_in(units, config=config, epoch=1, world_size=world_size)
    world = {"world_size": world_size, "num_workers": 2}
    plans = [plan_epoch(units, config=config, epoch=1, rank=r, **world) for r in range(world_size)]
    consumed = np.array(
        [[data.draw(st.integers(0, w.num_samples)) for w in p.workers] for p in plans]
    )
    point = ResumePoint(epoch=1, config=config, consumed=consumed, **world)
    since = EpochStart(1, carry, point)
    expect = carry
    for epoch in (1, 2, 3):
        resume = point if epoch == 1 else None
        expect = plan_epoch(
            units,
            config=config,
            epoch=epoch,
            world_size=new_world,
            rank=0,
            num_workers=new_workers,
            resume=resume,
            carry_in=expect,
        ).leftover_ids
        got = plan_carry_in(
            units,
            config=config,
            epoch=epoch + 1,
            world_size=new_world,
            since=since,
            num_workers=new_workers,
        )
        assert np.array_equal(got, expect)


@pytest.mark.parametrize(
    ("sizes", "groups", "match"),
    [
        ([1, 2, 3], [0, 0, 2], "unit_groups"),  # a step of 2
        ([1, 2, 3], [0, 1, 0], "unit_groups"),  # decreasing
        ([1, 2, 3], [1, 1, 2], "unit_groups"),  # not from 0
        ([1, 2, 3], np.array([0, 1, 0], dtype=np.uint64), "unit_groups"),  # wraps as uint
        ([1, 2, 3], [0, 1], "unit_groups"),  # one short
        ([1, -2, 3], [0, 0, 1], r"shard_sizes\[1\] is -2"),
    ],
)
def test_prepare_units_refuses_bad_units(sizes: list[int], groups: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        prepare_units(sizes, unit_groups=groups)  # type: ignore[arg-type]


def test_prepared_units_do_not_copy_int64_arrays_nor_let_them_be_written() -> None:
    sizes = np.array([3, 0, 5, 2], dtype=np.int64)
    units = prepare_units(sizes, unit_groups=[0, 0, 1, 1])
    assert np.shares_memory(units.sizes, sizes)
    assert sizes.flags.writeable  # the caller's array keeps its flags
    assert not units.sizes.flags.writeable
    assert units.group_starts.tolist() == [0, 2]  # type: ignore[union-attr]
    assert units.group_counts.tolist() == [2, 2]  # type: ignore[union-attr]
    assert units.group_samples.tolist() == [3, 7]  # type: ignore[union-attr]


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_shards_of_one_block_each_come_in_the_order_of_whole_shards(
    sizes: list[int], seed: int, epoch: int
) -> None:
    """Slot 0's jitter is the shard's own draw, so blocks mode over one-block shards plans the
    same stream as whole shards (a Parquet file indexed in place and its converted copy)."""
    world = {"epoch": epoch, "world_size": 3, "rank": 1, "num_workers": 2}
    shards = plan_epoch(sizes, config=PlanConfig(seed=seed, shuffle_window=2), **world)
    blocks = plan_epoch(
        prepare_units(sizes, unit_groups=np.arange(len(sizes))),
        config=PlanConfig(seed=seed, shuffle_window=2, shuffle_unit="block"),
        **world,
    )
    assert np.array_equal(shards.sample_ids(), blocks.sample_ids())
    assert np.array_equal(shards.leftover_ids, blocks.leftover_ids)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=40),
    key=st.integers(0, 2**32),
)
def test_a_spread_window_holds_every_run_in_proportion_in_every_prefix(
    lengths: list[int], key: int
) -> None:
    """Each run's items take the equal parts of the window: in the first ``P`` positions of
    ``N`` a run of ``c`` has ``P * c / N`` items, give or take ``1 + R * c / N`` (``R`` runs)."""
    order = spread_permutation(np.array(lengths), (9, key))
    n, runs = sum(lengths), len(lengths)
    assert sorted(order.tolist()) == list(range(n))
    run = np.repeat(np.arange(runs), lengths)[order]
    counts = np.cumsum(np.eye(runs, dtype=np.int64)[run], axis=0)  # [P, run]: items so far
    expected = np.outer(np.arange(1, n + 1), lengths) / n
    slack = 1 + runs * np.array(lengths) / n + 1e-9
    assert (np.abs(counts - expected) <= slack).all()


def test_a_spread_window_draws_on_every_block_where_a_uniform_one_repeats_some() -> None:
    """111 blocks of 51 (a worker's last window in the shuffle benchmark): any 222 consecutive
    samples hold every block, and 111 of them about 5/6 of the blocks (uniformly permuted: 63%)."""
    lengths = np.full(111, 51)
    run = np.repeat(np.arange(111), lengths)
    spread = run[spread_permutation(lengths, (1, 2, 3))]
    uniform = run[permutation(len(run), (1, 2, 3))]

    def distinct(order: np.ndarray, size: int) -> list[int]:
        return [len(set(order[i : i + size].tolist())) for i in range(0, len(run) - size, 7)]

    assert min(distinct(spread, 222)) == 111
    assert min(distinct(uniform, 222)) < 100
    assert np.mean(distinct(spread, 111)) > 0.8 * 111 > 0.7 * 111 > np.mean(distinct(uniform, 111))


def test_the_spread_permutation_is_pinned() -> None:
    """The same runs and key give this order on any machine and numpy version."""
    order = spread_permutation(np.array([3, 1, 4]), (5, 6))
    assert np.array_equal(order, spread_permutation(np.array([3, 1, 4]), (5, 6)))
    assert not np.array_equal(order, spread_permutation(np.array([3, 1, 4]), (5, 7)))
    assert order.tolist() == PINNED_SPREAD


PINNED_SPREAD = [6, 1, 7, 0, 5, 2, 4, 3]


def test_block_windows_are_spread_unless_every_shard_is_one_block() -> None:
    sizes = np.array([40, 40, 40, 40], dtype=np.int64)
    config = PlanConfig(seed=3, shuffle_window=64, shuffle_unit="block")
    world = {"epoch": 0, "world_size": 1, "rank": 0, "num_workers": 1}
    many = plan_epoch(
        prepare_units(np.full(16, 10), unit_groups=np.repeat(np.arange(4), 4)),
        config=config,
        **world,
    )
    assert all(w.spread for w in many.workers[0].windows)
    ids = many.workers[0].sample_ids()
    blocks = ids // 10  # 16 blocks of 10: every 32 consecutive ids hold all of them
    assert min(len(set(blocks[i : i + 32].tolist())) for i in range(len(ids) - 32)) == 16
    one = plan_epoch(prepare_units(sizes, unit_groups=np.arange(4)), config=config, **world)
    assert not any(w.spread for w in one.workers[0].windows)
