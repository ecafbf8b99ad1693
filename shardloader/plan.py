"""Epoch plans: which global sample ids each rank and DataLoader worker reads, and in which order.

A pure function of (shard sizes, config, epoch, world, resume point): no I/O, no torch, no
environment. Sample ids are positions in manifest order: shard ``i`` holds ids ``first[i] ..
first[i] + sizes[i] - 1``, ``first`` being the running sum of the sizes.

Algorithm, for one epoch over ``W`` ranks with ``K`` workers each:

1. Permute the shard order with a generator seeded by ``(seed, epoch)`` (none if ``shuffle`` is
   off).
2. Lay out the epoch's sequence: the ids carried in from the previous epoch first, then every
   shard's samples in natural order, shards in the permuted order. Its length is ``L``.
3. Make it divide. ``"drop"``: each rank gets ``n = L // W``; the last ``L % W`` ids of the
   sequence (``EpochPlan.leftover_ids``) are left out and carried into the next epoch, whose
   sequence starts with them. ``"pad"``: each rank gets ``n = ceil(L / W)``; the missing
   ``n * W - L`` positions repeat the first ids of the sequence and are marked as padding.
4. Rank ``r`` takes positions ``[r * n, (r + 1) * n)``. Worker ``w`` takes a contiguous sub-block;
   the sub-blocks differ by at most one and lower worker ids get the extra samples.
5. A worker reads its block in windows of ``shuffle_window`` consecutive shard pieces; a window's
   ids are permuted together, seeded by ``(seed, epoch, rank, worker, window index)``.

So a rank opens only the shards of its block (the two at its ends shared with its neighbours,
plus the shards of carried-in or padding ids), and a worker holds at most ``shuffle_window``
shards at once. A worker's share is kept as spans (`Span`: shard_index, start, stop); its ids are
made window by window (`WorkerPlan.iter_windows`), so memory follows one window, not the corpus.
Generators are PCG64 seeded by a ``SeedSequence`` of integers only, and permutations are an
argsort of the generator's raw 64-bit output, which numpy keeps stable across versions and
machines.

Carry-over ("drop"): per epoch, ``carry_in + T - leftover`` ids are served (``T`` = samples in
the corpus), so over epochs ``0 .. E-1`` every id is served ``E`` times less its multiplicity in
epoch ``E-1``'s ``leftover_ids``: fewer than ``W`` ids, each at most once when ``T >= W - 1``.
Nothing is lost. Inside one epoch an id appears at most once plus its multiplicity in the
carry-in (a carried-in id also appears at its regular place: it catches up the serving it
missed); padding repeats are marked.
`plan_epoch` computes the carry-in of epoch ``e`` by replaying epochs ``0 .. e-1`` with the same
world size and config (each is a shard permutation and a look at its tail: no samples are made).
When the world size changed between epochs, or an epoch was resumed on another topology, pass
``carry_in=previous_epoch_plan.leftover_ids`` instead (it is the same on every rank; keep it in
the loader state).

Resume inside an epoch: a `ResumePoint` gives the topology the epoch was planned with and how
many samples each (rank, worker) consumed, counted in that worker's reading order. With the same
topology and equal consumption per rank, every worker continues exactly where it stopped (the
rest of a partly read window is kept as explicit ids; untouched windows stay spans). Otherwise
the unconsumed samples, concatenated worker by worker, are split again as in steps 3 to 5
(padding not yet read is dropped and made afresh; the explicit rest of a partly read window forms
its own window and keeps its order). Under ``"drop"`` the re-split leaves up to ``W' - 1``
further ids, which join the epoch's own ``leftover_ids`` (so up to ``W - 1 + W' - 1`` carry into
the next epoch, which must then get them as ``carry_in``). Resume points chain through
``ResumePoint.previous`` when a resumed run is interrupted again. A resumed rank makes ids only
for the partly read windows of the workers whose rest it takes over.

Measured cost (``tools/bench_plan.py``: 100,000 shards of 1 to 20,000 samples, 1,000 ranks x 8
workers, best of 5 on a shared 2-core machine, peak traced Python memory): planning one rank
takes 10 ms and 4.0 MB (the shard permutation and its running sum: O(shards), never O(samples));
the carry-in of epoch 50 takes 72 ms and 3.3 MB (one partial sort of 100,000 generator outputs
per earlier epoch); one worker's 125,000 ids are made in 10 ms and 2.0 MB; an exact resume of
one rank takes 37 ms and 7.9 MB, an elastic one onto 750 ranks x 4 workers 56 ms and 12.6 MB
(the partly read windows of the workers it takes over are made).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from shardloader.errors import ConfigError, ResumeError
from shardloader.options import option

POLICIES = ("drop", "pad")

IdArray: TypeAlias = npt.NDArray[np.int64]
MaskArray: TypeAlias = npt.NDArray[np.bool_]

# First entropy word of every generator: which decision it seeds, so streams never coincide.
_SHARD_ORDER = 1
_WINDOW_ORDER = 2


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """How epochs are ordered and divided: the part of a loader's settings the plan depends on.

    Every rank must use the same config, and a saved loader state resumes only under the config
    it was saved with. `shardloader.dataset.StreamConfig` extends it with fetch and cache
    settings; each field's meaning is its `shardloader.options.option` help.
    """

    seed: int = option(0, "seeds every permutation, together with the epoch (and rank, worker)")
    shuffle: bool = option(True, "permute shards and the ids inside windows; off: manifest order")
    shuffle_window: int = option(4, "consecutive shard pieces a worker mixes, and holds, at once")
    policy: str = option(
        "drop",
        "samples that do not divide by the world size: drop (served first next epoch) or pad "
        "(repeats, marked is_padding)",
        choices=POLICIES,
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_int(f"{name}.seed", self.seed, 0)
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"{name}.shuffle is {self.shuffle!r}; expected True or False")
        _check_int(f"{name}.shuffle_window", self.shuffle_window, 1)
        if self.policy not in POLICIES:
            raise ConfigError(
                f"{name}.policy is {self.policy!r}; expected one of "
                + ", ".join(repr(p) for p in POLICIES)
            )

    def plan_config(self) -> PlanConfig:
        """Just the plan's settings, as a `PlanConfig` (what a loader state records)."""
        return PlanConfig(**{f.name: getattr(self, f.name) for f in fields(PlanConfig)})


