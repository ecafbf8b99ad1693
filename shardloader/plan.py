"""Epoch plans: which global sample ids each rank and DataLoader worker reads, and in which order.

A pure function of (shard sizes, config, epoch, world, resume point): no I/O, no torch, no
environment. Sample ids are positions in manifest order: shard ``i`` holds ids ``first[i] ..
first[i] + sizes[i] - 1``, ``first`` being the running sum of the sizes.

The units may also be blocks (the record batches of Arrow shards, Parquet row groups; see
`shardloader.blocks`): blocks are contiguous id ranges in shard order, so everything below holds
with "block" for "shard"; ``unit_groups`` then names each block's shard.

Algorithm, for one epoch over ``W`` ranks with ``K`` workers each:

1. Permute the shard order with a generator seeded by ``(seed, epoch)`` (none if ``shuffle`` is
   off). Over blocks with ``unit_groups``, the order spreads each shard's blocks evenly over the
   epoch instead (`shardloader.plan_spread`: the ``m`` blocks of a shard, from a random one on,
   fall one in each ``1/m`` of the epoch, at a random place in it), so that any stretch of the
   sequence draws on as many shards as it can, in proportion to their sizes. Each block's place
   is a hash of (seed, epoch, shard, slot), so a range of the sequence is found and made from
   per-shard sums without ordering every block.
2. Lay out the epoch's sequence: the ids carried in from the previous epoch first, then every
   shard's samples in natural order, shards in the permuted order. Its length is ``L``.
3. Make it divide. ``"drop"``: each rank gets ``n = L // W``; the last ``L % W`` ids of the
   sequence (``EpochPlan.leftover_ids``) are left out and carried into the next epoch, whose
   sequence starts with them. ``"pad"``: each rank gets ``n = ceil(L / W)``; the missing
   ``n * W - L`` positions repeat the first ids of the sequence and are marked as padding.
4. Rank ``r`` takes positions ``[r * n, (r + 1) * n)``. Worker ``w`` takes a contiguous sub-block;
   the sub-blocks differ by at most one and lower worker ids get the extra samples.
5. A worker reads its block in windows of at most ``shuffle_window`` consecutive shard pieces,
   and, with ``shuffle_bytes`` and ``unit_bytes``, of at most that many decoded bytes (a window
   ends before the piece that would pass it; a piece of part of a unit counts its share); a
   window's ids are permuted together, seeded by ``(seed, epoch, rank, worker, window index)``.
   Over blocks (when some shard has more than one), the permutation spreads each block's
   samples evenly over the window (`shardloader.plan_spans.spread_permutation`: a block of
   ``c`` puts one sample in each ``1/c`` of it, at a random place), so any stretch of the window
   draws on as many of its blocks as it can; with one block per shard, windows are permuted
   uniformly, as whole shards are.

So over shards a rank opens only the shards of its block (the two at its ends shared with its
neighbours, plus the shards of carried-in or padding ids), and a worker holds at most
``shuffle_window`` shards at once; over blocks a rank touches most shards, a few blocks of each, and
a worker holds at most one window of blocks (``shuffle_bytes``). A worker's share is kept as spans
(`Span`: shard_index, start, stop); its ids are made window by window (`WorkerPlan.iter_windows`),
so memory follows one window, not the corpus. Generators are PCG64 seeded by a ``SeedSequence`` of
integers only, and permutations are an argsort of the generator's raw 64-bit output (or of float64
keys made from it with exact or correctly rounded arithmetic), which numpy keeps stable across
versions and machines.

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

Code: this module checks the arguments and assembles an `EpochPlan`; `shardloader.plan_config`
holds the inputs (`PlanConfig`, `ResumePoint`, `EpochStart`), `shardloader.plan_sequence` the
sequences and the planners that divide them (steps 1 to 5, resume, carry-in), and
`shardloader.plan_spans` the pieces, windows and worker plans, and makes the ids. Import the
public names from here.

Measured cost (``python -m tools.bench.plan``: 100,000 shards of 1 to 20,000 samples, 1,000
ranks x 8 workers, best of 5 on a shared 2-core machine, peak traced Python memory): planning
one rank takes 10 ms and 4.0 MB (the shard permutation and its running sum: O(shards), never
O(samples)); the carry-in of epoch 50 takes 72 ms and 3.3 MB (one partial sort of 100,000
generator outputs per earlier epoch); one worker's 125,000 ids are made in 10 ms and 2.0 MB; an
exact resume of one rank takes 37 ms and 7.9 MB, an elastic one onto 750 ranks x 4 workers
56 ms and 12.6 MB (the partly read windows of the workers it takes over are made).
Over blocks (``--blocks``: the same shards in 19.6 M blocks of 51 samples, windows of 64 MiB,
the units prepared once by `prepare_units`, 1.1 s and 0.5 GB; block order 4): one rank of epoch
0 takes 30 ms and 18 MB, of epoch 5 with its carry-in chain 48 ms (the chain alone 18 ms);
epoch 5 after a state saved inside epoch 3, 38 ms; an exact resume inside epoch 5 74 ms and 19
MB, an elastic one onto 750 ranks x 4 workers 0.13 s and 22 MB; one worker's 124,907 ids 14 ms
(a spread window's order is two sorts; uniform windows took 9 ms). The O(shards) part is a few
numpy passes over 100,000 shards per boundary; the rest is the rank's own ~20,000 blocks as
spans and windows, in Python. (Before block order 2 one rank took 10 s and 1.6 GB.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shardloader.errors import ConfigError
from shardloader.plan_config import (
    POLICIES,
    EpochStart,
    PlanConfig,
    ResumePoint,
    check_config,
    check_int,
    is_int_array,
)
from shardloader.plan_sequence import FreshEpoch, carry_chain, planner_for
from shardloader.plan_spans import (
    IdArray,
    MaskArray,
    Span,
    Window,
    WindowSamples,
    WorkerPlan,
    concat,
)
from shardloader.plan_spread import PlanUnits, prepare_units

__all__ = [
    "POLICIES",
    "EpochPlan",
    "EpochStart",
    "IdArray",
    "MaskArray",
    "PlanConfig",
    "PlanUnits",
    "ResumePoint",
    "Span",
    "Window",
    "WindowSamples",
    "WorkerPlan",
    "plan_carry_in",
    "plan_epoch",
    "prepare_units",
]


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
        return concat([w.sample_ids() for w in self.workers], np.int64)


def plan_epoch(
    shard_sizes: Sequence[int] | npt.NDArray[np.integer] | PlanUnits,
    *,
    config: PlanConfig,
    epoch: int,
    world_size: int,
    rank: int,
    num_workers: int,
    resume: ResumePoint | None = None,
    carry_in: Sequence[int] | npt.NDArray[np.integer] | None = None,
    keep_ranks: bool = False,
    unit_bytes: Sequence[int] | npt.NDArray[np.integer] | None = None,
    unit_groups: Sequence[int] | npt.NDArray[np.integer] | None = None,
) -> EpochPlan:
    """Plan one rank's share of an epoch, or of the rest of an interrupted epoch.

    Args:
        shard_sizes: Samples per shard, in manifest order (zeros allowed); or the units made
            once by `prepare_units` (with their ``unit_bytes`` and ``unit_groups``, which are
            then not passed here): planning over millions of blocks then costs O(shards).
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
        unit_bytes: Decoded bytes of every shard (or block), for ``config.shuffle_bytes``: a
            window ends before the piece that would take it past that many bytes (a piece of
            part of a unit counts its share). ``None`` or 0: unknown, not bounded.
        unit_groups: When the units are blocks: the shard of every block (non-decreasing, from
            0). The epoch's order then spreads each shard's blocks evenly over the epoch
            (`shardloader.plan_spread`) instead of permuting units uniformly. The
            same value for every rank and resume.

    Returns:
        The rank's plan, with one `WorkerPlan` per worker.

    Raises:
        ConfigError: An argument is invalid.
        ResumeError: ``resume`` does not fit this epoch, config or shard sizes.
    """
    check_config(config)
    if resume is not None and not isinstance(resume, ResumePoint):
        raise ConfigError(f"resume is a {type(resume).__name__}; expected a ResumePoint or None")
    units = _units(shard_sizes, unit_bytes, unit_groups)
    _check_world(epoch, world_size, num_workers)
    check_int("rank", rank, 0)
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
        carry = carry_chain(units, config, epoch, chain_world)
    else:
        carry = _check_carry(carry_in, int(units.first[-1]))
    fresh = FreshEpoch(units=units, config=config, epoch=epoch, carry=carry)
    planner = planner_for(resume, world_size, max(num_workers, 1), fresh, keep_ranks)
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
    shard_sizes: Sequence[int] | npt.NDArray[np.integer] | PlanUnits,
    *,
    config: PlanConfig,
    epoch: int,
    world_size: int,
    since: EpochStart | None = None,
    num_workers: int = 0,
    keep_ranks: bool = False,
    unit_groups: Sequence[int] | npt.NDArray[np.integer] | None = None,
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
        unit_groups: As passed to `plan_epoch`.

    Returns:
        The ids (fewer than ``world_size`` without ``since``; none under ``"pad"``).

    Raises:
        ConfigError: An argument is invalid, or ``since`` is after ``epoch``.
        ResumeError: ``since.resume`` does not fit its epoch.
    """
    check_config(config)
    units = _units(shard_sizes, None, unit_groups)
    _check_world(epoch, world_size, num_workers)
    if since is None:
        return carry_chain(units, config, epoch, world_size)
    if since.epoch > epoch:
        raise ConfigError(
            f"plan_carry_in: since is epoch {since.epoch}, after epoch {epoch}; pass a start "
            "of an earlier epoch or none"
        )
    if since.resume is not None and not isinstance(since.resume, ResumePoint):
        raise ConfigError(
            f"since.resume is a {type(since.resume).__name__}; expected a ResumePoint or None"
        )
    carry = _check_carry(since.carry_in, int(units.first[-1]))
    for e in range(since.epoch, epoch):
        # Only the epoch's leftover is wanted: the planner gives it without making any
        # worker's windows (over blocks, the tail of the sequence alone).
        fresh = FreshEpoch(units=units, config=config, epoch=e, carry=carry)
        resume = since.resume if e == since.epoch else None
        planner = planner_for(resume, world_size, max(num_workers, 1), fresh, keep_ranks)
        carry = planner.leftover_ids()
    return carry


def _check_world(epoch: int, world_size: int, num_workers: int) -> None:
    check_int("epoch", epoch, 0)
    check_int("world_size", world_size, 1)
    check_int("num_workers", num_workers, 0)


def _units(
    shard_sizes: Sequence[int] | npt.NDArray[np.integer] | PlanUnits,
    unit_bytes: Sequence[int] | npt.NDArray[np.integer] | None,
    unit_groups: Sequence[int] | npt.NDArray[np.integer] | None,
) -> PlanUnits:
    if not isinstance(shard_sizes, PlanUnits):
        return prepare_units(shard_sizes, unit_bytes=unit_bytes, unit_groups=unit_groups)
    if unit_bytes is not None or unit_groups is not None:
        raise ConfigError(
            "shard_sizes is a PlanUnits, which holds its unit_bytes and unit_groups; pass them "
            "to prepare_units, not to the plan"
        )
    return shard_sizes


def _check_carry(carry_in: Sequence[int] | npt.NDArray[np.integer], num_samples: int) -> IdArray:
    carry = np.asarray(carry_in)
    if carry.ndim != 1 or not is_int_array(carry):
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
