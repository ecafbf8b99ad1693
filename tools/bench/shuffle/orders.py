"""Each system's epoch order for one rank, built with the system's own code from shard sizes.

shardloader (`plan_epoch` with `StreamConfig`'s defaults, a wider window, and block mode over
blocks of a fixed number of samples), Mosaic Streaming (``py1e``, partition
``relaxed``), WebDataset (shard buffer, then sample buffer), a uniform permutation (the ideal) and
manifest order (the worst); and what a DataLoader hands the loop (`interleave_batches`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from shardloader.convert_config import ConvertConfig
from shardloader.dataset import BLOCK_WINDOW, BLOCK_WINDOW_BYTES
from shardloader.plan import PlanConfig, plan_epoch
from tools.bench.harness import STUBS

IdArray = npt.NDArray[np.int64]

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
        held: For shardloader, the most samples one worker holds at once (its largest window,
            over the rank's workers); ``None`` for the other systems.
    """

    loop: IdArray
    workers: tuple[IdArray, ...]
    held: int | None = None


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
        holds: What one worker holds in memory to make its order (empty: not a memory bound).
    """

    name: str
    order: OrderFn
    seed: int | None
    deterministic: bool = True
    epoch_varies: bool = True
    holds: str = ""


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


def first_ids(sizes: IdArray) -> IdArray:
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=first[1:])
    return first


def plan_order(
    unit_sizes: IdArray,
    *,
    config: PlanConfig,
    epoch: int,
    topology: Topology,
    unit_bytes: IdArray | None = None,
    unit_groups: IdArray | None = None,
) -> RankOrder:
    """`plan_epoch` over ``unit_sizes`` (shards, or blocks in shard order): one rank's order.

    Args:
        unit_sizes: Samples per planning unit, in manifest order.
        config: The plan's settings.
        epoch: The epoch.
        topology: Ranks, workers and batch size.
        unit_bytes: Decoded bytes per unit (for ``config.shuffle_bytes``).
        unit_groups: Each block's shard (blocks are spread over the epoch by shard).

    Returns:
        The rank's order, with the largest window a worker holds.
    """
    plan = plan_epoch(
        unit_sizes,
        config=config,
        epoch=epoch,
        world_size=topology.world_size,
        rank=topology.rank,
        num_workers=topology.num_workers,
        unit_bytes=unit_bytes,
        unit_groups=unit_groups,
    )
    workers = tuple(w.sample_ids() for w in plan.workers)
    held = max((win.num_samples for w in plan.workers for win in w.windows), default=0)
    return RankOrder(interleave_batches(workers, topology.batch_size), workers, held)


# The corpus the default row models: documents of this many bytes (the mean of the stream
# benchmark's generated corpus is 2,750), so convert's default record batches of 128 KiB hold
# ceil(131,072 / 2,621) = 51 of them. The plan then bounds a window by bytes, as ShardDataset
# does with the block sizes the manifest records.
SAMPLE_BYTES = 2621


def shardloader_default_order(
    sizes: IdArray,
    *,
    seed: int | None,
    epoch: int,
    topology: Topology,
    sample_bytes: int = SAMPLE_BYTES,
    shuffle_bytes: int = BLOCK_WINDOW_BYTES,
    batch_bytes: int = ConvertConfig.batch_bytes,
) -> RankOrder:
    """`plan_epoch` as `shardloader.ShardDataset` plans a dataset convert made, by default.

    ``StreamConfig()`` resolves to blocks (``shuffle_unit="auto"``: the manifest records the
    blocks' decoded sizes) in windows of at most ``BLOCK_WINDOW_BYTES`` (64 MiB) decoded; the
    blocks are convert's default record batches (``batch_bytes`` 128 KiB) of documents of
    ``sample_bytes`` each.

    Args:
        sizes: Samples per shard, in manifest order.
        seed: The plan's seed.
        epoch: The epoch.
        topology: Ranks, workers and batch size.
        sample_bytes: Bytes of every document.
        shuffle_bytes: The window bound (`StreamConfig.shuffle_bytes`).
        batch_bytes: Convert's record batch size (``--batch-bytes``), which is the block's.

    Returns:
        The rank's order.
    """
    per_block = -(-batch_bytes // sample_bytes)  # a batch ends after its limit
    units = block_sizes(sizes, per_block)
    config = PlanConfig(
        seed=seed or 0,
        shuffle_unit="block",
        shuffle_window=BLOCK_WINDOW,
        shuffle_bytes=shuffle_bytes,
    )
    return plan_order(
        units,
        config=config,
        epoch=epoch,
        topology=topology,
        unit_bytes=units * sample_bytes,
        unit_groups=block_groups(sizes, per_block),
    )


def shardloader_order(
    sizes: IdArray, *, seed: int | None, epoch: int, topology: Topology, shuffle_window: int = 4
) -> RankOrder:
    """`plan_epoch` over whole shards (``shuffle_unit="shard"``; the default before blocks).

    Args:
        sizes: Samples per shard, in manifest order.
        seed: The plan's seed.
        epoch: The epoch.
        topology: Ranks, workers and batch size.
        shuffle_window: Shards a worker mixes at once (4: the shard-mode default).

    Returns:
        The rank's order.
    """
    config = PlanConfig(seed=seed or 0, shuffle_window=shuffle_window)
    return plan_order(sizes, config=config, epoch=epoch, topology=topology)


def block_sizes(sizes: IdArray, block_samples: int) -> IdArray:
    """Each shard cut into blocks of ``block_samples`` (the last one shorter), in shard order.

    What convert's record batches are when every sample has the same size: ``batch_bytes`` /
    sample bytes samples per batch.
    """
    full, rest = np.divmod(sizes, block_samples)
    counts = full + (rest > 0)
    out = np.full(int(counts.sum()), block_samples, dtype=np.int64)
    ends = np.cumsum(counts)
    has_rest = rest > 0
    out[ends[has_rest] - 1] = rest[has_rest]
    return out


def block_groups(sizes: IdArray, block_samples: int) -> IdArray:
    """The shard of every block of `block_sizes` (the corpora here have no empty shard)."""
    counts = -(-sizes // block_samples)
    return np.repeat(np.arange(len(sizes), dtype=np.int64), counts)


def shardloader_block_order(
    sizes: IdArray,
    *,
    seed: int | None,
    epoch: int,
    topology: Topology,
    block_samples: int,
    shuffle_window: int,
) -> RankOrder:
    """`plan_epoch` with ``shuffle_unit="block"`` over blocks of ``block_samples``.

    As `shardloader.ShardDataset` in block mode, whose plan's sizes are the manifest's
    ``block_table().num_samples``. The ids are the same global ids as over shards (blocks are
    contiguous id ranges in shard order), so the metrics still count shards.

    Args:
        sizes: Samples per shard, in manifest order.
        seed: The plan's seed.
        epoch: The epoch.
        topology: Ranks, workers and batch size.
        block_samples: Samples per block (each shard's last block is shorter).
        shuffle_window: Blocks a worker mixes (and holds) at once.

    Returns:
        The rank's order.
    """
    config = PlanConfig(seed=seed or 0, shuffle_window=shuffle_window, shuffle_unit="block")
    units = block_sizes(sizes, block_samples)
    return plan_order(units, config=config, epoch=epoch, topology=topology)


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

    first = first_ids(sizes)
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


MiB = 1 << 20
BUDGETS = (16 * MiB, 256 * MiB)  # other shuffle_bytes than the default's 64 MiB
_DEFAULT_BLOCK = -(-ConvertConfig.batch_bytes // SAMPLE_BYTES)
_1MIB_BLOCK = -(-MiB // SAMPLE_BYTES)  # convert --batch-bytes 1MiB: smaller, faster output

SYSTEMS = (
    System(
        "shardloader (ShardDataset defaults)",
        shardloader_default_order,
        seed=0,
        holds=f"64 MiB: {BLOCK_WINDOW_BYTES // (_DEFAULT_BLOCK * SAMPLE_BYTES)} x "
        f"{_DEFAULT_BLOCK} = {BLOCK_WINDOW_BYTES // SAMPLE_BYTES:,}",
    ),
    System(
        'shardloader shuffle_unit="shard" (the default before blocks)',
        shardloader_order,
        seed=0,
        holds="4 x shard",
    ),
    System(
        'shardloader shuffle_unit="shard", shuffle_window=16',
        functools.partial(shardloader_order, shuffle_window=16),
        seed=0,
        holds="16 x shard",
    ),
    *(
        System(
            f"shardloader shuffle_bytes={budget // MiB}MiB",
            functools.partial(shardloader_default_order, shuffle_bytes=budget),
            seed=0,
            holds=f"{budget // MiB} MiB: {budget // (_DEFAULT_BLOCK * SAMPLE_BYTES)} x "
            f"{_DEFAULT_BLOCK} = {budget // SAMPLE_BYTES:,}",
        )
        for budget in BUDGETS
    ),
    System(
        "shardloader, converted with --batch-bytes 1MiB",
        functools.partial(shardloader_default_order, batch_bytes=MiB),
        seed=0,
        holds=f"64 MiB: {BLOCK_WINDOW_BYTES // (_1MIB_BLOCK * SAMPLE_BYTES)} x "
        f"{_1MIB_BLOCK} = {BLOCK_WINDOW_BYTES // SAMPLE_BYTES:,}",
    ),
    System("Mosaic Streaming shuffle=True (py1e defaults)", mosaic_order, seed=MOSAIC_SEED),
    System(
        "WebDataset shardshuffle=True + shuffle(1000)",
        webdataset_order,
        seed=0,
        holds=f"buffer {WDS_SAMPLE_BUFFER:,}",
    ),
    System(
        "WebDataset all shards shuffled + shuffle(1000)",
        webdataset_full_order,
        seed=0,
        holds=f"buffer {WDS_SAMPLE_BUFFER:,}",
    ),
    System("uniform permutation (ideal)", uniform_order, seed=0),
    System("no shuffle (manifest order)", sequential_order, seed=0, epoch_varies=False),
)
