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
  dataset (`shardloader.world.WorldSource`) and hands them over.

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
from typing import Any, NamedTuple, cast

import numpy as np
import torch.utils.data

from shardloader import resume, storage
from shardloader.blocks import BlockTable, shard_decoded_bytes
from shardloader.errors import ConfigError
from shardloader.manifest import Manifest, iter_shard_urls, read_manifest
from shardloader.options import option, parse_size
from shardloader.pack import PackConfig, Packer
from shardloader.pack_encode import check_tokenizer
from shardloader.plan import EpochPlan, IdArray, PlanConfig, plan_epoch
from shardloader.plan_config import SHUFFLE_UNITS
from shardloader.reader import ShardReader
from shardloader.state import LoaderState, dataset_fingerprint
from shardloader.tokenizer import TextTokenizer
from shardloader.world import WorldInfo, WorldSource, in_spawning_process

log = logging.getLogger(__name__)

STAGES = ("produce", "fetch_wait", "decode", "collate")

GiB = 1 << 30


MiB = 1 << 20
BLOCK_WINDOW = 4096  # blocks in a window at most by default (shuffle_bytes is the real bound)
BLOCK_WINDOW_BYTES = 64 * MiB  # decoded bytes of a window by default, in block mode
SHARD_WINDOW = 4  # shards in a window by default, in shard mode


class UnitPlan(NamedTuple):
    """What a dataset's plans are made over, once `StreamConfig.resolve` chose the unit.

    Attributes:
        config: The plan config, every "auto" setting chosen (what states record).
        sizes: Samples per unit (shard or block), in manifest order.
        unit_bytes: Decoded bytes per unit (0 where unknown), or ``None`` (none known).
        blocks: The block table when the units are blocks, else ``None``.
    """

    config: PlanConfig
    sizes: IdArray
    unit_bytes: IdArray | None
    blocks: BlockTable | None


