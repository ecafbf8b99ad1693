"""Convert a Hugging Face ``datasets`` object held in memory: plan its tasks, run one task.

`shardloader.convert` hands a `datasets.Dataset` or `datasets.IterableDataset` here instead of
listing files. The rest of a conversion is the same: the same shards, completion records, resume,
lock and manifest (`shardloader.convert`).

- A `datasets.Dataset` knows its row count, so it is cut into tasks of consecutive row ranges of
  about ``task_bytes`` (estimated from the Arrow table's size), read in bounded batches
  (`shardloader.sources.hf`). Where workers fork, the tasks run on the process pool and each
  worker inherits the dataset (its Arrow memory is mapped or shared, nothing is pickled);
  elsewhere they run in this process.
- A `datasets.IterableDataset` has no random access: it is one task, read once, in this process.

The plan's fingerprint covers the dataset's own fingerprint (``Dataset._fingerprint``, which
changes with its data and transforms) and row count, so a rerun resumes a killed conversion of
the same dataset. An `IterableDataset` has no such fingerprint: each run gets a fresh one, so a
rerun into a finished output asks for ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardloader.convert_config import ConvertConfig
from shardloader.convert_plan import fingerprint, plan_settings
from shardloader.convert_task import (
    FileDone,
    Throttle,
    open_task_output,
    record_name,
    task_record,
    write_documents,
)
from shardloader.errors import CorpusError
from shardloader.sources import detect_schema
from shardloader.sources.hf import first_record, hf_dataset_kind, hf_dataset_name, read_hf_documents
from shardloader.sources.records import BadRecords
from shardloader.storage import InputFile, write_file

log = logging.getLogger("shardloader.convert")


@dataclass(frozen=True)
class DatasetTask:
    """Rows ``[start, stop)`` of the dataset being converted (``stop=None``: all of an iterable).

    ``files`` is empty: the pool's progress bar then counts without a total.
    """

    index: int
    start: int
    stop: int | None
    files: tuple[InputFile, ...] = ()


def make_dataset_plan(config: ConvertConfig, dataset: Any) -> tuple[dict[str, Any], list[Any]]:
    """The work plan (with its ``fingerprint``) and the tasks of converting ``dataset``.

    Raises:
        CorpusError: The dataset has no rows.
        ConfigError: Settings that do not go with its records.
    """
    kind = hf_dataset_kind(dataset)
    name = hf_dataset_name(dataset)
    schema = config.schema
    if schema == "auto":  # the first row decides, as a file's first record does
        first = first_record(dataset)
        if first is None:
            raise CorpusError(f"{name}: holds no rows; nothing to convert")
        schema = detect_schema(first, config.text_field)
    settings, info = plan_settings(config, schema)
    tasks: list[DatasetTask]
    if kind == "map":
        num_rows = len(dataset)
        if not num_rows:
            raise CorpusError(f"{name}: holds no rows; nothing to convert")
        nbytes = max(1, int(getattr(dataset.data, "nbytes", 0) or 0))
        rows_per_task = max(1, min(num_rows, num_rows * config.task_bytes // nbytes))
        tasks = [
            DatasetTask(i, start, min(start + rows_per_task, num_rows))
            for i, start in enumerate(range(0, num_rows, rows_per_task))
        ]
        identity: list[Any] = [name, getattr(dataset, "_fingerprint", None), num_rows]
    else:
        tasks = [DatasetTask(0, 0, None)]
        identity = [name, uuid.uuid4().hex, None]  # unknowable contents: never "already done"
    plan: dict[str, Any] = {
        "version": 1,
        "settings": settings,
        "tokenizer": info.to_dict() if info else None,
        "token_dtype": info.dtype if info else None,
        "sources": [identity],
        "tasks": [[t.start, t.stop] for t in tasks],
    }
    plan["fingerprint"] = fingerprint(plan)
    return plan, tasks


def run_dataset_task(
    task: DatasetTask,
    config: ConvertConfig,
    settings_fingerprint: str,
    dataset: Any,
    report: Callable[[int, int], None] = lambda docs, nbytes: None,
) -> dict[str, Any]:
    """Convert one task's rows of ``dataset`` into shards and write its completion record.

    The same shards and record as `shardloader.convert_task.run_task` writes for files; the
    record's ``sources`` entry names the rows (``Dataset: rows 0-999``).

    Raises:
        CorpusError: A bad record (with ``on_bad_record="raise"``).
        StorageError: Writing a shard or the record failed.
    """
    # convert() passes the plan's shape
    out, (tokenizer, renderer, series, spec) = open_task_output(config, task.index, config.schema)
    bad = BadRecords(config.on_bad_record)
    progress = Throttle(report)
    stats: Counter[str] = Counter()
    docs = read_hf_documents(
        dataset,
        task.start,
        task.stop,
        spec=spec,
        bad=bad,
        stats=stats,
        max_record_bytes=config.max_record_bytes,
    )
    try:
        num_docs, text_bytes = write_documents(
            docs, series, progress, config=config, tokenizer=tokenizer, renderer=renderer, bad=bad
        )
        shards = series.close()
    except BaseException:
        series.abort()
        raise
    progress.add(0, stats["bytes"] - text_bytes)
    progress.flush()
    rows = f"rows {task.start}-{task.stop - 1}" if task.stop is not None else "all rows"
    entry = {
        "url": f"{hf_dataset_name(dataset)}: {rows}",
        "num_bytes": stats["bytes"],
        "num_records": stats["records"],
        "num_skipped": bad.total,
        "num_blank_lines": 0,
    }
    done = [FileDone(entry, num_docs, stats["bytes"])]
    record = task_record(task.index, settings_fingerprint, shards, series.blocks, done, bad)
    write_file(out, record_name(task.index), json.dumps(record, indent=1).encode())
    out.close()
    return record
