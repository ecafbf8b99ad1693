"""How long reading a manifest takes, from 1,000 to 100,000 shards.

Run: ``python -m tools.bench.manifest`` (prints size on disk, parse time and peak memory);
``--blocks 16 --block-file`` writes the block table to a binary file beside the manifest
(`shardloader.block_file`) and counts both files' sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import tracemalloc

from shardloader.manifest import (
    Manifest,
    ShardInfo,
    manifest_files,
    read_manifest,
    shards_with_ids,
)


def make_manifest(num_shards: int, blocks_per_shard: int = 0) -> Manifest:
    shards = [
        ShardInfo(
            path=f"shard-{i // 16:05d}-{i % 16:04d}.arrow",
            num_samples=30_000 + i % 977,
            num_bytes=64_000_000 + i,
            checksum=hashlib.sha256(str(i).encode()).hexdigest(),
            num_tokens=0,
        )
        for i in range(num_shards)
    ]
    blocks = None
    if blocks_per_shard:  # a block table as convert writes it (decoded bytes and digests too)
        blocks = []
        for s in shards:
            k = blocks_per_shard
            n, step = s.num_samples // k, (s.num_bytes - 4096) // k
            entry = [
                [n, 1024 + i * step, step, 3 * step, hashlib.sha256(b"%d" % i).hexdigest()[:32]]
                for i in range(k)
            ]
            entry[-1][0] += s.num_samples - n * k
            blocks.append(entry)
    return Manifest(
        format="arrow",
        compression="zstd",
        fields={"id": "string", "text": "string"},
        shards=shards_with_ids(shards, blocks=blocks),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--blocks", type=int, default=0, help="record batches per shard in a block table (none)"
    )
    parser.add_argument(
        "--block-file", action="store_true", help="the block table in a binary file beside it"
    )
    args = parser.parse_args()
    print(f"{'shards':>8} {'file MB':>8} {'read s (median)':>16} {'peak MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.shards:
            manifest = make_manifest(n, args.blocks)
            size = 0.0
            for name, data in manifest_files(
                manifest, block_file_min_blocks=0 if args.block_file else 1 << 62
            ):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
                size += len(data) / 1e6
            del manifest
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                m = read_manifest(tmp)
                times.append(time.perf_counter() - start)
                assert len(m.shards) == n
            tracemalloc.start()
            read_manifest(tmp)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            times.sort()
            print(f"{n:>8} {size:>8.1f} {times[len(times) // 2]:>16.3f} {peak / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
