"""Corpus -> shards + manifest: split into tasks, run them on a process pool, skip finished ones.

The algorithm:

1. List the input files (sorted within each pattern) and group consecutive files into tasks of
   about ``task_bytes`` input bytes (`shardloader.convert_plan`). The grouping depends only on the
   inputs and the config, never on the number of processes, so the output is byte-identical for
   any ``num_proc``. A JSONL file of more than ``slice_bytes`` of text is a task of its own, cut
   into slices of whole lines that run as separate jobs (`shardloader.convert_slice`), so one huge
   file uses every core.
2. Each task reads its files in order and writes its own shards, ``shard-{task}-{part}``, closing a
   shard at ``shard_bytes`` of uncompressed payload or ``shard_samples`` samples. Shards are written
   under temporary names and renamed; the task then writes a completion record
   ``_work/task-{task}.json`` (`shardloader.convert_task`, run on a process pool by
   `shardloader.convert_pool`). A rerun skips every task that has a record, so a conversion killed
   with ``kill -9`` resumes and ends byte-identical to an uninterrupted run.
3. When every task has a record, the manifest is assembled from the records in task order and
   published last (``_manifest.json``): a manifest exists only when the conversion finished.

Jobs run on a local process pool or, with ``executor="ray"``, as Ray tasks
(`shardloader.convert_executor`); both write the same shards and records.

``num_tasks``/``task_index`` give a machine its slice of the tasks (``task % num_tasks ==
task_index``); every slice writes into the same output, and ``merge`` writes the manifest.

Safety: a run holds ``_work/lock`` (``_work/lock-{task_index}`` for a slice), an ``flock`` that
the kernel drops when the run dies, so a second run into the same output fails at once and names
the first one's pid and host (`shardloader.storage.lock_output`). Temporary names carry the
writer's pid. An input folder that holds the output is read without it (and the log says how many
files were left out); an input inside the output is refused. Failed writes (full disk, read-only
output, a file where the output directory should be) raise a `StorageError` that names the file
and what to do.

Cost: reading JSON and writing shards is a few hundred MB/s per process; with a tokenizer, the
tokenizer dominates (``python -m tools.bench.convert``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shardloader._version import __version__
from shardloader.convert_config import ConvertConfig
from shardloader.convert_hf import DatasetTask, make_dataset_plan
from shardloader.convert_plan import Task, make_plan, plan_tasks
from shardloader.convert_pool import pool_start_method, run_tasks
from shardloader.convert_task import WORK_DIR, record_name, run_task, shard_fields
from shardloader.errors import ConfigError, ManifestError
from shardloader.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    manifest_files,
    parse_manifest,
    shards_with_ids,
)
from shardloader.sources.hf import hf_dataset_kind
from shardloader.storage import OutputDir, lock_output, unlock_output, write_file, writing

__all__ = [
    "ConvertConfig",
    "ConvertResult",
    "Task",
    "convert",
    "merge",
    "plan_tasks",
    "pool_start_method",
    "run_task",
]

log = logging.getLogger(__name__)

PLAN_NAME = f"{WORK_DIR}/plan.json"
LOCK_NAME = f"{WORK_DIR}/lock"


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did (the CLI prints it).

    Attributes:
        output: Where the dataset is.
        manifest: The manifest, or ``None`` when this slice finished but others have not.
        num_docs: Documents written by the tasks this run executed.
        num_input_bytes: Uncompressed input bytes read by those tasks.
        num_output_bytes: Shard bytes written by those tasks.
        num_tokens: Tokens written by those tasks.
        skipped: Skipped records by kind, in the tasks this run executed.
        tasks_run: Tasks executed now.
        tasks_skipped: Tasks found already finished.
        tasks_total: All tasks of the conversion.
        wall_s: Wall time of this run.
    """

    output: str
    manifest: Manifest | None
    num_docs: int
    num_input_bytes: int
    num_output_bytes: int
    num_tokens: int
    skipped: Mapping[str, int]
    tasks_run: int
    tasks_skipped: int
    tasks_total: int
    wall_s: float
    skipped_examples: tuple[str, ...] = ()


