"""Shuffle quality: shardloader's epoch order beside Mosaic Streaming's and WebDataset's shuffles.

Every order here is a pure function of the shard sizes (no shard is read), built with each
system's own code:

- **shardloader**: `shardloader.plan.plan_epoch` with ``StreamConfig().plan_config()`` (the
  defaults of `shardloader.ShardDataset`: seed 0, ``shuffle_window=4``, ``"drop"``). Worker ``w``
  reads ``plan.workers[w].sample_ids()``. Before measuring, the script converts a tiny corpus and
  checks that a real ``ShardDataset`` under a real ``DataLoader`` yields exactly the reconstructed
  order (`check_shard_dataset`). One more row sets ``shuffle_window=16``.
- **Mosaic Streaming** 0.13 (``StreamingDataset(shuffle=True)`` with its defaults): shuffle
  ``py1e``, seed 9176, ``num_canonical_nodes`` = physical nodes (one node of ``W`` ranks here),
  ``shuffle_block_size = max(4_000_000 // num_canonical_nodes, 1 << 18)``, batching ``random``,
  partition ``relaxed``. As in ``streaming.base.batching.random``: ``get_partitions`` (shape nodes
  x ranks x workers x batches x batch) mapped through ``get_shuffle``; ``-1`` (padding) skipped.
- **WebDataset** 1.0.2: ``WebDataset(urls, shardshuffle=True, nodesplitter=split_by_node,
  detshuffle=True, seed=s).compose(detshuffle(1000, seed=s))``: shards split by rank, then by
  worker (``split_by_node``/``split_by_worker``), the worker's shard list through a shuffle buffer
  of 100 (``shardshuffle=True`` becomes 100), each shard's samples in tar order, then the sample
  buffer of 1,000 (``initial=100``, as ``.shuffle(1000)``). ``detshuffle`` seeds
  ``random.Random(seed + epoch)``; plain ``.shuffle(1000)`` seeds from pid and time. A second row
  shuffles the whole shard list (buffer = number of shards) to separate the two buffers' effects.
  `check_webdataset_epochs` runs ``detshuffle`` under a real DataLoader: it counts epochs in the
  worker's copy of the pipeline, so without ``persistent_workers`` every epoch repeats epoch 0.
- **uniform permutation** (the ideal) and **no shuffle** (manifest order; the worst), each rank
  taking a contiguous block.

What a rank's training loop sees with ``DataLoader(num_workers=K, batch_size=B)`` over an
``IterableDataset`` is the workers' batches taken round-robin (worker 0's first B ids, worker 1's
first B, ...), exhausted workers skipped (`interleave_batches`). Rank 0 is measured, for
``world_size`` 1 and 8, in that loop order and in worker 0's own order.

Metrics: the fraction of consecutive samples from the same shard; Spearman's |rho| between
position and sample id (ids rank-transformed, so a rank's subset counts like a whole epoch); the
mean number of distinct shards in consecutive windows of 1,000 samples; determinism (the same
seed and epoch twice must give the same order, asserted where the system promises it; the
fraction of positions that change from epoch 0 to 1); and the cost of making rank 0's whole
epoch order (wall time, then peak traced memory from `tracemalloc` in a second run).

Run it (under a minute on 2 cores, ~0.8 GB peak RSS)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python -m tools.bench.shuffle
    .venv-bench/bin/python -m tools.bench.shuffle --quick          # smaller corpora, no check
    .venv-bench/bin/python -m tools.bench.shuffle --cost-shards 100000   # cost at 100M samples

Results go to ``.bench/shuffle.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch.utils.data

from shardloader.dataset import StreamConfig
from shardloader.plan import plan_epoch
from tools.bench.harness import ROOT, STUBS

IdArray = npt.NDArray[np.int64]

WINDOW = 1000  # samples per window of the mixing metric
MOSAIC_SEED = 9176  # StreamingDataset's default shuffle_seed
WDS_SHARD_BUFFER = 100  # WebDataset(shardshuffle=True) turns True into 100
WDS_SAMPLE_BUFFER = 1000  # .shuffle(1000)
WDS_INITIAL = 100  # _shuffle's default initial fill


@dataclass(frozen=True)
class RankOrder:
    """One rank's epoch order.

    Attributes:
        loop: What the training loop sees: the workers' batches interleaved round-robin.
        workers: Each DataLoader worker's own order.
    """

    loop: IdArray
    workers: tuple[IdArray, ...]


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Where the order is read.

    Attributes:
        world_size: Number of ranks.
        rank: The rank measured.
        num_workers: DataLoader workers per rank.
        batch_size: Samples per batch (the unit the DataLoader interleaves workers by).
    """

    world_size: int
    rank: int
    num_workers: int
    batch_size: int


