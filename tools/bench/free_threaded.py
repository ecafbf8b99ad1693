"""One epoch of shardloader's `ShardReader`, normal (GIL) against free-threaded CPython.

Measurement only; shardloader does not need free-threaded Python. ``tools/bench/free_threaded.sh``
builds the interpreters (CPython 3.13.5 with and without ``--disable-gil``, same flags, in a
Debian trixie chroot) and runs this on each. Entry points (run from the repository root, with it
on ``PYTHONPATH``; only numpy, pyarrow, zstandard and fsspec are needed, not torch):

- ``free_threaded.py case --task text --mode reader --threads 2``: one case in this process, one
  JSON line on stdout. ``reader``: one ShardReader over the whole epoch with ``decode_threads`` =
  ``--threads``; ``split``: ``--threads`` Python threads, each its own ShardReader
  (``decode_threads=0``) and fetcher over one worker's share of the plan (``plan_epoch`` with
  ``num_workers=--threads``: disjoint, equal shares).
- ``free_threaded.py run --python PY --out FILE``: every case, ``--repeats`` times each, each in
  a fresh subprocess of ``PY``, one after the other (each waits for a quiet machine); appends
  JSON lines to FILE.
- ``free_threaded.py table FILE...``: min/median per interpreter and case.

The data are the stream benchmark's converted corpus (``python -m tools.bench.stream`` makes it;
``--data`` or ``FT_DATA`` names another folder holding ``shardloader-text`` and
``shardloader-tokens``).

The plan is what ``ShardDataset`` makes for a local dataset under ``shuffle_unit="auto"`` with
``shuffle=False``: blocks (Arrow record batches), windows of at most 4096 blocks / 64 MiB.
Timed: from constructing the reader(s) to the last sample (imports, manifest, plan excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.bench.harness import cpu_marks, other_cpu_share

DATA = os.environ.get("FT_DATA", os.path.join(".bench", "stream", "corpus-300mb-0", "s3", "bench"))
CASES = [
    (task, mode, threads)
    for task in ("text", "tokens")
    for mode, threads in (("reader", 0), ("reader", 2), ("reader", 4), ("split", 2), ("split", 4))
]
MiB = 1 << 20


def gil_state() -> object:
    check = getattr(sys, "_is_gil_enabled", None)
    return "n/a" if check is None else check()


def run_case(task: str, mode: str, threads: int) -> dict[str, object]:
    import numpy  # noqa: F401 - imported for the versions line
    import pyarrow
    import zstandard

    from shardloader.fetch import ShardFetcher
    from shardloader.manifest import iter_shard_urls, read_manifest
    from shardloader.plan import PlanConfig, plan_epoch, prepare_units
    from shardloader.reader import ShardReader

    gil_after_imports = gil_state()
    url = os.path.abspath(f"{DATA}/shardloader-{task}")
    manifest = read_manifest(url)
    table = manifest.shards.block_table()
    assert table.all_known, "expected a block table (shuffle_unit auto -> block)"
    units = prepare_units(
        table.num_samples, unit_bytes=table.decoded, unit_groups=table.shard_index
    )
    config = PlanConfig(
        seed=0, shuffle=False, shuffle_window=4096, shuffle_unit="block", shuffle_bytes=64 * MiB
    )
    num_workers = threads if mode == "split" else 0
    plan = plan_epoch(units, config=config, epoch=0, world_size=1, rank=0, num_workers=num_workers)
    urls = [u for _, u in iter_shard_urls(url, manifest)]
    field = "text" if task == "text" else "input_ids"
    cache_dir = tempfile.mkdtemp(prefix="ftbench-cache-")

    def read(worker_plan: object, decode_threads: int, out: list[tuple[int, int]]) -> None:
        fetcher = ShardFetcher(cache_dir=cache_dir, verify_local=True)
        reader = ShardReader(
            manifest, urls, fetcher=fetcher, blocks=table, decode_threads=decode_threads
        )
        samples = size = 0
        try:
            for sample in reader.iter_samples(worker_plan):  # type: ignore[arg-type]
                samples += 1
                size += len(sample[field])
        finally:
            reader.close()
            fetcher.close()
        out.append((samples, size))

    results: list[tuple[int, int]] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if mode == "reader":
        read(plan.workers[0], threads, results)
    else:
        pool = [
            threading.Thread(target=read, args=(plan.workers[i], 0, results))
            for i in range(threads)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    shutil.rmtree(cache_dir, ignore_errors=True)
    num_samples = sum(r[0] for r in results)
    amount = sum(r[1] for r in results)  # characters (text) or tokens
    if num_samples != plan.samples_per_rank or len(results) != max(1, num_workers):
        raise SystemExit(
            f"read {num_samples} samples in {len(results)} parts; expected {plan.samples_per_rank}"
        )
    return {
        "python": sys.version.split()[0] + ("t" if "free-threading" in sys.version else ""),
        "executable": sys.executable,
        "pyarrow": pyarrow.__version__,
        "numpy": sys.modules["numpy"].__version__,
        "zstandard": zstandard.__version__,
        "gil_after_imports": gil_after_imports,
        "gil_after_run": gil_state(),
        "task": task,
        "mode": mode,
        "threads": threads,
        "seconds": round(seconds, 4),
        "cpu_s": round(cpu_s, 3),  # this process's CPU time over the timed section
        "num_samples": num_samples,
        "amount": amount,
        "decoded_mb": round(int(table.decoded.sum()) / 1e6, 1),
        "rate": round(amount / seconds / 1e6, 2),  # M chars/s (text) or M tokens/s
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def wait_quiet(limit: float = 0.15, patience_s: float = 30.0) -> None:
    """Wait until other processes use under ``limit`` of the machine (0.5 s samples)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        marks = cpu_marks()
        time.sleep(0.5)
        if other_cpu_share(marks, 0.5) < limit:
            return