@dataclass(frozen=True, kw_only=True, eq=False)
class ResumePoint:
    """Where an interrupted epoch stopped, for `plan_epoch` to plan the rest.

    Attributes:
        epoch: The epoch that was interrupted.
        world_size: World size the interrupted run planned the epoch with.
        num_workers: DataLoader workers per rank of that run (0 means one, in-process).
        config: The `PlanConfig` of that run; must equal the one passed to `plan_epoch`.
        consumed: Samples each (rank, worker) had consumed, shape
            ``[world_size, max(num_workers, 1)]``, counted in that worker's reading order.
        previous: If the interrupted run was itself resumed, the resume point it was planned
            from; ``consumed`` then counts positions in that resumed plan.
    """

    epoch: int
    world_size: int
    num_workers: int
    config: PlanConfig
    consumed: IdArray
    previous: ResumePoint | None = None

    def __post_init__(self) -> None:
        _check_int("ResumePoint.epoch", self.epoch, 0)
        _check_int("ResumePoint.world_size", self.world_size, 1)
        _check_int("ResumePoint.num_workers", self.num_workers, 0)
        _check_config(self.config)
        if self.previous is not None and not isinstance(self.previous, ResumePoint):
            raise ConfigError(
                f"ResumePoint.previous is a {type(self.previous).__name__}; "
                "expected a ResumePoint or None"
            )
        consumed = np.array(self.consumed)
        shape = (self.world_size, max(self.num_workers, 1))
        if consumed.shape != shape or not _is_int_array(consumed):
            raise ConfigError(
                f"ResumePoint.consumed has shape {consumed.shape} and dtype {consumed.dtype}; "
                f"expected integers of shape {shape} (world_size, max(num_workers, 1))"
            )
        if (consumed < 0).any():
            r, w = np.argwhere(consumed < 0)[0]
            raise ConfigError(
                f"ResumePoint.consumed[{r}, {w}] is {consumed[r, w]}; expected a count >= 0"
            )
        consumed = consumed.astype(np.int64)
        consumed.setflags(write=False)
        object.__setattr__(self, "consumed", consumed)


