"""Resume decisions: from a saved position and a topology to what each worker must do.

A loader's position is a `shardloader.state.LoaderState`; this module is the one place that
decides what a position means when iteration starts again, and how positions are made. Every
function is pure (no I/O, no torch): it takes a state, the run's shard sizes and settings
(`RunSpec`) and a topology (world size, workers per rank), and returns plan inputs, a worker's
share, a packer's skip or a new state.

Algorithm. Each DataLoader worker ships a `Cursor` with every batch: its epoch, the share it
reads, how many samples of that share it has consumed (``position``) and, with packing, how much
of the next sample its packer used (``skip``). The loader keeps the latest cursor per share that
reached the training loop, and `state_from_cursors` turns them, with the state the epoch was
planned from (`anchor_state`: the epoch's start, or the loaded state it continues), into a
`LoaderState`: ``consumed[rank, share]`` plus ``previous``, the anchor's own resume point, so
positions chain through resumes. When iteration starts from a loaded state:

- Same topology (exact resume): `plan_inputs` hands the state's resume point and carry-in to
  `shardloader.plan.plan_epoch`, which continues every worker's share where it stopped.
  `worker_share` keeps DataLoader workers' turns: the worker after the one whose batch came last
  reads first (``rotation``), so batches come in the same order as without the interruption;
  `packer_skip` restarts a packer inside the document it had partly packed.
- Another topology (elastic resume): the same inputs, but the plan splits the unconsumed rest of
  every (rank, worker) anew over the new ranks and workers; it needs every rank's row of
  ``consumed`` (`LoaderState.check_topology` refuses a one-rank state; `merge_states` combines
  all ranks'). Turns start at worker 0 and partly packed documents are served again whole.
- Carry-over across epochs (``"drop"``): an epoch serves the previous epoch's leftover first.
  For the loaded epoch it is the state's ``carry_in``; for a later epoch `epoch_carry_in` plans
  the epochs from the loaded one on (`shardloader.plan.plan_carry_in` with ``since``), because
  a resumed epoch may leave other ids than an uninterrupted one; with no state, or for an epoch
  before it, epochs are replayed from 0. When an epoch ends, `next_epoch_state` is the start of
  the next one.

A worker's own ``state_dict`` (torchdata's ``StatefulDataLoader``) is its cursor plus its anchor
(`worker_state_dict`); `state_from_worker` reads it back as a one-rank `LoaderState`.

Cost: the decisions are O(world_size x workers) integers, except carry-ins, which replay or plan
earlier epochs (`shardloader.plan`'s docstring: about 72 ms for 50 epochs of 100,000 shards).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np

from shardloader.errors import ResumeError
from shardloader.plan import (
    EpochStart,
    IdArray,
    PlanConfig,
    PlanUnits,
    ResumePoint,
    plan_carry_in,
    prepare_units,
)
from shardloader.state import LoaderState
from shardloader.world import WorldInfo

WORKER_STATE_KIND = "shardloader.worker_state"


class Cursor(NamedTuple):
    """One process's position, shipped with every batch (as a plain tuple on the wire)."""

    epoch: int
    rank: int
    world_size: int
    share: int  # the worker share being read (see `LoaderState.rotation`)
    num_workers: int
    position: int  # samples of the share consumed (packing: where the next row starts)
    finished: bool  # the share was read to its end
    skip: int = 0  # packing: what the packer used of the sample at ``position``


