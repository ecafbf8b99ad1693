"""``python -m tools.bench.stream``: prepare every system's copy, run the passes, report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    BENCH_DIR,
    ROOT,
    Corpus,
    default_python,
    ensure_corpus,
    ensure_tokenizer,
    versions,
    write_results,
)
from tools.bench.stream import (
    BATCH_SIZE,
    BLOCK_SIZE,
    CACHE_BYTES,
    MOSAIC_PREDOWNLOAD,
    SEED,
    SHARD_BYTES,
    SHUFFLE_BUFFER,
    SOURCES,
    STREAM_DIR,
    SYSTEMS,
    TARGET_FIRST_BATCH_S,
    TARGET_LOCAL_RATIO,
    TARGET_S3_RATIO,
    TASKS,
    VERSIONS,
)
from tools.bench.stream.passes import Context, Measurement, measure, plan_passes
from tools.bench.stream.prepare import (
    Prepared,
    data_system,
    data_task,
    prepare_all,
    text_bytes_of,
    warm_page_cache,
)
from tools.bench.stream.report import checksum_cost, print_report, report_from_json

Corpora = dict[str, tuple[Corpus, int, dict[tuple[str, str], Prepared]]]
Pass = tuple[str, str, str, int]  # (system, task, source, num_workers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """The command line, resolved: what to run and how often."""

    args: argparse.Namespace
    mb: float
    large_mb: float
    repeats: int
    systems: list[str]
    tasks: list[str]
    sources: list[str]
    workers: list[int]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Streaming throughput, first batch and RSS of shardloader and its peers."
    )
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (40)")
    parser.add_argument(
        "--large-mb", type=float, default=None, help="second size for RSS, 0 to skip (160)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="passes per configuration (3)")
    parser.add_argument("--large-repeats", type=int, default=1, help="passes at the large size")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 + 24 MB, 1 repeat")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument(
        "--tasks", default="text,tokens,packed", help="comma-separated: text,tokens,packed"
    )
    parser.add_argument("--sources", default="local,s3", help="comma-separated: local,s3")
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="for preparing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per pass")
    parser.add_argument(
        "--plain-dataloader",
        action="store_true",
        help="iterate shardloader with torch's DataLoader instead of ShardLoader",
    )
    parser.add_argument(
        "--per-sample",
        action="store_true",
        help="iterate every system item by item through DataLoader(batch_size=None), as most "
        "users do (packed: one row per item)",
    )
    parser.add_argument(
        "--shuffle-unit",
        default="auto",
        choices=("auto", "block", "shard"),
        help="shardloader's StreamConfig.shuffle_unit (auto: blocks locally, whole shards on S3)",
    )
    parser.add_argument("--python", default=default_python(), help="interpreter for the passes")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (.bench/results-stream.json; with --quick, results-stream-quick.json)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="re-print the tables of an earlier results file; run nothing"
    )
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def resolve(args: argparse.Namespace) -> Run:
    """Defaults that depend on ``--quick``, and the lists; exits on unknown names."""
    run = Run(
        args=args,
        mb=args.mb if args.mb is not None else (8.0 if args.quick else 40.0),
        large_mb=args.large_mb if args.large_mb is not None else (24.0 if args.quick else 160.0),
        repeats=args.repeats if args.repeats is not None else (1 if args.quick else 3),
        systems=[s for s in args.systems.split(",") if s],
        tasks=[t for t in args.tasks.split(",") if t],
        sources=[s for s in args.sources.split(",") if s],
        workers=[int(w) for w in args.workers.split(",") if w],
    )
    unknown = (set(run.systems) - set(SYSTEMS)) | (set(run.tasks) - set(TASKS))
    unknown |= set(run.sources) - set(SOURCES)
    chosen = run.systems and run.tasks and run.sources and run.workers
    if unknown or not chosen or run.repeats < 1:
        args.parser.error(f"nothing to run, or unknown names {sorted(unknown)}")
    return run


def large_passes_of(run: Run) -> list[Pass]:
    """The passes at the second corpus size (text, ``num_workers=0``: RSS)."""
    large_passes = [(system, "text", source, 0) for source in run.sources for system in run.systems]
    if run.args.quick:  # the code path is the same for every system: one pass shows it works
        large_passes = [large_passes[0]]
    if run.large_mb <= 0 or "text" not in run.tasks:
        large_passes = []
    return large_passes


def prepare_corpora(run: Run, passes: list[Pass], large_passes: list[Pass]) -> Corpora:
    """Each corpus size with its text bytes and every system's copy, read once into the cache."""
    args = run.args
    corpus = ensure_corpus(run.mb, SEED, 32)
    tokenizer = ensure_tokenizer(corpus) if {"tokens", "packed"} & set(run.tasks) else None
    print(
        f"corpus: {corpus.path.relative_to(ROOT)}: {corpus.num_docs:,} docs, "
        f"{corpus.input_bytes / 1e6:.1f} MB of JSONL",
        flush=True,
    )
    needed = {(data_system(s), data_task(t)) for s, t, _, _ in passes}
    prepared = prepare_all(
        corpus, sorted(needed), tokenizer=tokenizer, python=args.python, num_proc=args.num_proc
    )
    corpora: Corpora = {"main": (corpus, text_bytes_of(corpus), prepared)}
    if large_passes:
        large = ensure_corpus(run.large_mb, SEED, 32)
        print(
            f"large corpus: {large.path.relative_to(ROOT)}: {large.num_docs:,} docs, "
            f"{large.input_bytes / 1e6:.1f} MB of JSONL (text, num_workers=0: RSS)",
            flush=True,
        )
        large_prepared = prepare_all(
            large,
            [(s, "text") for s in run.systems],
            tokenizer=None,
            python=args.python,
            num_proc=args.num_proc,
        )
        corpora["large"] = (large, text_bytes_of(large), large_prepared)
    for _, _, p in corpora.values():
        warm_page_cache(p)
    return corpora


