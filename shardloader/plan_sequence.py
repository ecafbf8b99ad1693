"""An epoch's sequence of sample ids, and the planners that divide it (used by `shardloader.plan`).

Steps 1 to 5 and the resume of `shardloader.plan`'s docstring. A sequence lays ids out by
position and cuts any range of positions into pieces without making the ids:
`_EpochSequence` (the carried-in ids, then the shards in permuted order) and `_ResumedSequence`
(the unconsumed real ids of another plan, worker after worker). A planner says who reads which
range: `_SplitPlanner` divides a sequence among ranks and workers (steps 3 to 5), `_TailPlanner`
keeps another planner's workers, each without what it consumed (an exact resume), and
`planner_for` picks one for a resume point, following `ResumePoint.previous`. `carry_chain`
replays the tails of earlier epochs for an epoch's carry-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from shardloader.errors import ResumeError
from shardloader.plan_config import PlanConfig, ResumePoint
from shardloader.plan_spans import (
    Block,
    IdArray,
    Piece,
    WindowBudget,
    WorkerPlan,
    as_padding,
    body_spans,
    cut_pieces,
    drop_prefix,
    empty_ids,
    generator,
    group_windows,
    ids_to_spans,
    piece_ids,
    piece_len,
)
from shardloader.plan_spread import PlanUnits, SpreadOrder

# First entropy word of every generator: which decision it seeds, so streams never coincide.
_SHARD_ORDER = 1
_WINDOW_ORDER = 2


# ---------------------------------------------------------------------------------------------
# Sequences: an epoch's ids as pieces, cut by position without making the ids.


class _Sequence(Protocol):
    length: int

    def pieces(self, start: int, stop: int) -> list[Piece]: ...


class _EpochSequence:
    """Carried-in ids, then the shards' samples in permuted shard order (``None``: in order)."""

    def __init__(
        self, sizes: IdArray, first: IdArray, perm: IdArray | None, carry: IdArray
    ) -> None:
        self._perm = perm
        # In manifest order the sizes and their running sum are the units' own (no O(units)
        # copy per plan: blocks without shuffle).
        self._sizes = sizes if perm is None else sizes[perm]
        self._ends = first[1:] if perm is None else np.cumsum(self._sizes)
        self._carry = ids_to_spans(carry, first)
        self._num_carried = len(carry)
        self.length = self._num_carried + int(first[-1])

    def pieces(self, start: int, stop: int) -> list[Piece]:
        return _carried_then(self._carry, self._num_carried, start, stop, self._body)

    def _body(self, start: int, stop: int) -> list[Piece]:
        return body_spans(self._perm, self._sizes, self._ends, start, stop)


def _carried_then(
    carry: list[Piece],
    num_carried: int,
    start: int,
    stop: int,
    body: Callable[[int, int], list[Piece]],
) -> list[Piece]:
    """Positions ``[start, stop)`` of a sequence: the carried-in pieces, then ``body``'s."""
    out: list[Piece] = []
    if start < min(stop, num_carried):
        out += cut_pieces(carry, start, min(stop, num_carried))
    if max(start, num_carried) < stop:
        out += body(max(start, num_carried) - num_carried, stop - num_carried)
    return out


class _SpreadSequence:
    """Carried-in ids, then the blocks in the spread order (`shardloader.plan_spread`).

    The blocks of a range of positions are made when it is first asked for (`reserve` asks
    for a rank's whole range at once, so its workers share one sort).
    """

    def __init__(self, order: SpreadOrder, first: IdArray, carry: IdArray) -> None:
        self._order = order
        self._first = first
        self._carry = ids_to_spans(carry, first)
        self._num_carried = len(carry)
        self._segments: list[tuple[int, IdArray, IdArray, IdArray]] = []
        self.length = self._num_carried + order.total

    def reserve(self, start: int, stop: int) -> None:
        """Make the blocks of positions ``[start, stop)`` now, for the calls that follow."""
        c = self._num_carried
        if max(start, c) < stop:
            self._segment(max(start, c) - c, stop - c)

    def pieces(self, start: int, stop: int) -> list[Piece]:
        return _carried_then(self._carry, self._num_carried, start, stop, self._body)

    def _body(self, start: int, stop: int) -> list[Piece]:
        pos, units, sizes, ends = self._segment(start, stop)
        return body_spans(units, sizes, ends, start - pos, stop - pos)

    def _segment(self, start: int, stop: int) -> tuple[int, IdArray, IdArray, IdArray]:
        for segment in self._segments:
            pos, _, _, ends = segment
            if pos <= start and stop <= pos + (int(ends[-1]) if len(ends) else 0):
                return segment
        units, pos = self._order.segment(start, stop)
        sizes = self._first[units + 1] - self._first[units]
        segment = (pos, units, sizes, np.cumsum(sizes))
        self._segments.append(segment)
        return segment


