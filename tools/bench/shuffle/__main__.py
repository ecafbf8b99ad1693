"""``python -m tools.bench.shuffle``: measure every system's order, print the tables, write JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench import shuffle
from tools.bench.harness import ROOT
from tools.bench.shuffle.checks import check_shard_dataset, check_webdataset_epochs
from tools.bench.shuffle.metrics import WINDOW, describe, long_tailed_sizes, uniform_sizes
from tools.bench.shuffle.orders import IdArray, Topology
from tools.bench.shuffle.report import (
    format_cost,
    format_determinism,
    format_quality,
    package_versions,
)
from tools.bench.shuffle.runs import run_cost, run_determinism, run_quality


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=(shuffle.__doc__ or "").splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    parser.add_argument("--world-sizes", default="1,8", help="comma-separated world sizes")
    parser.add_argument("--cost-shards", type=int, default=10_000, help="x 1,000 samples")
    parser.add_argument("--quick", action="store_true", help="small corpora, no ShardDataset check")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "shuffle.json")
    return parser.parse_args(argv)


def _rank0_of_8(args: argparse.Namespace) -> Topology:
    return Topology(world_size=8, rank=0, num_workers=args.num_workers, batch_size=args.batch_size)


def print_quality(args: argparse.Namespace, corpora: dict[str, IdArray]) -> list[dict[str, Any]]:
    """Quality of every system's order in each corpus and world size, printed."""
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    quality_rows = run_quality(corpora, world_sizes, args.num_workers, args.batch_size)
    print(f"\nQuality, rank 0 (loop order: {args.num_workers} workers, batch {args.batch_size})")
    print(format_quality(quality_rows))
    return quality_rows


def print_determinism(
    args: argparse.Namespace, sizes: IdArray
) -> tuple[list[dict[str, Any]], dict[str, bool]]:
    """Determinism rows and WebDataset's epochs under a DataLoader, printed."""
    det_rows = run_determinism(sizes, _rank0_of_8(args))
    print("\nDeterminism (long-tailed corpus, W=8, rank 0 loop order)")
    print(format_determinism(det_rows))
    wds_epochs = check_webdataset_epochs()
    print(
        "WebDataset detshuffle, epoch 1 in the order of epoch 0: "
        + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in wds_epochs.items())
    )
    return det_rows, wds_epochs


def print_cost(args: argparse.Namespace, cost_shards: int) -> tuple[IdArray, list[dict[str, Any]]]:
    """The cost corpus and the cost of every system's order in it, printed."""
    cost_sizes = uniform_sizes(cost_shards, 1000)
    cost_rows = run_cost(cost_sizes, _rank0_of_8(args))
    print(
        f"\nCost: rank 0 of 8 ({args.num_workers} workers), whole epoch order, "
        f"{cost_shards:,} shards x 1,000 = {int(cost_sizes.sum()):,} samples"
    )
    print(format_cost(cost_rows))
    return cost_sizes, cost_rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the JSON.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    scale = 10 if args.quick else 1
    corpora = {
        "1k x 1k": uniform_sizes(1000 // scale, 1000),
        "long-tailed": long_tailed_sizes(1000 // scale, median=300),
    }
    for name, sizes in corpora.items():
        print(f"corpus {name}: {describe(sizes)}")
    total = time.perf_counter()

    checked = (0, 0)
    if not args.quick:
        checked = check_shard_dataset()
        print(
            f"ShardDataset under a DataLoader (2 ranks x 2 workers, batch 7, epochs 0-1) yields "
            f"the reconstructed order: {checked[0]} samples compared in shard mode, "
            f"{checked[1]} in blocks, the default (record batches of 256 bytes, windows of 3)"
        )
    quality_rows = print_quality(args, corpora)
    det_rows, wds_epochs = print_determinism(args, corpora["long-tailed"])
    cost_sizes, cost_rows = print_cost(args, args.cost_shards // scale)
    total_s = time.perf_counter() - total
    print(f"\ntotal {total_s:.1f} s")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": package_versions(),
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "window": WINDOW,
        "corpora": {name: describe(sizes) for name, sizes in corpora.items()},
        "shard_dataset_check_samples": checked[0],
        "shard_dataset_block_check_samples": checked[1],
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
