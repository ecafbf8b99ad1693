"""LoaderState: round trips, checks, merging, and states saved by earlier versions.

``tests/data/loader_state_v1.json`` holds states saved by the code before the resume decisions
moved to `shardloader.resume` (2 workers, batches of 6 ids, the `tests.streaming` dataset): an
exact one, one saved after resuming (with ``previous``), one at the next epoch's start, and an
elastic one (2 ranks merged), each with the batches it resumed to then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardloader import ResumeError, ShardDataset, ShardLoader
from shardloader.plan import PlanConfig, ResumePoint
from shardloader.state import (
    BLOCK_STATE_VERSION,
    STATE_VERSION,
    LoaderState,
    merge_states,
    state_to_json,
)
from tests.streaming import ids_of

V1 = Path(__file__).parent / "data" / "loader_state_v1.json"


@pytest.fixture(scope="module")
def saved() -> dict[str, Any]:
    return json.loads(V1.read_text())


def _loader(dataset_dir: Path, **kwargs: int) -> ShardLoader:
    workers = kwargs.pop("num_workers", 2)
    dataset = ShardDataset(str(dataset_dir), **kwargs)
    return ShardLoader(dataset, batch_size=6, num_workers=workers, collate_fn=ids_of)


@pytest.mark.parametrize("case", ["exact", "chained", "next_epoch", "elastic"])
def test_v1_states_parse_and_serialize_unchanged(saved: dict[str, Any], case: str) -> None:
    data = saved[case]["state"]
    state = LoaderState.from_dict(data)
    assert state.to_dict() == data
    assert json.loads(state_to_json(state)) == data
    assert data["version"] == STATE_VERSION == 1


@pytest.mark.parametrize("case", ["exact", "chained", "next_epoch"])
def test_v1_states_resume_to_the_same_batches(
    saved: dict[str, Any], dataset_dir: Path, case: str
) -> None:
    loader = _loader(dataset_dir)
    loader.load_state_dict(saved[case]["state"])
    assert list(loader) == saved[case]["rest"]
    assert saved[case]["rest"]  # not vacuous


def test_v1_elastic_state_merges_and_resumes_the_same(
    saved: dict[str, Any], dataset_dir: Path
) -> None:
    case = saved["elastic"]
    assert merge_states(case["states"]).to_dict() == case["state"]
    for rank, want in enumerate(case["rest_by_rank"]):
        loader = _loader(dataset_dir, rank=rank, world_size=3, num_workers=1)
        loader.load_state_dict(case["state"])
        assert list(loader) == want


# --- properties ------------------------------------------------------------------------------

configs = st.builds(
    PlanConfig,
    seed=st.integers(0, 2**40),
    shuffle=st.booleans(),
    shuffle_window=st.integers(1, 5),
    policy=st.sampled_from(["drop", "pad"]),
)


@st.composite
def states(draw: st.DrawFn, *, complete: bool | None = None) -> LoaderState:
    world_size, num_workers = draw(st.integers(1, 4)), draw(st.integers(0, 3))
    shape = (world_size, max(num_workers, 1))
    counts = st.lists(st.integers(0, 50), min_size=shape[1], max_size=shape[1])
    consumed = np.array(draw(st.lists(counts, min_size=world_size, max_size=world_size)))
    config = draw(configs)
    previous = None
    if draw(st.booleans()):
        previous = ResumePoint(
            epoch=2, world_size=1, num_workers=0, config=config, consumed=np.array([[7]])
        )
    packing = draw(st.booleans())
    return LoaderState(
        dataset="abc",
        config=config,
        epoch=2,
        world_size=world_size,
        num_workers=num_workers,
        consumed=consumed,
        complete=draw(st.booleans()) if complete is None else complete,
        rank=draw(st.integers(0, world_size - 1)),
        carry_in=np.array(draw(st.lists(st.integers(0, 99), max_size=4)), dtype=np.int64),
        previous=previous,
        rotation=draw(st.integers(0, shape[1] - 1)),
        pack={"seq_len": 64} if packing else None,
        extra=tuple(tuple(int(v) % 3 for v in row) for row in consumed) if packing else None,
    )


@settings(max_examples=100, deadline=None)
@given(states())
def test_to_dict_round_trips_through_json(state: LoaderState) -> None:
    text = state_to_json(state)
    back = LoaderState.from_dict(json.loads(text))
    assert state_to_json(back) == text
    assert back.started == state.started
    point = back.resume_point()
    assert (point is None) == (not state.started)
    if point is not None:
        assert np.array_equal(point.consumed, state.consumed)


@settings(max_examples=100, deadline=None)
@given(states(complete=False))
def test_merging_every_rank_takes_each_ranks_own_row(state: LoaderState) -> None:
    rows = state.consumed
    parts = []
    for rank in range(state.world_size):
        own = np.tile(rows[rank], (state.world_size, 1))  # a rank's copy of its own row
        extra = None if state.extra is None else tuple(state.extra[rank] for _ in rows)
        parts.append(
            LoaderState(**{**_fields(state), "consumed": own, "rank": rank, "extra": extra})
        )
    merged = merge_states([p.to_dict() for p in reversed(parts)])
    assert merged.complete
    assert merged.rank is None
    assert np.array_equal(merged.consumed, rows)
    assert merged.extra == state.extra
    if state.world_size > 1:
        with pytest.raises(ResumeError, match="missing the states of ranks"):
            merge_states(parts[1:])


def _fields(state: LoaderState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in LoaderState.__dataclass_fields__}


def test_checks_name_what_differs() -> None:
    config = PlanConfig(seed=1)
    state = LoaderState(
        dataset="d", config=config, epoch=0, world_size=2, num_workers=1, consumed=[[3], [3]],
        complete=False, rank=0,
    )  # fmt: skip
    state.check(dataset="d", config=config)
    with pytest.raises(ResumeError, match="saved for dataset d"):
        state.check(dataset="e", config=config)
    with pytest.raises(ResumeError, match="seed, shuffle"):
        state.check(dataset="d", config=PlanConfig(seed=2))
    with pytest.raises(ResumeError, match="packing"):
        state.check(dataset="d", config=config, pack={"seq_len": 8})
    state.check_topology(2, 1)
    with pytest.raises(ResumeError, match="merge the states of all ranks"):
        state.check_topology(3, 1)
    with pytest.raises(ResumeError, match="expected"):
        LoaderState(dataset="d", config=config, epoch=0, world_size=2, num_workers=1, consumed=[1])
    for bad in ({"kind": "x"}, {**state.to_dict(), "version": 5}, {**state.to_dict(), "epoch": []}):
        with pytest.raises(ResumeError):
            LoaderState.from_dict(bad)


def _block_state(consumed: int, **kwargs: Any) -> LoaderState:
    config = PlanConfig(shuffle_unit="block", shuffle_window=64, shuffle_bytes=1 << 20)
    return LoaderState(
        dataset="fp",
        config=config,
        epoch=3,
        world_size=2,
        num_workers=1,
        consumed=np.full((2, 1), consumed),
        carry_in=np.array([5]),
        **kwargs,
    )


def test_block_states_are_version_4_and_shard_states_keep_version_1() -> None:
    data = _block_state(7).to_dict()
    assert data["version"] == BLOCK_STATE_VERSION == 4  # earlier readers refuse it
    assert LoaderState.from_dict(data).to_dict() == data
    shard = LoaderState(
        dataset="fp", config=PlanConfig(), epoch=0, world_size=1, num_workers=0, consumed=[[0]]
    )
    assert shard.to_dict()["version"] == 1  # whole shards: the bytes and order as before


def _old(state: LoaderState, version: int) -> dict[str, Any]:
    """The state as a shardloader before block order 2, 3 or 4 (versions 1, 2, 3) saved it."""
    return {**state.to_dict(), "version": version}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_earlier_block_state_inside_an_epoch_is_refused_saying_what_to_do(version: int) -> None:
    """Older block states cannot continue an epoch: the order of blocks changed."""
    with pytest.raises(
        ResumeError, match=rf"inside epoch 3 .*state version {version}.*epoch boundary"
    ):
        LoaderState.from_dict(_old(_block_state(7), version))
    previous = ResumePoint(
        epoch=3, world_size=2, num_workers=1, config=_block_state(0).config, consumed=[[1], [1]]
    )
    with pytest.raises(ResumeError, match="order of blocks"):
        LoaderState.from_dict(_old(_block_state(0, previous=previous), version))  # resumed
    with pytest.raises(ResumeError, match="version 5 is not supported"):
        LoaderState.from_dict({**_block_state(7).to_dict(), "version": 5})


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_earlier_block_state_at_an_epoch_boundary_starts_it_in_the_new_order(
    version: int,
) -> None:
    state = LoaderState.from_dict(_old(_block_state(0), version))
    assert not state.started
    assert state.carry_in.tolist() == [5]  # the carry-in stays explicit ids