def print_prepared(corpora: Corpora) -> None:
    """One line per prepared copy: files, MB, samples, tokens."""
    for size, (_, _, p) in corpora.items():
        for (system, task), d in sorted(p.items()):
            print(
                f"  {size} {system}-{task}: {len(d.files)} files, {d.stored_bytes / 1e6:.1f} MB"
                f", {d.num_samples:,} samples"
                + (f", {d.num_tokens:,} tokens" if d.num_tokens else "")
            )


def status_line(m: Measurement) -> str:
    """How one pass went, for the progress log."""
    if not m.ok:
        return f"FAILED ({m.error[:300]})"
    status = f"{m.job_s:6.2f} s  first batch {m.first_batch_s:5.2f} s  "
    status += f"RSS {m.peak_rss_mb:4.0f}/{m.workers_peak_rss_mb:4.0f} MB"
    status += f"  (other processes: {m.other_cpu_share:.0%} CPU)"
    status += f" (note: {m.note})" if m.note else ""
    return status


def run_passes(
    run: Run, corpora: Corpora, passes: list[Pass], large_passes: list[Pass]
) -> list[Measurement]:
    """Every pass, repeat by repeat, with an S3 server per corpus size that needs one."""
    from shardloader.testing import S3Server

    servers: dict[str, Any] = {}
    measurements: list[Measurement] = []
    try:
        needs_s3 = {
            size
            for size, ps in (("main", passes), ("large", large_passes))
            if any(src == "s3" for _, _, src, _ in ps)
        }
        for size in needs_s3:
            data_dir = STREAM_DIR / corpora[size][0].path.name / "s3"
            servers[size] = S3Server(data_dir=data_dir).start()
            print(f"S3 server for {size}: {servers[size].endpoint_url} serving {data_dir}")
        schedule = [(r, "main", p) for r in range(run.repeats) for p in passes]
        schedule += [(r, "large", p) for r in range(run.args.large_repeats) for p in large_passes]
        for i, (repeat, size, (system, task, source, num_workers)) in enumerate(schedule):
            c, text_bytes, p = corpora[size]
            ctx = Context(
                python=run.args.python,
                server=servers.get(size),
                timeout_s=run.args.timeout,
                shardloader_loader=not run.args.plain_dataloader,
                per_sample=run.args.per_sample,
                shuffle_unit=run.args.shuffle_unit,
            )
            m = measure(
                ctx,
                system=system,
                task=task,
                source=source,
                num_workers=num_workers,
                size=size,
                repeat=repeat,
                corpus=c,
                text_bytes=text_bytes,
                prepared=p,
            )
            measurements.append(m)
            print(
                f"  [{i + 1}/{len(schedule)}] {size} r{repeat} {system:<11} {task:<6} "
                f"{source:<5} w{num_workers}  {status_line(m)}",
                flush=True,
            )
    finally:
        for server in servers.values():
            server.close()
    return measurements


