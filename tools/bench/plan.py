"""Measure shardloader.plan at scale: one rank's plan, the carry-in chain, resume.

Usage: python -m tools.bench.plan [--shards 100000] [--world-size 1000] [--workers 8] [--blocks]

Prints wall time (best of --repeat) and peak traced Python memory (tracemalloc) per step. With
``--blocks``, the shards are cut into blocks of ``--block-samples`` samples (the last one
shorter; 51 documents of 2,621 bytes fill convert's default 128 KiB record batch) and planned as
`shardloader.dataset.ShardDataset` plans them by default: blocks spread over the epoch, windows
of at most 64 MiB decoded, the units prepared once (`shardloader.plan.prepare_units`, timed
apart); epochs 0 and ``--block-epoch`` (its carry-in chain included), and a resume in the middle
of that epoch.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from shardloader.plan import (
    EpochStart,
    PlanConfig,
    ResumePoint,
    plan_carry_in,
    plan_epoch,
    prepare_units,
)

DOC_BYTES = 2621  # the shuffle benchmark's mean document


def measure(label: str, fn: Callable[[], Any], repeat: int) -> Any:
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{label:<58} {best * 1000:9.1f} ms {peak / 1e6:8.1f} MB peak")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--world-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--epoch", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--blocks", action="store_true", help="plan blocks, not whole shards")
    parser.add_argument("--block-samples", type=int, default=51)
    parser.add_argument("--block-epoch", type=int, default=5)
    args = parser.parse_args()
    if args.blocks:
        bench_blocks(args)
        return

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 20_001, args.shards)
    config = PlanConfig(seed=1)
    world = {"world_size": args.world_size, "num_workers": args.workers}
    print(
        f"{args.shards:,} shards, {int(sizes.sum()):,} samples, "
        f"{args.world_size} ranks x {args.workers} workers"
    )

    rank = args.world_size // 2
    plan = measure(
        "plan_epoch, one rank, epoch 0",
        lambda: plan_epoch(sizes, config=config, epoch=0, rank=rank, **world),
        args.repeat,
    )
    print(
        f"  {plan.samples_per_rank:,} samples per rank, "
        f"{sum(len(w.windows) for w in plan.workers)} windows, {plan.num_dropped} dropped"
    )
    carry = measure(
        f"plan_carry_in, epoch {args.epoch} ({args.epoch} permutations)",
        lambda: plan_carry_in(sizes, config=config, epoch=args.epoch, world_size=args.world_size),
        args.repeat,
    )
    print(f"  {len(carry)} ids carried in")
    measure(
        f"plan_epoch, one rank, epoch {args.epoch} (chain included)",
        lambda: plan_epoch(sizes, config=config, epoch=args.epoch, rank=rank, **world),
        args.repeat,
    )
    measure(
        f"plan_epoch, one rank, epoch {args.epoch}, carry_in given",
        lambda: plan_epoch(
            sizes, config=config, epoch=args.epoch, rank=rank, carry_in=carry, **world
        ),
        args.repeat,
    )
    worker = plan.workers[0]
    ids = measure(
        "one worker's sample_ids()",
        worker.sample_ids,
        args.repeat,
    )
    print(f"  {len(ids):,} ids")

    counts = np.stack([[w.num_samples for w in plan.workers]] * args.world_size)
    consumed = (counts * rng.uniform(0.2, 0.8, counts.shape)).astype(np.int64)
    consumed[:] = consumed[0]  # same consumption on every rank, as in DDP
    point = ResumePoint(epoch=0, config=config, consumed=consumed, **world)
    measure(
        "resume, same topology (exact tails), one rank",
        lambda: plan_epoch(sizes, config=config, epoch=0, rank=rank, resume=point, **world),
        args.repeat,
    )
    new_world = max(1, args.world_size * 3 // 4)
    new_workers = max(1, args.workers // 2)
    elastic = measure(
        f"resume onto {new_world} ranks x {new_workers} workers, one rank",
        lambda: plan_epoch(
            sizes,
            config=config,
            epoch=0,
            rank=new_world // 2,
            world_size=new_world,
            num_workers=new_workers,
            resume=point,
        ),
        args.repeat,
    )
    print(f"  {elastic.samples_per_rank:,} samples per rank, {elastic.num_dropped} dropped")


def bench_blocks(args: argparse.Namespace) -> None:
    """Block mode: epoch 0, a later epoch with its carry chain, and a resume inside it."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 20_001, args.shards)
    per_shard = -(-sizes // args.block_samples)
    groups = np.repeat(np.arange(args.shards), per_shard)
    blocks = np.full(len(groups), args.block_samples, dtype=np.int64)
    blocks[np.cumsum(per_shard) - 1] = sizes - (per_shard - 1) * args.block_samples
    print(
        f"{args.shards:,} shards, {int(sizes.sum()):,} samples, {len(blocks):,} blocks of "
        f"{args.block_samples}, {args.world_size} ranks x {args.workers} workers"
    )
    units = measure(
        "prepare_units (once per dataset and process)",
        lambda: prepare_units(blocks, unit_bytes=blocks * DOC_BYTES, unit_groups=groups),
        1,
    )
    config = PlanConfig(
        seed=1, shuffle_unit="block", shuffle_window=4096, shuffle_bytes=64 * 1024 * 1024
    )
    world = {"world_size": args.world_size, "num_workers": args.workers}
    rank = args.world_size // 2
    for epoch in (0, args.block_epoch):
        plan = measure(
            f"block plan_epoch, one rank, epoch {epoch}" + (" (chain included)" if epoch else ""),
            lambda e=epoch: plan_epoch(units, config=config, epoch=e, rank=rank, **world),
            args.repeat,
        )
        print(
            f"  {plan.samples_per_rank:,} samples per rank, {plan.num_carried} carried in, "
            f"{sum(len(w.windows) for w in plan.workers)} windows"
        )
    carry = measure(
        f"block plan_carry_in, epoch {args.block_epoch}",
        lambda: plan_carry_in(
            units, config=config, epoch=args.block_epoch, world_size=args.world_size
        ),
        args.repeat,
    )
    print(f"  {len(carry)} ids carried in")
    counts = np.stack([[w.num_samples for w in plan.workers]] * args.world_size)
    consumed = counts // 2
    point = ResumePoint(epoch=args.block_epoch, config=config, consumed=consumed, **world)
    kwargs = {"config": config, "epoch": args.block_epoch, "resume": point}
    measure(
        f"block resume in epoch {args.block_epoch}, same topology, one rank",
        lambda: plan_epoch(units, rank=rank, **kwargs, **world),
        args.repeat,
    )
    new_world = max(1, args.world_size * 3 // 4)
    measure(
        f"block resume in epoch {args.block_epoch} onto {new_world} ranks x 4 workers",
        lambda: plan_epoch(
            units, rank=new_world // 2, world_size=new_world, num_workers=4, **kwargs
        ),
        args.repeat,
    )
    # A state saved inside an earlier epoch, loaded to plan this one: the epochs between are
    # replayed for their leftovers only (as ShardDataset does after a resume).
    earlier = max(args.block_epoch - 2, 0)
    start = EpochStart(
        earlier,
        plan_carry_in(units, config=config, epoch=earlier, world_size=args.world_size),
        ResumePoint(epoch=earlier, config=config, consumed=consumed, **world),
    )

    def later() -> Any:
        carry_in = plan_carry_in(
            units,
            config=config,
            epoch=args.block_epoch,
            world_size=args.world_size,
            since=start,
            num_workers=args.workers,
        )
        return plan_epoch(
            units, config=config, epoch=args.block_epoch, rank=rank, carry_in=carry_in, **world
        )

    measure(
        f"block plan_epoch {args.block_epoch} after a state saved inside epoch {earlier}",
        later,
        args.repeat,
    )
    ids = measure("one worker's sample_ids() (blocks)", plan.workers[0].sample_ids, args.repeat)
    print(f"  {len(ids):,} ids")


if __name__ == "__main__":
    main()
