"""One rank of the distributed streaming tests; run by torch.multiprocessing.spawn or torchrun.

Each rank builds its `ShardDataset` before ``init_process_group`` (rank and world size are
detected when iteration starts), reads through a `ShardLoader`, and writes the sample ids it
got, batch by batch, to ``OUT/<tag>-rank<R>.json``.

torchrun usage: ``python -m torch.distributed.run --nproc_per_node=N tests/dist_stream.py
DATASET OUT TAG [--workers K] [--stop-after B] [--resume STATE] [--save STATE] [--unit U]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardloader import ShardDataset, ShardLoader, StreamConfig, end_process_group  # noqa: E402
from tests.streaming import ids_of  # noqa: E402


def read(
    dataset: ShardDataset,
    *,
    num_workers: int,
    context: str | None = None,
    stop_after: int = -1,
    resume: dict[str, Any] | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Read up to ``stop_after`` batches (all if -1); return them and the gathered state."""
    loader = ShardLoader(
        dataset,
        batch_size=4,
        num_workers=num_workers,
        collate_fn=ids_of,
        multiprocessing_context=context if num_workers else None,
    )
    if resume is not None:
        loader.load_state_dict(resume)
    batches: list[list[int]] = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == stop_after:
            break
    return batches, loader.state_dict(gather=True)


def spawn_main(
    rank: int, world_size: int, init_file: str, dataset_dir: str, out: str, runs: list[Any]
) -> None:
    """Entry point for ``torch.multiprocessing.spawn``: ``runs`` are (tag, workers, context)."""
    dataset = ShardDataset(dataset_dir)  # before the process group exists
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        for tag, num_workers, context in runs:
            batches, _ = read(dataset, num_workers=num_workers, context=context)
            dataset.set_epoch(0)
            Path(out, f"{tag}-rank{rank}.json").write_text(json.dumps(batches))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def torchrun_main() -> None:
    """Entry point under torchrun (env:// rendezvous)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=-1)
    parser.add_argument("--resume")
    parser.add_argument("--save")
    parser.add_argument("--unit", default="shard")
    args = parser.parse_args()
    config = StreamConfig(shuffle_unit=args.unit, shuffle_window=6 if args.unit == "block" else 4)
    dataset = ShardDataset(args.dataset, config=config)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    resume = json.loads(Path(args.resume).read_text()) if args.resume else None
    batches, state = read(
        dataset, num_workers=args.workers, stop_after=args.stop_after, resume=resume
    )
    Path(args.out, f"{args.tag}-rank{rank}.json").write_text(json.dumps(batches))
    if args.save and rank == 0:
        Path(args.save).write_text(json.dumps(state))
    assert os.environ["WORLD_SIZE"] == str(dist.get_world_size())
    end_process_group()


if __name__ == "__main__":
    torchrun_main()