class OrderFn(Protocol):
    """Makes one rank's order from shard sizes, a seed, an epoch and a topology."""

    def __call__(
        self, sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology
    ) -> RankOrder:
        """Return the rank's order."""
        ...


@dataclass(frozen=True)
class System:
    """One shuffle under test.

    Attributes:
        name: Label in the tables.
        order: Builds one rank's order.
        seed: The system's default seed.
        deterministic: Whether the system promises the same order for the same seed and epoch.
        epoch_varies: Whether a different epoch is meant to give a different order.
    """

    name: str
    order: OrderFn
    seed: int | None
    deterministic: bool = True
    epoch_varies: bool = True


# ---------------------------------------------------------------------------------------------
# Orders.


def interleave_batches(workers: Sequence[IdArray], batch_size: int) -> IdArray:
    """The order a DataLoader over an IterableDataset hands batches to the loop.

    Args:
        workers: Each worker's samples in the order it yields them.
        batch_size: Samples per batch.

    Returns:
        Worker 0's first batch, worker 1's first batch, ..., then every worker's second batch,
        workers that have run out skipped.
    """
    num_batches = max((-(-len(w) // batch_size) for w in workers), default=0)
    parts = [
        w[b * batch_size : (b + 1) * batch_size]
        for b in range(num_batches)
        for w in workers
        if b * batch_size < len(w)
    ]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _first_ids(sizes: IdArray) -> IdArray:
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=first[1:])
    return first


def shardloader_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology, shuffle_window: int = 4
) -> RankOrder:
    """`plan_epoch` with the defaults of `shardloader.StreamConfig` (``shuffle_window=4``).

    Args:
        sizes: Samples per shard, in manifest order.
        seed: The plan's seed.
        epoch: The epoch.
        topology: Ranks, workers and batch size.
        shuffle_window: Shard pieces a worker mixes at once (the only non-default knob).

    Returns:
        The rank's order.
    """
    config = StreamConfig(seed=seed or 0, shuffle_window=shuffle_window).plan_config()
    plan = plan_epoch(
        sizes,
        config=config,
        epoch=epoch,
        world_size=topology.world_size,
        rank=topology.rank,
        num_workers=topology.num_workers,
    )
    workers = tuple(w.sample_ids() for w in plan.workers)
    return RankOrder(interleave_batches(workers, topology.batch_size), workers)


def mosaic_order(sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology) -> RankOrder:
    """Mosaic Streaming 0.13's default shuffle and partition, on one node of ``world_size`` ranks.

    Args:
        sizes: Samples per shard, in manifest order.
        seed: ``shuffle_seed``.
        epoch: The epoch.
        topology: Ranks, workers and batch size.

    Returns:
        The rank's order (padding ``-1`` skipped, as ``StreamingDataset._each_sample_id`` does).
    """
    if str(STUBS) not in sys.path:
        sys.path.insert(0, str(STUBS))
    from streaming.base.partition import get_partitions
    from streaming.base.shuffle import get_shuffle

    num_nodes = 1
    num_canonical_nodes = num_nodes  # default for py1e: the physical nodes of the first run
    block_size = max(4_000_000 // num_canonical_nodes, 1 << 18)  # _set_shuffle_block_size
    num_samples = int(sizes.sum())
    big_ids = get_partitions(
        "relaxed",
        num_samples,
        num_canonical_nodes,
        num_nodes,
        topology.world_size,
        max(topology.num_workers, 1),
        topology.batch_size,
    )
    shuffle = get_shuffle("py1e", sizes, num_canonical_nodes, seed, epoch, block_size)
    ids = np.where(big_ids != -1, shuffle[big_ids], -1)[0, topology.rank]
    workers = tuple(row[row != -1] for row in ids.reshape(ids.shape[0], -1))
    return RankOrder(interleave_batches(workers, topology.batch_size), workers)


@contextlib.contextmanager
def _torch_world(rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[None]:
    """Environment that webdataset's ``pytorch_worker_info`` reads, restored afterwards."""
    names = ("RANK", "WORLD_SIZE", "WORKER", "NUM_WORKERS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(zip(names, map(str, (rank, world_size, worker, num_workers)), strict=True))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _webdataset_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology, shard_buffer: int
) -> RankOrder:
    from webdataset.filters import _shuffle, detshuffle
    from webdataset.shardlists import split_by_node, split_by_worker

    first = _first_ids(sizes)
    num_workers = max(topology.num_workers, 1)
    workers = []
    for worker in range(num_workers):
        with _torch_world(topology.rank, topology.world_size, worker, num_workers):
            shards = list(split_by_worker(split_by_node(iter(range(len(sizes))))))
        if seed is None:  # WebDataset(seed=None) draws a random seed; .shuffle(1000) pid+time
            shards = list(_shuffle(iter(shards), shard_buffer, shard_buffer))
        else:
            shard_stage = detshuffle(shard_buffer, shard_buffer, seed=seed, epoch=epoch - 1)
            shards = list(shard_stage.run(iter(shards)))  # run() moves to epoch ``epoch``
        samples: Iterator[int] = itertools.chain.from_iterable(
            range(first[s], first[s + 1]) for s in shards
        )
        if seed is None:
            stream = _shuffle(samples, WDS_SAMPLE_BUFFER, WDS_INITIAL)
        else:
            sample_stage = detshuffle(WDS_SAMPLE_BUFFER, WDS_INITIAL, seed=seed, epoch=epoch - 1)
            stream = sample_stage.run(samples)
        count = int(sizes[shards].sum())
        workers.append(np.fromiter(stream, dtype=np.int64, count=count))
    return RankOrder(interleave_batches(workers, topology.batch_size), tuple(workers))


def webdataset_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology
) -> RankOrder:
    """WebDataset 1.0.2: ``shardshuffle=True`` (a 100-shard buffer), then ``shuffle(1000)``.

    Args:
        sizes: Samples per shard, in manifest order.
        seed: ``detshuffle`` seed of both buffers; ``None`` seeds them from pid and time.
        epoch: The epoch (``detshuffle`` seeds ``seed + epoch``).
        topology: Ranks, workers and batch size.

    Returns:
        The rank's order.
    """
    return _webdataset_order(
        sizes, seed=seed, epoch=epoch, topology=topology, shard_buffer=WDS_SHARD_BUFFER
    )


def webdataset_full_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology
) -> RankOrder:
    """As `webdataset_order`, with the whole shard list shuffled (buffer = number of shards).

    Args:
        sizes: Samples per shard, in manifest order.
        seed: ``detshuffle`` seed of both buffers; ``None`` seeds them from pid and time.
        epoch: The epoch.
        topology: Ranks, workers and batch size.

    Returns:
        The rank's order.
    """
    return _webdataset_order(
        sizes, seed=seed, epoch=epoch, topology=topology, shard_buffer=max(len(sizes), 1)
    )


def _contiguous_block(order: IdArray, topology: Topology) -> RankOrder:
    per_rank = len(order) // topology.world_size
    block = order[topology.rank * per_rank : (topology.rank + 1) * per_rank]
    return RankOrder(block, (block,))


def uniform_order(sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology) -> RankOrder:
    """A uniformly random permutation of the epoch (the ideal), split in contiguous blocks.

    Args:
        sizes: Samples per shard.
        seed: Seed of the permutation, with ``epoch``.
        epoch: The epoch.
        topology: Ranks (workers and batches do not change a uniform order's quality).

    Returns:
        The rank's block.
    """
    rng = np.random.default_rng([seed or 0, epoch])
    return _contiguous_block(rng.permutation(int(sizes.sum())), topology)


def sequential_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology
) -> RankOrder:
    """Manifest order (no shuffle), split in contiguous blocks.

    Args:
        sizes: Samples per shard.
        seed: Ignored.
        epoch: Ignored.
        topology: Ranks.

    Returns:
        The rank's block.
    """
    return _contiguous_block(np.arange(int(sizes.sum()), dtype=np.int64), topology)