def run_all(python: str, out: str, repeats: int, env_extra: dict[str, str], label: str) -> None:
    env = {**os.environ, **env_extra}
    with open(out, "a") as f:
        for repeat in range(repeats):
            for task, mode, threads in CASES:
                cmd = [
                    python,
                    os.path.abspath(__file__),
                    "case",
                    "--task",
                    task,
                    "--mode",
                    mode,
                    "--threads",
                    str(threads),
                ]
                wait_quiet()
                marks, wall = cpu_marks(), time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                other = other_cpu_share(marks, time.perf_counter() - wall)
                if done.returncode:
                    print(done.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{cmd} failed")
                line = done.stdout.strip().splitlines()[-1]
                row = {
                    **json.loads(line),
                    "label": label,
                    "repeat": repeat,
                    "other_cpu_share": round(other, 3),
                    "stderr": done.stderr[-300:],
                }
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(
                    repeat,
                    task,
                    mode,
                    threads,
                    row["seconds"],
                    row["cpu_s"],
                    row["rate"],
                    row["peak_rss_mb"],
                    row["gil_after_run"],
                    row["other_cpu_share"],
                    flush=True,
                )


def table(files: list[str]) -> None:
    rows = [json.loads(line) for name in files for line in Path(name).read_text().splitlines()]
    groups: dict[tuple[str, str, str, int], list[dict[str, object]]] = {}
    for r in rows:
        key = (r.get("label") or r["python"], r["task"], r["mode"], r["threads"])
        groups.setdefault(key, []).append(r)
    print(
        "| python | task | case | n | min s | median s | median CPU s | median rate |"
        " peak RSS MB | GIL | other CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (py, task, mode, threads), rs in groups.items():
        secs = sorted(float(r["seconds"]) for r in rs)
        rate = statistics.median(float(r["rate"]) for r in rs)
        rss = max(float(r["peak_rss_mb"]) for r in rs)
        gil = sorted({str(r["gil_after_run"]) for r in rs})
        cpu = statistics.median(float(r["cpu_s"]) for r in rs)
        other = statistics.median(float(r["other_cpu_share"]) for r in rs)
        unit = "Mchar/s" if task == "text" else "Mtok/s"
        case = f"decode_threads={threads}" if mode == "reader" else f"split {threads} threads"
        print(
            f"| {py} | {task} | {case} | {len(secs)} | {secs[0]:.3f} | "
            f"{statistics.median(secs):.3f} | {cpu:.2f} | {rate:.1f} {unit} | {rss:.0f} | "
            f"{'/'.join(gil)} | {other:.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    case = sub.add_parser("case")
    case.add_argument("--task", choices=("text", "tokens"), required=True)
    case.add_argument("--mode", choices=("reader", "split"), required=True)
    case.add_argument("--threads", type=int, default=0)
    run = sub.add_parser("run")
    run.add_argument("--python", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--repeats", type=int, default=3)
    run.add_argument("--env", action="append", default=[], help="NAME=VALUE for the cases")
    run.add_argument("--label", default="", help="name of the interpreter in the table")
    tab = sub.add_parser("table")
    tab.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.cmd == "case":
        print(json.dumps(run_case(args.task, args.mode, args.threads)))
    elif args.cmd == "run":
        env = dict(e.split("=", 1) for e in args.env)
        run_all(args.python, args.out, args.repeats, env, args.label or args.python)
    else:
        table(args.files)


if __name__ == "__main__":
    main()