@dataclass(frozen=True, kw_only=True)
class StreamConfig(PlanConfig):
    """How a `ShardDataset` orders, splits, fetches and caches.

    The plan's settings (`shardloader.plan.PlanConfig`: seed, shuffle, window, policy, unit)
    must be the same on every rank and in a state being resumed; the fetch and cache settings
    may differ per run and per node. Each field's meaning is its `shardloader.options.option`
    help. ``shuffle_unit="auto"``, ``shuffle_window=None`` and ``shuffle_bytes=None`` are chosen
    per dataset by `resolve`: blocks in windows of at most 64 MiB decoded when the manifest
    records its blocks' decoded sizes and digests (Arrow datasets converted by this version on;
    blocks of remote shards are then read alone by ranged reads), else whole shards, 4 per
    window, as before.
    """

    _AUTO = True

    shuffle_window: int | None = option(
        None,
        "units a worker mixes, and holds, at most at once (default: 4 shards, or up to "
        f"{BLOCK_WINDOW} blocks within shuffle_bytes)",
    )
    shuffle_unit: str = option(
        "auto",
        "what the plan permutes and groups into windows: block (the record batches of Arrow "
        "shards, Parquet row groups; many shards mix in every window), shard, or auto: block "
        "where the manifest records the blocks' sizes and digests (remote blocks are then read "
        "by ranged reads), else shard",
        choices=(*SHUFFLE_UNITS, "auto"),
    )
    shuffle_bytes: int | None = option(
        None,
        "bound on a window's decoded bytes, so on what a worker holds decoded (default: 64MiB "
        "in block mode; none in shard mode, where shuffle_window counts shards; 0: none)",
        parse=parse_size,
    )

    cache_dir: str | None = option(None, "node-local cache of remote shards (default: temp dir)")
    cache_bytes: int = option(
        16 * GiB, "bound on the cache's size; shards in use are never evicted", parse=parse_size
    )
    prefetch_windows: int = option(1, "windows ahead whose shards are fetched in the background")
    prefetch_threads: int = option(2, "concurrent background downloads per process")
    range_requests: int = option(
        8, "ranged reads in flight per process, for blocks of remote shards in block mode"
    )
    range_bytes: int | None = option(
        None,
        "bound on the bytes of remote blocks read ahead and not yet decoded, per process "
        "(default: the window's byte budget, shuffle_bytes, or 64MiB without one)",
        parse=parse_size,
    )
    decode_threads: int | None = option(
        None,
        "threads per process decoding a window's units ahead of the samples being made "
        "(default: 1 for whole shards, which then decode while the next one downloads or is "
        "checked; 2 for local Arrow blocks, decoded 64 at a time with the GIL released once "
        "per group; 0 for other blocks, and where DataLoader workers are as many as the cores)",
    )
    timeout_s: float = option(
        60.0, "longest wait for one network step of a fetch (the request, each 4 MiB block)"
    )
    retry_deadline_s: float = option(300.0, "how long transient fetch failures are retried")
    verify_local: bool = option(
        True,
        "hash local shards (and cached copies of remote ones) against the manifest before their "
        "first use in each process; catches a shard changed or rotted on disk, which decoding "
        "may not (--no-verify-local: check local shards by size only)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode_threads is not None and (
            not isinstance(self.decode_threads, int) or self.decode_threads < 0
        ):
            raise ConfigError(
                f"StreamConfig.decode_threads is {self.decode_threads!r}; expected an integer "
                ">= 0 or None"
            )
        for name in ("cache_bytes", "prefetch_windows", "prefetch_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"StreamConfig.{name} is {value!r}; expected an integer >= 0")
        for name in ("range_requests", "range_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"StreamConfig.{name} is {value!r}; expected an integer >= 1")
        for name in ("timeout_s", "retry_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"StreamConfig.{name} must be > 0")

    def resolve(self, manifest: Manifest, *, remote: bool = False) -> UnitPlan:
        """The plan config for ``manifest``, every "auto" setting chosen, and its units.

        "auto" reads in blocks when the manifest records every block's decoded size and digest
        (Arrow and plain tar shards converted by this version; Parquet files indexed locally by
        this version)
        and the shards are local. Remote datasets stay in whole shards under "auto": with
        ``shuffle_unit="block"`` a block of a remote Arrow shard is read alone, by one ranged
        read of its bytes checked against its digest (`shardloader.fetch_blocks`; an epoch
        fetches the dataset's bytes once, with no node cache), but a dataset many times its
        window makes a GET of nearly every block, each about 1 ms of this process's CPU
        (presigned; 3 ms through botocore) and, on the loopback test server, 10 ms of its: it
        read about 4x slower than in whole shards (`tools.bench.s3_latency`).
        (Remote blocks without ranged reads, Parquet row groups, come from whole shards fetched
        into the node cache.)

        States record the unit chosen, and `shardloader.dataset.ShardDataset.load_state_dict`
        takes it back for "auto" (`adopt`): a state saved when "auto" kept remote datasets in
        whole shards (before ranged reads) resumes in whole shards.

        Args:
            manifest: The dataset's manifest.
            remote: Whether the shards are remote (the same answer on every rank): then "auto"
                keeps whole shards.
        """
        unit = self.shuffle_unit
        has_table = manifest.shards.block_columns is not None
        # The block table is made only where it is used (1.6 M blocks take a while to lay out).
        wanted = unit == "block" or (unit == "auto" and not remote)
        table = manifest.shards.block_table() if has_table and wanted else None
        unit_bytes: IdArray | None = None
        window: int
        budget: int | None
        if unit == "auto":  # blocks where every size and digest is known (convert, local index)
            known = table is not None and table.all_known
            unit = "block" if known and not remote else "shard"
        if unit == "block":
            table = table or manifest.shards.block_table()
            sizes, unit_bytes = table.num_samples, table.decoded
            window = self.shuffle_window or BLOCK_WINDOW
            budget = BLOCK_WINDOW_BYTES if self.shuffle_bytes is None else self.shuffle_bytes
        else:
            sizes = np.array(manifest.shards.column("num_samples"), dtype=np.int64)
            window, budget = self.shuffle_window or SHARD_WINDOW, self.shuffle_bytes
            if budget and has_table:  # windows of shards bounded in bytes: the shards' sizes
                table = table or manifest.shards.block_table()
                unit_bytes = shard_decoded_bytes(table, len(sizes))
            table = None
        budget = budget or None  # 0: no bound
        if unit_bytes is not None and not unit_bytes.any():
            unit_bytes = None
        config = PlanConfig(
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_window=window,
            policy=self.policy,
            shuffle_unit=unit,
            shuffle_bytes=budget,
        )
        return UnitPlan(config, sizes, unit_bytes, table)

    def shard_plan_config(self) -> PlanConfig:
        """The plan config over whole shards, whatever the dataset (a mixture's sources)."""
        return PlanConfig(
            seed=self.seed,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window or SHARD_WINDOW,
            policy=self.policy,
        )

    def adopt(self, saved: PlanConfig) -> StreamConfig:
        """This config with its "auto" settings taken from a saved state's config.

        So a state saved under earlier defaults (whole shards, 4 per window) resumes on a
        dataset that "auto" would now read in blocks. Settings given explicitly stay.
        """
        changes: dict[str, Any] = {}
        if self.shuffle_unit == "auto":
            changes["shuffle_unit"] = saved.shuffle_unit
        if self.shuffle_window is None:
            changes["shuffle_window"] = saved.shuffle_window
        if self.shuffle_bytes is None:
            changes["shuffle_bytes"] = saved.shuffle_bytes or 0  # 0: no bound
        return replace(self, **changes)

    def make_fetcher(self, storage_options: Mapping[str, Any]) -> Any:
        """A `shardloader.fetch.ShardFetcher` with these fetch and cache settings."""
        from shardloader.fetch import ShardFetcher

        return ShardFetcher(
            cache_dir=self.cache_dir,
            cache_bytes=self.cache_bytes,
            storage_options=dict(storage_options),
            timeout_s=self.timeout_s,
            retry_deadline_s=self.retry_deadline_s,
            prefetch_threads=self.prefetch_threads,
            verify_local=self.verify_local,
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
            ``http(s)://``, ``memory://``, local paths), or the manifest's own URL. A
            `shardloader.Mixture` makes a `shardloader.mix_dataset.MixDataset` instead.
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

    def __new__(cls, source: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``ShardDataset(Mixture(...), ...)`` reads a mixture: it makes a `MixDataset`."""
        from shardloader.mix_config import Mixture

        if isinstance(source, Mixture):
            from shardloader.mix_dataset import MixDataset

            return MixDataset(source, *args, **kwargs)
        return super().__new__(cls)

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
        if config is not None and not isinstance(config, StreamConfig):
            raise ConfigError(f"config is a {type(config).__name__}; expected a StreamConfig")
        self.source = storage.normalize(source)
        self.config = config or StreamConfig()
        self.transform = transform
        if pack is not None and not isinstance(pack, PackConfig):
            raise ConfigError(f"pack is a {type(pack).__name__}; expected a PackConfig")
        self.pack = pack
        self.tokenizer = TextTokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._world_source = WorldSource(rank, world_size)
        self._storage_options = dict(storage_options or {})
        self._manifest: Manifest | None = None
        self._blocks: BlockTable | None = None
        self._spec: resume.RunSpec | None = None  # made once from the manifest
        self._epoch = _SharedEpoch(0)
        self._resume: LoaderState | None = None
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
        return self.resume_spec().dataset

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
        return self._world_source.world()

    def __len__(self) -> int:
        """Samples this rank reads in the current epoch (padding included).

        Raises:
            TypeError: With ``pack``: how many rows an epoch makes depends on the documents'
                lengths, which only reading tells (like any ``IterableDataset`` without a
                length, so ``len(loader)`` raises too and torch never warns about it).
        """
        if self.pack is not None:
            raise TypeError(
                f"{self.source}: a packing ShardDataset has no length (rows per epoch depend on "
                "the documents' lengths); count the batches of one epoch, or schedule by tokens"
            )
        world, epoch = self.world(), self.epoch
        whole = plan_epoch(
            self.resume_spec().units,
            config=self.resume_spec().config,
            epoch=epoch,
            world_size=world.world_size,
            rank=world.rank,
            num_workers=0,
            carry_in=self.carry_in(epoch, world.world_size, 0),
        )
        return whole.samples_per_rank

    # --- planning -----------------------------------------------------------------------

    def resume_spec(self) -> resume.RunSpec:
        """The data and settings every state of this dataset shares.

        Made once, when the manifest is first read (the fingerprint hashes every shard's entry:
        0.17 s for 100,000 shards), and carried to DataLoader workers with the dataset.
        """
        if self._spec is None:
            units = self.config.resolve(self.manifest, remote=not storage.is_local(self.source))
            self._blocks = units.blocks
            budget = units.unit_bytes if units.config.shuffle_bytes else None
            self._spec = resume.RunSpec(
                shard_sizes=units.sizes,
                dataset=dataset_fingerprint(self.manifest, blocks=units.blocks, unit_bytes=budget),
                config=units.config,
                pack=self.pack_fingerprint,
                unit_bytes=budget,
                unit_groups=None if units.blocks is None else units.blocks.shard_index,
            )
        return self._spec

    def plan(self, epoch: int, world_size: int, rank: int, num_workers: int) -> EpochPlan:
        """One rank's plan of ``epoch``, continuing a loaded state where it applies."""
        spec = self.resume_spec()
        start = resume.plan_inputs(
            spec, self._resume, epoch=epoch, world_size=world_size, num_workers=num_workers
        )
        return plan_epoch(
            spec.units,
            config=spec.config,
            epoch=epoch,
            world_size=world_size,
            rank=rank,
            num_workers=num_workers,
            resume=start.resume,
            carry_in=start.carry_in,
            keep_ranks=spec.keep_ranks,
        )

    def carry_in(self, epoch: int, world_size: int, num_workers: int) -> IdArray:
        """The ids epoch ``epoch`` serves first: the leftover of the epoch before it."""
        return resume.epoch_carry_in(
            self.resume_spec(), self._resume, epoch, world_size, num_workers
        )

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        world = self.world()
        epoch = self.epoch
        plan = self.plan(epoch, world.world_size, world.rank, world.num_workers)
        self._plan_worker = resume.worker_share(self._resume, epoch=epoch, world=world)
        worker_plan = plan.workers[self._plan_worker]
        self._world, self._reading_epoch, self._position, self._finished = world, epoch, 0, False
        reader = ShardReader(
            self.manifest,
            [url for _, url in iter_shard_urls(self.source, self.manifest)],
            fetcher=self._get_fetcher(),
            prefetch_windows=self.config.prefetch_windows,
            mark_padding=self.config.policy == "pad",
            blocks=self._block_table(),
            verify_blocks=self.config.verify_local,
            decode_threads=self.config.decode_threads,
            processes=world.num_workers,
            range_requests=self.config.range_requests,
            range_bytes=self._range_bytes(),
        )
        self._skip = 0
        self._reader = reader
        items: Iterator[Any]
        if self._packs_runs():  # token documents straight into rows, no dict per sample
            packer = Packer(cast(PackConfig, self.pack))
            runs = reader.iter_token_runs(worker_plan, "input_ids")
            items = packer.pack_runs(runs, skip=self._packer_skip(epoch, world))
        else:
            samples = reader.iter_samples(worker_plan)
            transform = self.transform
            if transform is not None:
                samples = (transform(s) for s in samples)
            items = samples
            if self.pack is not None:
                packer = Packer(self.pack, tokenizer=self.tokenizer)
                items = packer.pack(enumerate(samples), skip=self._packer_skip(epoch, world))
        stages = self._stages
        try:
            started = time.perf_counter()
            for item in cast(Iterator[Any], items):
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

    def _packs_runs(self) -> bool:
        """Whether rows can be packed from runs of token documents (`Packer.pack_runs`).

        So for ``concat`` packing of token shards without loss spans, with no transform and no
        tokenizer: the rows are those the per-sample path makes.
        """
        fields = self.manifest.fields
        return (
            self.pack is not None
            and self.pack.mode == "concat"
            and self.transform is None
            and self.tokenizer is None
            and fields.get("input_ids") == "tokens"
            and "loss_spans" not in fields
        )

    def _range_bytes(self) -> int:
        """`StreamConfig.range_bytes`, or its default: the window's byte budget (or 64 MiB)."""
        if self.config.range_bytes is not None:
            return self.config.range_bytes
        return self.resume_spec().config.shuffle_bytes or BLOCK_WINDOW_BYTES

    def _block_table(self) -> BlockTable | None:
        """The plan's units when they are blocks (made once per process, and kept)."""
        self.resume_spec()
        return self._blocks

    def _packer_skip(self, epoch: int, world: WorldInfo) -> int:
        return resume.packer_skip(self._resume, epoch=epoch, world=world, share=self._plan_worker)

    def _get_fetcher(self) -> Any:
        if self._fetcher is None:
            self._fetcher = self.config.make_fetcher(self._storage_options)
        return self._fetcher

    def fetch_counters(self) -> dict[str, float]:
        """This process's fetch counters: its finished epochs' plus the epoch being read.

        `shardloader.fetch.ShardFetcher.stats`: ``bytes_fetched`` (from remote storage:
        downloads and ranged reads), ``range_reads``, ``retries``, ``cache_hits``, ... Inside a
        DataLoader worker they are that worker's (its ``collate_fn`` can read them through
        ``torch.utils.data.get_worker_info().dataset``).
        """
        counters = dict(self.fetch_stats)
        if self._fetcher is not None:
            for name, value in self._fetcher.stats.items():
                counters[name] = counters.get(name, 0) + value
        return counters

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
        return state

    # --- position -----------------------------------------------------------------------

    def count_stage(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name`` of this process (`ShardLoader` counts ``collate``)."""
        self._stages[name] += seconds

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

    def cursor(self) -> resume.Cursor:
        """This process's position, cheap enough to ship with every batch (`ShardLoader`).

        ``share`` is the worker share being read (see `LoaderState.rotation`); with packing,
        ``position`` and ``skip`` are the last row's cursor (where the next row starts).
        """
        world = self._world or self.world()
        reading = self._world is not None
        return resume.Cursor(
            epoch=self._reading_epoch if reading else self.epoch,
            rank=world.rank,
            world_size=world.world_size,
            share=self._plan_worker if reading else world.worker_id,
            num_workers=world.num_workers,
            position=self._position,
            finished=self._finished,
            skip=self._skip,
        )

    def state_dict(self) -> dict[str, Any]:
        """This process's position in its worker's share, self-contained.

        Inside a DataLoader worker (torchdata's ``StatefulDataLoader`` calls it there) or in a
        process that iterates the dataset itself. With a plain DataLoader and workers, the main
        process's copy does not see the workers' progress: use `ShardLoader.state_dict`.
        """
        cursor = self.cursor()
        return resume.worker_state_dict(cursor, self.anchor(cursor.epoch))

    def anchor(self, epoch: int) -> LoaderState:
        """The state ``epoch`` was planned from (its start, or the loaded state it continues)."""
        if self._resume is not None and self._resume.epoch == epoch:
            return self._resume  # (no manifest needed)
        world = self._world or self.world()
        return resume.anchor_state(
            self.resume_spec(),
            self._resume,
            epoch=epoch,
            world_size=world.world_size,
            num_workers=world.num_workers,
        )

    @property
    def loaded_state(self) -> LoaderState | None:
        """The state given to `load_state_dict`, if any."""
        return self._resume

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
        if isinstance(state, Mapping) and state.get("kind") == resume.WORKER_STATE_KIND:
            loaded = resume.state_from_worker(state)
        else:
            loaded = LoaderState.from_dict(state)
        adopted = self.config.adopt(loaded.config)
        if adopted != self.config:  # "auto" settings follow the state (resolved again)
            self.config, self._spec, self._blocks = adopted, None, None
        spec = self.resume_spec()
        loaded.check(dataset=spec.dataset, config=spec.config, pack=self.pack_fingerprint)
        self._resume = loaded
        self.set_epoch(loaded.epoch)