class _ResumedSequence:
    """The unconsumed real (non-padding) ids of a plan, worker after worker."""

    def __init__(self, tail: _TailPlanner) -> None:
        self._tail = tail
        counts = tail.worker_counts()
        for r, w in tail.padding_workers():
            counts[r, w] -= tail.worker_plan(r, w).num_padded
        self._offsets = np.concatenate([[0], np.cumsum(counts.ravel())])
        self._cache: dict[int, tuple[list[Piece], list[int]]] = {}
        self.length = int(self._offsets[-1])

    def pieces(self, start: int, stop: int) -> list[Piece]:
        out: list[Piece] = []
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            if hi > start:
                pieces, ends = self._worker_pieces(i)
                out += cut_pieces(pieces, start - lo, min(stop, hi) - lo, ends)
                start = min(stop, hi)
            i += 1
        return out

    def _worker_pieces(self, index: int) -> tuple[list[Piece], list[int]]:
        if index not in self._cache:
            plan = self._tail.worker_plan(*divmod(index, self._tail.num_workers))
            pieces: list[Piece] = []
            for window in plan.windows:
                if window.ids is None:
                    pieces += [s for s in window.spans if not s.padding]
                elif window.padded is not None:
                    real = ~window.padded
                    if real.any():
                        pieces.append(Block(window.ids[real], window.padded[real]))
            ends = np.cumsum([piece_len(p) for p in pieces]).tolist()
            self._cache[index] = (pieces, ends)
        return self._cache[index]


# ---------------------------------------------------------------------------------------------
# Planners: who reads which part of a sequence; a resumed plan is a planner over another's rest.


class _Planner(Protocol):
    world_size: int
    num_workers: int

    def worker_counts(self) -> IdArray: ...

    def worker_plan(self, rank: int, worker_id: int) -> WorkerPlan: ...

    def leftover_ids(self) -> IdArray: ...

    def padding_workers(self) -> list[tuple[int, int]]: ...

    def num_padded(self) -> int: ...


@dataclass(frozen=True, eq=False)
class FreshEpoch:
    """What an epoch is planned from before any resume: the units, config, carry-in."""

    units: PlanUnits
    config: PlanConfig
    epoch: int
    carry: IdArray

    @property
    def first(self) -> IdArray:
        """Global id of every unit's first sample, plus the total."""
        return self.units.first

    @property
    def budget(self) -> WindowBudget | None:
        """The windows' byte bound, when the config sets one and the units' sizes are known."""
        if self.config.shuffle_bytes is None or self.units.unit_bytes is None:
            return None
        return WindowBudget(self.config.shuffle_bytes, self.units.unit_bytes, self.units.sizes)

    @cached_property
    def spreads_windows(self) -> bool:
        """Whether windows spread their blocks' samples (`shardloader.plan_spans.Window.spread`).

        Over blocks, when some shard has more than one: with one block per shard the plan is
        the one of whole shards, windows included (an indexed Parquet file of one row group
        reads in its converted copy's order).
        """
        counts = self.units.group_counts
        return counts is not None and len(counts) > 0 and int(counts.max()) > 1

    def planner(self, world_size: int, num_workers: int) -> _SplitPlanner:
        """The epoch's sequence divided among ``world_size x num_workers``."""
        seq = _epoch_sequence(self.units, self.config, self.epoch, self.carry)
        return _SplitPlanner(seq, self, world_size, num_workers, depth=0, inherited=empty_ids())


