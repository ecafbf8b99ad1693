"""Corpus -> shards + manifest: split into tasks, run them on a process pool, skip finished ones.

The algorithm:

1. List the input files (sorted within each pattern) and group consecutive files into tasks of
   about ``task_bytes`` input bytes. The grouping depends only on the inputs and the config, never
   on the number of processes, so the output is byte-identical for any ``num_proc``.
2. Each task reads its files in order and writes its own shards, ``shard-{task}-{part}``, closing a
   shard at ``shard_bytes`` of uncompressed payload or ``shard_samples`` samples. Shards are written
   under temporary names and renamed; the task then writes a completion record
   ``_work/task-{task}.json``. A rerun skips every task that has a record, so a conversion killed
   with ``kill -9`` resumes and ends byte-identical to an uninterrupted run.
3. When every task has a record, the manifest is assembled from the records in task order and
   published last (``_manifest.json``): a manifest exists only when the conversion finished.

``num_tasks``/``task_index`` give a machine its slice of the tasks (``task % num_tasks ==
task_index``); every slice writes into the same output, and ``merge`` writes the manifest.

Safety: a run holds ``_work/lock`` (``_work/lock-{task_index}`` for a slice), an ``flock`` that
the kernel drops when the run dies, so a second run into the same output fails at once and names
the first one's pid and host. Temporary names carry the writer's pid. An input folder that holds
the output is read without it (and the log says how many files were left out); an input inside
the output is refused. Failed writes (full disk, read-only output, a file where the output
directory should be) raise a `StorageError` that names the file and what to do.

Cost: reading JSON and writing shards is a few hundred MB/s per process; with a tokenizer, the
tokenizer dominates (``tools/bench_convert.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from shardloader import storage
from shardloader._version import __version__
from shardloader.errors import ConfigError, CorpusError, ManifestError, ShardloaderError
from shardloader.formats import COMPRESSIONS
from shardloader.formats.series import ShardSeries, write_error
from shardloader.manifest import (
    FORMATS,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    manifest_to_json,
    parse_manifest,
    shards_with_ids,
)
from shardloader.options import option, parse_size
from shardloader.sources import (
    MAX_RECORD_BYTES,
    ON_BAD_RECORD,
    BadRecords,
    Document,
    RecordSpec,
    kind_of,
    parse_keep_fields,
    read_documents,
    read_jsonl_table,
)
from shardloader.storage import InputFile, OutputDir
from shardloader.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MiB = 1 << 20
WORK_DIR = "_work"
PLAN_NAME = f"{WORK_DIR}/plan.json"
LOCK_NAME = f"{WORK_DIR}/lock"
TOKENIZE_BATCH_DOCS = 1024
TOKENIZE_BATCH_BYTES = 4 * MiB
PROGRESS_EVERY_S = 0.25


def _none_if_empty(text: str) -> str | None:
    return text or None


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Settings of a conversion: where the shards go, their format and limits, the tokenizer.

    Every field is also a ``shardloader convert`` flag (``shard_bytes`` -> ``--shard-bytes``,
    sizes like ``64MB``), declared with `shardloader.options.option`; the help text is in the
    field. `output_settings` are the fields that shape the output; the manifest records them.
    """

    output: str = option(
        help="output directory or URL (an input folder that holds it is read without it)",
        flags=("-o", "--output"),
    )
    format: str = option(
        "arrow", "shard format: Arrow IPC files or WebDataset tar", choices=FORMATS
    )
    compression: str = option(
        "zstd", "zstd (Arrow: per record batch; tar: .tar.zst) or none", choices=COMPRESSIONS
    )
    # 2 compresses text about twice as fast as 3 here for ~4% more bytes, and decompresses
    # faster (tools/bench_convert.py).
    compression_level: int = option(2, "zstd level, -7 to 22")
    shard_bytes: int = option(
        128 * MiB, "close a shard at this many uncompressed payload bytes", parse=parse_size
    )
    shard_samples: int | None = option(None, "close a shard at this many samples")
    batch_bytes: int = option(4 * MiB, "Arrow record batch size, uncompressed", parse=parse_size)
    task_bytes: int = option(
        64 * MiB, "group input files into tasks of about this many (stored) bytes", parse=parse_size
    )
    text_field: str = option("text", "field (or Parquet column) holding the text")
    id_field: str | None = option(
        "id",
        "field with the document id; ids are made from file:line where missing "
        "(pass '' to always make them)",
        parse=_none_if_empty,
    )
    keep_fields: tuple[str, ...] = option(
        (),
        "comma-separated extra fields to keep, each name or name:type "
        "(string, int64, float64, bool, json)",
    )
    tokenizer: str | None = option(
        None, "tokenizer.json or a local Hugging Face tokenizer directory: store token ids"
    )
    eos_token: str | None = option(None, "override the tokenizer's end-of-document token")
    bos_token: str | None = option(None, "override the tokenizer's beginning-of-document token")
    add_eos: bool = option(
        True, "append EOS to tokenized documents (--no-eos: do not)", negative="--no-eos"
    )
    add_bos: bool = option(False, "prepend BOS to tokenized documents")
    on_bad_record: str = option(
        "raise",
        "raise: stop at the first bad record; skip: count and skip it",
        choices=ON_BAD_RECORD,
    )
    max_record_bytes: int = option(
        MAX_RECORD_BYTES,
        "longest record (JSONL line, Parquet row's strings, text file); a longer one is a bad "
        "record (record_too_large), measured but never held in memory",
        parse=parse_size,
    )
    num_proc: int | None = option(None, "worker processes (default: the CPUs this process may use)")
    num_tasks: int = option(1, "split the conversion into this many independent slices (machines)")
    task_index: int = option(0, "which slice this run converts (0-based)")
    overwrite: bool = option(False, "replace a different dataset already in the output")
    progress: bool | None = option(None, "show a progress bar (default: when stderr is a terminal)")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not known; use one of {FORMATS}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression {self.compression!r}; use one of {COMPRESSIONS}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(f"on_bad_record {self.on_bad_record!r}; use one of {ON_BAD_RECORD}")
        for name in ("shard_bytes", "batch_bytes", "task_bytes", "max_record_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard_samples is not None and self.shard_samples <= 0:
            raise ConfigError(f"shard_samples must be positive, got {self.shard_samples}")
        if self.num_proc is not None and self.num_proc <= 0:
            raise ConfigError(f"num_proc must be positive, got {self.num_proc}")
        if self.num_tasks <= 0 or not 0 <= self.task_index < self.num_tasks:
            raise ConfigError(
                f"task_index must be in [0, num_tasks); got task_index={self.task_index}, "
                f"num_tasks={self.num_tasks}"
            )
        if not -7 <= self.compression_level <= 22:
            raise ConfigError(
                f"compression_level must be in [-7, 22], got {self.compression_level}"
            )
        parse_keep_fields(self.keep_fields)  # validates

    def output_settings(self, tokenizer_fingerprint: str | None) -> dict[str, Any]:
        """The settings that shape the output (recorded in the manifest and the work plan)."""
        return {
            "format": self.format,
            "compression": self.compression,
            "compression_level": self.compression_level,
            "shard_bytes": self.shard_bytes,
            "shard_samples": self.shard_samples,
            "batch_bytes": self.batch_bytes,
            "task_bytes": self.task_bytes,
            "text_field": self.text_field,
            "id_field": self.id_field,
            "keep_fields": list(self.keep_fields),
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "add_eos": self.add_eos if tokenizer_fingerprint else None,
            "add_bos": self.add_bos if tokenizer_fingerprint else None,
            "on_bad_record": self.on_bad_record,
        }


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


@dataclass(frozen=True)
class Task:
    """A group of consecutive input files converted together into ``shard-{index}-*``."""

    index: int
    files: tuple[InputFile, ...]


def plan_tasks(files: Sequence[InputFile], task_bytes: int) -> list[Task]:
    """Group consecutive files into tasks of at least ``task_bytes`` bytes (the last: any size)."""
    tasks: list[Task] = []
    group: list[InputFile] = []
    size = 0
    for f in files:
        group.append(f)
        size += f.num_bytes
        if size >= task_bytes:
            tasks.append(Task(len(tasks), tuple(group)))
            group, size = [], 0
    if group:
        tasks.append(Task(len(tasks), tuple(group)))
    return tasks


def _fingerprint(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def _record_name(task: int) -> str:
    return f"{WORK_DIR}/task-{task:05d}.json"


def _fields(tokenized: bool, keep_fields: Sequence[str]) -> dict[str, str]:
    payload = {"input_ids": "tokens"} if tokenized else {"text": "string"}
    return {"id": "string", **payload, **parse_keep_fields(tuple(keep_fields))}


# ---- one task ---------------------------------------------------------------------------------


class _Throttle:
    """Passes (documents, input bytes) on to ``report`` at most every ``PROGRESS_EVERY_S``."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self._report = report
        self._docs = self._bytes = 0
        self._last = time.monotonic()

    def add(self, docs: int, nbytes: int) -> None:
        self._docs += docs
        self._bytes += nbytes
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self.flush()
            self._last = now

    def flush(self) -> None:
        self._report(self._docs, self._bytes)
        self._docs = self._bytes = 0


class _FileDone(NamedTuple):
    """What converting one input file did: its ``sources`` entry, documents, input bytes."""

    source: dict[str, Any]
    num_docs: int
    num_bytes: int


def _write_texts(
    docs: Iterable[Document], series: ShardSeries, progress: _Throttle
) -> tuple[int, int]:
    """The line-by-line path: write each document's text; returns (documents, text bytes)."""
    num_docs = num_bytes = 0
    for doc in docs:
        data = doc.text.encode("utf-8")  # sources refused lone surrogates
        series.write(doc.id, data, doc.fields)
        num_docs += 1
        num_bytes += len(data)
        progress.add(1, len(data))
    return num_docs, num_bytes


def _write_tokens(
    docs: Iterable[Document],
    series: ShardSeries,
    progress: _Throttle,
    tokenizer: TextTokenizer,
    config: ConvertConfig,
) -> tuple[int, int]:
    """The tokenize path: encode documents in batches, write their ids; (documents, text bytes)."""
    dtype = tokenizer.info.dtype
    pending: list[Document] = []
    pending_bytes = num_docs = num_bytes = 0

    def flush() -> None:
        ids = tokenizer.encode_batch(
            [d.text for d in pending], add_bos=config.add_bos, add_eos=config.add_eos
        )
        for doc, arr in zip(pending, ids, strict=True):
            series.write(doc.id, arr.astype(dtype), doc.fields)
        pending.clear()

    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        pending.append(doc)
        pending_bytes += size
        num_docs += 1
        num_bytes += size
        if len(pending) >= TOKENIZE_BATCH_DOCS or pending_bytes >= TOKENIZE_BATCH_BYTES:
            flush()
            pending_bytes = 0
        progress.add(1, size)
    if pending:
        flush()
    return num_docs, num_bytes


def _convert_file(
    source: InputFile,
    series: ShardSeries,
    progress: _Throttle,
    *,
    config: ConvertConfig,
    tokenizer: TextTokenizer | None,
    spec: RecordSpec,
    bad: BadRecords,
    fast_jsonl: bool,
) -> _FileDone:
    """Convert one input file by the first path that applies: whole-file JSONL, tokenize, lines."""
    stats = Counter[str]()
    skipped_before = bad.total
    limit = config.max_record_bytes
    table = (
        read_jsonl_table(source, spec=spec, stats=stats, max_record_bytes=limit)
        if fast_jsonl
        else None
    )
    if table is not None and tokenizer is None:  # whole-file JSONL
        series.write_table(table)
        num_docs, text_bytes = len(table.sizes), 0
        progress.add(num_docs, 0)
    else:
        docs: Iterable[Document] = (
            table.documents()
            if table is not None
            else read_documents(source, spec=spec, bad=bad, stats=stats, max_record_bytes=limit)
        )
        if tokenizer is not None:
            num_docs, text_bytes = _write_tokens(docs, series, progress, tokenizer, config)
        else:
            num_docs, text_bytes = _write_texts(docs, series, progress)
    # Progress counted text bytes; settle this file at its raw (JSON) input bytes.
    progress.add(0, stats["bytes"] - text_bytes)
    entry = {
        "url": source.url,
        "num_bytes": source.num_bytes,
        "num_records": stats["records"],
        "num_skipped": bad.total - skipped_before,
        "num_blank_lines": stats["blank_lines"],
    }
    return _FileDone(entry, num_docs, stats["bytes"])


def _task_record(
    task: Task,
    settings_fingerprint: str,
    shards: Sequence[ShardInfo],
    done: Sequence[_FileDone],
    bad: BadRecords,
) -> dict[str, Any]:
    """The completion record of a task (and the log line of what it skipped)."""
    if bad.total:
        log.warning(
            "task %d: skipped %d bad records %s; first at %s",
            task.index,
            bad.total,
            dict(sorted(bad.counts.items())),
            bad.examples[0],
        )
    return {
        "task": task.index,
        "settings": settings_fingerprint,
        "shards": [s._asdict() for s in shards],
        "sources": [d.source for d in done],
        "num_docs": sum(d.num_docs for d in done),
        "num_input_bytes": sum(d.num_bytes for d in done),
        "skipped": dict(sorted(bad.counts.items())),
        "skipped_examples": bad.examples,
    }


def run_task(
    task: Task,
    config: ConvertConfig,
    settings_fingerprint: str,
    report: Callable[[int, int], None] = lambda docs, nbytes: None,
    *,
    fast_jsonl: bool = True,
) -> dict[str, Any]:
    """Convert one task's files into shards and write its completion record.

    Clean JSONL files are parsed whole by pyarrow's JSON reader (``read_jsonl_table``); a file
    with anything unusual goes through the line-by-line reader, which finds and reports it. Both
    paths give the same bytes.

    Args:
        task: The task.
        config: The conversion settings.
        settings_fingerprint: Fingerprint of the output settings, stored in the record.
        report: Called now and then with (documents, input bytes) done since the last call; by the
            end of each file its bytes add up to the uncompressed bytes read from it.
        fast_jsonl: Use the whole-file JSONL reader where it applies (tests turn it off to check
            that both readers give the same output).

    Returns:
        The completion record (as written to ``_work/task-NNNNN.json``).

    Raises:
        StorageError: Writing a shard or the record failed (the file, the reason, a remedy).
    """
    out = OutputDir(config.output)
    with _writing(out.url):
        out.clean_tmp(f"{task.index:05d}-")  # left by a run that died in this task
    tokenizer = (
        TextTokenizer(config.tokenizer, eos_token=config.eos_token, bos_token=config.bos_token)
        if config.tokenizer
        else None
    )
    series = ShardSeries(
        out,
        config,
        task.index,
        _fields(bool(config.tokenizer), config.keep_fields),
        tokenizer.info.dtype if tokenizer else None,
        tmp_prefix=f"{task.index:05d}-{os.getpid()}-",
    )
    spec = RecordSpec(
        text_field=config.text_field,
        id_field=config.id_field,
        keep_fields=parse_keep_fields(config.keep_fields),
    )
    bad = BadRecords(config.on_bad_record)
    progress = _Throttle(report)
    try:
        done = [
            _convert_file(
                source,
                series,
                progress,
                config=config,
                tokenizer=tokenizer,
                spec=spec,
                bad=bad,
                fast_jsonl=fast_jsonl,
            )
            for source in task.files
        ]
        shards = series.close()
    except BaseException:
        series.abort()
        raise
    progress.flush()
    record = _task_record(task, settings_fingerprint, shards, done, bad)
    _write_file(out, _record_name(task.index), json.dumps(record, indent=1).encode())
    out.close()
    return record


# ---- the process pool -------------------------------------------------------------------------

_progress_queue: Any = None


def _init_worker(progress_queue: Any, lock_fd: int | None) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    if lock_fd is not None:  # forked: drop our copy, so the lock dies with the parent
        os.close(lock_fd)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _worker_report(docs: int, nbytes: int) -> None:
    _progress_queue.put((docs, nbytes))


def _pool_task(task: Task, config: ConvertConfig, fingerprint: str) -> dict[str, Any]:
    return run_task(task, config, fingerprint, _worker_report)


class _Progress:
    def __init__(self, total_bytes: int | None, enabled: bool | None) -> None:
        self._bar: Any = None
        self._docs = 0
        self._bytes = 0
        self._last_log = time.monotonic()
        self._start = time.monotonic()
        self._total = total_bytes
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert"
            )

    def update(self, docs: int, nbytes: int) -> None:
        self._docs += docs
        self._bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix(docs=self._docs, refresh=False)
        elif time.monotonic() - self._last_log >= 10:
            self._last_log = time.monotonic()
            rate = self._bytes / max(time.monotonic() - self._start, 1e-9) / MiB
            log.info(
                "converted %d documents, %.1f MB (%.1f MB/s)", self._docs, self._bytes / 1e6, rate
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def pool_start_method() -> str:
    """How worker processes start: ``fork`` where that is safe, else ``spawn``.

    A forked worker starts at once with the parent's imports; a spawned one imports shardloader,
    pyarrow and (with ``--tokenizer``) tokenizers again, about 0.5 s per worker, which was a
    quarter of converting 300 MB on 2 cores. Forking is safe on Linux while this process runs no
    other Python thread (no fsspec event loop from listing ``s3://`` inputs, no progress-bar
    monitor); the check runs before the progress bar starts.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _run_tasks(
    tasks: Sequence[Task],
    config: ConvertConfig,
    fingerprint: str,
    num_proc: int,
    lock_fd: int | None = None,
) -> list[dict[str, Any]]:
    start_method = pool_start_method()
    files = [f for t in tasks for f in t.files]
    # Progress counts text bytes read; the stored size is their total only for plain files.
    plain = all(kind_of(f.url)[1] == "none" and kind_of(f.url)[0] != "parquet" for f in files)
    progress = _Progress(sum(f.num_bytes for f in files) if plain else None, config.progress)
    try:
        if num_proc <= 1 or len(tasks) <= 1:
            return [run_task(t, config, fingerprint, progress.update) for t in tasks]
        ctx = mp.get_context(start_method)
        q = ctx.Queue()
        inherited = lock_fd if start_method == "fork" else None
        pool = ctx.Pool(
            min(num_proc, len(tasks)), initializer=_init_worker, initargs=(q, inherited)
        )
        try:
            pending = [pool.apply_async(_pool_task, (t, config, fingerprint)) for t in tasks]
            while not all(r.ready() for r in pending):
                with contextlib.suppress(queue_mod.Empty):
                    progress.update(*q.get(timeout=0.2))
                for r in pending:  # fail fast: the first task error stops the pool
                    if r.ready() and not r.successful():
                        r.get()
            while True:
                try:
                    progress.update(*q.get_nowait())
                except queue_mod.Empty:
                    break
            records = [r.get() for r in pending]
            pool.close()
            return records
        finally:
            pool.terminate()
            pool.join()
    finally:
        progress.close()


# ---- the driver -------------------------------------------------------------------------------


def _check_output(out: OutputDir, plan: dict[str, Any], config: ConvertConfig) -> Manifest | None:
    """Make sure ``out`` is empty or holds this same conversion; return its manifest if done."""
    if out.exists(MANIFEST_NAME):
        existing = parse_manifest(out.read_bytes(MANIFEST_NAME), where=out.url_of(MANIFEST_NAME))
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
    with _writing(out.url):
        out.remove(MANIFEST_NAME)
        for name in out.list(WORK_DIR):
            if not name.startswith(LOCK_NAME.rsplit("/", 1)[1]):
                out.remove(f"{WORK_DIR}/{name}", recursive=True)
        for name in out.list():
            if name.startswith("shard-") and name.endswith((".arrow", ".tar", ".tar.zst")):
                out.remove(name)


@contextlib.contextmanager
def _writing(url: str) -> Iterator[None]:
    """Turn an ``OSError`` from writing ``url`` into a `StorageError` with a remedy."""
    try:
        yield
    except ShardloaderError:
        raise
    except OSError as err:
        raise write_error(url, err) from err


def _write_file(out: OutputDir, rel: str, data: bytes) -> None:
    """Write ``rel`` atomically, under a temporary name no other process uses."""
    with _writing(out.url_of(rel)):
        f = out.open_atomic(rel, tmp_prefix=f"p{os.getpid()}-")
        try:
            f.write(data)
            f.commit()
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk fails the flush in close() again
                f.abort()
            raise


def _lock_output(out: OutputDir, rel: str) -> int | None:
    """Lock ``out`` for this run; returns the descriptor to hold (``None``: a remote output).

    The lock is an ``flock`` on ``rel``, so the kernel drops it when its holder dies and a rerun
    after ``kill -9`` takes it at once; the file names the holder (pid and host) for the message
    a second run gets. Object stores have no locks: there, one run per output is up to the user.

    Raises:
        ConfigError: Another process holds the lock.
    """
    if not out.local:
        return None
    path = storage.url_to_fs(out.url_of(rel))[1]
    with _writing(out.url_of(rel)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").split()
                os.close(fd)
                pid, host = [*holder, "?", "?"][:2]
                raise ConfigError(
                    f"{out.url}: is being written by pid {pid} on {host}; wait for it or remove "
                    f"{path} if it died"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            os.close(fd)  # its holder removed it as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _unlock_output(out: OutputDir, rel: str, fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(storage.url_to_fs(out.url_of(rel))[1])
        os.close(fd)


def _location(url: str) -> str:
    """A comparable form of a path or URL: symlinks resolved for local paths."""
    if storage.is_url(url):
        return storage.normalize(url).rstrip("/")
    return os.path.realpath(os.path.expanduser(url))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _list_inputs(inputs: Sequence[str], output: str) -> list[InputFile]:
    """List the input files; an input folder that holds the output is read without it.

    Raises:
        ConfigError: An input (file, folder or pattern) is inside the output directory.
        CorpusError: An input matches nothing, or nothing is left.
    """
    out_at = _location(output)
    files: list[InputFile] = []
    for pattern in inputs:
        if _inside(_location(pattern), out_at):
            raise ConfigError(
                f"{pattern}: this input is inside the output directory {output}; a conversion "
                "cannot read its own output: move the input or choose another output"
            )
        try:
            found = storage.list_files([pattern])
        except FileNotFoundError as err:
            raise CorpusError(f"{err}; check the input paths") from err
        kept = [f for f in found if not _inside(_location(f.url), out_at)]
        if len(kept) < len(found):
            log.info(
                "%s: left out %d files inside the output directory %s",
                pattern,
                len(found) - len(kept),
                output,
            )
        files.extend(kept)
    return files


def _make_plan(config: ConvertConfig, inputs: Sequence[str]) -> tuple[dict[str, Any], list[Task]]:
    files = _list_inputs(inputs, config.output)
    if not files:
        raise CorpusError(f"no input files found in {list(inputs)}")
    info = None
    if config.tokenizer:  # loaded here so a bad tokenizer fails before any work starts
        info = TextTokenizer(
            config.tokenizer, eos_token=config.eos_token, bos_token=config.bos_token
        ).info
    settings = config.output_settings(info.fingerprint if info else None)
    tasks = plan_tasks(files, config.task_bytes)
    plan: dict[str, Any] = {
        "version": 1,
        "settings": settings,
        "tokenizer": info.to_dict() if info else None,
        "token_dtype": info.dtype if info else None,
        "sources": [[f.url, f.num_bytes, f.root] for f in files],
        "tasks": [[files.index(t.files[0]), len(t.files)] for t in tasks],
    }
    plan["fingerprint"] = _fingerprint(plan)
    return plan, tasks


def convert(inputs: Sequence[str] | str, config: ConvertConfig) -> ConvertResult:
    """Convert raw corpus files into shards and a manifest.

    Args:
        inputs: Files, directories or glob patterns (local paths or fsspec URLs).
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
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    plan, tasks = _make_plan(config, inputs)
    out = OutputDir(config.output)
    with _writing(out.url):
        out.makedirs()
    # One lock per slice: slices of one conversion may run at once, a slice twice may not.
    lock_name = LOCK_NAME if config.num_tasks == 1 else f"{LOCK_NAME}-{config.task_index}"
    lock_fd = _lock_output(out, lock_name)
    try:
        done = _check_output(out, plan, config)
        if done is not None:
            log.info("%s: this conversion is already complete", out.url)
            return _result(out.url, done, [], len(tasks), len(tasks), time.monotonic() - start)
        _write_file(out, PLAN_NAME, json.dumps(plan, indent=1).encode())
        mine = [t for t in tasks if t.index % config.num_tasks == config.task_index]
        finished = set(_finished_tasks(out, plan["fingerprint"]))
        todo = [t for t in mine if t.index not in finished]
        if len(todo) < len(mine):
            log.info("resuming: %d of %d tasks already done", len(mine) - len(todo), len(mine))
        num_proc = config.num_proc or _available_cpus()
        records = _run_tasks(todo, config, plan["fingerprint"], num_proc, lock_fd)
        manifest = None
        if config.num_tasks == 1:
            manifest = _write_manifest(out, plan)
    finally:
        _unlock_output(out, lock_name, lock_fd)
        out.close()
    return _result(
        out.url, manifest, records, len(mine) - len(todo), len(tasks), time.monotonic() - start
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
            record = json.loads(out.read_bytes(_record_name(index)))
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
    shards = shards_with_ids([ShardInfo(**s) for r in records for s in r["shards"]])
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    for r in records:
        skipped.update(r["skipped"])
        examples.extend(r["skipped_examples"])
    settings = dict(plan["settings"])
    fields = _fields(bool(settings["tokenizer_fingerprint"]), settings["keep_fields"])
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
    _write_file(out, MANIFEST_NAME, manifest_to_json(manifest))
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
        tasks_run=len(records),
        tasks_skipped=tasks_skipped,
        tasks_total=tasks_total,
        wall_s=wall_s,
        skipped_examples=tuple(examples[:20]),
    )
