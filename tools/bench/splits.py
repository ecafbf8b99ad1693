"""Split exactness: which samples each rank gets from shardloader and its peers in one epoch.

The same 1,003 small documents (unique ids) in 7 uneven shards of ``SHARD_SIZES`` (one input
file per shard, and each system writes one shard, chunk or file per input file) are read with
``WORLD_SIZES`` ranks x ``NUM_WORKERS`` DataLoader workers, one shuffled epoch, by:

- shardloader: ``ShardDataset`` + ``ShardLoader``, policy ``"drop"`` (the default; reads a second
  epoch too, to check that what epoch 0 left out is served in epoch 1) and ``"pad"``;
- mosaic: ``StreamingDataset`` (with ``batch_size``) + torch ``DataLoader``;
- litdata: ``StreamingDataset`` + ``StreamingDataLoader``;
- webdataset: ``WebDataset(nodesplitter=split_by_node)`` (workers: ``split_by_worker``, its
  default) + torch ``DataLoader``;
- hf: ``load_dataset("parquet", streaming=True).shuffle()`` + ``split_dataset_by_node``;
- sampler: a map-style dataset with torch ``DistributedSampler`` (the classic reference).

Each system writes its shards with ``prepare`` of ``tools.bench.peers_stream``, once per input
file (Mosaic: then ``merge_index``; LitData: then ``merge_datasets``, as one ``optimize`` with a
worker per file still packs files together), and its dataset is built with ``make_dataset`` there.
Every (system, world size) runs under ``torch.distributed.run --standalone`` (gloo), ranks as
concurrent processes; each rank writes the document ids it received to JSON, and this parent
computes per rank the sample count, then ids in no rank ("lost"), ids received more than once
("dup"; marked padding is counted apart) and what, if anything, made the counts equal. It exits
non-zero unless shardloader's rows are exact: equal counts, no duplicate, and under ``"drop"``
only ``N % world_size`` ids left out, all of them served in the next epoch.

Measured (mosaicml-streaming 0.13.0, litdata 0.2.76, webdataset 1.0.2, datasets 5.2.0, torch
2.13.0): Mosaic and ``DistributedSampler`` repeat ``W - N % W`` samples, unmarked; LitData's
``StreamingDataLoader`` passes ``batch_size`` to the dataset, which then trims every worker to
whole batches (11 samples dropped on 2 ranks, 19 on 3, not ``N % W``); WebDataset splits whole
shards (621/382 and 573/18/412); HF gives every rank ``N // W`` or one more (502/501).

Run it (about 2.5 minutes on 2 cores)::

    .venv-bench/bin/python -m tools.bench.splits [--out .bench/results-splits.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench.harness import ROOT, format_columns, versions
from tools.bench.peers_stream import make_dataset, prepare
from tools.bench.stream import VERSIONS as STREAM_VERSIONS
from tools.bench.stream.prepare import job_env as stream_job_env

SHARD_SIZES = (300, 17, 200, 153, 1, 212, 120)
NUM_SAMPLES = sum(SHARD_SIZES)
WORLD_SIZES = (2, 3)
NUM_WORKERS = 2
BATCH_SIZE = 8
SEED = 0
SHARDLOADER_EPOCHS = 2  # epoch 1 shows where epoch 0's left-out ids went
SYSTEMS = ("shardloader", "shardloader-pad", "mosaic", "litdata", "webdataset", "hf", "sampler")
SPLITS_DIR = ROOT / ".bench" / "splits"
TIMEOUT_S = 180


def doc_id(index: int) -> str:
    """The id of document ``index``; WebDataset keys may hold no dots."""
    return f"doc-{index:05d}"


def write_corpus(corpus: Path) -> list[Path]:
    """``SHARD_SIZES`` documents per JSONL file, with unique ids and varied lengths."""
    corpus.mkdir(parents=True, exist_ok=True)
    paths = []
    index = 0
    for file_index, size in enumerate(SHARD_SIZES):
        path = corpus / f"part-{file_index}.jsonl"
        with path.open("w") as out:
            for _ in range(size):
                text = f"document {index}: " + "words " * (1 + index * 7919 % 97)
                out.write(json.dumps({"id": doc_id(index), "text": text}) + "\n")
                index += 1
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Writing each system's shards (subprocess: `python -m tools.bench.splits prepare SYSTEM`)


def _peer_spec(system: str, output: Path, inputs: list[Path]) -> dict[str, Any]:
    return {
        "system": system,
        "task": "text",
        "output": str(output),
        "inputs": [str(p) for p in inputs],
        "shard_bytes": 1 << 26,  # larger than any input file: one shard per file
        "num_proc": 1,
    }


def prepare_system(system: str, corpus: list[Path], out: Path) -> None:
    """Write ``system``'s shards of the corpus into ``out``, one shard per input file."""
    if system.startswith("shardloader"):
        from shardloader import ConvertConfig, convert

        config = ConvertConfig(output=str(out), task_bytes=1, num_proc=1, progress=False)
        convert([str(p) for p in corpus], config)  # task_bytes=1: a task (shard) per file
    elif system in ("mosaic", "litdata", "webdataset", "hf"):
        # One optimize run per file: a single run with a worker per file still packs files
        # together (litdata 0.2.76: chunks of 883 and 120 samples).
        parts = out.with_name(out.name + "-parts") if system == "litdata" else out
        for index, path in enumerate(corpus):
            prepare(_peer_spec(system, parts / f"part-{index}", [path]))
        if system == "mosaic":  # one dataset of the per-file partitions, as Mosaic documents
            from streaming.base.util import merge_index

            merge_index(str(out), keep_local=True)
        elif system == "litdata":
            from litdata import merge_datasets

            merge_datasets([str(parts / f"part-{i}") for i in range(len(corpus))], str(out))
    # sampler: reads the JSONL files themselves