SYSTEMS = (
    System("shardloader (ShardDataset defaults)", shardloader_order, seed=0),
    System(
        "shardloader shuffle_window=16",
        functools.partial(shardloader_order, shuffle_window=16),
        seed=0,
    ),
    System("Mosaic Streaming shuffle=True (py1e defaults)", mosaic_order, seed=MOSAIC_SEED),
    System("WebDataset shardshuffle=True + shuffle(1000)", webdataset_order, seed=0),
    System("WebDataset all shards shuffled + shuffle(1000)", webdataset_full_order, seed=0),
    System("uniform permutation (ideal)", uniform_order, seed=0),
    System("no shuffle (manifest order)", sequential_order, seed=0, epoch_varies=False),
)


# ---------------------------------------------------------------------------------------------
# Metrics.


def shard_of(ids: IdArray, first: IdArray) -> IdArray:
    """The shard index of every sample id."""
    return np.searchsorted(first, ids, side="right") - 1


def same_shard_fraction(shards: IdArray) -> float:
    """Fraction of consecutive pairs whose samples come from the same shard."""
    if len(shards) < 2:
        return 0.0
    return float(np.mean(shards[1:] == shards[:-1]))


def spearman_abs(ids: IdArray) -> float:
    """|Spearman rho| between position and sample id (ids rank-transformed, no ties assumed)."""
    n = len(ids)
    if n < 2:
        return 0.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[np.argsort(ids, kind="stable")] = np.arange(n, dtype=np.float64)
    positions = np.arange(n, dtype=np.float64)
    return abs(float(np.corrcoef(positions, ranks)[0, 1]))


