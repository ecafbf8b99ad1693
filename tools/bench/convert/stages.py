"""Where one process's conversion time goes, stage by stage, on one slice of a JSONL file.

    python -m tools.bench.convert.stages FILE [--mb 256] [--repeats 2]

Stages, each timed alone in CPU seconds of this process (robust on a shared machine) on the
file's first ``--mb`` MB of whole lines, and reported as MB/s of input text:

- read: the bytes from the page cache (``read``)
- parse: pyarrow's JSON reader into id/text columns (`jsonl_table_from_bytes`)
- build: Arrow record batches of 128 KiB written uncompressed to /dev/null-like memory
- compress: the same batches with zstd level 2, minus build
- hash: sha256 of the shard bytes (the manifest's checksum)
- write: the compressed shard bytes to a local file (CPU only; the disk's time is not counted)

Then the speed/size trade of the zstd level (compress stage and output size per level).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
import time
from collections import Counter

import pyarrow as pa

from shardloader.sources.jsonl_table import jsonl_table_from_bytes
from shardloader.sources.records import RecordSpec
from shardloader.storage import InputFile


def cpu(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def arrow_bytes(table, codec) -> bytes:
    sink = io.BytesIO()
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        sizes = table.sizes
        start, n = 0, len(sizes)
        while start < n:  # 128 KiB batches, as convert writes them
            end, held = start, 0
            while end < n and held < 128 * 1024:
                held += int(sizes[end])
                end += 1
            batch = pa.record_batch(
                [table.ids.slice(start, end - start), table.texts.slice(start, end - start)],
                schema=schema,
            )
            writer.write_batch(batch)
            start = end
    return sink.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="*", default=[-1, 1, 2, 3])
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        head = f.read(args.mb * 10**6)
    data = head[: head.rfind(b"\n") + 1]
    mb = len(data) / 1e6
    source = InputFile(os.path.abspath(args.file), os.path.getsize(args.file), "/")

    def read() -> bytes:
        with open(args.file, "rb") as f:
            return f.read(len(data))

    def parse():
        return jsonl_table_from_bytes(data, source, spec=RecordSpec(), stats=Counter())

    rows = []
    t_read, _ = cpu(read, args.repeats)
    rows.append(("read", t_read))
    t_parse, table = cpu(parse, args.repeats)
    rows.append(("parse", t_parse))
    t_build, _ = cpu(lambda: arrow_bytes(table, None), args.repeats)
    rows.append(("build", t_build))
    t_zstd, shard = cpu(lambda: arrow_bytes(table, pa.Codec("zstd", 2)), args.repeats)
    rows.append(("compress", t_zstd - t_build))
    t_hash, _ = cpu(lambda: hashlib.sha256(shard).hexdigest(), args.repeats)
    rows.append(("hash", t_hash))
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(args.file))) as out:

        def write() -> None:
            out.seek(0)
            out.write(shard)
            out.flush()
            os.fsync(out.fileno())

        t_write, _ = cpu(write, args.repeats)
    rows.append(("write", t_write))
    total = sum(t for _, t in rows)
    print(f"{mb:.0f} MB of JSONL, {len(table.sizes):,} documents, one process, CPU seconds")
    print("| stage | CPU s | MB/s of input | share |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {mb / max(t, 1e-9):.0f} | {t / total:.0%} |")
    print(f"| all | {total:.2f} | {mb / total:.0f} | 100% |")
    print()
    print("| zstd level | compress CPU s | MB/s of input | output MB |")
    print("|---|---|---|---|")
    for level in args.levels:
        t, out_bytes = cpu(lambda lv=level: arrow_bytes(table, pa.Codec("zstd", lv)), 1)
        print(
            f"| {level} | {t - t_build:.2f} | {mb / max(t - t_build, 1e-9):.0f} | "
            f"{len(out_bytes) / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
