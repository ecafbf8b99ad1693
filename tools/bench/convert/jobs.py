"""One conversion job, run in its own subprocess: ``python -m tools.bench.convert.jobs INPUTS...``.

Each system's writer (or the tokenizer-alone bound) over the input files with ``--num-proc``
processes; the result (job seconds, samples, tokens) goes to ``--result`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tools.bench.convert import BOUNDS, ENCODE_BATCH_DOCS, SHARD_BYTES, SHARDLOADER_SYSTEMS
from tools.bench.convert.chat import contents
from tools.bench.harness import EOS_TOKEN


def split_files(files: Sequence[str], num_parts: int) -> list[list[str]]:
    """Split files into ``num_parts`` groups of about equal bytes (largest first, greedy)."""
    groups: list[list[str]] = [[] for _ in range(min(num_parts, len(files)))]
    sizes = [0] * len(groups)
    for path in sorted(files, key=lambda f: (-os.path.getsize(f), f)):
        smallest = sizes.index(min(sizes))
        groups[smallest].append(path)
        sizes[smallest] += os.path.getsize(path)
    return [sorted(group) for group in groups]


def read_records(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Parse every JSON line of ``paths``, in order."""
    for path in paths:
        with open(path, "rb") as lines:
            for line in lines:
                yield json.loads(line)