def mean_distinct_shards(shards: IdArray, window: int = WINDOW) -> float:
    """Mean number of distinct shards in consecutive, non-overlapping windows of samples."""
    num_windows = len(shards) // window
    if num_windows == 0:
        return float("nan")
    blocks = np.sort(shards[: num_windows * window].reshape(num_windows, window), axis=1)
    return float(np.mean((np.diff(blocks, axis=1) != 0).sum(axis=1) + 1))


def quality(ids: IdArray, first: IdArray) -> dict[str, float | int]:
    """The three quality metrics of one order.

    Args:
        ids: Sample ids in reading order.
        first: First sample id of every shard, plus the total.

    Returns:
        ``samples``, ``same_shard``, ``spearman_abs`` and ``distinct_shards_per_1000``.
    """
    shards = shard_of(ids, first)
    return {
        "samples": len(ids),
        "same_shard": same_shard_fraction(shards),
        "spearman_abs": spearman_abs(ids),
        "distinct_shards_per_1000": mean_distinct_shards(shards),
    }


def digest(ids: IdArray) -> str:
    """First 16 hex digits of the sha256 of the ids (int64, little-endian): compare machines."""
    return hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Corpora.


def uniform_sizes(num_shards: int, samples_per_shard: int) -> IdArray:
    """``num_shards`` shards of ``samples_per_shard`` samples each."""
    return np.full(num_shards, samples_per_shard, dtype=np.int64)


def long_tailed_sizes(num_shards: int, median: int, sigma: float = 1.5, seed: int = 0) -> IdArray:
    """Log-normal shard sizes (at least 1): most shards small, a few very large ones.

    Args:
        num_shards: Number of shards.
        median: Median shard size.
        sigma: Log-space standard deviation (1.5: the largest of 1,000 is ~100x the median).
        seed: Seed of the sizes.

    Returns:
        The sizes.
    """
    rng = np.random.default_rng(seed)
    return np.maximum(1, rng.lognormal(np.log(median), sigma, num_shards)).astype(np.int64)


