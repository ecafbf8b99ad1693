"""Measure shardloader.plan at scale: one rank's plan, the carry-in chain, resume.

Usage: python -m tools.bench.plan [--shards 100000] [--world-size 1000] [--workers 8]

Prints wall time (best of --repeat) and peak traced Python memory (tracemalloc) per step.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from shardloader.plan import PlanConfig, ResumePoint, plan_carry_in, plan_epoch


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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
