"""Convert one slice of a big JSONL file, and join a task's slice records into its task record.

A task of one file cut into slices (`shardloader.sources.slices`) runs as one `SliceJob` per
slice: each writes ``shard-{task}-{slice}-{part}`` and its own record
``_work/slice-{task}-{slice}.json``. When every slice of the task has one, `join_slices` writes
the task record ``_work/task-{task}.json`` from them, in slice order, as if one process had
converted the file: the manifest, resume and ``merge`` then see tasks only. A slice's first line
number is known before it starts (the newlines of the slices before it, counted on the pool), so
generated ``file:line`` ids and error locations are the file's own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from shardloader.convert_config import ConvertConfig
from shardloader.convert_task import (
    WORK_DIR,
    FileDone,
    Throttle,
    open_task_output,
    record_name,
    task_record,
    write_documents,
)
from shardloader.sources import (
    FAST_JSONL_MAX_BYTES,
    BadRecords,
    DamagedFileError,
    Document,
    detect_file_schema,
)
from shardloader.sources.jsonl import read_jsonl_chunks
from shardloader.sources.jsonl_table import arrow_schema, jsonl_table_from_bytes
from shardloader.sources.records import FileContext
from shardloader.sources.slices import iter_slice_chunks
from shardloader.sources.streams import CHUNK_BYTES
from shardloader.storage import InputFile, OutputDir, relpath, write_file


@dataclass(frozen=True)
class SliceJob:
    """Slice ``slice_index`` of task ``task_index``, the task of the one big file ``file``.

    Attributes:
        task_index: The task the slice belongs to.
        slice_index: Its place among the task's slices.
        file: The input file.
        start: Stored offset where the slice starts (``bytes`` and ``frames`` splits).
        end: Stored offset where it ends (its last line runs on past it).
        first_line: The file's line number of the slice's first line.
        data: A ``stream`` slice's lines, decompressed by the reader (``None`` otherwise).
        spill: Or the local file that holds them (the job removes it once read): on a local
            pool a file costs fewer copies than a pipe.
        long_line: The length of a ``stream`` slice's last line, left out of ``data`` as longer
            than ``max_record_bytes`` (0: none); reported as ``record_too_large``.
        damage: Where and what, when the file is damaged after this ``stream`` slice's lines:
            raised, or with ``on_bad_record="skip"`` counted as ``damaged_file``.
    """

    task_index: int
    slice_index: int
    file: InputFile
    start: int
    end: int
    first_line: int
    data: bytes | None = None
    spill: str | None = None
    long_line: int = 0
    damage: tuple[str, str] | None = None

    @property
    def index(self) -> int:
        """The task index (the pool's progress and errors speak of tasks)."""
        return self.task_index

    @property
    def files(self) -> tuple[InputFile, ...]:
        """The input file, as a task's files."""
        return (self.file,)


def slice_record_name(task: int, slice_index: int) -> str:
    """The completion record of slice ``slice_index`` of task ``task``, relative to the output."""
    return f"{WORK_DIR}/slice-{task:05d}-{slice_index:05d}.json"


def finished_slices(out: OutputDir, task: int, fingerprint: str) -> dict[int, dict[str, Any]]:
    """The records of task ``task``'s slices that have finished, by slice index."""
    done = {}
    prefix = f"slice-{task:05d}-"
    for name in out.list(WORK_DIR):
        if name.startswith(prefix) and name.endswith(".json"):
            record = json.loads(out.read_bytes(f"{WORK_DIR}/{name}"))
            if record.get("settings") == fingerprint:
                done[int(record["slice"])] = record
    return done


def _pieces(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        yield bytes(view[start : start + CHUNK_BYTES])


def _slice_chunks(job: SliceJob) -> Iterator[bytes]:
    """The slice's lines, read in chunks (never held whole)."""
    if job.data is not None:
        yield from _pieces(job.data)
    elif job.spill is not None:
        with open(job.spill, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
    else:
        yield from iter_slice_chunks(job.file, job.start, job.end, first=job.slice_index == 0)


def _load(job: SliceJob) -> bytes | None:
    """The slice's lines whole, for the fast path; ``None`` past ``FAST_JSONL_MAX_BYTES``."""
    if job.data is not None:
        return job.data
    held: list[bytes] = []
    size = 0
    for chunk in _slice_chunks(job):
        size += len(chunk)
        if size > FAST_JSONL_MAX_BYTES:  # a slice with a huge last line: read it line by line
            return None
        held.append(chunk)
    return b"".join(held)


def _until_damage(docs: Iterator[Document], bad: BadRecords) -> Iterator[Document]:
    """``docs``, ended early by a damaged file where bad records are skipped."""
    try:
        yield from docs
    except DamagedFileError as err:
        if bad.on_bad_record != "skip":
            raise
        bad.report("damaged_file", err.where, err.what + "; the rest of the slice is skipped")


def run_slice(
    job: SliceJob,
    config: ConvertConfig,
    settings_fingerprint: str,
    report: Callable[[int, int], None] = lambda docs, nbytes: None,
) -> dict[str, Any]:
    """Convert one slice into its shards and write its record (`slice_record_name`).

    The slice's lines are parsed whole by pyarrow's JSON reader where clean, else line by line,
    as a whole file would be (`shardloader.convert_task`).

    Returns:
        The slice's record: a task record plus ``slice``.
    """
    schema = config.schema
    if schema == "auto":
        schema = detect_file_schema(job.file, config.text_field, config.max_record_bytes)
    out, writers = open_task_output(config, job.task_index, schema, job.slice_index)
    tokenizer, renderer, series, spec = writers
    bad = BadRecords(config.on_bad_record)
    progress = Throttle(report)
    stats: Counter[str] = Counter()
    name = relpath(job.file.url, job.file.root)
    try:
        try:
            data = _load(job)
        except DamagedFileError as err:
            if bad.on_bad_record != "skip":
                raise
            bad.report("damaged_file", err.where, err.what + "; the rest of the slice is skipped")
            data = b""
        table = None
        if data is not None and arrow_schema(spec) is not None:
            table = jsonl_table_from_bytes(
                data,
                job.file,
                spec=spec,
                stats=stats,
                max_record_bytes=config.max_record_bytes,
                first_line=job.first_line,
            )
        if table is not None and tokenizer is None:
            series.write_table(table)
            num_docs, text_bytes = len(table.sizes), 0
            progress.add(num_docs, 0)
        else:
            file = FileContext(
                url=job.file.url,
                name=name,
                codec="none",
                bad=bad,
                stats=stats,
                max_record_bytes=config.max_record_bytes,
                first_line=job.first_line,
            )
            chunks = _pieces(data) if data is not None else _slice_chunks(job)
            docs: Iterable[Document] = (
                table.documents()
                if table is not None
                else _until_damage(read_jsonl_chunks(chunks, file, spec), bad)
            )
            num_docs, text_bytes = write_documents(
                docs,
                series,
                progress,
                config=config,
                tokenizer=tokenizer,
                renderer=renderer,
                bad=bad,
            )
        if job.long_line:  # the reader measured it instead of holding it
            line_no = job.first_line + stats["records"] + stats["blank_lines"]
            stats["records"] += 1
            stats["bytes"] += job.long_line + 1
            bad.report_too_large(
                f"{job.file.url}:{line_no}", job.long_line, config.max_record_bytes
            )
        if job.damage is not None:  # as `shardloader.sources.read_documents` treats it
            where, what = job.damage
            if bad.on_bad_record != "skip":
                raise DamagedFileError(where, what)
            bad.report("damaged_file", where, what + "; the rest of the file is skipped")
        progress.add(0, stats["bytes"] - text_bytes)
        shards = series.close()
    except BaseException:
        series.abort()
        raise
    finally:
        if job.spill is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(job.spill)
    progress.flush()
    entry = {
        "url": job.file.url,
        "num_bytes": job.file.num_bytes,
        "num_records": stats["records"],
        "num_skipped": bad.total,
        "num_blank_lines": stats["blank_lines"],
    }
    done = [FileDone(entry, num_docs, stats["bytes"])]
    record = task_record(job.task_index, settings_fingerprint, shards, series.blocks, done, bad)
    record["slice"] = job.slice_index
    write_file(out, slice_record_name(job.task_index, job.slice_index), json.dumps(record).encode())
    out.close()
    return record


def join_slices(
    out: OutputDir, task: int, records: Sequence[dict[str, Any]], settings_fingerprint: str
) -> dict[str, Any]:
    """Write task ``task``'s record from its slices' ``records`` (in slice order); return it.

    The one ``sources`` entry adds up the slices' counts, so the manifest reads as if the file
    had been converted whole.
    """
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    for r in records:
        skipped.update(r["skipped"])
        examples.extend(r["skipped_examples"])
    source = dict(records[0]["sources"][0])
    for key in ("num_records", "num_skipped", "num_blank_lines"):
        source[key] = sum(r["sources"][0][key] for r in records)
    record = {
        "task": task,
        "settings": settings_fingerprint,
        "shards": [s for r in records for s in r["shards"]],
        "sources": [source],
        "num_docs": sum(r["num_docs"] for r in records),
        "num_input_bytes": sum(r["num_input_bytes"] for r in records),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples[:20],
        "num_slices": len(records),
    }
    write_file(out, record_name(task), json.dumps(record, indent=1).encode())
    return record