class EpochStart(NamedTuple):
    """How an epoch began: the ids carried into it, and where it was resumed (if it was)."""

    epoch: int
    carry_in: IdArray
    resume: ResumePoint | None = None


class Span(NamedTuple):
    """Samples ``start .. stop - 1`` (offsets inside the shard) of shard ``shard_index``."""

    shard_index: int
    start: int
    stop: int
    padding: bool = False  # a "pad" repeat, not a sample of its own


@dataclass(frozen=True, eq=False)
class Window:
    """One shuffle window of a worker's share, before its ids are made.

    Attributes:
        spans: Shard pieces whose ids are permuted together (with ``shuffle_key``).
        ids: Instead of spans, explicit ids in reading order: the rest of a window that was
            partly read before a resume.
        padded: With ``ids``, which of them are padding repeats.
        shuffle_key: Entropy of the window's permutation; ``None`` keeps the order.
    """

    spans: tuple[Span, ...] = ()
    ids: IdArray | None = None
    padded: MaskArray | None = None
    shuffle_key: tuple[int, ...] | None = None

    @property
    def num_samples(self) -> int:
        """Number of ids in the window."""
        if self.ids is not None:
            return len(self.ids)
        return sum(s.stop - s.start for s in self.spans)

    @property
    def num_padded(self) -> int:
        """Number of padding repeats in the window."""
        if self.padded is not None:
            return int(self.padded.sum())
        return sum(s.stop - s.start for s in self.spans if s.padding)


class WindowSamples(NamedTuple):
    """The ids of one window, in reading order, and the shards they come from."""

    shard_indices: list[int]  # distinct, in order of first use
    sample_ids: IdArray
    padded: MaskArray