def read_batches(paths: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
    """Records of ``paths`` in lists of ``ENCODE_BATCH_DOCS``."""
    batch: list[dict[str, Any]] = []
    for record in read_records(paths):
        batch.append(record)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def load_encoder(tokenizer_path: str, method: str = "fast") -> tuple[Callable[..., Any], int]:
    """Return (batch encoder, EOS id); ``method`` is ``"fast"`` or ``"encode_batch"``."""
    from tokenizers import Tokenizer

    if Path(tokenizer_path).is_dir():  # the chat case's tokenizer directory
        tokenizer_path = str(Path(tokenizer_path) / "tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"{tokenizer_path}: no {EOS_TOKEN} token")
    encode: Callable[..., Any] = tokenizer.encode_batch
    if method == "fast":
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode, eos_id


def _bound_worker(args: tuple[list[str], str, str, str]) -> tuple[int, int]:
    paths, tokenizer_path, method, task = args
    encode, _ = load_encoder(tokenizer_path, method)
    text_of = contents if task == "chat" else (lambda record: record["text"])
    num_docs = num_tokens = 0
    for batch in read_batches(paths):
        encodings = encode([text_of(record) for record in batch], add_special_tokens=False)
        num_tokens += sum(len(encoding.ids) for encoding in encodings)
        num_docs += len(batch)
    return num_docs, num_tokens


def _wds_worker(args: tuple[int, list[str], str]) -> int:
    import webdataset as wds

    rank, paths, output = args
    num_docs = 0
    pattern = os.path.join(output, f"shard-{rank:03d}-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=SHARD_BYTES, verbose=0) as sink:
        for record in read_records(paths):
            sink.write({"__key__": record["id"], "txt": record["text"]})
            num_docs += 1
    return num_docs


def _mds_worker(args: tuple[int, list[str], str, str | None]) -> tuple[int, int]:
    import numpy as np
    from streaming import MDSWriter

    rank, paths, output, tokenizer_path = args
    num_docs = num_tokens = 0
    out = os.path.join(output, f"{rank:03d}")
    if tokenizer_path is None:
        columns = {"id": "str", "text": "str"}
        writer = MDSWriter(out=out, columns=columns, compression="zstd", size_limit=SHARD_BYTES)
        with writer as sink:
            for record in read_records(paths):
                sink.write({"id": record["id"], "text": record["text"]})
                num_docs += 1
        return num_docs, 0
    encode, eos_id = load_encoder(tokenizer_path)
    columns = {"id": "str", "tokens": "ndarray:uint16"}
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=SHARD_BYTES) as sink:
        for batch in read_batches(paths):
            encodings = encode([record["text"] for record in batch], add_special_tokens=False)
            for record, encoding in zip(batch, encodings, strict=True):
                tokens = np.array([*encoding.ids, eos_id], dtype=np.uint16)
                sink.write({"id": record["id"], "tokens": tokens})
                num_tokens += tokens.size
            num_docs += len(batch)
    return num_docs, num_tokens


def litdata_text_fn(path: str) -> Iterator[dict[str, str]]:
    """LitData ``optimize`` fn: one ``{"id", "text"}`` item per document of a JSONL file."""
    for record in read_records([path]):
        yield {"id": record["id"], "text": record["text"]}


_LITDATA_ENCODER: tuple[Callable[..., Any], int] | None = None


def litdata_tokens_fn(path: str) -> Iterator[Any]:
    """LitData ``optimize`` fn: a uint16 token array (EOS appended) per document of a JSONL file."""
    import numpy as np

    global _LITDATA_ENCODER
    if _LITDATA_ENCODER is None:  # once per worker process
        _LITDATA_ENCODER = load_encoder(os.environ["BENCH_TOKENIZER"])
    encode, eos_id = _LITDATA_ENCODER
    for batch in read_batches([path]):
        encodings = encode([record["text"] for record in batch], add_special_tokens=False)
        for encoding in encodings:
            yield np.array([*encoding.ids, eos_id], dtype=np.uint16)


def _pool(num_proc: int) -> Any:
    import multiprocessing

    return multiprocessing.get_context("fork").Pool(num_proc)


def _run_shardloader(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """shardloader (``shardloader-arrow``, ``-tar``, ...): its own CLI, in this process.

    The chat task's tokenizer is a directory with a chat template: conversion renders each
    conversation with it and stores ``input_ids`` plus ``loss_spans``.
    """
    tokens = task in ("tokens", "chat")
    from shardloader.cli import main as shardloader_main

    # Tasks of a quarter of each process's share, so every process has work even on the quick
    # corpus (the peers split the files over the processes, too): a user sets --task-bytes so.
    total = sum(os.path.getsize(path) for path in inputs)
    task_bytes = max(1 << 20, total // (4 * num_proc))
    argv = ["convert", *inputs, "--output", output, "--num-proc", str(num_proc)]
    fmt, extra = SHARDLOADER_SYSTEMS[system]
    argv += ["--format", fmt, "--shard-bytes", str(SHARD_BYTES), *extra]
    # Explicit: tar shards are plain by default since issue 18; the bench keeps measuring zstd
    # for both formats, so results stay comparable with earlier runs.
    argv += ["--compression", "zstd"]
    argv += ["--task-bytes", str(task_bytes)]
    argv += ["--no-progress"] + (["--tokenizer", str(tokenizer)] if tokens else [])
    print("shardloader " + " ".join(argv), flush=True)
    started = time.perf_counter()
    try:
        code = shardloader_main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    job_s = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"shardloader {' '.join(argv)} exited with {code}")
    from shardloader.manifest import read_manifest

    manifest = read_manifest(output)
    num_samples, num_tokens = manifest.num_samples, manifest.num_tokens
    return {"job_s": job_s, "num_samples": num_samples, "num_tokens": num_tokens}


def _run_bound(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """The bounds: tokenize every file on a process pool, write nothing."""
    method = "fast" if system == "bound" else "encode_batch"
    groups = split_files(inputs, num_proc)
    started = time.perf_counter()
    with _pool(num_proc) as pool:
        counts = pool.map(_bound_worker, [(g, str(tokenizer), method, task) for g in groups])
    job_s = time.perf_counter() - started
    return {
        "job_s": job_s,
        "num_samples": sum(c[0] for c in counts),
        "num_tokens": sum(c[1] for c in counts),
    }


def _run_webdataset(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """WebDataset: one ``ShardWriter`` per process."""
    import webdataset  # noqa: F401  (import outside the timed region, like the others)

    groups = split_files(inputs, num_proc)
    os.makedirs(output)
    started = time.perf_counter()
    with _pool(num_proc) as pool:
        counts = pool.map(_wds_worker, [(rank, g, output) for rank, g in enumerate(groups)])
    return {"job_s": time.perf_counter() - started, "num_samples": sum(counts), "num_tokens": 0}


def _run_mosaic(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """Mosaic: one ``MDSWriter`` per process, then ``merge_index``."""
    tokens = task == "tokens"
    from streaming.base.util import merge_index

    groups = split_files(inputs, num_proc)
    tok = str(tokenizer) if tokens else None
    os.makedirs(output)
    started = time.perf_counter()
    jobs = [(rank, group, output, tok) for rank, group in enumerate(groups)]
    with _pool(num_proc) as pool:
        counts = pool.map(_mds_worker, jobs)
    merge_index(output, keep_local=True)
    job_s = time.perf_counter() - started
    index = json.loads(Path(output, "index.json").read_text())
    num_samples = sum(shard["samples"] for shard in index["shards"])
    return {"job_s": job_s, "num_samples": num_samples, "num_tokens": sum(c[1] for c in counts)}


def _run_litdata(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """LitData: ``optimize`` with a worker per process."""
    tokens = task == "tokens"
    from litdata import TokensLoader, optimize

    options: dict[str, Any] = {
        "inputs": list(inputs),
        "output_dir": output,
        "num_workers": num_proc,
        "chunk_bytes": SHARD_BYTES,
        "compression": "zstd",
        "reorder_files": False,
        "verbose": False,
    }
    if tokens:
        os.environ["BENCH_TOKENIZER"] = str(tokenizer)  # read by the spawned workers
        options.update(item_loader=TokensLoader(), compression_level="chunk")
    started = time.perf_counter()
    optimize(fn=litdata_tokens_fn if tokens else litdata_text_fn, **options)
    job_s = time.perf_counter() - started
    index = json.loads(Path(output, "index.json").read_text())
    num_samples = sum(chunk["chunk_size"] for chunk in index["chunks"])
    num_tokens = sum(chunk.get("dim") or 0 for chunk in index["chunks"]) if tokens else 0
    return {"job_s": job_s, "num_samples": num_samples, "num_tokens": num_tokens}


_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "webdataset": _run_webdataset,
    "mosaic": _run_mosaic,
    "litdata": _run_litdata,
}


def run_job(
    system: str, task: str, inputs: list[str], output: str, num_proc: int, tokenizer: str | None
) -> dict[str, Any]:
    """Run one conversion and time it; returns job_s, num_samples, num_tokens."""
    if system.startswith("shardloader"):
        runner = _run_shardloader
    elif system in BOUNDS:
        runner = _run_bound
    elif system in _RUNNERS:
        runner = _RUNNERS[system]
    else:
        raise ValueError(f"unknown system {system!r}")
    return runner(system, task, inputs, output, num_proc, tokenizer)


def job_main(argv: Sequence[str]) -> int:
    """Entry point of a ``_job`` subprocess: run one job, write its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench.convert.jobs")
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--system", required=True)
    parser.add_argument("--task", required=True, choices=["text", "tokens", "chat"])
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-proc", type=int, required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    result = run_job(
        args.system, args.task, args.inputs, args.output, args.num_proc, args.tokenizer
    )
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