class _SplitPlanner:
    """Steps 3 to 5 of the algorithm over a sequence."""

    def __init__(
        self,
        seq: _Sequence,
        fresh: FreshEpoch,
        world_size: int,
        num_workers: int,
        *,
        depth: int,
        inherited: IdArray,
    ) -> None:
        self.world_size = world_size
        self.num_workers = num_workers
        self._seq = seq
        self._fresh = fresh
        self._depth = depth  # resume points behind this plan, so its windows get new seeds
        self._inherited = inherited  # leftover of the plan this one resumes
        length = seq.length
        per_rank = length // world_size
        if fresh.config.policy == "pad":
            per_rank = -(-length // world_size)
        self._per_rank = per_rank
        self._served = per_rank * world_size  # positions served, padding included

    def worker_counts(self) -> IdArray:
        base, extra = divmod(self._per_rank, self.num_workers)
        counts = np.full((self.world_size, self.num_workers), base, dtype=np.int64)
        counts[:, :extra] += 1
        return counts

    def _worker_range(self, rank: int, worker_id: int) -> tuple[int, int]:
        base, extra = divmod(self._per_rank, self.num_workers)
        start = rank * self._per_rank + worker_id * base + min(worker_id, extra)
        return start, start + base + (worker_id < extra)

    def worker_plan(self, rank: int, worker_id: int) -> WorkerPlan:
        config = self._fresh.config
        key = None
        if config.shuffle:
            key = (_WINDOW_ORDER, config.seed, self._fresh.epoch, self._depth, rank, worker_id)
        reserve = getattr(self._seq, "reserve", None)
        if reserve is not None:  # a rank's workers (from this one on) share one range
            last = self.num_workers - 1
            reserve(self._worker_range(rank, worker_id)[0], self._worker_range(rank, last)[1])
        pieces = self._pieces(*self._worker_range(rank, worker_id))
        window = config.shuffle_window
        assert window is not None  # plan_epoch checks the config is resolved
        spread = self._fresh.spreads_windows
        windows = group_windows(pieces, window, key, budget=self._fresh.budget, spread=spread)
        return WorkerPlan(rank, worker_id, self._fresh.epoch, windows, self._fresh.first)

    def _pieces(self, start: int, stop: int) -> list[Piece]:
        length = self._seq.length
        out = self._seq.pieces(start, min(stop, length)) if start < min(stop, length) else []
        # Padding positions repeat the sequence from its start (cyclically, if it is shorter).
        pos, end = max(start, length) - length, stop - length
        while pos < end:
            a = pos % length
            b = min(length, a + end - pos)
            out += [as_padding(p) for p in self._seq.pieces(a, b)]
            pos += b - a
        return out

    def leftover_ids(self) -> IdArray:
        length = self._seq.length
        if self._served >= length:
            return self._inherited.copy()
        own = piece_ids(self._seq.pieces(self._served, length), self._fresh.first)
        return np.concatenate([self._inherited, own])

    def padding_workers(self) -> list[tuple[int, int]]:
        length = self._seq.length
        if self._served <= length:
            return []
        return [
            (r, w)
            for r in range(length // self._per_rank, self.world_size)
            for w in range(self.num_workers)
            if self._worker_range(r, w)[1] > length
        ]

    def num_padded(self) -> int:
        return max(0, self._served - self._seq.length)


class _TailPlanner:
    """The same workers as another plan, each without the ids it consumed (exact resume)."""

    def __init__(self, base: _Planner, consumed: IdArray) -> None:
        self.world_size = base.world_size
        self.num_workers = base.num_workers
        self._base = base
        self._consumed = consumed
        self._cache: dict[tuple[int, int], WorkerPlan] = {}

    def worker_counts(self) -> IdArray:
        return self._base.worker_counts() - self._consumed

    def worker_plan(self, rank: int, worker_id: int) -> WorkerPlan:
        if (rank, worker_id) not in self._cache:
            plan = self._base.worker_plan(rank, worker_id)
            consumed = int(self._consumed[rank, worker_id])
            self._cache[rank, worker_id] = drop_prefix(plan, consumed)
        return self._cache[rank, worker_id]

    def leftover_ids(self) -> IdArray:
        return self._base.leftover_ids()

    def padding_workers(self) -> list[tuple[int, int]]:
        return self._base.padding_workers()

    def num_padded(self) -> int:
        return sum(self.worker_plan(r, w).num_padded for r, w in self.padding_workers())


def planner_for(
    point: ResumePoint | None,
    world_size: int,
    num_workers: int,
    fresh: FreshEpoch,
    keep_ranks: bool = False,
) -> _Planner:
    """The planner for ``world_size x num_workers`` after resuming from ``point``."""
    if point is None:
        return fresh.planner(world_size, num_workers)
    if point.epoch != fresh.epoch:
        raise ResumeError(
            f"resume point is for epoch {point.epoch}, this plan is for epoch {fresh.epoch}; "
            "resume the saved epoch or plan this one without a resume point"
        )
    if point.config != fresh.config:
        raise ResumeError(
            f"resume point was planned with {point.config}, this plan has {fresh.config}; "
            "resume with the saved config"
        )
    base = planner_for(
        point.previous, point.world_size, max(point.num_workers, 1), fresh, keep_ranks
    )
    planned = base.worker_counts()
    over = np.argwhere(point.consumed > planned)
    if len(over):
        r, w = over[0]
        raise ResumeError(
            f"resume point: rank {r} worker {w} consumed {point.consumed[r, w]} samples but was "
            f"planned {planned[r, w]}; were they saved with other shard sizes, carry_in or "
            "resume point?"
        )
    tail = _TailPlanner(base, point.consumed)
    per_rank = tail.worker_counts().sum(axis=1)
    same = (world_size, num_workers) == (tail.world_size, tail.num_workers)
    if same and (keep_ranks or (per_rank == per_rank[0]).all()):
        return tail
    depth = 1
    while point.previous is not None:
        point, depth = point.previous, depth + 1
    return _SplitPlanner(
        _ResumedSequence(tail),
        fresh,
        world_size,
        num_workers,
        depth=depth,
        inherited=tail.leftover_ids(),
    )


# ---------------------------------------------------------------------------------------------
# Carry-in: the tails of earlier epochs, found without making their sequences.


def carry_chain(units: PlanUnits, config: PlanConfig, epoch: int, world_size: int) -> IdArray:
    """Epoch ``epoch``'s carry-in, replaying epochs ``0 .. epoch-1`` on ``world_size`` ranks."""
    carry = empty_ids()
    if config.policy != "drop":
        return carry
    total = int(units.first[-1])
    for e in range(epoch):
        if len(carry) == 0 and total % world_size == 0:
            break  # every later epoch divides evenly too
        count = (len(carry) + total) % world_size
        carry = _sequence_tail(units, config, e, carry, count)
    return carry


def _sequence_tail(
    units: PlanUnits, config: PlanConfig, epoch: int, carry: IdArray, count: int
) -> IdArray:
    """The last ``count`` ids of an epoch's sequence.

    Only the last units of the order are needed. Over shards, they are the ones with the
    largest keys, found by a partial sort (an O(N) argpartition instead of a full sort); over
    blocks, the spread order finds them from per-shard sums (`shardloader.plan_spread`).
    """
    sizes, first = units.sizes, units.first
    num_shards = len(sizes)
    if count == 0:
        return empty_ids()
    if config.shuffle and count <= first[-1] and units.groups is None:
        keys = generator((_SHARD_ORDER, config.seed, epoch)).random_raw(num_shards)
        k = 64
        while k < num_shards:
            top = np.argpartition(keys, num_shards - k)[num_shards - k :]
            if np.count_nonzero(keys == keys[top].min()) > 1:
                break  # a tie at the boundary: sort everything, as permutation does
            top = top[np.lexsort((top, keys[top]))].astype(np.int64)
            top_sizes = sizes[top]
            ends = np.cumsum(top_sizes)
            if ends[-1] >= count:
                end = int(ends[-1])
                return piece_ids(body_spans(top, top_sizes, ends, end - count, end), first)
            k *= 4
    seq = _epoch_sequence(units, config, epoch, carry)
    return piece_ids(seq.pieces(seq.length - count, seq.length), first)


def _epoch_sequence(units: PlanUnits, config: PlanConfig, epoch: int, carry: IdArray) -> _Sequence:
    if config.shuffle and units.groups is not None:
        order = SpreadOrder(units, (_SHARD_ORDER, config.seed, epoch))
        return _SpreadSequence(order, units.first, carry)
    if config.shuffle:
        keys = generator((_SHARD_ORDER, config.seed, epoch)).random_raw(len(units.sizes))
        perm = np.argsort(keys, kind="stable").astype(np.int64)
    else:
        perm = None
    return _EpochSequence(units.sizes, units.first, perm, carry)
