"""``python -m tools.bench.convert``: every system converts the corpus, repeat by repeat."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tools.bench.convert import (
    BOUNDS,
    CHAT_SYSTEMS,
    PEERS,
    SHARD_BYTES,
    TARGET_TEXT_RATIO,
    TARGET_TOKEN_RATIO,
    TEXT_SYSTEMS,
    TOKEN_SYSTEMS,
    jobs,
)
from tools.bench.convert.chat import ensure_chat_corpus, ensure_chat_tokenizer
from tools.bench.convert.report import Measurement, print_report, report_from_json
from tools.bench.harness import (
    BENCH_DIR,
    ROOT,
    Corpus,
    cpu_marks,
    default_python,
    ensure_corpus,
    ensure_tokenizer,
    job_env,
    log_tail,
    other_cpu_share,
    versions,
    warm_page_cache,
    write_results,
)

VERSIONS = (
    "shardloader",
    "webdataset",
    "mosaicml-streaming",
    "litdata",
    "tokenizers",
    "pyarrow",
    "torch",
    "zstandard",
)


def count_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(
    *,
    system: str,
    task: str,
    repeat: int,
    corpus: Corpus,
    num_proc: int,
    tokenizer: Path | None,
    corpus_tokens: int | None,
    python: str,
) -> Measurement:
    """Run one job in a fresh subprocess and output folder; delete the output afterwards."""
    name = f"{system}-{task}-r{repeat}"
    output = BENCH_DIR / "out" / name
    result_path = BENCH_DIR / "out" / f"{name}.result.json"
    log_path = BENCH_DIR / "logs" / f"{name}.log"
    shutil.rmtree(output, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.parent.mkdir(parents=True, exist_ok=True)  # a bound job creates no output
    command = [python, "-m", "tools.bench.convert.jobs", *map(str, corpus.files)]
    command += ["--system", system, "--task", task, "--output", str(output)]
    command += ["--num-proc", str(num_proc), "--result", str(result_path)]
    command += ["--tokenizer", str(tokenizer)] if tokenizer else []
    marks = cpu_marks()
    started = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=job_env(system), cwd=ROOT
        ).returncode
    process_s = time.perf_counter() - started
    failed = Measurement(
        system=system,
        task=task,
        repeat=repeat,
        ok=False,
        process_s=process_s,
        other_cpu_share=other_cpu_share(marks, process_s),
    )
    try:
        if code != 0 or not result_path.exists():
            return dataclasses.replace(failed, error=f"exit {code}: {log_tail(log_path)}")
        result = json.loads(result_path.read_text())
        done = dataclasses.replace(
            failed,
            job_s=result["job_s"],
            output_bytes=count_bytes(output),
            num_samples=result["num_samples"],
            num_tokens=result["num_tokens"],
        )
        if done.num_samples != corpus.num_docs:
            error = f"wrote {done.num_samples} of {corpus.num_docs} documents"
            return dataclasses.replace(done, error=error)
        expected = corpus_tokens + corpus.num_docs if corpus_tokens else None  # EOS per document
        if task == "tokens" and system not in BOUNDS and expected != done.num_tokens:
            note = f"reports {done.num_tokens} tokens, expected {expected} (text + EOS)"
            if system in PEERS:  # our own peer code appends one EOS per document
                return dataclasses.replace(done, error=note)
            done = dataclasses.replace(done, note=note)
        return dataclasses.replace(done, ok=True)
    finally:
        shutil.rmtree(output, ignore_errors=True)
        result_path.unlink(missing_ok=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Conversion throughput of shardloader and its peers on one generated corpus."
    )
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (default 256)")
    parser.add_argument("--num-files", type=int, default=32, help="JSONL files in the corpus")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="processes each")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement (3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 MB, 1 repeat")
    parser.add_argument(
        "--tasks", default="text,tokens,chat", help="comma-separated: text,tokens,chat"
    )
    parser.add_argument("--systems", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--python", default=default_python(), help="interpreter for the jobs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results-convert.json")
    parser.add_argument(
        "--from-json", type=Path, help="re-print the table of an earlier results file; run nothing"
    )
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def plan_jobs(args: argparse.Namespace, tasks: list[str]) -> list[tuple[str, str]]:
    """(system, task) of every job, in order; the bound first if a subset needs its tokens."""
    only = {s for s in args.systems.split(",") if s}
    plan = [(s, "text") for s in TEXT_SYSTEMS if "text" in tasks]
    plan += [(s, "tokens") for s in TOKEN_SYSTEMS if "tokens" in tasks]
    plan += [(s, "chat") for s in CHAT_SYSTEMS if "chat" in tasks]
    if only:
        plan = [(s, t) for s, t in plan if s in only or s.split("-")[0] in only]
        for task in ("tokens", "chat"):
            if task in tasks and ("bound", task) not in plan:
                plan.insert(0, ("bound", task))  # tokens/s needs the bound's token count
    return plan


def run_jobs(
    args: argparse.Namespace,
    plan: list[tuple[str, str]],
    repeats: int,
    corpora: dict[str, Corpus],
    tokenizers: dict[str, Path],
) -> tuple[list[Measurement], dict[str, int]]:
    """Every job, repeat by repeat, with a progress line each; each task's corpus token count."""
    measurements: list[Measurement] = []
    corpus_tokens: dict[str, int] = {}  # per task, set by its first good "bound" job
    for repeat in range(repeats):
        for system, task in plan:
            m = measure(
                system=system,
                task=task,
                repeat=repeat,
                corpus=corpora[task],
                num_proc=args.num_proc,
                tokenizer=tokenizers.get(task),
                corpus_tokens=corpus_tokens.get(task),
                python=args.python,
            )
            measurements.append(m)
            if m.ok and system == "bound" and task not in corpus_tokens:
                corpus_tokens[task] = m.num_tokens
            status = f"{m.job_s:7.2f} s" if m.ok else f"FAILED ({m.error[:200]})"
            status += f"  (other processes: {m.other_cpu_share:.0%} CPU)" if m.ok else ""
            status += f" (note: {m.note})" if m.note else ""
            print(f"  [{repeat + 1}/{repeats}] {system:<20} {task:<6} {status}", flush=True)
    return measurements, corpus_tokens


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_job"]:
        return jobs.job_main(argv[1:])
    args = parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    mb = args.mb if args.mb is not None else (32.0 if args.quick else 256.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    tasks = [t for t in args.tasks.split(",") if t]
    plan = plan_jobs(args, tasks)
    if not plan or repeats < 1 or args.num_proc < 1:
        args.parser.error("nothing to run: check --tasks, --systems, --repeats and --num-proc")

    BENCH_DIR.mkdir(exist_ok=True)
    corpus = ensure_corpus(mb, args.seed, args.num_files)
    corpora = {"text": corpus, "tokens": corpus}
    tokenizers = {"tokens": ensure_tokenizer(corpus)} if "tokens" in tasks else {}
    if "chat" in tasks:
        corpora["chat"] = ensure_chat_corpus(corpus)
        tokenizers["chat"] = ensure_chat_tokenizer(corpus)
    warm_page_cache([f for task in tasks for f in corpora[task].files])
    found = versions(args.python, VERSIONS)
    print(
        f"corpus: {corpus.path.relative_to(ROOT)}: {len(corpus.files)} files, "
        f"{corpus.num_docs:,} docs, {corpus.input_bytes / 1e6:.1f} MB of JSONL; "
        f"{args.num_proc} processes each, {repeats} repeat(s)"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    if "chat" in tasks:
        chat = corpora["chat"]
        print(
            f"chat corpus: {chat.path.relative_to(ROOT)}: {chat.num_docs:,} conversations, "
            f"{chat.input_bytes / 1e6:.1f} MB of JSONL; tokenizer {tokenizers['chat'].name}"
        )
    measurements, corpus_tokens = run_jobs(args, plan, repeats, corpora, tokenizers)

    plain = [m for m in measurements if m.task != "chat"]
    summaries = print_report(plain, corpus, corpus_tokens.get("tokens")) if plain else []
    chat_report = None
    if "chat" in tasks:
        chat_measurements = [m for m in measurements if m.task == "chat"]
        print("\nchat: conversion with chat rendering vs the tokenizer alone")
        chat_summaries = print_report(chat_measurements, corpora["chat"], corpus_tokens.get("chat"))
        chat_report = {
            "corpus": {
                "path": str(corpora["chat"].path.relative_to(ROOT)),
                "num_docs": corpora["chat"].num_docs,
                "input_bytes": corpora["chat"].input_bytes,
                "num_tokens": corpus_tokens.get("chat"),
            },
            "summaries": [dataclasses.asdict(s) for s in chat_summaries],
        }
    report = {
        "corpus": {
            "path": str(corpus.path.relative_to(ROOT)),
            "files": len(corpus.files),
            "num_docs": corpus.num_docs,
            "input_bytes": corpus.input_bytes,
            "num_tokens": corpus_tokens.get("tokens"),
            "mb": mb,
            "seed": args.seed,
        },
        "num_proc": args.num_proc,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "shard_bytes": SHARD_BYTES,
        "versions": found,
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "chat": chat_report,
        "targets": {
            "text_vs_fastest_peer": TARGET_TEXT_RATIO,
            "tokens_vs_bound": TARGET_TOKEN_RATIO,
        },
    }
    write_results(args.out, report)
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
