"""What a plan is planned from: `PlanConfig`, `ResumePoint` and `EpochStart`, checked on creation.

`shardloader.plan` re-exports them; its docstring says how each one shapes an epoch's plan.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from shardloader.errors import ConfigError
from shardloader.options import option, parse_size
from shardloader.plan_spans import IdArray

POLICIES = ("drop", "pad")
SHUFFLE_UNITS = ("shard", "block")


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """How epochs are ordered and divided: the part of a loader's settings the plan depends on.

    Every rank must use the same config, and a saved loader state resumes only under the config
    it was saved with. `shardloader.dataset.StreamConfig` extends it with fetch and cache
    settings; each field's meaning is its `shardloader.options.option` help.
    """

    seed: int = option(0, "seeds every permutation, together with the epoch (and rank, worker)")
    shuffle: bool = option(True, "permute shards and the ids inside windows; off: manifest order")
    shuffle_window: int | None = option(
        4, "consecutive units (shard pieces, or blocks) a worker mixes, and holds, at most at once"
    )
    policy: str = option(
        "drop",
        "samples that do not divide by the world size: drop (served first next epoch) or pad "
        "(repeats, marked is_padding)",
        choices=POLICIES,
    )
    shuffle_unit: str = option(
        "shard",
        "what the plan permutes and groups into windows: whole shards, or blocks (the record "
        "batches of Arrow shards, of about batch_bytes each; Parquet row groups; a tar shard is "
        "one block): block mixes many shards per window",
        choices=SHUFFLE_UNITS,
    )
    shuffle_bytes: int | None = option(
        None,
        "bound on the decoded bytes of a window: a window ends before the unit that would pass "
        "it (always at least one unit); units of unknown size count 0; none: shuffle_window only",
        parse=parse_size,
    )

    # Whether shuffle_unit "auto" and shuffle_window None (chosen from the dataset) are allowed:
    # in `shardloader.dataset.StreamConfig`, resolved per manifest; never in a plan's config.
    _AUTO = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_int(f"{name}.seed", self.seed, 0)
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"{name}.shuffle is {self.shuffle!r}; expected True or False")
        if not (self._AUTO and self.shuffle_window is None):
            check_int(f"{name}.shuffle_window", self.shuffle_window, 1)
        if self.shuffle_bytes is not None:  # (0, "no bound", only where "auto" is allowed)
            check_int(f"{name}.shuffle_bytes", self.shuffle_bytes, 0 if self._AUTO else 1)
        if self.policy not in POLICIES:
            raise ConfigError(
                f"{name}.policy is {self.policy!r}; expected one of "
                + ", ".join(repr(p) for p in POLICIES)
            )
        units = (*SHUFFLE_UNITS, "auto") if self._AUTO else SHUFFLE_UNITS
        if self.shuffle_unit not in units:
            raise ConfigError(
                f"{name}.shuffle_unit is {self.shuffle_unit!r}; expected one of "
                + ", ".join(repr(u) for u in units)
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
        check_int("ResumePoint.epoch", self.epoch, 0)
        check_int("ResumePoint.world_size", self.world_size, 1)
        check_int("ResumePoint.num_workers", self.num_workers, 0)
        check_config(self.config)
        if self.previous is not None and not isinstance(self.previous, ResumePoint):
            raise ConfigError(
                f"ResumePoint.previous is a {type(self.previous).__name__}; "
                "expected a ResumePoint or None"
            )
        consumed = np.array(self.consumed)
        shape = (self.world_size, max(self.num_workers, 1))
        if consumed.shape != shape or not is_int_array(consumed):
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


def is_int_array(array: np.ndarray) -> bool:
    """Whether ``array`` holds integers (bools are not); an empty one of any dtype does."""
    return array.size == 0 or (
        np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_)
    )


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise `ConfigError` unless ``value`` is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"{name} is {value!r}; expected an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{name} is {value}; expected an integer >= {minimum}")


def check_config(config: object) -> None:
    """Raise `ConfigError` unless ``config`` is a `PlanConfig`."""
    if not isinstance(config, PlanConfig):
        raise ConfigError(f"config is a {type(config).__name__}; expected a PlanConfig")
    if config.shuffle_unit not in SHUFFLE_UNITS or config.shuffle_window is None:
        raise ConfigError(
            f"config has shuffle_unit={config.shuffle_unit!r}, shuffle_window="
            f"{config.shuffle_window!r}: chosen per dataset; plan with the resolved config "
            "(ShardDataset.resume_spec().config, or StreamConfig.resolve)"
        )
