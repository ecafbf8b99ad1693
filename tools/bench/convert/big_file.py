"""One big file on 1 vs N processes: MB/s of input text, and whether the shards are identical.

    python -m tools.bench.convert.big_file FILE [FILE ...] --num-proc 1 2 [--slice-bytes 256MB]

Each conversion runs in a fresh ``python -m shardloader convert`` process into a temporary
folder; the time is the wall time of that process (start-up included). The output's published
files (shards and manifest) are hashed, and runs of one file must agree for every ``--num-proc``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def digest(out: Path) -> str:
    """One sha256 over every published file's name and sha256, in name order."""
    total = hashlib.sha256()
    for path in sorted(out.iterdir()):
        if path.is_file():
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            total.update(f"{path.name} {h.hexdigest()}\n".encode())
    return total.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slice-bytes", default="256MB")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    print("| file | text MB | num_proc | wall s | MB/s | speed-up | shards | sha256 (all shards) |")
    print("|---|---|---|---|---|---|---|---|")
    for file in args.files:
        text_mb = None
        first_s = None
        digests = set()
        for num_proc in args.num_proc:
            out = Path(tempfile.mkdtemp(dir=args.workdir, prefix="big-file-"))
            start = time.monotonic()
            cmd = [sys.executable, "-m", "shardloader", "convert", file, "-o", str(out)]
            cmd += ["--num-proc", str(num_proc), "--slice-bytes", args.slice_bytes]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            wall = time.monotonic() - start
            for line in proc.stdout.splitlines():
                if line.strip().startswith("bytes in:"):
                    value, unit = line.split()[2:4]
                    text_mb = float(value) * {"MB": 1, "GB": 1000}[unit]
            first_s = first_s or wall
            d = digest(out)
            digests.add(d)
            shards = sum(1 for p in out.iterdir() if p.name.startswith("shard-"))
            print(
                f"| {os.path.basename(file)} | {text_mb:.0f} | {num_proc} | {wall:.1f} | "
                f"{(text_mb or 0) / wall:.1f} | {first_s / wall:.2f}x | {shards} | {d[:12]} |",
                flush=True,
            )
            shutil.rmtree(out)
        print(f"<!-- {file}: {'identical' if len(digests) == 1 else 'DIFFERENT'} output -->")


if __name__ == "__main__":
    main()
