"""`ShardDataset`: a torch ``IterableDataset`` over a converted dataset, exact across ranks.

When iteration starts, in the process that iterates (the rank itself, or one of its DataLoader
workers), the dataset resolves its `shardloader.world.WorldInfo`, plans the epoch with
`shardloader.plan.plan_epoch` (a pure function of shard sizes, seed, epoch and topology) and
reads its worker's share with a `shardloader.reader.ShardReader`. Every rank gets the same number
of samples; none is read twice in an epoch; what does not divide is handled by the policy
(``"drop"``: served first next epoch; ``"pad"``: repeated and marked ``is_padding``).

How it reaches DataLoader workers:

- The epoch lives in a small shared-memory integer, so `set_epoch` reaches workers that hold
  copies of the dataset (``persistent_workers=True``), whether forked or spawned.
- Rank and world size are never needed at construction. A forked worker inherits its parent's
  process group; for a spawned worker the rank's own process resolves them while pickling the
  dataset (`shardloader.world.in_spawning_process`) and hands them over.

Position: each process counts the samples it has yielded (``position``) in its worker's plan.
`state_dict` returns that count with everything needed to plan the rest of the epoch; the
`shardloader.loader.ShardLoader` ships it with every batch so the main process knows what the
training loop consumed, and torchdata's ``StatefulDataLoader`` calls it inside the workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch.utils.data

from shardloader import storage
from shardloader.errors import ConfigError, ResumeError
from shardloader.manifest import Manifest, iter_shard_urls, read_manifest
from shardloader.pack import PackConfig, Packer
from shardloader.pack_encode import check_tokenizer
from shardloader.plan import POLICIES, EpochPlan, IdArray, PlanConfig, plan_carry_in, plan_epoch
from shardloader.reader import ShardReader
from shardloader.state import LoaderState, dataset_fingerprint
from shardloader.tokenizer import TextTokenizer
from shardloader.world import WorldInfo, detect_rank, detect_world, in_spawning_process

log = logging.getLogger(__name__)

STAGES = ("produce", "fetch_wait", "decode", "collate")

WORKER_STATE_KIND = "shardloader.worker_state"
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """How a `ShardDataset` orders, splits, fetches and caches.

    Attributes:
        seed: Seeds every shuffle, together with the epoch; the same on every rank.
        shuffle: Shuffle shard order and samples within windows; ``False`` keeps manifest order.
        shuffle_window: Shards a worker mixes (and holds decoded) at once.
        policy: Samples that do not divide by the world size: ``"drop"`` serves them first next
            epoch; ``"pad"`` repeats a few, marked ``is_padding``.
        cache_dir: Node-local cache for remote shards (default: a per-user temp directory).
        cache_bytes: Bound on the cache's size; shards in use are never evicted.
        prefetch_windows: Windows ahead whose shards are fetched in the background.
        prefetch_threads: Concurrent background downloads per process.
        timeout_s: Longest wait for any one network step of a fetch (the request, each 4 MiB
            block); a hung server costs this much, then the fetch is retried.
        retry_deadline_s: How long transient fetch failures are retried before giving up.
        verify_local: Hash local shards (and cached copies of remote ones) against the manifest
            before their first use in each process; catches a shard changed or rotted on disk,
            which decoding may not. ``False``: local shards are checked by size only.
    """

    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 4
    policy: str = "drop"
    cache_dir: str | None = None
    cache_bytes: int = 16 * GiB
    prefetch_windows: int = 1
    prefetch_threads: int = 2
    timeout_s: float = 60.0
    retry_deadline_s: float = 300.0
    verify_local: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"StreamConfig.policy is {self.policy!r}; expected one of {', '.join(POLICIES)}"
            )
        for name in ("cache_bytes", "prefetch_windows", "prefetch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"StreamConfig.{name} is {value!r}; expected an integer >= 0")
        for name in ("timeout_s", "retry_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"StreamConfig.{name} must be > 0")
        self.plan_config()  # validates seed, shuffle, shuffle_window

    def plan_config(self) -> PlanConfig:
        """The part of the config that shapes the plan."""
        return PlanConfig(
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window,
            policy=self.policy,
        )


class _SharedEpoch:
    """An integer in shared memory: one writer (the rank), read by its DataLoader workers."""

    def __init__(self, value: int = 0) -> None:
        self._shared: Any = multiprocessing.RawValue("q", value)
        self._local = value

    def get(self) -> int:
        return int(self._shared.value) if self._shared is not None else self._local

    def set(self, value: int) -> None:
        self._local = value
        if self._shared is not None:
            self._shared.value = value

    def __getstate__(self) -> dict[str, Any]:
        # Shared memory can only travel to a child being spawned; otherwise copy the value.
        shared = self._shared if in_spawning_process() else None
        return {"_shared": shared, "_local": self.get()}


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams the samples of a converted dataset, split exactly across ranks and workers.

    Args:
        source: The dataset: a directory or URL holding ``_manifest.json`` (``s3://``, ``gs://``,
            ``http(s)://``, ``memory://``, local paths), or the manifest's own URL.
        config: Order, split, fetch and cache settings.
        transform: Applied to every sample inside the worker, before packing.
        pack: Pack documents into fixed-length rows inside the workers
            (`shardloader.pack.PackConfig`); the dataset then yields `PackedRow` s, which
            `ShardLoader` collates with `shardloader.pack.collate_rows` by default.
        tokenizer: For packing text shards (or SFT fields): a tokenizer path, a
            `shardloader.TextTokenizer` or a Hugging Face fast tokenizer. With tokenized shards it
            is checked against the manifest's fingerprint.
        rank: This rank; by default detected when iteration starts (torch.distributed, then
            ``RANK``). Pass with ``world_size`` or not at all.
        world_size: Number of ranks; detected like ``rank``.
        storage_options: Passed to the filesystem (fsspec), e.g. an S3 endpoint.

    Samples are dicts: ``id`` (the source id), ``sample_id`` (position in manifest order),
    ``text`` or ``input_ids`` (numpy), the kept fields, and ``is_padding`` under ``"pad"``.
    """

    def __init__(
        self,
        source: str,
        *,
        config: StreamConfig | None = None,
        transform: Callable[[dict[str, Any]], Any] | None = None,
        pack: PackConfig | None = None,
        tokenizer: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ConfigError("pass both rank and world_size to ShardDataset, or neither")
        if config is not None and not isinstance(config, StreamConfig):
            raise ConfigError(f"config is a {type(config).__name__}; expected a StreamConfig")
        self.source = storage.normalize(source)
        self.config = config or StreamConfig()
        self.transform = transform
        if pack is not None and not isinstance(pack, PackConfig):
            raise ConfigError(f"pack is a {type(pack).__name__}; expected a PackConfig")
        self.pack = pack
        self.tokenizer = TextTokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._rank = rank
        self._world_size = world_size
        self._storage_options = dict(storage_options or {})
        self._manifest: Manifest | None = None
        self._epoch = _SharedEpoch(0)
        self._resume: LoaderState | None = None
        self._handed_world: tuple[int, int] | None = None  # resolved by the spawning rank
        self._fetcher: Any = None
        # Fetch counters of this process's finished epochs (bytes_fetched, retries, ...).
        self.fetch_stats: dict[str, float] = {}
        # Seconds this process spent per stage, since it started (see `stage_seconds`).
        self._stages = dict.fromkeys(STAGES, 0.0)
        self._reader: ShardReader | None = None
        # What this process has yielded in the epoch it is reading.
        self._world: WorldInfo | None = None
        self._reading_epoch = 0
        self._position = 0
        self._skip = 0  # packing: what the packer drops of the sample at _position
        self._plan_worker = 0
        self._finished = False

    # --- configuration ------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The dataset's manifest, read on first use."""
        if self._manifest is None:
            manifest = read_manifest(self.source, **self._storage_options)
            if manifest.tokenized and self.tokenizer is not None:
                check_tokenizer(manifest, self.tokenizer, where=self.source)
            self._manifest = manifest
        return self._manifest

    @property
    def fingerprint(self) -> str:
        """`shardloader.state.dataset_fingerprint` of the manifest."""
        return dataset_fingerprint(self.manifest)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (reaches persistent DataLoader workers too)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch is {epoch!r}; expected an integer >= 0")
        self._epoch.set(epoch)

    def world(self) -> WorldInfo:
        """This process's rank and worker, as iteration would see them now."""
        if self._handed_world is not None:
            return detect_world(*self._handed_world)
        return detect_world(self._rank, self._world_size)

    def __len__(self) -> int:
        """Samples this rank reads in the current epoch (padding included)."""
        world, epoch = self.world(), self.epoch
        sizes = np.array(self.manifest.shards.column("num_samples"), dtype=np.int64)
        whole = plan_epoch(
            sizes,
            config=self.config.plan_config(),
            epoch=epoch,
            world_size=world.world_size,
            rank=world.rank,
            num_workers=0,
            carry_in=self.carry_in(epoch, world.world_size, 0),
        )
        return whole.samples_per_rank

    # --- planning -----------------------------------------------------------------------

    def plan(self, epoch: int, world_size: int, rank: int, num_workers: int) -> EpochPlan:
        """One rank's plan of ``epoch``, continuing a loaded state where it applies."""
        sizes = np.array(self.manifest.shards.column("num_samples"), dtype=np.int64)
        config = self.config.plan_config()
        state = self._resume
        resume, carry_in = None, None
        if state is not None and epoch == state.epoch:
            state.check_topology(world_size, num_workers)
            resume, carry_in = state.resume_point(), state.carry_in
        elif state is not None and epoch > state.epoch:
            carry_in = self.carry_in(epoch, world_size, num_workers)
        return plan_epoch(
            sizes,
            config=config,
            epoch=epoch,
            world_size=world_size,
            rank=rank,
            num_workers=num_workers,
            resume=resume,
            carry_in=carry_in,
            keep_ranks=self.pack is not None,  # ranks pack different numbers of documents
        )

    def carry_in(self, epoch: int, world_size: int, num_workers: int) -> IdArray:
        """The ids epoch ``epoch`` serves first: the leftover of the epoch before it."""
        state = self._resume
        if state is not None and epoch == state.epoch:
            return state.carry_in
        if state is not None and epoch > state.epoch:
            return self.plan(epoch - 1, world_size, 0, num_workers).leftover_ids
        sizes = np.array(self.manifest.shards.column("num_samples"), dtype=np.int64)
        return plan_carry_in(
            sizes, config=self.config.plan_config(), epoch=epoch, world_size=world_size
        )

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        world = self.world()
        epoch = self.epoch
        plan = self.plan(epoch, world.world_size, world.rank, world.num_workers)
        self._plan_worker = self._rotated(epoch, world)
        worker_plan = plan.workers[self._plan_worker]
        self._world, self._reading_epoch, self._position, self._finished = world, epoch, 0, False
        reader = ShardReader(
            self.manifest,
            [url for _, url in iter_shard_urls(self.source, self.manifest)],
            fetcher=self._get_fetcher(),
            prefetch_windows=self.config.prefetch_windows,
            mark_padding=self.config.policy == "pad",
        )
        self._skip = 0
        self._reader = reader
        samples = reader.iter_samples(worker_plan)
        transform = self.transform
        if transform is not None:
            samples = (transform(s) for s in samples)
        items: Iterator[Any] = samples
        if self.pack is not None:
            packer = Packer(self.pack, tokenizer=self.tokenizer)
            items = packer.pack(enumerate(samples), skip=self._resume_skip(epoch, world))
        stages = self._stages
        try:
            started = time.perf_counter()
            for item in items:
                stages["produce"] += time.perf_counter() - started
                if self.pack is None:
                    self._position += 1
                else:
                    self._position, self._skip = item.cursor
                yield item
                started = time.perf_counter()
            self._finished = True
        finally:
            for name, seconds in reader.stage_seconds.items():
                stages[name] += seconds
            self._reader = None
            # Stop background fetches (an abandoned or failed epoch must not keep retrying);
            # the cache is on disk, so the next epoch's fetcher finds what was fetched.
            self.close()

    def _resume_skip(self, epoch: int, world: WorldInfo) -> int:
        """The packer's skip for this worker's first sample when continuing a saved state."""
        state = self._resume
        if state is None or state.epoch != epoch or state.extra is None:
            return 0
        same = (state.world_size, max(state.num_workers, 1)) == (
            world.world_size,
            max(world.num_workers, 1),
        )
        return int(state.extra[world.rank][self._plan_worker] or 0) if same else 0

    def _rotated(self, epoch: int, world: WorldInfo) -> int:
        """Which worker's share this DataLoader worker reads (turns kept across a resume)."""
        state = self._resume
        workers = max(world.num_workers, 1)
        if state is None or state.epoch != epoch or max(state.num_workers, 1) != workers:
            return world.worker_id
        return (world.worker_id + state.rotation) % workers

    def _get_fetcher(self) -> Any:
        if self._fetcher is None:
            from shardloader.cache import ShardFetcher

            self._fetcher = ShardFetcher(
                cache_dir=self.config.cache_dir,
                cache_bytes=self.config.cache_bytes,
                storage_options=self._storage_options,
                timeout_s=self.config.timeout_s,
                retry_deadline_s=self.config.retry_deadline_s,
                prefetch_threads=self.config.prefetch_threads,
                verify_local=self.config.verify_local,
            )
        return self._fetcher

    def close(self) -> None:
        """Stop background fetches of this process."""
        if self._fetcher is not None:
            self._fetcher.close()
            for name, value in self._fetcher.stats.items():
                self.fetch_stats[name] = self.fetch_stats.get(name, 0) + value
            self._fetcher = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fetcher"] = None
        state["_reader"] = None
        if in_spawning_process() and self._rank is None and self._handed_world is None:
            # A spawned worker has no process group: resolve the world here, in the rank.
            state["_handed_world"] = detect_rank()
        return state

    # --- position -----------------------------------------------------------------------

    def stage_seconds(self) -> dict[str, float]:
        """Seconds this process has spent per stage since it started: cheap counters.

        ``fetch_wait``: blocked on the fetcher (download or cache); ``decode``: decompressing
        shards and building samples; ``pack``: the rest of producing items (the transform,
        tokenizing and packing); ``collate``: in ``collate_fn`` (`ShardLoader` adds it).
        """
        stages = dict(self._stages)
        if self._reader is not None:  # the epoch being read
            for name, seconds in self._reader.stage_seconds.items():
                stages[name] += seconds
        produce = stages.pop("produce")
        stages["pack"] = max(0.0, produce - stages["fetch_wait"] - stages["decode"])
        return stages

    def cursor(self) -> tuple[int, int, int, int, int, int, bool, int]:
        """This process's position, cheap enough to ship with every batch (`ShardLoader`).

        Returns:
            ``(epoch, rank, world_size, worker, num_workers, position, finished, skip)``;
            ``worker`` is the share being read (see `LoaderState.rotation`); with packing,
            ``position`` and ``skip`` are the last row's cursor (where the next row starts).
        """
        world = self._world or self.world()
        return (
            self._reading_epoch if self._world is not None else self.epoch,
            world.rank,
            world.world_size,
            self._plan_worker if self._world is not None else world.worker_id,
            world.num_workers,
            self._position,
            self._finished,
            self._skip,
        )

    def state_dict(self) -> dict[str, Any]:
        """This process's position in its worker's share, self-contained.

        Inside a DataLoader worker (torchdata's ``StatefulDataLoader`` calls it there) or in a
        process that iterates the dataset itself. With a plain DataLoader and workers, the main
        process's copy does not see the workers' progress: use `ShardLoader.state_dict`.
        """
        epoch, rank, world_size, worker_id, num_workers, position, finished, skip = self.cursor()
        return {
            "kind": WORKER_STATE_KIND,
            "epoch": epoch,
            "rank": rank,
            "world_size": world_size,
            "worker_id": worker_id,
            "num_workers": num_workers,
            "position": position,
            "finished": finished,
            "skip": skip,
            "anchor": self.anchor(epoch).to_dict(),
        }

    def anchor(self, epoch: int) -> LoaderState:
        """The state ``epoch`` was planned from (its start, or the loaded state it continues)."""
        state = self._resume
        if state is not None and state.epoch == epoch:
            return state
        world = self._world or self.world()
        return LoaderState(
            dataset=self.fingerprint,
            config=self.config.plan_config(),
            epoch=epoch,
            world_size=world.world_size,
            num_workers=world.num_workers,
            consumed=np.zeros((world.world_size, max(world.num_workers, 1)), np.int64),
            complete=True,
            carry_in=self.carry_in(epoch, world.world_size, world.num_workers),
            pack=self.pack_fingerprint,
        )

    @property
    def pack_fingerprint(self) -> dict[str, Any] | None:
        """The packing settings a saved state must match (``None`` without packing)."""
        return None if self.pack is None else self.pack.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position: a `LoaderState` dict or one worker's `state_dict`.

        Call before iterating. The epoch is set to the saved one.

        Raises:
            ResumeError: The state is from another dataset or config, or malformed.
        """
        if isinstance(state, Mapping) and state.get("kind") == WORKER_STATE_KIND:
            loaded = _from_worker_state(state)
        else:
            loaded = LoaderState.from_dict(state)
        loaded.check(
            dataset=self.fingerprint, config=self.config.plan_config(), pack=self.pack_fingerprint
        )
        self._resume = loaded
        self.set_epoch(loaded.epoch)


def _from_worker_state(state: Mapping[str, Any]) -> LoaderState:
    """A worker's own state as a loader state: its count, copied to the rank's other rows."""
    try:
        anchor = LoaderState.from_dict(state["anchor"])
        worker_id, position = int(state["worker_id"]), int(state["position"])
        rank = int(state["rank"])
    except (KeyError, TypeError, ValueError) as err:
        raise ResumeError(f"worker state is malformed ({type(err).__name__}: {err})") from err
    if (int(state["world_size"]), int(state["num_workers"])) != (
        anchor.world_size,
        anchor.num_workers,
    ) and anchor.started:
        raise ResumeError("worker state does not match the topology of its anchor")
    consumed = np.zeros((int(state["world_size"]), max(int(state["num_workers"]), 1)), np.int64)
    consumed[:, worker_id] = position
    extra = [[0] * consumed.shape[1] for _ in range(consumed.shape[0])]
    for row in extra:
        row[worker_id] = int(state.get("skip", 0))
    previous = anchor.resume_point()
    return replace(
        anchor,
        world_size=int(state["world_size"]),
        num_workers=int(state["num_workers"]),
        consumed=consumed,
        complete=False,
        rank=rank,
        previous=previous,
        extra=tuple(tuple(row) for row in extra),
    )