def shard_sizes(system: str, out: Path) -> list[int]:
    """Samples per shard, chunk or file, from what ``system`` wrote (sorted)."""
    if system.startswith("shardloader"):
        from shardloader import read_manifest

        return sorted(read_manifest(str(out)).shards.column("num_samples"))
    if system == "mosaic":
        return sorted(s["samples"] for s in json.loads((out / "index.json").read_text())["shards"])
    if system == "litdata":
        chunks = json.loads((out / "index.json").read_text())["chunks"]
        return sorted(chunk["chunk_size"] for chunk in chunks)
    if system == "webdataset":
        import tarfile

        return sorted(
            len({Path(n).stem for n in tarfile.open(p).getnames()})
            for p in out.glob("part-*/*.tar")
        )
    if system == "hf":
        import pyarrow.parquet as pq

        return sorted(pq.read_metadata(p).num_rows for p in out.glob("part-*/*.parquet"))
    return sorted(SHARD_SIZES)


# --------------------------------------------------------------------------------------------
# One rank (subprocess under torch.distributed.run: `tools.bench.splits rank SYSTEM DATA OUT`)


def collate_ids(samples: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """(document id, is marked padding) of each sample of a batch."""
    return [(sample["id"], bool(sample.get("is_padding", False))) for sample in samples]


class JsonlDocs:
    """Map-style dataset of the corpus's documents, for ``DistributedSampler``."""

    def __init__(self, paths: list[Path]) -> None:
        self.docs = [json.loads(line) for p in paths for line in p.open()]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.docs[index]


def make_loader(system: str, data: Path, cache_dir: Path, rank: int, world_size: int) -> Any:
    """``system``'s dataset over ``data`` in the loader its documentation pairs it with."""
    from torch.utils.data import DataLoader, DistributedSampler

    options: dict[str, Any] = {
        "batch_size": BATCH_SIZE,
        "num_workers": NUM_WORKERS,
        "collate_fn": collate_ids,
    }
    if system == "sampler":
        docs = JsonlDocs(sorted(data.glob("part-*.jsonl")))
        sampler = DistributedSampler(docs, shuffle=True, seed=SEED)  # drop_last=False
        return DataLoader(docs, sampler=sampler, **options)
    if system.startswith("shardloader"):
        from shardloader import ShardDataset, ShardLoader, StreamConfig

        policy = "pad" if system == "shardloader-pad" else "drop"
        dataset = ShardDataset(str(data), config=StreamConfig(seed=SEED, policy=policy))
        return ShardLoader(dataset, **options)
    files = sorted(str(p.relative_to(data)) for p in data.glob("part-*/*") if p.is_file())
    spec = {
        "system": system,
        "task": "text",
        "url": str(data),
        "source": "local",
        "seed": SEED,
        "batch_size": BATCH_SIZE,
        "cache_dir": str(cache_dir),  # shared by the ranks of a node, as Mosaic expects
        "mosaic_predownload": 2048,
        "shuffle_buffer": 1000,
        "files": files,
    }
    dataset = make_dataset(spec)
    if system == "webdataset":
        dataset = dataset.map(lambda sample: {"id": sample["id"]})
    if system == "hf":
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if system == "litdata":
        from litdata import StreamingDataLoader

        return StreamingDataLoader(dataset, **options)
    return DataLoader(dataset, **options)


def run_rank(system: str, data: Path, out: Path) -> None:
    """Read one epoch (shardloader: two) on this rank; write the ids to ``out/rank<R>.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        loader = make_loader(system, data, out / "cache", rank, world_size)
        epochs = SHARDLOADER_EPOCHS if system == "shardloader" else 1
        ids = [[item for batch in loader for item in batch] for _ in range(epochs)]
        (out / f"rank{rank}.json").write_text(json.dumps(ids))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The parent


def job_env(system: str) -> dict[str, str]:
    """Environment of a subprocess: the stream benchmark's, this checkout's shardloader first."""
    env = stream_job_env(system)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_logged(args: list[str], system: str, log: Path) -> tuple[int, float]:
    """Run ``args`` with ``system``'s environment, output to ``log``; (exit code, seconds)."""
    started = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=job_env(system),
                cwd=ROOT,
                timeout=TIMEOUT_S,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
    return code, time.perf_counter() - started


def analyze(ranks: list[list[list[Any]]], world_size: int) -> dict[str, Any]:
    """Counts, lost and duplicated ids of epoch 0, and how the counts were made equal."""
    expected = {doc_id(i) for i in range(NUM_SAMPLES)}
    epoch0 = [ids[0] for ids in ranks]
    counts = [len(ids) for ids in epoch0]
    seen = collections.Counter(i for ids in epoch0 for i, padding in ids if not padding)
    num_padding = sum(padding for ids in epoch0 for _, padding in ids)
    lost = sorted(expected - set(seen))
    duplicated = {i: n for i, n in seen.items() if n > 1}
    num_extra = sum(n - 1 for n in duplicated.values())
    equal = len(set(counts)) == 1
    if not equal:
        how = "nothing"
    elif num_padding:
        how = "pad (marked)"
    else:
        how = {(0, 0): "exact", (1, 0): "repeat", (0, 1): "drop"}.get(
            (bool(num_extra), bool(lost)), "repeat+drop"
        )
    result: dict[str, Any] = {
        "counts": counts,
        "equal": equal,
        "how": how,
        "lost": lost,
        "duplicated": duplicated,
        "num_extra_copies": num_extra,
        "num_padding": num_padding,
        "unknown": sorted(set(seen) - expected),
    }
    if len(ranks[0]) > 1:  # was each id left out of epoch 0 served in epoch 1?
        epoch1 = collections.Counter(i for ids in ranks for i, _ in ids[1])
        result["lost_served_next_epoch"] = all(epoch1[i] for i in lost)
        if lost and result["lost_served_next_epoch"] and how == "drop":
            result["how"] = "drop, served in epoch 1"
        result["expected_left_out"] = NUM_SAMPLES % world_size
    return result


def check_shardloader(system: str, row: dict[str, Any]) -> list[str]:
    """What is wrong with a shardloader row (empty if exact)."""
    problems = []
    if not row["equal"]:
        problems.append(f"unequal counts {row['counts']}")
    if row["num_extra_copies"] or row["unknown"]:
        problems.append(f"duplicated {row['duplicated']} unknown {row['unknown']}")
    if system == "shardloader":  # policy "drop": N % world_size left out, served next epoch
        if len(row["lost"]) != row["expected_left_out"] or not row["lost_served_next_epoch"]:
            problems.append(f"left out {row['lost']}, not carried into epoch 1")
    elif row["lost"]:
        problems.append(f"lost {row['lost']}")
    return problems


def _some(ids: list[str] | dict[str, int]) -> str:
    """How many ids, and the first two."""
    if not ids:
        return "0"
    return f"{len(ids)} ({', '.join(list(ids)[:2])}{', ...' if len(ids) > 2 else ''})"


def format_table(rows: list[dict[str, Any]]) -> str:
    """system x world size: per-rank counts, lost, duplicated, equal, how."""
    header = ("system", "ranks x workers", "samples per rank", "lost", "dup", "equal", "how")
    lines = [
        (
            r["system"],
            f"{r['world_size']} x {NUM_WORKERS}",
            "/".join(map(str, r["counts"])) if "counts" in r else "FAILED",
            _some(r.get("lost", [])),
            _some(r.get("duplicated", {})),
            "yes" if r.get("equal") else "NO",
            r.get("how", r.get("error", "")),
        )
        for r in rows
    ]
    return format_columns(header, lines)


MODULE = "tools.bench.splits"  # run as `python -m`, from the repository root


def run_system(system: str, corpus: Path) -> list[dict[str, Any]]:
    """Prepare one system's shards (once), then run it at every world size: one row each."""
    name = "shardloader" if system.startswith("shardloader") else system  # one copy
    data = corpus if system == "sampler" else SPLITS_DIR / "data" / name
    log = SPLITS_DIR / f"prepare-{name}.log"
    code = 0
    if not data.exists():
        prepare_args = [sys.executable, "-m", MODULE, "prepare", system, str(corpus), str(data)]
        code, _ = run_logged(prepare_args, system, log)
    sizes = shard_sizes(system, data) if code == 0 else []
    if sizes != sorted(SHARD_SIZES):
        error = f"prepare failed (exit {code}, shards {sizes}); see {log}"
        return [{"system": system, "world_size": w, "error": error} for w in WORLD_SIZES]
    rows: list[dict[str, Any]] = []
    for world_size in WORLD_SIZES:
        out = SPLITS_DIR / "runs" / f"{system}-w{world_size}"
        out.mkdir(parents=True)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launch += [
            f"--nproc_per_node={world_size}",
            "--module",
            MODULE,
            "rank",
            system,
            str(data),
            str(out),
        ]
        code, wall_s = run_logged(launch, system, out / "run.log")
        row: dict[str, Any] = {"system": system, "world_size": world_size, "wall_s": wall_s}
        paths = [out / f"rank{r}.json" for r in range(world_size)]
        if code != 0 or not all(p.exists() for p in paths):
            row["error"] = f"exit {code}; see {out / 'run.log'}"
        else:
            row.update(analyze([json.loads(p.read_text()) for p in paths], world_size))
        rows.append(row)
        print(f"  {system} {world_size}x{NUM_WORKERS}: {wall_s:.1f} s", flush=True)
    return rows


def shardloader_failures(rows: list[dict[str, Any]]) -> list[str]:
    """What is not exact in shardloader's rows, one line per problem."""
    failures = []
    for row in rows:
        if row["system"].startswith("shardloader"):
            problems = [row["error"]] if "error" in row else check_shardloader(row["system"], row)
            failures += [f"{row['system']} {row['world_size']} ranks: {p}" for p in problems]
    return failures


def main(argv: list[str] | None = None) -> int:
    """Prepare every system's shards, run each (system, world size), print and save the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        _, system, corpus, out = argv
        prepare_system(system, sorted(Path(corpus).glob("part-*.jsonl")), Path(out))
        return 0
    if argv and argv[0] == "rank":
        _, system, data, out = argv
        run_rank(system, Path(data), Path(out))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "results-splits.json")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")

    started = time.perf_counter()
    shutil.rmtree(SPLITS_DIR, ignore_errors=True)
    corpus = SPLITS_DIR / "corpus"
    write_corpus(corpus)
    rows: list[dict[str, Any]] = []
    for system in systems:
        rows += run_system(system, corpus)

    print(
        f"\n{NUM_SAMPLES} docs in shards of {SHARD_SIZES}; batch_size {BATCH_SIZE}; "
        "one shuffled epoch; lost: in no rank; dup: ids received more than once"
    )
    print(format_table(rows))
    failures = shardloader_failures(rows)
    found = versions(sys.executable, STREAM_VERSIONS)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    report = {
        "versions": found,
        "shard_sizes": SHARD_SIZES,
        "num_samples": NUM_SAMPLES,
        "num_workers": NUM_WORKERS,
        "batch_size": BATCH_SIZE,
        "seed": SEED,
        "rows": rows,
        "shardloader_failures": failures,
        "total_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['total_s']:.0f} s)")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