def describe(sizes: IdArray) -> dict[str, int]:
    """Shard count, sample count and the spread of shard sizes."""
    return {
        "shards": len(sizes),
        "samples": int(sizes.sum()),
        "min": int(sizes.min()),
        "median": int(np.median(sizes)),
        "max": int(sizes.max()),
    }


# ---------------------------------------------------------------------------------------------
# Runs.


def run_quality(
    corpora: dict[str, IdArray], world_sizes: Sequence[int], num_workers: int, batch_size: int
) -> list[dict[str, Any]]:
    """Quality of rank 0's loop order and worker 0's order, for every system.

    Args:
        corpora: Shard sizes by corpus name.
        world_sizes: World sizes to measure.
        num_workers: DataLoader workers per rank.
        batch_size: Samples per batch.

    Returns:
        One row per (corpus, world size, system).
    """
    rows = []
    for corpus, sizes in corpora.items():
        first = _first_ids(sizes)
        for world_size in world_sizes:
            topology = Topology(
                world_size=world_size, rank=0, num_workers=num_workers, batch_size=batch_size
            )
            for system in SYSTEMS:
                start = time.perf_counter()
                order = system.order(sizes, seed=system.seed, epoch=0, topology=topology)
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "corpus": corpus,
                        "world_size": world_size,
                        "system": system.name,
                        "loop": quality(order.loop, first),
                        "worker0": quality(order.workers[0], first),
                        "order_s": seconds,
                    }
                )
    return rows


def run_determinism(sizes: IdArray, topology: Topology) -> list[dict[str, Any]]:
    """Same seed and epoch twice, then the next epoch, for every system (and WebDataset unseeded).

    Args:
        sizes: Shard sizes.
        topology: Where the order is read.

    Returns:
        One row per system: ``reproducible``, ``epochs_differ`` (fraction of positions).

    Raises:
        AssertionError: A system that promises determinism gave two different orders.
    """
    cases = [(s, s.seed) for s in SYSTEMS]
    cases += [(s, None) for s in SYSTEMS if s.order in (webdataset_order, webdataset_full_order)]
    rows = []
    for system, seed in cases:
        a = system.order(sizes, seed=seed, epoch=0, topology=topology).loop
        b = system.order(sizes, seed=seed, epoch=0, topology=topology).loop
        c = system.order(sizes, seed=seed, epoch=1, topology=topology).loop
        reproducible = bool(np.array_equal(a, b))
        if seed is not None and system.deterministic:
            assert reproducible, f"{system.name}: same seed and epoch gave two orders"
        n = min(len(a), len(c))
        differ = float(np.mean(a[:n] != c[:n])) if n else 0.0
        if seed is not None and system.epoch_varies:
            assert differ > 0, f"{system.name}: epochs 0 and 1 gave the same order"
        name = system.name if seed is not None else f"{system.name}, unseeded (default)"
        rows.append(
            {
                "system": name,
                "seed": seed,
                "reproducible": reproducible,
                "epochs_differ": differ,
                "digest_epoch0": digest(a),
            }
        )
    return rows


def _peak_traced(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _shardloader_streamed(sizes: IdArray, topology: Topology) -> int:
    """What a reader holds: the plan, then one window of ids at a time."""
    plan = plan_epoch(
        sizes,
        config=StreamConfig().plan_config(),
        epoch=0,
        world_size=topology.world_size,
        rank=topology.rank,
        num_workers=topology.num_workers,
    )
    return sum(len(w.sample_ids) for worker in plan.workers for w in worker.iter_windows())


def run_cost(sizes: IdArray, topology: Topology) -> list[dict[str, Any]]:
    """Time and peak traced memory of making rank 0's whole epoch order, per system.

    Args:
        sizes: Shard sizes (a large corpus).
        topology: Where the order is read.

    Returns:
        One row per system, with the order's quality too.
    """
    first = _first_ids(sizes)
    jobs: list[tuple[str, Callable[[], object]]] = [
        (s.name, lambda s=s: s.order(sizes, seed=s.seed, epoch=0, topology=topology))
        for s in SYSTEMS
    ]
    streamed = "shardloader, one window at a time (as the reader)"
    jobs.insert(1, (streamed, lambda: _shardloader_streamed(sizes, topology)))
    rows = []
    for name, fn in jobs:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"system": name, "order_s": seconds}
        if isinstance(result, RankOrder):
            row["loop"] = quality(result.loop, first)
        del result
        row["peak_bytes"] = _peak_traced(fn)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# ShardDataset check: the reconstruction is what a real DataLoader yields.


