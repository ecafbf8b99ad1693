"""Stream packed training batches from tokenized shards, save the position, resume exactly.

Usage: python examples/stream.py TOKEN_SHARDS [--seq-len 512] [--batch-size 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from shardloader import PackConfig, ShardDataset, ShardLoader, StreamConfig


def make_loader(path: str, args: argparse.Namespace) -> ShardLoader:
    """A loader of packed rows: shuffled shards, documents packed whole (best fit)."""
    dataset = ShardDataset(
        path,
        config=StreamConfig(seed=0, shuffle=True),
        pack=PackConfig(seq_len=args.seq_len, mode="bfd"),
    )
    return ShardLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shards")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stop-after", type=int, default=5)
    args = parser.parse_args()

    loader = make_loader(args.shards, args)
    start, tokens, batches = time.perf_counter(), 0, []
    for batch in loader:
        batches.append(batch["input_ids"])
        tokens += int((batch["labels"] != -100).sum())
    elapsed = time.perf_counter() - start
    print(
        f"one epoch: {len(batches)} batches of {list(batches[0].shape)}, "
        f"{tokens / elapsed / 1e6:.2f} M trained tokens/s"
    )

    interrupted = make_loader(args.shards, args)
    for step, _ in enumerate(interrupted, 1):
        if step == args.stop_after:
            break
    state = json.dumps(interrupted.state_dict())  # save it beside the model checkpoint
    print(f"state after {args.stop_after} batches ({len(state)} bytes of JSON)")

    resumed = make_loader(args.shards, args)
    resumed.load_state_dict(json.loads(state))
    rest = [batch["input_ids"] for batch in resumed]
    same = all(torch.equal(a, b) for a, b in zip(rest, batches[args.stop_after :], strict=True))
    if not same or len(rest) != len(batches) - args.stop_after:
        raise SystemExit("resume did not continue exactly")
    print(f"resumed: the remaining {len(rest)} batches equal the uninterrupted run's")


if __name__ == "__main__":
    main()