def corpora_json(corpora: Corpora) -> dict[str, Any]:
    """Each corpus size and its prepared copies, for the results file."""
    return {
        size: {
            "path": str(c.path.relative_to(ROOT)),
            "num_docs": c.num_docs,
            "input_bytes": c.input_bytes,
            "text_bytes": text_bytes,
            "prepared": {
                f"{s}-{t}": {
                    "files": len(d.files),
                    "stored_bytes": d.stored_bytes,
                    "num_samples": d.num_samples,
                    "num_tokens": d.num_tokens,
                }
                for (s, t), d in p.items()
            },
        }
        for size, (c, text_bytes, p) in corpora.items()
    }


def settings_json(run: Run) -> dict[str, Any]:
    """The settings every pass ran with, for the results file."""
    return {
        "shard_bytes": SHARD_BYTES,
        "batch_size": BATCH_SIZE,
        "block_size": BLOCK_SIZE,
        "shuffle_buffer": SHUFFLE_BUFFER,
        "mosaic_predownload": MOSAIC_PREDOWNLOAD,
        "cache_bytes": CACHE_BYTES,
        "seed": SEED,
        "repeats": run.repeats,
        "large_repeats": run.args.large_repeats,
        "quick": run.args.quick,
        "shardloader_loader": "DataLoader" if run.args.plain_dataloader else "ShardLoader",
        "shuffle_unit": run.args.shuffle_unit,
        "per_sample": run.args.per_sample,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    run = resolve(args)
    out = args.out or BENCH_DIR / (
        "results-stream-quick.json" if args.quick else "results-stream.json"
    )
    started = time.perf_counter()
    BENCH_DIR.mkdir(exist_ok=True)
    passes = plan_passes(
        systems=run.systems,
        tasks=run.tasks,
        sources=run.sources,
        workers=run.workers,
        quick=args.quick,
    )
    large_passes = large_passes_of(run)
    corpora = prepare_corpora(run, passes, large_passes)
    found = versions(args.python, VERSIONS)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    print_prepared(corpora)
    prepared_s = time.perf_counter() - started
    measurements = run_passes(run, corpora, passes, large_passes)

    corpus = corpora["main"][0]
    sizes_mb = {"main": run.mb, "large": run.large_mb}
    description = (
        f"{corpus.num_docs:,} docs, {corpus.input_bytes / 1e6:.1f} MB of JSONL (and "
        f"{run.large_mb:g} MB for RSS); batch_size {BATCH_SIZE}; {run.repeats} repeat(s); "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"\n{description}; preparation {prepared_s:.0f} s, total "
        f"{time.perf_counter() - started:.0f} s"
    )
    summaries = print_report(measurements, sizes_mb)
    report = {
        "description": description,
        "sizes_mb": sizes_mb,
        "corpora": corpora_json(corpora),
        "settings": settings_json(run),
        "cpu_count": os.cpu_count(),
        "versions": found,
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "local_checksum_cost": checksum_cost(summaries),
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "targets": {
            "local_vs_fastest_peer": TARGET_LOCAL_RATIO,
            "s3_vs_raw_get": TARGET_S3_RATIO,
            "first_batch_s": TARGET_FIRST_BATCH_S,
        },
    }
    write_results(out, report)
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