@dataclass(frozen=True, eq=False)
class RunSpec:
    """What every state of one loader shares: the data and the settings the plan depends on.

    Attributes:
        shard_sizes: Samples per shard, in manifest order.
        dataset: `shardloader.state.dataset_fingerprint` of the manifest.
        config: The plan config.
        pack: The packing settings (`shardloader.pack.PackConfig.to_dict`), if packing.
        unit_bytes: Decoded bytes per unit, for the config's ``shuffle_bytes`` (or ``None``).
        unit_groups: With blocks as units, each block's shard (`shardloader.plan.plan_epoch`).
    """

    shard_sizes: IdArray
    dataset: str
    config: PlanConfig
    pack: Mapping[str, Any] | None = None
    unit_bytes: IdArray | None = None
    unit_groups: IdArray | None = None

    @cached_property
    def units(self) -> PlanUnits:
        """The units, checked and summed once per process for every plan made over them."""
        return prepare_units(
            self.shard_sizes, unit_bytes=self.unit_bytes, unit_groups=self.unit_groups
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without `units` (a DataLoader worker makes its own when it plans)."""
        return {k: v for k, v in self.__dict__.items() if k != "units"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the fields (a frozen dataclass: set through ``__dict__``)."""
        self.__dict__.update(state)

    @property
    def keep_ranks(self) -> bool:
        """Whether an exact resume keeps ranks' unequal rests (packing: rows vary in samples)."""
        return self.pack is not None


class PlanInputs(NamedTuple):
    """What `shardloader.plan.plan_epoch` needs beyond the topology to plan a loaded epoch."""

    resume: ResumePoint | None
    carry_in: IdArray | None  # None: replay the epochs before (plan_epoch's default)


def plan_inputs(
    spec: RunSpec, loaded: LoaderState | None, *, epoch: int, world_size: int, num_workers: int
) -> PlanInputs:
    """Where ``epoch`` starts on ``world_size x num_workers``, given the loaded state.

    Raises:
        ResumeError: A one-rank state and another topology.
    """
    if loaded is not None and epoch == loaded.epoch:
        loaded.check_topology(world_size, num_workers)
        return PlanInputs(loaded.resume_point(), loaded.carry_in)
    if loaded is not None and epoch > loaded.epoch:
        return PlanInputs(None, epoch_carry_in(spec, loaded, epoch, world_size, num_workers))
    return PlanInputs(None, None)


def epoch_carry_in(
    spec: RunSpec, loaded: LoaderState | None, epoch: int, world_size: int, num_workers: int
) -> IdArray:
    """The ids ``epoch`` serves first: the leftover of the epoch before it.

    Raises:
        ResumeError: For an epoch after a one-rank state's, another topology.
    """
    if loaded is not None and epoch == loaded.epoch:
        return loaded.carry_in
    since = None
    if loaded is not None and epoch > loaded.epoch:
        loaded.check_topology(world_size, num_workers)
        since = EpochStart(loaded.epoch, loaded.carry_in, loaded.resume_point())
    return plan_carry_in(
        spec.units,
        config=spec.config,
        epoch=epoch,
        world_size=world_size,
        since=since,
        num_workers=num_workers,
        keep_ranks=spec.keep_ranks,
    )


def worker_share(loaded: LoaderState | None, *, epoch: int, world: WorldInfo) -> int:
    """Which worker's share DataLoader worker ``world.worker_id`` reads (turns kept)."""
    workers = max(world.num_workers, 1)
    if loaded is None or loaded.epoch != epoch or max(loaded.num_workers, 1) != workers:
        return world.worker_id
    return (world.worker_id + loaded.rotation) % workers


def packer_skip(loaded: LoaderState | None, *, epoch: int, world: WorldInfo, share: int) -> int:
    """How much of share ``share``'s first sample its packer already used (same topology)."""
    if loaded is None or loaded.epoch != epoch or loaded.extra is None:
        return 0
    same = (loaded.world_size, max(loaded.num_workers, 1)) == (
        world.world_size,
        max(world.num_workers, 1),
    )
    return int(loaded.extra[world.rank][share] or 0) if same else 0


def anchor_state(
    spec: RunSpec, loaded: LoaderState | None, *, epoch: int, world_size: int, num_workers: int
) -> LoaderState:
    """The state ``epoch`` is planned from: the loaded one it continues, or its start."""
    if loaded is not None and loaded.epoch == epoch:
        return loaded
    return LoaderState(
        dataset=spec.dataset,
        config=spec.config,
        epoch=epoch,
        world_size=world_size,
        num_workers=num_workers,
        consumed=np.zeros((world_size, max(num_workers, 1)), np.int64),
        complete=True,
        carry_in=epoch_carry_in(spec, loaded, epoch, world_size, num_workers),
        pack=spec.pack,
    )


def next_epoch_state(
    spec: RunSpec,
    loaded: LoaderState | None,
    *,
    done: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> LoaderState:
    """The start of the epoch after ``done``, which ended."""
    return LoaderState(
        dataset=spec.dataset,
        config=spec.config,
        epoch=done + 1,
        world_size=world_size,
        num_workers=num_workers,
        consumed=np.zeros((world_size, max(num_workers, 1)), np.int64),
        rank=rank,
        carry_in=epoch_carry_in(spec, loaded, done + 1, world_size, num_workers),
        pack=spec.pack,
    )


def state_from_cursors(
    anchor: LoaderState, cursors: Iterable[Cursor], *, last_share: int | None
) -> LoaderState:
    """The position the training loop reached: the latest cursor of each share it consumed.

    Args:
        anchor: The state the epoch was planned from (`anchor_state`).
        cursors: One per share that delivered a batch, all of one rank and epoch.
        last_share: The share whose batch came last (the next turn is the one after it).
    """
    cursors = list(cursors)
    if not cursors:
        return anchor
    rank, world_size, num_workers = cursors[0].rank, cursors[0].world_size, cursors[0].num_workers
    consumed = np.zeros((world_size, max(num_workers, 1)), np.int64)
    skips = np.zeros_like(consumed)
    for cursor in cursors:
        consumed[:, cursor.share] = cursor.position
        skips[:, cursor.share] = cursor.skip
    return replace(
        anchor,
        world_size=world_size,
        num_workers=num_workers,
        consumed=consumed,
        complete=world_size == 1,
        rank=rank,
        previous=anchor.resume_point(),
        rotation=0 if last_share is None else (last_share + 1) % max(num_workers, 1),
        extra=None if anchor.pack is None else tuple(map(tuple, skips.tolist())),
    )


def worker_state_dict(cursor: Cursor, anchor: LoaderState) -> dict[str, Any]:
    """One process's own position, self-contained (read back by `state_from_worker`)."""
    return {
        "kind": WORKER_STATE_KIND,
        "epoch": cursor.epoch,
        "rank": cursor.rank,
        "world_size": cursor.world_size,
        "worker_id": cursor.share,
        "num_workers": cursor.num_workers,
        "position": cursor.position,
        "finished": cursor.finished,
        "skip": cursor.skip,
        "anchor": anchor.to_dict(),
    }


def state_from_worker(state: Mapping[str, Any]) -> LoaderState:
    """A worker's own state as a loader state: its count, copied to the rank's other rows.

    Raises:
        ResumeError: The worker state is malformed or does not fit its anchor.
    """
    try:
        anchor = LoaderState.from_dict(state["anchor"])
        worker_id, position = int(state["worker_id"]), int(state["position"])
        rank, skip = int(state["rank"]), int(state.get("skip", 0))
        world_size, num_workers = int(state["world_size"]), int(state["num_workers"])
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ResumeError):
            raise
        raise ResumeError(f"worker state is malformed ({type(err).__name__}: {err})") from err
    if (world_size, num_workers) != (anchor.world_size, anchor.num_workers) and anchor.started:
        raise ResumeError(
            f"worker state: {world_size} ranks x {num_workers} workers, but its anchor has "
            f"{anchor.world_size} x {anchor.num_workers}; save the state again"
        )
    consumed = np.zeros((world_size, max(num_workers, 1)), np.int64)
    consumed[:, worker_id] = position
    extra = [[0] * consumed.shape[1] for _ in range(world_size)]
    for row in extra:
        row[worker_id] = skip
    return replace(
        anchor,
        world_size=world_size,
        num_workers=num_workers,
        consumed=consumed,
        complete=False,
        rank=rank,
        previous=anchor.resume_point(),
        extra=tuple(tuple(row) for row in extra),
    )