@dataclass(frozen=True, eq=False)
class WorkerPlan:
    """One DataLoader worker's share of an epoch, as windows of shard spans.

    Attributes:
        rank: The worker's rank.
        worker_id: The worker's index inside its rank.
        epoch: The planned epoch.
        windows: The share, window by window, in reading order.
        shard_first_ids: Global id of each shard's first sample, plus the total at the end.
        num_samples: Number of ids the worker reads.
    """

    rank: int
    worker_id: int
    epoch: int
    windows: tuple[Window, ...]
    shard_first_ids: IdArray = field(repr=False)
    num_samples: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_samples", sum(w.num_samples for w in self.windows))

    @property
    def num_padded(self) -> int:
        """Number of padding repeats in the share."""
        return sum(w.num_padded for w in self.windows)

    def iter_windows(self) -> Iterator[WindowSamples]:
        """Make the ids window by window: memory follows one window."""
        for window in self.windows:
            yield _window_samples(window, self.shard_first_ids)

    def sample_ids(self) -> IdArray:
        """All ids of the share, in reading order (int64)."""
        return _concat([w.sample_ids for w in self.iter_windows()], np.int64)

    def padded_mask(self) -> MaskArray:
        """Aligned with `sample_ids`: True for padding repeats."""
        return _concat([w.padded for w in self.iter_windows()], np.bool_)


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One rank's view of an epoch (or of the rest of an interrupted epoch).

    Attributes:
        epoch: The planned epoch.
        rank: This rank.
        world_size: Number of ranks.
        num_workers: DataLoader workers per rank as given (0 is planned as one worker).
        samples_per_rank: Ids every rank reads, padding included; equal on all ranks.
        num_carried: Ids carried in from the previous epoch, served first.
        num_dropped: Ids left out of this epoch, all ranks together (``len(leftover_ids)``).
        num_padded: Padding repeats, all ranks together.
        leftover_ids: The ids left out, to be served first next epoch (same on every rank).
        workers: One plan per worker, ``max(num_workers, 1)`` of them.
    """

    epoch: int
    rank: int
    world_size: int
    num_workers: int
    samples_per_rank: int
    num_carried: int
    num_dropped: int
    num_padded: int
    leftover_ids: IdArray = field(repr=False)
    workers: tuple[WorkerPlan, ...] = field(repr=False)

    def sample_ids(self) -> IdArray:
        """All ids this rank reads, worker after worker (each in its reading order)."""
        return _concat([w.sample_ids() for w in self.workers], np.int64)


def plan_epoch(
    shard_sizes: Sequence[int] | npt.NDArray[np.integer],
    *,
    config: PlanConfig,
    epoch: int,
    world_size: int,
    rank: int,
    num_workers: int,
    resume: ResumePoint | None = None,
    carry_in: Sequence[int] | npt.NDArray[np.integer] | None = None,
    keep_ranks: bool = False,
) -> EpochPlan:
    """Plan one rank's share of an epoch, or of the rest of an interrupted epoch.

    Args:
        shard_sizes: Samples per shard, in manifest order (zeros allowed).
        config: Seed, shuffle and division policy; the same on every rank.
        epoch: The epoch to plan (>= 0).
        world_size: Number of ranks.
        rank: This rank, ``0 <= rank < world_size``.
        num_workers: DataLoader workers per rank; 0 plans one (reading in-process).
        resume: Where this epoch was interrupted; the plan then covers the unconsumed rest.
        carry_in: The ids this epoch serves first, i.e. the previous epoch's ``leftover_ids``.
            By default they are computed by replaying epochs ``0 .. epoch-1`` with ``config``
            and the world size the epoch was started with (``world_size``, or that of the
            first resume point); pass them when that is not how those epochs ran. A resumed
            epoch must get the same ``carry_in`` as when it started.
        keep_ranks: On the topology of ``resume``, continue every worker's own rest even when
            ranks consumed different numbers of samples (packing: a row holds a varying number
            of documents), so the resume is exact; by default such a rest is split anew so that
            ranks get equal counts. Pass the same value for every resume of an epoch.

    Returns:
        The rank's plan, with one `WorkerPlan` per worker.

    Raises:
        ConfigError: An argument is invalid.
        ResumeError: ``resume`` does not fit this epoch, config or shard sizes.
    """
    _check_config(config)
    if resume is not None and not isinstance(resume, ResumePoint):
        raise ConfigError(f"resume is a {type(resume).__name__}; expected a ResumePoint or None")
    sizes, first = _check_sizes(shard_sizes)
    _check_world(epoch, world_size, num_workers)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ConfigError(
            f"rank {rank} is out of range for world_size {world_size}; "
            f"expected 0 <= rank < {world_size}"
        )
    if carry_in is None:
        # The epoch's own carry-in: replayed with the world size the epoch was started with.
        started = resume
        while started is not None and started.previous is not None:
            started = started.previous
        chain_world = world_size if started is None else started.world_size
        carry = _carry_chain(sizes, first, config, epoch, chain_world)
    else:
        carry = _check_carry(carry_in, int(first[-1]))
    fresh = _FreshEpoch(sizes=sizes, first=first, config=config, epoch=epoch, carry=carry)
    planner = _planner_for(resume, world_size, max(num_workers, 1), fresh, keep_ranks)
    workers = tuple(planner.worker_plan(rank, w) for w in range(planner.num_workers))
    leftover = planner.leftover_ids()
    leftover.setflags(write=False)
    return EpochPlan(
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        samples_per_rank=sum(w.num_samples for w in workers),
        num_carried=len(carry),
        num_dropped=len(leftover),
        num_padded=planner.num_padded(),
        leftover_ids=leftover,
        workers=workers,
    )


def plan_carry_in(
    shard_sizes: Sequence[int] | npt.NDArray[np.integer],
    *,
    config: PlanConfig,
    epoch: int,
    world_size: int,
    since: EpochStart | None = None,
    num_workers: int = 0,
    keep_ranks: bool = False,
) -> IdArray:
    """The ids epoch ``epoch`` serves first: epoch ``epoch - 1``'s leftover.

    Without ``since``, epochs ``0 .. epoch-1`` are assumed to have run uninterrupted with this
    ``world_size`` and ``config``: they are replayed at the cost of one shard permutation per
    epoch, making no samples (and none at all when the epochs divide evenly). With ``since``,
    epoch ``since.epoch`` began as it says (its carry-in, and where it was resumed) and the
    epochs after it ran on ``world_size x num_workers``: each is planned for rank 0 (the
    leftover is the same on every rank) and its leftover carried on.

    Args:
        shard_sizes: Samples per shard, in manifest order.
        config: The plan config.
        epoch: The epoch whose carry-in is wanted.
        world_size: Number of ranks.
        since: A known start of an epoch ``<= epoch`` (a loaded state's).
        num_workers: With ``since``: workers per rank of the epochs after it.
        keep_ranks: With ``since``: as passed to `plan_epoch` when those epochs were planned.

    Returns:
        The ids (fewer than ``world_size`` without ``since``; none under ``"pad"``).

    Raises:
        ConfigError: An argument is invalid, or ``since`` is after ``epoch``.
        ResumeError: ``since.resume`` does not fit its epoch.
    """
    _check_config(config)
    sizes, first = _check_sizes(shard_sizes)
    _check_world(epoch, world_size, num_workers)
    if since is None:
        return _carry_chain(sizes, first, config, epoch, world_size)
    if since.epoch > epoch:
        raise ConfigError(
            f"plan_carry_in: since is epoch {since.epoch}, after epoch {epoch}; pass a start "
            "of an earlier epoch or none"
        )
    carry = _check_carry(since.carry_in, int(first[-1]))
    for e in range(since.epoch, epoch):
        carry = plan_epoch(
            sizes,
            config=config,
            epoch=e,
            world_size=world_size,
            rank=0,
            num_workers=num_workers,
            resume=since.resume if e == since.epoch else None,
            carry_in=carry,
            keep_ranks=keep_ranks,
        ).leftover_ids
    return carry


# ---------------------------------------------------------------------------------------------
# Sequences: an epoch's ids as pieces, cut by position without making the ids.


@dataclass(frozen=True, eq=False)
class _Block:
    """Explicit ids in reading order (the rest of a partly read window)."""

    ids: IdArray
    padded: MaskArray


_Piece: TypeAlias = "Span | _Block"


class _Sequence(Protocol):
    length: int

    def pieces(self, start: int, stop: int) -> list[_Piece]: ...


class _EpochSequence:
    """Carried-in ids, then the shards' samples in permuted shard order."""

    def __init__(self, sizes: IdArray, first: IdArray, perm: IdArray, carry: IdArray) -> None:
        self._perm = perm
        self._sizes = sizes[perm]
        self._ends = np.cumsum(self._sizes)
        self._carry = _ids_to_spans(carry, first)
        self._num_carried = len(carry)
        self.length = self._num_carried + int(first[-1])

    def pieces(self, start: int, stop: int) -> list[_Piece]:
        out: list[_Piece] = []
        c = self._num_carried
        if start < min(stop, c):
            out += _cut(self._carry, start, min(stop, c))
        if max(start, c) < stop:
            out += self._body(max(start, c) - c, stop - c)
        return out

    def _body(self, start: int, stop: int) -> list[_Piece]:
        return _body_spans(self._perm, self._sizes, self._ends, start, stop)


class _ResumedSequence:
    """The unconsumed real (non-padding) ids of a plan, worker after worker."""

    def __init__(self, tail: _TailPlanner) -> None:
        self._tail = tail
        counts = tail.worker_counts()
        for r, w in tail.padding_workers():
            counts[r, w] -= tail.worker_plan(r, w).num_padded
        self._offsets = np.concatenate([[0], np.cumsum(counts.ravel())])
        self._cache: dict[int, list[_Piece]] = {}
        self.length = int(self._offsets[-1])

    def pieces(self, start: int, stop: int) -> list[_Piece]:
        out: list[_Piece] = []
        i = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            if hi > start:
                out += _cut(self._worker_pieces(i), start - lo, min(stop, hi) - lo)
                start = min(stop, hi)
            i += 1
        return out

    def _worker_pieces(self, index: int) -> list[_Piece]:
        if index not in self._cache:
            plan = self._tail.worker_plan(*divmod(index, self._tail.num_workers))
            pieces: list[_Piece] = []
            for window in plan.windows:
                if window.ids is None:
                    pieces += [s for s in window.spans if not s.padding]
                elif window.padded is not None:
                    real = ~window.padded
                    if real.any():
                        pieces.append(_Block(window.ids[real], window.padded[real]))
            self._cache[index] = pieces
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
class _FreshEpoch:
    sizes: IdArray
    first: IdArray
    config: PlanConfig
    epoch: int
    carry: IdArray

    def planner(self, world_size: int, num_workers: int) -> _SplitPlanner:
        seq = _epoch_sequence(self.sizes, self.first, self.config, self.epoch, self.carry)
        return _SplitPlanner(seq, self, world_size, num_workers, depth=0, inherited=_empty())


class _SplitPlanner:
    """Steps 3 to 5 of the algorithm over a sequence."""

    def __init__(
        self,
        seq: _Sequence,
        fresh: _FreshEpoch,
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
        windows = _group_windows(self._pieces(*self._worker_range(rank, worker_id)), config, key)
        return WorkerPlan(rank, worker_id, self._fresh.epoch, windows, self._fresh.first)

    def _pieces(self, start: int, stop: int) -> list[_Piece]:
        length = self._seq.length
        out = self._seq.pieces(start, min(stop, length)) if start < min(stop, length) else []
        # Padding positions repeat the sequence from its start (cyclically, if it is shorter).
        pos, end = max(start, length) - length, stop - length
        while pos < end:
            a = pos % length
            b = min(length, a + end - pos)
            out += [_as_padding(p) for p in self._seq.pieces(a, b)]
            pos += b - a
        return out

    def leftover_ids(self) -> IdArray:
        length = self._seq.length
        if self._served >= length:
            return self._inherited.copy()
        own = _piece_ids(self._seq.pieces(self._served, length), self._fresh.first)
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
            self._cache[rank, worker_id] = _drop_prefix(plan, consumed)
        return self._cache[rank, worker_id]

    def leftover_ids(self) -> IdArray:
        return self._base.leftover_ids()

    def padding_workers(self) -> list[tuple[int, int]]:
        return self._base.padding_workers()

    def num_padded(self) -> int:
        return sum(self.worker_plan(r, w).num_padded for r, w in self.padding_workers())


def _planner_for(
    point: ResumePoint | None,
    world_size: int,
    num_workers: int,
    fresh: _FreshEpoch,
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
    base = _planner_for(
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


def _carry_chain(
    sizes: IdArray, first: IdArray, config: PlanConfig, epoch: int, world_size: int
) -> IdArray:
    carry = _empty()
    if config.policy != "drop":
        return carry
    total = int(first[-1])
    for e in range(epoch):
        if len(carry) == 0 and total % world_size == 0:
            break  # every later epoch divides evenly too
        carry = _sequence_tail(sizes, first, config, e, carry, (len(carry) + total) % world_size)
    return carry


def _sequence_tail(
    sizes: IdArray, first: IdArray, config: PlanConfig, epoch: int, carry: IdArray, count: int
) -> IdArray:
    """The last ``count`` ids of an epoch's sequence.

    Only the last shards of the permutation are needed: they are the ones with the largest
    generator outputs, found by a partial sort (an O(N) argpartition instead of a full sort).
    """
    num_shards = len(sizes)
    if count == 0:
        return _empty()
    if config.shuffle and count <= first[-1]:
        keys = _generator((_SHARD_ORDER, config.seed, epoch)).random_raw(num_shards)
        k = 64
        while k < num_shards:
            top = np.argpartition(keys, num_shards - k)[num_shards - k :]
            if np.count_nonzero(keys == keys[top].min()) > 1:
                break  # a tie at the boundary: sort everything, as _permutation does
            top = top[np.lexsort((top, keys[top]))].astype(np.int64)
            top_sizes = sizes[top]
            ends = np.cumsum(top_sizes)
            if ends[-1] >= count:
                end = int(ends[-1])
                return _piece_ids(_body_spans(top, top_sizes, ends, end - count, end), first)
            k *= 4
    seq = _epoch_sequence(sizes, first, config, epoch, carry)
    return _piece_ids(seq.pieces(seq.length - count, seq.length), first)


# ---------------------------------------------------------------------------------------------
# Helpers.


def _epoch_sequence(
    sizes: IdArray, first: IdArray, config: PlanConfig, epoch: int, carry: IdArray
) -> _EpochSequence:
    if config.shuffle:
        perm = _permutation(len(sizes), (_SHARD_ORDER, config.seed, epoch))
    else:
        perm = np.arange(len(sizes), dtype=np.int64)
    return _EpochSequence(sizes, first, perm, carry)


def _generator(key: tuple[int, ...]) -> np.random.PCG64:
    return np.random.PCG64(np.random.SeedSequence(list(key)))


def _permutation(n: int, key: tuple[int, ...]) -> IdArray:
    """A permutation of ``range(n)`` from PCG64's raw output only (stable across numpy)."""
    return np.argsort(_generator(key).random_raw(n), kind="stable").astype(np.int64)


def _body_spans(
    perm: IdArray, sizes: IdArray, ends: IdArray, start: int, stop: int
) -> list[_Piece]:
    """Spans of positions ``[start, stop)`` of shards ``perm`` laid end to end.

    ``sizes`` and ``ends`` are the sizes of the shards in ``perm`` and their running sum.
    """
    i0 = int(np.searchsorted(ends, start, side="right"))
    i1 = int(np.searchsorted(ends, stop, side="left")) + 1
    begins = ends[i0:i1] - sizes[i0:i1]
    lo = np.maximum(begins, start) - begins
    hi = np.minimum(ends[i0:i1], stop) - begins
    keep = hi > lo  # empty shards
    rows = zip(perm[i0:i1][keep].tolist(), lo[keep].tolist(), hi[keep].tolist(), strict=True)
    return [Span(s, a, b) for s, a, b in rows]


def _group_windows(
    pieces: list[_Piece], config: PlanConfig, key: tuple[int, ...] | None
) -> tuple[Window, ...]:
    """Consecutive spans, ``shuffle_window`` at a time; explicit ids form windows of their own."""
    windows: list[Window] = []
    run: list[Span] = []
    for piece in [*pieces, None]:
        if isinstance(piece, Span):
            run.append(piece)
            if len(run) < config.shuffle_window:
                continue
        if run:
            window_key = None if key is None else (*key, len(windows))
            windows.append(Window(spans=tuple(run), shuffle_key=window_key))
            run = []
        if isinstance(piece, _Block):
            piece.ids.setflags(write=False)
            piece.padded.setflags(write=False)
            windows.append(Window(ids=piece.ids, padded=piece.padded))
    return tuple(windows)


def _window_samples(window: Window, first: IdArray) -> WindowSamples:
    if window.ids is not None and window.padded is not None:
        shards = np.searchsorted(first, window.ids, side="right") - 1
        return WindowSamples(list(dict.fromkeys(shards.tolist())), window.ids, window.padded)
    spans = window.spans
    ids = _piece_ids(list(spans), first)
    lengths = [s.stop - s.start for s in spans]
    padded = np.repeat(np.array([s.padding for s in spans], dtype=np.bool_), lengths)
    if window.shuffle_key is not None:
        order = _permutation(len(ids), window.shuffle_key)
        ids, padded = ids[order], padded[order]
    return WindowSamples(list(dict.fromkeys(s.shard_index for s in spans)), ids, padded)


def _drop_prefix(plan: WorkerPlan, consumed: int) -> WorkerPlan:
    """The plan without its first ``consumed`` ids; a partly read window becomes explicit."""
    windows = plan.windows
    i = 0
    while i < len(windows) and consumed >= windows[i].num_samples:
        consumed -= windows[i].num_samples
        i += 1
    rest = windows[i:]
    if consumed and rest:
        head = _window_samples(rest[0], plan.shard_first_ids)
        ids, padded = head.sample_ids[consumed:], head.padded[consumed:]
        ids.setflags(write=False)
        padded.setflags(write=False)
        partial = Window(ids=ids, padded=padded)
        rest = (partial, *rest[1:])
    return replace(plan, windows=rest)


def _cut(pieces: list[_Piece], start: int, stop: int) -> list[_Piece]:
    out: list[_Piece] = []
    pos = 0
    for piece in pieces:
        size = _piece_len(piece)
        lo, hi = max(start - pos, 0), min(stop - pos, size)
        if lo < hi:
            if isinstance(piece, Span):
                out.append(piece._replace(start=piece.start + lo, stop=piece.start + hi))
            else:
                out.append(_Block(piece.ids[lo:hi], piece.padded[lo:hi]))
        pos += size
        if pos >= stop:
            break
    return out


def _piece_len(piece: _Piece) -> int:
    return piece.stop - piece.start if isinstance(piece, Span) else len(piece.ids)


def _as_padding(piece: _Piece) -> _Piece:
    if isinstance(piece, Span):
        return piece._replace(padding=True)
    return _Block(piece.ids, np.ones(len(piece.ids), dtype=np.bool_))


def _piece_ids(pieces: list[_Piece], first: IdArray) -> IdArray:
    parts = [
        np.arange(first[p.shard_index] + p.start, first[p.shard_index] + p.stop, dtype=np.int64)
        if isinstance(p, Span)
        else p.ids
        for p in pieces
    ]
    return _concat(parts, np.int64)


def _ids_to_spans(ids: IdArray, first: IdArray) -> list[_Piece]:
    """Explicit ids as spans: one per run of consecutive ids inside one shard."""
    if len(ids) == 0:
        return []
    shards = np.searchsorted(first, ids, side="right") - 1
    breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shards) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(ids)]])
    offsets = ids[starts] - first[shards[starts]]
    rows = zip(shards[starts].tolist(), offsets.tolist(), (stops - starts).tolist(), strict=True)
    return [Span(s, a, a + n) for s, a, n in rows]