def _collate_ids(batch: list[dict[str, Any]]) -> list[int]:
    return [int(sample["sample_id"]) for sample in batch]


def check_shard_dataset(num_workers: int = 2, batch_size: int = 7, world_size: int = 2) -> int:
    """Convert a tiny uneven corpus and compare ShardDataset under a DataLoader with the order.

    Args:
        num_workers: DataLoader workers.
        batch_size: Samples per batch.
        world_size: Ranks (each read in this process, with an explicit rank).

    Returns:
        Number of samples compared.

    Raises:
        AssertionError: The DataLoader yielded another order than `shardloader_order`.
    """
    from shardloader import ConvertConfig, ShardDataset, convert, read_manifest

    sizes = np.array([300, 17, 200, 153, 1, 212, 120, 64, 333, 9], dtype=np.int64)
    compared = 0
    with tempfile.TemporaryDirectory(prefix="bench-shuffle-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        start = 0
        for index, size in enumerate(sizes.tolist()):
            lines = [json.dumps({"text": f"doc {start + i}"}) for i in range(size)]
            (corpus / f"part-{index:02d}.jsonl").write_text("\n".join(lines) + "\n")
            start += size
        out = Path(tmp) / "shards"
        convert([str(corpus)], ConvertConfig(output=str(out), task_bytes=1, num_proc=1))
        written = np.array(read_manifest(str(out)).shards.column("num_samples"), dtype=np.int64)
        assert np.array_equal(written, sizes), f"one shard per file expected, got {written}"
        for epoch, rank in itertools.product((0, 1), range(world_size)):
            dataset = ShardDataset(str(out), rank=rank, world_size=world_size)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_collate_ids,
                multiprocessing_context="fork",
            )
            seen = np.array([i for batch in loader for i in batch], dtype=np.int64)
            topology = Topology(
                world_size=world_size, rank=rank, num_workers=num_workers, batch_size=batch_size
            )
            expected = shardloader_order(sizes, seed=0, epoch=epoch, topology=topology).loop
            assert np.array_equal(seen, expected), (
                f"epoch {epoch} rank {rank}: the DataLoader order differs from the reconstruction"
            )
            compared += len(seen)
    return compared


class _Range(torch.utils.data.IterableDataset):
    """The integers ``0 .. n-1``: a stand-in for a WebDataset shard list."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def check_webdataset_epochs() -> dict[str, bool]:
    """Whether ``detshuffle`` gives epoch 1 the order of epoch 0 under a real DataLoader.

    ``detshuffle`` counts epochs in its own attribute, so a worker that gets a fresh copy of the
    pipeline each epoch (``persistent_workers=False``, the DataLoader default) restarts the count.

    Returns:
        ``"persistent_workers=False"``, ``"persistent_workers=True"`` and ``"in-process"`` mapped
        to whether epochs 0 and 1 came out in the same order.
    """
    import webdataset as wds

    pipeline = wds.DataPipeline(
        _Range(5000), wds.detshuffle(WDS_SAMPLE_BUFFER, WDS_INITIAL, seed=0)
    )
    same = {}
    for persistent in (False, True):
        loader = torch.utils.data.DataLoader(
            pipeline,
            batch_size=None,
            num_workers=1,
            persistent_workers=persistent,
            multiprocessing_context="fork",
        )
        epochs = [[int(i) for i in loader] for _ in range(2)]
        same[f"persistent_workers={persistent}"] = epochs[0] == epochs[1]
    same["in-process"] = list(pipeline) == list(pipeline)
    return same


# ---------------------------------------------------------------------------------------------
# Report.


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _q(metrics: dict[str, float | int]) -> list[str]:
    return [
        f"{metrics['same_shard']:.3f}",
        f"{metrics['spearman_abs']:.3f}",
        f"{metrics['distinct_shards_per_1000']:.1f}",
    ]


def format_quality(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_quality` rows, loop order and worker 0 side by side."""
    header = [
        "corpus",
        "W",
        "system",
        "same shard",
        "abs(rho)",
        "shards/1000",
        "worker 0: same shard",
        "abs(rho)",
        "shards/1000",
    ]
    body = [
        [r["corpus"], str(r["world_size"]), r["system"], *_q(r["loop"]), *_q(r["worker0"])]
        for r in rows
    ]
    return _table(header, body)


