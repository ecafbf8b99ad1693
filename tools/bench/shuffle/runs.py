"""The measurements: quality per system, determinism across seeds and epochs, cost of an order."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shardloader.convert_config import ConvertConfig
from shardloader.dataset import BLOCK_WINDOW, BLOCK_WINDOW_BYTES
from shardloader.plan import PlanConfig, plan_epoch
from tools.bench.shuffle.metrics import digest, quality
from tools.bench.shuffle.orders import (
    SAMPLE_BYTES,
    SYSTEMS,
    IdArray,
    RankOrder,
    Topology,
    block_groups,
    block_sizes,
    first_ids,
    webdataset_full_order,
    webdataset_order,
)


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
        first = first_ids(sizes)
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
                        "holds": system.holds,
                        "held_max_samples": order.held,
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
    """What a reader holds with the defaults: the plan, then one window of ids at a time."""
    per_block = -(-ConvertConfig.batch_bytes // SAMPLE_BYTES)
    units = block_sizes(sizes, per_block)
    plan = plan_epoch(
        units,
        config=PlanConfig(
            shuffle_unit="block", shuffle_window=BLOCK_WINDOW, shuffle_bytes=BLOCK_WINDOW_BYTES
        ),
        epoch=0,
        world_size=topology.world_size,
        rank=topology.rank,
        num_workers=topology.num_workers,
        unit_bytes=units * SAMPLE_BYTES,
        unit_groups=block_groups(sizes, per_block),
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
    first = first_ids(sizes)
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
