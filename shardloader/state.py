"""The loader's position: a few integers plus fingerprints, saved beside the model.

Because an epoch's plan is a pure function (`shardloader.plan`), a position is: the epoch, the
topology it was planned with (world size, workers per rank), how many samples each (rank,
worker) had consumed, the ids the epoch started with (the previous epoch's leftover), and, when
the epoch was itself resumed, the position it was resumed from. `LoaderState` holds that, checks
it, and converts it to and from a JSON-friendly dict (``state_dict`` form).

A state made on one rank knows its own row of ``consumed``; the other rows are copies of it
(ranks in lockstep consume alike), flagged by ``complete=False``. That is enough to resume on the
same topology. Resuming on another topology needs every rank's row: `merge_states` combines the
states of all ranks, or `ShardLoader.state_dict` gathers them itself under torch.distributed.

What a state means when iteration starts again (exact or elastic resume, carry-over into later
epochs), and how the loader makes one from its workers' cursors, is decided in
`shardloader.resume`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from shardloader.blocks import BlockTable
from shardloader.errors import ResumeError
from shardloader.manifest import Manifest
from shardloader.plan import IdArray, PlanConfig, ResumePoint

STATE_KIND = "shardloader.loader_state"
STATE_VERSION = 1
# Block-mode states (shuffle_unit="block") are version 4: the order of an epoch's blocks changed
# three times (version 1's spread drew per block; version 2 hashed per shard; version 3
# stratifies the place of a block in its slot over runs of neighbouring shards,
# `shardloader.plan_spread`; version 4 spreads each block's samples over its window,
# `shardloader.plan_spans.spread_permutation`, instead of permuting the window uniformly).
# Earlier shardloaders refuse a newer version, so they never continue such a state in their
# order; states of whole shards keep version 1 and their bytes (their order never changed).
BLOCK_STATE_VERSION = 4
_OLD_BLOCK_STATE_VERSIONS = (2, 3)


def dataset_fingerprint(
    manifest: Manifest,
    *,
    blocks: BlockTable | None = None,
    unit_bytes: np.ndarray | None = None,
) -> str:
    """A short hash of what the plan depends on: shard order, sample counts and checksums.

    With ``blocks`` (a plan over blocks, ``shuffle_unit="block"``: the manifest's
    `shardloader.manifest.ShardTable.block_table`, made once by the caller) also every block's
    sample count and shard, so a state is refused on a manifest whose block table differs (one
    written before block tables existed reads as one block per shard); with ``unit_bytes``
    (windows bounded in bytes) also the units' decoded sizes.
    """
    digest = hashlib.sha256()
    shards = manifest.shards
    for count, checksum in zip(
        shards.column("num_samples"), shards.column("checksum"), strict=True
    ):
        digest.update(f"{count}:{checksum}\n".encode())
    if blocks is not None:  # (and the order that spreads each shard's blocks over the epoch)
        digest.update(b"blocks-spread:" + blocks.num_samples.tobytes())
        digest.update(blocks.shard_index.tobytes())
    if unit_bytes is not None:  # windows bounded in bytes are cut by the units' sizes
        digest.update(b"bytes:" + np.asarray(unit_bytes, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True, eq=False)
class LoaderState:
    """Where a loader stands in its epochs.

    Attributes:
        dataset: `dataset_fingerprint` of the manifest it was made on.
        config: The plan config (seed, shuffle, window, policy).
        epoch: The epoch in progress (or about to start, when nothing is consumed).
        world_size: World size the epoch is planned with.
        num_workers: DataLoader workers per rank the epoch is planned with.
        consumed: Samples consumed per (rank, worker), shape ``[world_size, max(num_workers, 1)]``.
        complete: Whether every row of ``consumed`` is known (else all rows copy ``rank``'s).
        rank: The rank that made the state (``None`` once merged).
        carry_in: The ids the epoch serves first (the previous epoch's leftover).
        previous: When the epoch was resumed, the point it was resumed from.
        rotation: The worker whose batch comes next (DataLoader workers take turns); a resumed
            loader's worker ``i`` reads the share of worker ``(i + rotation) % num_workers``
            so batches keep their order.
        pack: The packing settings (`shardloader.pack.PackConfig.to_dict`), if packing.
        extra: With packing, how much of the next sample each (rank, worker)'s packer had
            used (the row cursor's ``skip``), ``extra[rank][worker]``; exact only on the same
            topology (elsewhere a partly packed document is served again whole).
    """

    dataset: str
    config: PlanConfig
    epoch: int
    world_size: int
    num_workers: int
    consumed: IdArray
    complete: bool = True
    rank: int | None = None
    carry_in: IdArray = field(default_factory=lambda: np.zeros(0, np.int64))
    previous: ResumePoint | None = None
    rotation: int = 0
    pack: Mapping[str, Any] | None = None
    extra: tuple[tuple[Any, ...], ...] | None = None

    def __post_init__(self) -> None:
        consumed = np.asarray(self.consumed, dtype=np.int64)
        shape = (self.world_size, max(self.num_workers, 1))
        if consumed.shape != shape:
            raise ResumeError(
                f"loader state: consumed has shape {consumed.shape}; expected {shape}"
            )
        object.__setattr__(self, "consumed", consumed)
        object.__setattr__(self, "carry_in", np.asarray(self.carry_in, dtype=np.int64))
        if self.epoch == 0 and len(self.carry_in):
            raise ResumeError(
                f"loader state: epoch 0 has a carry-in of {len(self.carry_in)} ids, but no "
                "epoch comes before it to leave them over"
            )

    @property
    def started(self) -> bool:
        """Whether any sample of the epoch was consumed (or it continues a resumed one)."""
        return bool(self.consumed.any()) or self.previous is not None

    def resume_point(self) -> ResumePoint | None:
        """The plan's view of this position (``None`` at the start of an epoch)."""
        if not self.started:
            return None
        return ResumePoint(
            epoch=self.epoch,
            world_size=self.world_size,
            num_workers=self.num_workers,
            config=self.config,
            consumed=self.consumed,
            previous=self.previous,
        )

    def check(
        self, *, dataset: str, config: PlanConfig, pack: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse a state made on another dataset or with another plan config.

        Raises:
            ResumeError: Another dataset or config.
        """
        if self.config.shuffle_unit != config.shuffle_unit:
            raise ResumeError(
                f"loader state was saved with shuffle_unit={self.config.shuffle_unit!r}, but "
                f"this loader has shuffle_unit={config.shuffle_unit!r}; the plans differ, so "
                f"resume with shuffle_unit={self.config.shuffle_unit!r} (the unit may change "
                "only with a fresh start)"
            )
        if self.dataset != dataset:
            raise ResumeError(
                f"loader state was saved for dataset {self.dataset}, but this dataset is "
                f"{dataset} (another manifest: different shards, counts or checksums)"
            )
        if self.config != config:
            raise ResumeError(
                f"loader state was saved with {self.config}, but this loader has {config}; "
                "seed, shuffle, shuffle_window, policy and shuffle_unit must match to resume"
            )
        if (self.pack or None) != (pack or None):
            raise ResumeError(
                f"loader state was saved with packing {self.pack}, but this loader packs with "
                f"{pack}; the packing settings must match to resume"
            )

    def check_topology(self, world_size: int, num_workers: int) -> None:
        """Refuse to resume a one-rank state on another topology (it lacks the other ranks).

        Raises:
            ResumeError: A partial state and another world size or number of workers.
        """
        same = (world_size, max(num_workers, 1)) == (self.world_size, max(self.num_workers, 1))
        if self.started and not same and not self.complete:
            raise ResumeError(
                f"loader state holds only rank {self.rank}'s position of a "
                f"{self.world_size}-rank x {self.num_workers}-worker run; to resume on "
                f"{world_size} ranks x {num_workers} workers, merge the states of all ranks "
                "(shardloader.merge_states) or save them with ShardLoader.state_dict(gather=True)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, tagged with kind and version (2 over blocks, else 1)."""
        blocks = self.config.shuffle_unit == "block"
        return {
            "kind": STATE_KIND,
            "version": BLOCK_STATE_VERSION if blocks else STATE_VERSION,
            "dataset": self.dataset,
            "config": config_to_dict(self.config),
            "epoch": self.epoch,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "consumed": self.consumed.tolist(),
            "complete": self.complete,
            "rank": self.rank,
            "carry_in": self.carry_in.tolist(),
            "previous": _point_to_dict(self.previous),
            "rotation": self.rotation,
            "pack": None if self.pack is None else dict(self.pack),
            "extra": None if self.extra is None else [list(row) for row in self.extra],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderState:
        """Parse `to_dict` output.

        Raises:
            ResumeError: Not a loader state, a newer version, or malformed.
        """
        if not isinstance(data, Mapping) or data.get("kind") != STATE_KIND:
            raise ResumeError(
                "not a shardloader loader state (expected a dict made by state_dict(), "
                f"with kind {STATE_KIND!r})"
            )
        version = data.get("version")
        readable = (STATE_VERSION, *_OLD_BLOCK_STATE_VERSIONS, BLOCK_STATE_VERSION)
        if version not in readable:
            raise ResumeError(
                f"loader state version {version!r} is not supported; "
                f"this shardloader reads versions {', '.join(map(str, readable))}"
            )
        try:
            extra = data.get("extra")
            state = cls(
                dataset=str(data["dataset"]),
                config=PlanConfig(**data["config"]),
                epoch=int(data["epoch"]),
                world_size=int(data["world_size"]),
                num_workers=int(data["num_workers"]),
                consumed=np.array(data["consumed"], dtype=np.int64),
                complete=bool(data["complete"]),
                rank=None if data.get("rank") is None else int(data["rank"]),
                carry_in=np.array(data["carry_in"], dtype=np.int64),
                previous=_point_from_dict(data.get("previous")),
                rotation=int(data.get("rotation", 0)),
                pack=data.get("pack"),
                extra=None if extra is None else tuple(tuple(row) for row in extra),
            )
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as err:
            if isinstance(err, ResumeError):
                raise
            raise ResumeError(f"loader state is malformed ({type(err).__name__}: {err})") from err
        _check_block_order(state, version)
        return state


def _check_block_order(state: LoaderState, version: object) -> None:
    """Refuse a block-mode state of an older version saved inside an epoch: its order is gone.

    At an epoch boundary nothing of the epoch's order was used (the carry-in is explicit ids),
    so such a state starts the epoch in the current order.
    """
    if state.config.shuffle_unit != "block" or version == BLOCK_STATE_VERSION:
        return
    if state.started:
        raise ResumeError(
            f"loader state was saved in block mode inside epoch {state.epoch} by an earlier "
            f"shardloader (state version {version}), whose order of blocks this version no "
            "longer makes, so the rest of that epoch cannot be continued exactly; finish the "
            "epoch with the shardloader that saved the state, or resume from a state saved at "
            "an epoch boundary (those resume in the new order)"
        )


def merge_states(states: Sequence[Mapping[str, Any] | LoaderState]) -> LoaderState:
    """Combine the states saved by every rank of one run into one complete state.

    Raises:
        ResumeError: The states are from different runs or positions, or ranks are missing.
    """
    parsed = [s if isinstance(s, LoaderState) else LoaderState.from_dict(s) for s in states]
    if not parsed:
        raise ResumeError("merge_states needs at least one state")
    base = parsed[0]
    consumed = base.consumed.copy()
    extra = [list(row) for row in base.extra] if base.extra is not None else None
    seen: set[int] = set()
    for state in parsed:
        key = (state.dataset, state.epoch, state.world_size, state.num_workers)
        if key != (base.dataset, base.epoch, base.world_size, base.num_workers):
            raise ResumeError(
                "merge_states got states of different runs or epochs: "
                f"{key} vs {(base.dataset, base.epoch, base.world_size, base.num_workers)}"
            )
        if state.complete:
            return state
        if state.rank is None:
            raise ResumeError("merge_states got a partial state without a rank")
        seen.add(state.rank)
        consumed[state.rank] = state.consumed[state.rank]
        if extra is not None and state.extra is not None:
            extra[state.rank] = list(state.extra[state.rank])
    missing = sorted(set(range(base.world_size)) - seen)
    if missing:
        raise ResumeError(f"merge_states is missing the states of ranks {missing}")
    return replace(
        base,
        consumed=consumed,
        complete=True,
        rank=None,
        extra=None if extra is None else tuple(tuple(row) for row in extra),
    )


def config_to_dict(config: PlanConfig) -> dict[str, Any]:
    """The config as a dict; ``shuffle_unit`` only if not ``"shard"``, ``shuffle_bytes`` if set.

    So a state of whole shards keeps the keys of states saved before blocks existed, and
    earlier versions of shardloader still read it.
    """
    out = asdict(config)
    if out.get("shuffle_unit") == "shard":
        del out["shuffle_unit"]
    if out.get("shuffle_bytes") is None:
        del out["shuffle_bytes"]
    return out


def _point_to_dict(point: ResumePoint | None) -> dict[str, Any] | None:
    if point is None:
        return None
    return {
        "epoch": point.epoch,
        "world_size": point.world_size,
        "num_workers": point.num_workers,
        "config": config_to_dict(point.config),
        "consumed": point.consumed.tolist(),
        "previous": _point_to_dict(point.previous),
    }


def _point_from_dict(data: Mapping[str, Any] | None) -> ResumePoint | None:
    if data is None:
        return None
    return ResumePoint(
        epoch=int(data["epoch"]),
        world_size=int(data["world_size"]),
        num_workers=int(data["num_workers"]),
        config=PlanConfig(**data["config"]),
        consumed=np.array(data["consumed"], dtype=np.int64),
        previous=_point_from_dict(data.get("previous")),
    )


def state_to_json(state: LoaderState) -> str:
    """The state as compact JSON text."""
    return json.dumps(state.to_dict(), separators=(",", ":"))