def format_determinism(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_determinism` rows."""
    header = ["system", "same seed+epoch: same order", "epoch 0 vs 1: positions changed"]
    body = [
        [r["system"], "yes" if r["reproducible"] else "**no**", f"{r['epochs_differ']:.1%}"]
        for r in rows
    ]
    return _table(header, body)


def format_cost(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_cost` rows."""
    header = ["system", "time s", "peak MB", "same shard", "abs(rho)", "shards/1000"]
    body = [
        [
            r["system"],
            f"{r['order_s']:.2f}",
            f"{r['peak_bytes'] / 1e6:.1f}",
            *(_q(r["loop"]) if "loop" in r else ["", "", ""]),
        ]
        for r in rows
    ]
    return _table(header, body)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("numpy", "torch", "mosaicml-streaming", "webdataset", "shardloader")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the JSON.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--world-sizes", default="1,8", help="comma-separated world sizes")
    parser.add_argument("--cost-shards", type=int, default=10_000, help="x 1,000 samples")
    parser.add_argument("--quick", action="store_true", help="small corpora, no ShardDataset check")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "shuffle.json")
    args = parser.parse_args(argv)

    scale = 10 if args.quick else 1
    corpora = {
        "1k x 1k": uniform_sizes(1000 // scale, 1000),
        "long-tailed": long_tailed_sizes(1000 // scale, median=300),
    }
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    cost_shards = args.cost_shards // scale
    for name, sizes in corpora.items():
        print(f"corpus {name}: {describe(sizes)}")
    total = time.perf_counter()

    checked = 0
    if not args.quick:
        checked = check_shard_dataset()
        print(
            f"ShardDataset under a DataLoader (2 ranks x 2 workers, batch 7, epochs 0-1) yields "
            f"the reconstructed order: {checked} samples compared"
        )

    quality_rows = run_quality(corpora, world_sizes, args.num_workers, args.batch_size)
    print(f"\nQuality, rank 0 (loop order: {args.num_workers} workers, batch {args.batch_size})")
    print(format_quality(quality_rows))

    det_topology = Topology(
        world_size=8, rank=0, num_workers=args.num_workers, batch_size=args.batch_size
    )
    det_rows = run_determinism(corpora["long-tailed"], det_topology)
    print("\nDeterminism (long-tailed corpus, W=8, rank 0 loop order)")
    print(format_determinism(det_rows))
    wds_epochs = check_webdataset_epochs()
    print(
        "WebDataset detshuffle, epoch 1 in the order of epoch 0: "
        + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in wds_epochs.items())
    )

    cost_sizes = uniform_sizes(cost_shards, 1000)
    cost_topology = Topology(
        world_size=8, rank=0, num_workers=args.num_workers, batch_size=args.batch_size
    )
    cost_rows = run_cost(cost_sizes, cost_topology)
    print(
        f"\nCost: rank 0 of 8 ({args.num_workers} workers), whole epoch order, "
        f"{cost_shards:,} shards x 1,000 = {int(cost_sizes.sum()):,} samples"
    )
    print(format_cost(cost_rows))
    total_s = time.perf_counter() - total
    print(f"\ntotal {total_s:.1f} s")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": _versions(),
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "window": WINDOW,
        "corpora": {name: describe(sizes) for name, sizes in corpora.items()},
        "shard_dataset_check_samples": checked,
        "quality": quality_rows,
        "determinism": det_rows,
        "webdataset_detshuffle_epoch1_repeats_epoch0": wds_epochs,
        "cost_corpus": describe(cost_sizes),
        "cost": cost_rows,
        "total_s": total_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