def _concat(parts: list[npt.NDArray[np.generic]], dtype: type[np.generic]) -> npt.NDArray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)


def _empty() -> IdArray:
    return np.empty(0, dtype=np.int64)


def _is_int_array(array: np.ndarray) -> bool:
    return array.size == 0 or (
        np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_)
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} is {value!r}; expected an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{name} is {value}; expected an integer >= {minimum}")


def _check_config(config: object) -> None:
    if not isinstance(config, PlanConfig):
        raise ConfigError(f"config is a {type(config).__name__}; expected a PlanConfig")


def _check_world(epoch: int, world_size: int, num_workers: int) -> None:
    _check_int("epoch", epoch, 0)
    _check_int("world_size", world_size, 1)
    _check_int("num_workers", num_workers, 0)


def _check_sizes(shard_sizes: Sequence[int] | npt.NDArray[np.integer]) -> tuple[IdArray, IdArray]:
    sizes = np.asarray(shard_sizes)
    if sizes.ndim != 1 or not _is_int_array(sizes):
        raise ConfigError(
            f"shard_sizes has shape {sizes.shape} and dtype {sizes.dtype}; "
            "expected a 1-D sequence of integer sample counts"
        )
    negative = np.flatnonzero(sizes < 0)
    if len(negative):
        i = int(negative[0])
        raise ConfigError(f"shard_sizes[{i}] is {sizes[i]}; expected a sample count >= 0")
    sizes = sizes.astype(np.int64)
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=first[1:])
    return sizes, first


def _check_carry(carry_in: Sequence[int] | npt.NDArray[np.integer], num_samples: int) -> IdArray:
    carry = np.asarray(carry_in)
    if carry.ndim != 1 or not _is_int_array(carry):
        raise ConfigError(
            f"carry_in has shape {carry.shape} and dtype {carry.dtype}; expected a 1-D array "
            "of sample ids (the previous epoch's leftover_ids)"
        )
    bad = np.flatnonzero((carry < 0) | (carry >= num_samples))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(
            f"carry_in[{i}] is {carry[i]}, out of range for {num_samples} samples; "
            "pass the previous epoch's leftover_ids"
        )
    return carry.astype(np.int64)