def _check_output(out: OutputDir, plan: dict[str, Any], config: ConvertConfig) -> Manifest | None:
    """Make sure ``out`` is empty or holds this same conversion; return its manifest if done."""
    if out.exists(MANIFEST_NAME):
        existing = parse_manifest(
            out.read_bytes(MANIFEST_NAME),
            where=out.url_of(MANIFEST_NAME),
            read_file=out.read_bytes,
        )
        if existing.config.get("plan_fingerprint") == plan["fingerprint"]:
            return existing
        if not config.overwrite:
            raise ConfigError(
                f"{out.url}: already holds another dataset ({existing.num_samples} samples, "
                f"{len(existing.shards)} shards, different inputs or settings); choose another "
                "output or pass --overwrite"
            )
        _clear(out)
        return None
    if out.exists(PLAN_NAME):
        old = json.loads(out.read_bytes(PLAN_NAME))
        if old.get("fingerprint") == plan["fingerprint"]:
            return None  # resume
        if not _finished_tasks(out, old.get("fingerprint", "")):
            # A run that failed before finishing any task (say, on a bad record the user has
            # since fixed or chosen to skip) leaves nothing worth keeping: start over.
            log.info("%s: replacing an earlier run that finished no task", out.url)
            _clear(out)
            return None
        if not config.overwrite:
            raise ConfigError(
                f"{out.url}: holds an unfinished conversion of other inputs or settings; rerun "
                "that "
                "conversion to finish it, choose another output, or pass --overwrite"
            )
        _clear(out)
        return None
    others = [n for n in out.list() if n != WORK_DIR]
    if others and not config.overwrite:
        raise ConfigError(
            f"{out.url}: is not empty ({len(others)} entries, e.g. {others[0]!r}); choose an empty "
            "or new directory, or pass --overwrite"
        )
    if config.overwrite:
        _clear(out)
    return None


def _clear(out: OutputDir) -> None:
    """Remove what a conversion writes: manifest, shards, work records (not the run's lock)."""
    with writing(out.url):
        out.remove(MANIFEST_NAME)
        for name in out.list(WORK_DIR):
            if not name.startswith(LOCK_NAME.rsplit("/", 1)[1]):
                out.remove(f"{WORK_DIR}/{name}", recursive=True)
        for name in out.list():
            if name.startswith("shard-") and name.endswith((".arrow", ".tar", ".tar.zst")):
                out.remove(name)


def convert(inputs: Sequence[str] | str | Any, config: ConvertConfig) -> ConvertResult:
    """Convert raw corpus files, or a Hugging Face dataset in memory, into shards and a manifest.

    A `datasets.Dataset` or `datasets.IterableDataset` is read in bounded batches, never whole;
    each row is a record as a JSONL line would be (``text_field``, ``id_field``, ``keep_fields``,
    chat shapes, ``on_bad_record``), located as ``Dataset: row N``, and a row without an id gets
    ``Dataset:N``. A `Dataset` is cut into tasks of row ranges that run on the process pool where
    workers fork (each inherits the dataset; nothing is pickled); an `IterableDataset` has no
    random access and is read once, in this process (`shardloader.convert_hf`).

    Args:
        inputs: Files, directories or glob patterns (local paths or fsspec URLs), or a
            `datasets.Dataset` / `datasets.IterableDataset` (one split, not a ``DatasetDict``).
        config: The conversion settings.

    Returns:
        What was done; ``result.manifest`` is ``None`` when this run was one slice of several
        (``num_tasks > 1``) and ``merge`` is still to run.

    Raises:
        CorpusError: Bad input (with ``on_bad_record="raise"``), missing or unreadable files.
        ConfigError: Invalid settings, an output that holds another dataset or that another
            run is writing, or an input inside the output.
        StorageError: Writing the output failed (full disk, read-only, a file in the way).
    """
    start = time.monotonic()
    dataset = inputs if hf_dataset_kind(inputs) else None
    tasks: Sequence[Task] | Sequence[DatasetTask]
    if dataset is not None:
        plan, tasks = make_dataset_plan(config, dataset)
    else:
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        plan, tasks = make_plan(config, inputs)
    out = OutputDir(config.output)
    with writing(out.url):
        out.makedirs()
    # One lock per slice: slices of one conversion may run at once, a slice twice may not.
    lock_name = LOCK_NAME if config.num_tasks == 1 else f"{LOCK_NAME}-{config.task_index}"
    lock_fd = lock_output(out, lock_name)
    try:
        for name in out.clean_dead_tmp():
            log.info("%s: removed %s, left by a run that was killed", out.url, name)
        done = _check_output(out, plan, config)
        if done is not None:
            log.info("%s: this conversion is already complete", out.url)
            return _result(out.url, done, [], 0, len(tasks), len(tasks), time.monotonic() - start)
        write_file(out, PLAN_NAME, json.dumps(plan, indent=1).encode())
        mine = [t for t in tasks if t.index % config.num_tasks == config.task_index]
        finished = set(_finished_tasks(out, plan["fingerprint"]))
        todo = [t for t in mine if t.index not in finished]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d tasks already done", len(mine) - len(todo), len(mine))
        num_proc = config.num_proc or _available_cpus()
        # Every task reads records of the shape the plan found ("auto" resolved once).
        task_config = replace(config, schema=plan["settings"]["schema"])
        records = run_tasks(
            todo,
            task_config,
            plan["fingerprint"],
            num_proc,
            start_method=pool_start_method(),
            lock_fd=lock_fd,
            dataset=dataset,
        )
        manifest = None
        if config.num_tasks == 1:
            manifest = _write_manifest(out, plan)
    finally:
        unlock_output(out, lock_name, lock_fd)
        out.close()
    return _result(
        out.url,
        manifest,
        records,
        len(todo),
        len(mine) - len(todo),
        len(tasks),
        time.monotonic() - start,
    )


