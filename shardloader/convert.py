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

Cost: reading JSON and writing shards is a few hundred MB/s per process; with a tokenizer, the
tokenizer dominates (``tools/bench_convert.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardloader import __version__, storage
from shardloader.errors import ConfigError, CorpusError, ManifestError
from shardloader.formats import COMPRESSIONS, get_format
from shardloader.formats.arrow import rows_before_limit
from shardloader.manifest import (
    FORMATS,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    manifest_to_json,
    parse_manifest,
    shards_with_ids,
)
from shardloader.sources import (
    MAX_RECORD_BYTES,
    ON_BAD_RECORD,
    BadRecords,
    Document,
    DocumentTable,
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
TOKENIZE_BATCH_DOCS = 1024
TOKENIZE_BATCH_BYTES = 4 * MiB
PROGRESS_EVERY_S = 0.25


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Settings of a conversion; the ``shardloader convert`` flags mirror these fields.

    Args:
        output: Directory or fsspec URL that receives the shards and the manifest.
        format: Shard format: ``"arrow"`` (Arrow IPC files) or ``"tar"`` (WebDataset tar).
        compression: ``"zstd"`` (Arrow: per record batch; tar: ``.tar.zst``) or ``"none"``.
        compression_level: zstd level. The default 2 compresses text about twice as fast as 3
            here for ~4% more bytes, and decompresses faster (``tools/bench_convert.py``).
        shard_bytes: Close a shard once its uncompressed payload reaches this many bytes.
        shard_samples: Close a shard once it holds this many samples (``None``: no limit).
        batch_bytes: Uncompressed size of an Arrow record batch.
        task_bytes: Group input files into tasks of about this many (stored) bytes.
        text_field: Field (or Parquet column) holding the text.
        id_field: Field holding the id; ids are made from file and line where it is missing.
        keep_fields: Extra fields to keep, ``"name"`` or ``"name:type"`` (string, int64,
            float64, bool, json).
        tokenizer: Path of a ``tokenizer.json`` or local Hugging Face tokenizer directory; when
            set, shards hold ``input_ids`` instead of text.
        eos_token: Override the tokenizer's end-of-document token.
        bos_token: Override the tokenizer's beginning-of-document token.
        add_eos: Append EOS to every tokenized document.
        add_bos: Prepend BOS to every tokenized document.
        on_bad_record: ``"raise"`` stops at the first bad record; ``"skip"`` counts and skips.
        max_record_bytes: Longest record (JSONL line, Parquet row's strings, text file); a longer
            one is a bad record (``record_too_large``), measured but never held in memory.
        num_proc: Worker processes (default: the number of CPUs).
        num_tasks: Number of independent slices (machines) the conversion is split into.
        task_index: Which slice this run converts (0-based).
        overwrite: Replace a different dataset already in ``output``.
        progress: Show a progress bar (``None``: only when stderr is a terminal).
    """

    output: str
    format: str = "arrow"
    compression: str = "zstd"
    compression_level: int = 2
    shard_bytes: int = 128 * MiB
    shard_samples: int | None = None
    batch_bytes: int = 4 * MiB
    task_bytes: int = 64 * MiB
    text_field: str = "text"
    id_field: str | None = "id"
    keep_fields: tuple[str, ...] = ()
    tokenizer: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None
    add_eos: bool = True
    add_bos: bool = False
    on_bad_record: str = "raise"
    max_record_bytes: int = MAX_RECORD_BYTES
    num_proc: int | None = None
    num_tasks: int = 1
    task_index: int = 0
    overwrite: bool = False
    progress: bool | None = None

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


class ShardSeries:
    """Writes one task's samples into consecutive shards, closing each at the configured limits."""

    def __init__(
        self,
        out: OutputDir,
        config: ConvertConfig,
        task: int,
        fields: Mapping[str, str],
        token_dtype: str | None,
    ) -> None:
        self._out, self._config, self._task = out, config, task
        self._format = get_format(config.format)
        self._fields, self._token_dtype = fields, token_dtype
        self._suffix = self._format.file_suffix(config.compression)
        self._sink: storage.AtomicWriter | None = None
        self._writer: Any = None
        self._name = ""
        self._num_samples = self._num_payload = self._num_tokens = 0
        self.shards: list[ShardInfo] = []

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample (UTF-8 text bytes, or token ids already in the shard dtype)."""
        if self._writer is None:
            self._open()
        self._writer.write(doc_id, payload, fields)
        self._num_samples += 1
        if isinstance(payload, bytes):
            self._num_payload += len(payload)
        else:
            self._num_payload += payload.nbytes
            self._num_tokens += len(payload)
        self._close_if_full()

    def write_table(self, table: DocumentTable) -> None:
        """Add a whole file of text samples; same shards and bytes as writing them one by one."""
        start, n = 0, len(table.sizes)
        while start < n:
            if self._writer is None:
                self._open()
            take = rows_before_limit(
                table.sizes[start:], self._num_payload, self._config.shard_bytes
            )
            if self._config.shard_samples:
                take = min(take, self._config.shard_samples - self._num_samples)
            part = table.slice(start, take)
            self._writer.write_columns(part.ids, part.texts, part.fields, part.sizes)
            self._num_samples += take
            self._num_payload += int(part.sizes.sum())
            start += take
            self._close_if_full()

    def _close_if_full(self) -> None:
        limit = self._config.shard_samples
        if self._num_payload >= self._config.shard_bytes or (limit and self._num_samples >= limit):
            self._close_shard()

    def _open(self) -> None:
        stem = f"shard-{self._task:05d}-{len(self.shards):04d}"
        self._name = stem + self._suffix
        self._sink = self._out.open_atomic(self._name, tmp_prefix=f"{self._task:05d}-")
        self._writer = self._format.open_writer(
            self._sink,
            shard_name=stem,
            fields=self._fields,
            token_dtype=self._token_dtype,
            compression=self._config.compression,
            compression_level=self._config.compression_level,
            batch_bytes=self._config.batch_bytes,
        )
        self._num_samples = self._num_payload = self._num_tokens = 0

    def _close_shard(self) -> None:
        assert self._sink is not None
        self._writer.close()
        self._sink.commit()
        self.shards.append(
            ShardInfo(
                path=self._name,
                num_samples=self._num_samples,
                num_bytes=self._sink.num_bytes,
                checksum=self._sink.sha256,
                num_tokens=self._num_tokens,
            )
        )
        self._writer = self._sink = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and return all shards written."""
        if self._writer is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the open shard's temporary file."""
        if self._sink is not None:
            self._sink.abort()


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
    """
    out = OutputDir(config.output)
    out.clean_tmp(f"{task.index:05d}-")
    tokenizer = (
        TextTokenizer(config.tokenizer, eos_token=config.eos_token, bos_token=config.bos_token)
        if config.tokenizer
        else None
    )
    token_dtype = tokenizer.info.dtype if tokenizer else None
    series = ShardSeries(
        out, config, task.index, _fields(bool(config.tokenizer), config.keep_fields), token_dtype
    )
    spec = RecordSpec(
        text_field=config.text_field,
        id_field=config.id_field,
        keep_fields=parse_keep_fields(config.keep_fields),
    )
    bad = BadRecords(config.on_bad_record)
    sources: list[dict[str, Any]] = []
    pending: list[Any] = []
    pending_bytes = 0
    last_report = time.monotonic()
    done_docs = done_bytes = 0
    totals = Counter[str]()

    def flush_tokens() -> None:
        nonlocal pending_bytes
        assert tokenizer is not None
        ids = tokenizer.encode_batch(
            [d.text for d in pending], add_bos=config.add_bos, add_eos=config.add_eos
        )
        for doc, arr in zip(pending, ids, strict=True):
            series.write(doc.id, arr.astype(token_dtype), doc.fields)
        pending.clear()
        pending_bytes = 0

    try:
        for source in task.files:
            stats = Counter[str]()
            skipped_before = bad.total
            table = (
                read_jsonl_table(
                    source, spec=spec, stats=stats, max_record_bytes=config.max_record_bytes
                )
                if fast_jsonl
                else None
            )
            file_bytes = 0  # text bytes reported for this file so far
            if table is not None and tokenizer is None:
                series.write_table(table)
                totals["docs"] += len(table.sizes)
                done_docs += len(table.sizes)
                docs: Iterable[Document] = ()
            elif table is not None:
                docs = table.documents()
            else:
                docs = read_documents(
                    source,
                    spec=spec,
                    bad=bad,
                    stats=stats,
                    max_record_bytes=config.max_record_bytes,
                )
            for doc in docs:
                data = doc.text.encode("utf-8")  # sources refused lone surrogates
                totals["docs"] += 1
                done_docs += 1
                done_bytes += len(data)
                file_bytes += len(data)
                if tokenizer is not None:
                    pending.append(doc)
                    pending_bytes += len(data)
                    if len(pending) >= TOKENIZE_BATCH_DOCS or pending_bytes >= TOKENIZE_BATCH_BYTES:
                        flush_tokens()
                else:
                    series.write(doc.id, data, doc.fields)
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY_S:
                    report(done_docs, done_bytes)
                    done_docs = done_bytes = 0
                    last_report = now
            if pending:
                flush_tokens()
            # Progress counted text bytes; settle this file at its raw (JSON) input bytes.
            done_bytes += stats["bytes"] - file_bytes
            totals["bytes"] += stats["bytes"]
            sources.append(
                {
                    "url": source.url,
                    "num_bytes": source.num_bytes,
                    "num_records": stats["records"],
                    "num_skipped": bad.total - skipped_before,
                    "num_blank_lines": stats["blank_lines"],
                }
            )
        shards = series.close()
    except BaseException:
        series.abort()
        raise
    report(done_docs, done_bytes)
    if bad.total:
        log.warning(
            "task %d: skipped %d bad records %s; first at %s",
            task.index,
            bad.total,
            dict(sorted(bad.counts.items())),
            bad.examples[0],
        )
    record = {
        "task": task.index,
        "settings": settings_fingerprint,
        "shards": [s._asdict() for s in shards],
        "sources": sources,
        "num_docs": totals["docs"],
        "num_input_bytes": totals["bytes"],
        "skipped": dict(sorted(bad.counts.items())),
        "skipped_examples": bad.examples,
    }
    out.write_bytes_atomic(_record_name(task.index), json.dumps(record, indent=1).encode())
    out.close()
    return record


# ---- the process pool -------------------------------------------------------------------------

_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
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
    tasks: Sequence[Task], config: ConvertConfig, fingerprint: str, num_proc: int
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
        pool = ctx.Pool(min(num_proc, len(tasks)), initializer=_init_worker, initargs=(q,))
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
    """Remove what a conversion writes: manifest, shards, work records."""
    out.remove(MANIFEST_NAME)
    out.remove(WORK_DIR, recursive=True)
    for name in out.list():
        if name.startswith("shard-") and name.endswith((".arrow", ".tar", ".tar.zst")):
            out.remove(name)


def _make_plan(config: ConvertConfig, inputs: Sequence[str]) -> tuple[dict[str, Any], list[Task]]:
    try:
        files = storage.list_files(inputs)
    except FileNotFoundError as err:
        raise CorpusError(f"{err}; check the input paths") from err
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
        ConfigError: Invalid settings, or an output that holds another dataset.
    """
    start = time.monotonic()
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    plan, tasks = _make_plan(config, inputs)
    out = OutputDir(config.output)
    out.makedirs()
    done = _check_output(out, plan, config)
    if done is not None:
        log.info("%s: this conversion is already complete", out.url)
        return _result(out.url, done, [], len(tasks), len(tasks), time.monotonic() - start)
    out.write_bytes_atomic(PLAN_NAME, json.dumps(plan, indent=1).encode())
    mine = [t for t in tasks if t.index % config.num_tasks == config.task_index]
    finished = set(_finished_tasks(out, plan["fingerprint"]))
    todo = [t for t in mine if t.index not in finished]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d tasks already done", len(mine) - len(todo), len(mine))
    num_proc = config.num_proc or _available_cpus()
    records = _run_tasks(todo, config, plan["fingerprint"], num_proc)
    manifest = None
    if config.num_tasks == 1:
        manifest = _write_manifest(out, plan)
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
    out.write_bytes_atomic(MANIFEST_NAME, manifest_to_json(manifest))
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
