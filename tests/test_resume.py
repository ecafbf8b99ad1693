"""Resume decisions, by property: exact on the same topology, nothing lost elsewhere, turns kept."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardloader import ResumeError
from shardloader.plan import PlanConfig, plan_carry_in, plan_epoch
from shardloader.resume import (
    Cursor,
    RunSpec,
    anchor_state,
    epoch_carry_in,
    next_epoch_state,
    packer_skip,
    plan_inputs,
    state_from_cursors,
    state_from_worker,
    worker_share,
    worker_state_dict,
)
from shardloader.state import LoaderState, merge_states
from shardloader.world import WorldInfo
from tests.test_plan import configs, shard_sizes

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def spec_of(sizes: list[int], config: PlanConfig, *, packing: bool = False) -> RunSpec:
    pack = {"seq_len": 16} if packing else None
    return RunSpec(np.array(sizes, dtype=np.int64), "fp", config, pack)


def plan_rank(spec: RunSpec, loaded: LoaderState | None, epoch: int, world: int, rank: int,
              workers: int):  # fmt: skip
    start = plan_inputs(spec, loaded, epoch=epoch, world_size=world, num_workers=workers)
    return plan_epoch(
        spec.shard_sizes, config=spec.config, epoch=epoch, world_size=world, rank=rank,
        num_workers=workers, resume=start.resume, carry_in=start.carry_in,
        keep_ranks=spec.keep_ranks,
    )  # fmt: skip


def stop_everywhere(spec: RunSpec, epoch: int, world: int, workers: int, fraction: float):
    """Every rank's state after consuming ``fraction`` of each share, and the shares' ids."""
    states, shares = [], []
    for rank in range(world):
        anchor = anchor_state(spec, None, epoch=epoch, world_size=world, num_workers=workers)
        plan = plan_rank(spec, None, epoch, world, rank, workers)
        ids = [w.sample_ids() for w in plan.workers]
        cursors = [
            Cursor(epoch, rank, world, share, workers, int(len(s) * fraction), False, 0)
            for share, s in enumerate(ids)
        ]
        last = len(ids) - 1 if cursors else None
        states.append(state_from_cursors(anchor, cursors, last_share=last))
        shares.append(ids)
    return states, shares


@PROPERTY
@given(
    shard_sizes(), configs, st.integers(1, 4), st.integers(0, 3), st.integers(0, 3),
    st.floats(0, 1),
)  # fmt: skip
def test_same_topology_resume_continues_every_share_exactly(
    sizes, config, world, workers, epoch, fraction
) -> None:
    spec = spec_of(sizes, config, packing=True)  # keep_ranks: rests are each worker's own
    states, shares = stop_everywhere(spec, epoch, world, workers, fraction)
    merged = merge_states(states)
    for rank in range(world):
        for loaded in (merged, states[rank]):
            plan = plan_rank(spec, loaded, epoch, world, rank, workers)
            for share, worker in enumerate(plan.workers):
                consumed = int(merged.consumed[rank, share])
                assert np.array_equal(worker.sample_ids(), shares[rank][share][consumed:])


@PROPERTY
@given(
    shard_sizes(), configs, st.integers(1, 4), st.integers(0, 3), st.integers(1, 4),
    st.integers(0, 3), st.floats(0, 1),
)  # fmt: skip
def test_elastic_resume_serves_the_rest_once_and_carries_the_remainder(
    sizes, config, world, workers, new_world, new_workers, fraction
) -> None:
    spec = spec_of(sizes, config)
    states, shares = stop_everywhere(spec, 0, world, workers, fraction)
    merged = merge_states(states)
    consumed = Counter()
    for rank in range(world):
        for share, ids in enumerate(shares[rank]):
            consumed.update(ids[: merged.consumed[rank, share]].tolist())
    plans = [plan_rank(spec, merged, 0, new_world, r, new_workers) for r in range(new_world)]
    assert len({p.samples_per_rank for p in plans}) == 1
    rest = Counter()
    for plan in plans:
        for worker in plan.workers:
            rest.update(worker.sample_ids()[~worker.padded_mask()].tolist())
    carried = Counter(plans[0].leftover_ids.tolist())
    if config.policy == "drop":  # every id once: consumed, still to come, or carried over
        assert consumed + rest + carried == Counter(range(sum(sizes)))
    else:  # every id at least once, nothing carried
        assert set(consumed + rest) == set(range(sum(sizes)))
        assert not carried
    # The next epoch starts with what this one left over, from the same state.
    nxt = next_epoch_state(spec, merged, done=0, rank=0, world_size=new_world, num_workers=0)
    assert nxt.epoch == 1
    assert not nxt.started
    assert np.array_equal(nxt.carry_in, plans[0].leftover_ids)


@PROPERTY
@given(shard_sizes(), configs, st.integers(1, 5), st.integers(0, 4), st.integers(0, 3))
def test_carry_in_from_an_unresumed_start_is_the_replayed_one(
    sizes, config, world, since, extra
) -> None:
    spec = spec_of(sizes, config)
    start = anchor_state(spec, None, epoch=since, world_size=world, num_workers=2)
    assert np.array_equal(
        start.carry_in, plan_carry_in(sizes, config=config, epoch=since, world_size=world)
    )
    later = epoch_carry_in(spec, start, since + extra, world, 2)
    replayed = plan_carry_in(sizes, config=config, epoch=since + extra, world_size=world)
    assert np.array_equal(later, replayed)


@given(st.integers(0, 5), st.integers(1, 6), st.integers(0, 5))
def test_turns_are_a_rotation_on_the_same_worker_count(rotation, workers, epoch) -> None:
    loaded = LoaderState(
        dataset="fp", config=PlanConfig(), epoch=epoch, world_size=1, num_workers=workers,
        consumed=np.ones((1, workers), np.int64), rotation=rotation % workers,
        extra=(tuple(range(workers)),),
    )  # fmt: skip
    shares = [
        worker_share(loaded, epoch=epoch, world=WorldInfo(0, 1, w, workers)) for w in range(workers)
    ]
    assert sorted(shares) == list(range(workers))
    assert shares[0] == rotation % workers
    skips = [packer_skip(loaded, epoch=epoch, world=WorldInfo(0, 1, 0, workers), share=s)
             for s in shares]  # fmt: skip
    assert skips == shares  # each share's own skip
    other = WorldInfo(0, 1, 0, workers + 1)
    assert worker_share(loaded, epoch=epoch, world=other) == 0
    assert packer_skip(loaded, epoch=epoch, world=other, share=0) == 0
    last = WorldInfo(0, 1, workers - 1, workers)
    assert worker_share(loaded, epoch=epoch + 1, world=last) == workers - 1


def test_a_workers_own_state_reads_back_as_its_ranks_position() -> None:
    spec = spec_of([10, 20, 5], PlanConfig(seed=4))
    anchor = anchor_state(spec, None, epoch=1, world_size=2, num_workers=3)
    data = worker_state_dict(Cursor(1, 1, 2, 2, 3, 6, False, 4), anchor)
    state = state_from_worker(data)
    assert (state.rank, state.complete, state.epoch) == (1, False, 1)
    assert state.consumed[:, 2].tolist() == [6, 6]
    assert not state.consumed[:, :2].any()
    assert state.extra is not None
    assert state.extra[1] == (0, 0, 4)
    with pytest.raises(ResumeError, match="malformed"):
        state_from_worker({**data, "position": "x"})
    started = state_from_cursors(anchor, [Cursor(1, 0, 2, 0, 3, 1, False, 0)], last_share=0)
    with pytest.raises(ResumeError, match="anchor has 2 x 3"):
        state_from_worker({**data, "num_workers": 1, "anchor": started.to_dict()})
    assert anchor_state(spec, state, epoch=1, world_size=5, num_workers=0) is state
    with pytest.raises(ResumeError, match="merge the states"):
        plan_inputs(spec, state, epoch=1, world_size=3, num_workers=3)
    with pytest.raises(ResumeError, match="merge the states"):
        epoch_carry_in(spec, state, 2, 3, 3)