def _available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _finished_tasks(out: OutputDir, fingerprint: str) -> list[int]:
    done = []
    for name in out.list(WORK_DIR):
        if name.startswith("task-") and name.endswith(".json"):
            record = json.loads(out.read_bytes(f"{WORK_DIR}/{name}"))
            if record.get("settings") == fingerprint:
                done.append(int(record["task"]))
    return done


def _write_manifest(out: OutputDir, plan: Mapping[str, Any]) -> Manifest:
    num_tasks = len(plan["tasks"])
    records = []
    missing = []
    for index in range(num_tasks):
        try:
            record = json.loads(out.read_bytes(record_name(index)))
        except FileNotFoundError:
            missing.append(index)
            continue
        if record.get("settings") != plan["fingerprint"]:
            missing.append(index)
        records.append(record)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ManifestError(
            f"{out.url}: {len(missing)} of {num_tasks} tasks are not finished (tasks {shown}); "
            "run the slices that own them (task % num_tasks == task_index), then merge again"
        )
    entries = [dict(s) for r in records for s in r["shards"]]
    # A record from before block tables has none: that shard reads as one block.
    blocks = [s.pop("blocks", None) for s in entries]
    shards = shards_with_ids([ShardInfo(**s) for s in entries], blocks=blocks)
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    for r in records:
        skipped.update(r["skipped"])
        examples.extend(r["skipped_examples"])
    settings = dict(plan["settings"])
    fields = shard_fields(
        bool(settings["tokenizer_fingerprint"]),
        settings["keep_fields"],
        settings.get("schema", "text"),
    )
    manifest = Manifest(
        format=settings["format"],
        compression=settings["compression"],
        fields=fields,
        shards=shards,
        token_dtype=plan["token_dtype"],
        tokenizer=plan["tokenizer"],
        config={**settings, "plan_fingerprint": plan["fingerprint"]},
        sources=tuple(s for r in records for s in r["sources"]),
        skipped=dict(sorted(skipped.items())),
        skipped_examples=tuple(examples[:20]),
        created_by=f"shardloader {__version__}",
    )
    for name, data in manifest_files(manifest):  # a large block table first, in its own file
        write_file(out, name, data)
    return manifest


def merge(output: str) -> Manifest:
    """Write the manifest of a conversion run as several slices into ``output``.

    Raises:
        ManifestError: Some task has not finished yet (the message lists them).
    """
    out = OutputDir(output)
    try:
        plan = json.loads(out.read_bytes(PLAN_NAME))
    except FileNotFoundError as err:
        raise ManifestError(
            f"{out.url}: no conversion plan found ({PLAN_NAME}); run convert into it first"
        ) from err
    manifest = _write_manifest(out, plan)
    out.close()
    return manifest


def _result(
    url: str,
    manifest: Manifest | None,
    records: Sequence[Mapping[str, Any]],
    tasks_run: int,
    tasks_skipped: int,
    tasks_total: int,
    wall_s: float,
) -> ConvertResult:
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    for r in records:
        skipped.update(r["skipped"])
        examples.extend(r["skipped_examples"])
    return ConvertResult(
        output=url,
        manifest=manifest,
        num_docs=sum(r["num_docs"] for r in records),
        num_input_bytes=sum(r["num_input_bytes"] for r in records),
        num_output_bytes=sum(s["num_bytes"] for r in records for s in r["shards"]),
        num_tokens=sum(s["num_tokens"] for r in records for s in r["shards"]),
        skipped=dict(sorted(skipped.items())),
        tasks_run=tasks_run,
        tasks_skipped=tasks_skipped,
        tasks_total=tasks_total,
        wall_s=wall_s,
        skipped_examples=tuple(examples[:20]),
    )
