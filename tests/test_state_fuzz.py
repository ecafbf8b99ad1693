"""Fuzzing the loader-state loader: a hostile or damaged state is refused with our own errors.

A state comes back from a checkpoint that someone else may have written. Starting from valid
states (saved mid-epoch, after a resume, at an epoch's end, by a loader without workers, so each
example runs in this process), hypothesis replaces, deletes or adds values anywhere in the dict,
and feeds the result to `LoaderState.from_dict`, to `ShardLoader.load_state_dict` and, when both
accept it, to iteration of a real dataset. Nothing may escape but a `ShardloaderError`; what is
accepted must serve ids that exist, each at most once (plus its multiplicity in the carry-in).
"""

from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardloader import ShardDataset, ShardLoader
from shardloader.errors import ResumeError, ShardloaderError
from shardloader.state import LoaderState
from tests.streaming import NUM_SAMPLES, ids_of

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([-1, 0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            found += _paths(item, (*prefix, index))
    return found


def _mutate(draw: st.DrawFn, state: dict[str, Any]) -> dict[str, Any]:
    state = copy.deepcopy(state)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(state) if p]
        path = draw(st.sampled_from(paths))
        parent = state
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return state


def _loader(dataset_dir: Path) -> ShardLoader:
    dataset = ShardDataset(str(dataset_dir))
    return ShardLoader(dataset, batch_size=6, num_workers=0, collate_fn=ids_of)


@pytest.fixture(scope="module")
def states(dataset_dir: Path) -> list[dict[str, Any]]:
    """Valid states: mid-epoch, mid-epoch after a resume, and the next epoch's start."""
    loader = _loader(dataset_dir)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    mid = loader.state_dict()
    resumed = _loader(dataset_dir)
    resumed.load_state_dict(mid)
    batches = iter(resumed)
    for _ in range(7):
        next(batches)
    chained = resumed.state_dict()
    for _ in batches:
        pass
    return [mid, chained, resumed.state_dict()]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_states_raise_only_our_errors(
    dataset_dir: Path, states: list[dict[str, Any]], data: st.DataObject
) -> None:
    state = _mutate(data.draw, data.draw(st.sampled_from(states)))
    try:
        LoaderState.from_dict(state)
        loader = _loader(dataset_dir)
        loader.load_state_dict(state)
        served = [i for batch in loader for i in batch]
    except ShardloaderError:
        return
    # An id appears at most once in an epoch, plus its multiplicity in the carry-in (the
    # previous epoch's leftover catches up there: `shardloader.plan`).
    extra = collections.Counter(served) - collections.Counter(int(i) for i in state["carry_in"])
    assert max(extra.values(), default=0) <= 1
    assert all(0 <= i < NUM_SAMPLES for i in served)


def test_the_unmutated_states_resume(dataset_dir: Path, states: list[dict[str, Any]]) -> None:
    served = []
    for state in states:
        loader = _loader(dataset_dir)
        loader.load_state_dict(state)
        served.append([i for batch in loader for i in batch])
    assert len(served[0]) == len(served[1]) + 7 * 6  # not vacuous: the chained state is later
    assert served[0][7 * 6 :] == served[1]


def test_a_deeply_nested_previous_chain_is_a_resume_error(states: list[dict[str, Any]]) -> None:
    state = copy.deepcopy(states[1])
    point = state["previous"]
    assert point is not None  # the chained state was saved after a resume
    for _ in range(5000):
        point = {**point, "previous": point}
    state["previous"] = point
    with pytest.raises(ResumeError, match="malformed"):
        LoaderState.from_dict(state)
