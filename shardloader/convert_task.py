"""Convert one task: read its files in order and write its shards and its completion record.

A clean JSONL file is parsed whole by pyarrow's JSON reader (`read_jsonl_table`); without a
tokenizer its table is written as it is. Otherwise the documents (from that table, or from the
line-by-line reader, which finds and reports bad records) are written one by one, or encoded in
batches first when there is a tokenizer. Chat data with a tokenizer is rendered with its chat
template (`shardloader.chat_template.ChatRenderer`) and stored as ``input_ids`` plus
``loss_spans``, the token ranges of the assistant turns. Every path gives the same bytes.
`ShardSeries` cuts the samples into shards; the completion record ``_work/task-{task}.json`` is
written last, so a task with a record is finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from shardloader.chat_template import ChatRenderer, load_chat_tokenizer, mask_to_spans
from shardloader.convert_config import ConvertConfig
from shardloader.convert_plan import Task
from shardloader.errors import CorpusError
from shardloader.formats.series import ShardSeries
from shardloader.manifest import ShardInfo
from shardloader.sources import (
    CHAT_SCHEMAS,
    BadRecords,
    Document,
    RecordSpec,
    detect_file_schema,
    parse_keep_fields,
    read_documents,
    read_jsonl_table,
)
from shardloader.storage import InputFile, OutputDir, write_file, writing
from shardloader.tokenizer import TextTokenizer

# The conversion logs under one name, as it did as one module ("shardloader.convert: ...").
log = logging.getLogger("shardloader.convert")

MiB = 1 << 20
WORK_DIR = "_work"
TOKENIZE_BATCH_DOCS = 1024
TOKENIZE_BATCH_BYTES = 4 * MiB
PROGRESS_EVERY_S = 0.25


_RENDERERS: dict[tuple[str, tuple[tuple[str, int, int], ...]], ChatRenderer] = {}


def chat_renderer(path: str) -> ChatRenderer:
    """The chat renderer of tokenizer directory ``path``, loaded once per process.

    Loading a transformers tokenizer takes a few tenths of a second, so a worker that runs many
    tasks keeps it; the key includes the size and mtime of the directory's files, so a tokenizer
    changed on disk is loaded again.
    """
    files = sorted(os.scandir(path), key=lambda e: e.name) if os.path.isdir(path) else []
    key = (path, tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files))
    if key not in _RENDERERS:
        _RENDERERS.clear()  # one tokenizer per conversion: keep only the latest
        _RENDERERS[key] = ChatRenderer(load_chat_tokenizer(path), path)
    return _RENDERERS[key]


def record_name(task: int) -> str:
    """The completion record of task ``task``, relative to the output."""
    return f"{WORK_DIR}/task-{task:05d}.json"


def shard_fields(
    tokenized: bool, keep_fields: Sequence[str], schema: str = "text"
) -> dict[str, str]:
    """The shards' fields (name -> kind), as the manifest records them.

    Chat records (any ``schema`` but ``text``) are stored as ``messages``, a ``json`` field, or
    tokenized as ``input_ids`` plus ``loss_spans`` (``json``: ``[start, end)`` token ranges).
    """
    payload = {"input_ids": "tokens"} if tokenized else {"text": "string"}
    if schema in CHAT_SCHEMAS:
        payload = (
            {"input_ids": "tokens", "loss_spans": "json"} if tokenized else {"messages": "json"}
        )
    return {"id": "string", **payload, **parse_keep_fields(tuple(keep_fields))}


class Throttle:
    """Passes (documents, input bytes) on to ``report`` at most every ``PROGRESS_EVERY_S``."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self._report = report
        self._docs = self._bytes = 0
        self._last = time.monotonic()

    def add(self, docs: int, nbytes: int) -> None:
        """Count ``docs`` documents and ``nbytes`` input bytes; report if it is time."""
        self._docs += docs
        self._bytes += nbytes
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self.flush()
            self._last = now

    def flush(self) -> None:
        """Report what is counted now."""
        self._report(self._docs, self._bytes)
        self._docs = self._bytes = 0


class FileDone(NamedTuple):
    """What converting one input file did: its ``sources`` entry, documents, input bytes."""

    source: dict[str, Any]
    num_docs: int
    num_bytes: int


def _write_texts(
    docs: Iterable[Document], series: ShardSeries, progress: Throttle
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
    progress: Throttle,
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


def _write_chats(
    docs: Iterable[Document],
    series: ShardSeries,
    progress: Throttle,
    renderer: ChatRenderer,
    *,
    dtype: str,
    bad: BadRecords,
    max_prompt_tokens: int | None,
) -> tuple[int, int]:
    """The chat path: render conversations, encode them in batches, write ids and loss spans.

    A conversation the template cannot render (``template_error``) or whose prompt is over
    ``max_prompt_tokens`` (``prompt_too_long``) is a bad record. Returns (documents written,
    text bytes).
    """
    pending: list[tuple[Document, Any]] = []
    pending_bytes = num_docs = num_bytes = 0

    def flush() -> int:
        written = 0
        encoded = renderer.encode([rendered for _, rendered in pending])
        for (doc, _), (ids, mask) in zip(pending, encoded, strict=True):
            spans = mask_to_spans(mask)
            prompt = spans[0][0] if spans else len(ids)
            if max_prompt_tokens is not None and prompt > max_prompt_tokens:
                bad.report(
                    "prompt_too_long",
                    doc.where,
                    f"{prompt} tokens before the first assistant turn, over --max-prompt-tokens "
                    f"{max_prompt_tokens}",
                    remedy="raise the limit",
                )
                continue
            series.write(doc.id, ids.astype(dtype), {"loss_spans": spans, **(doc.fields or {})})
            written += 1
        pending.clear()
        return written

    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        num_bytes += size
        progress.add(1, size)
        try:
            rendered = renderer.render_turns(json.loads(doc.text), doc.where)
        except CorpusError as err:
            bad.report("template_error", doc.where, str(err).removeprefix(f"{doc.where}: "))
            continue
        pending.append((doc, rendered))
        pending_bytes += size
        if len(pending) >= TOKENIZE_BATCH_DOCS or pending_bytes >= TOKENIZE_BATCH_BYTES:
            num_docs += flush()
            pending_bytes = 0
    if pending:
        num_docs += flush()
    return num_docs, num_bytes


def write_documents(
    docs: Iterable[Document],
    series: ShardSeries,
    progress: Throttle,
    *,
    config: ConvertConfig,
    tokenizer: TextTokenizer | None,
    renderer: ChatRenderer | None,
    bad: BadRecords,
) -> tuple[int, int]:
    """Write ``docs`` as chat token ids, token ids or text; returns (documents, text bytes)."""
    if renderer is not None and tokenizer is not None:
        return _write_chats(
            docs,
            series,
            progress,
            renderer,
            dtype=tokenizer.info.dtype,
            bad=bad,
            max_prompt_tokens=config.max_prompt_tokens,
        )
    if tokenizer is not None:
        return _write_tokens(docs, series, progress, tokenizer, config)
    return _write_texts(docs, series, progress)


def _convert_file(
    source: InputFile,
    series: ShardSeries,
    progress: Throttle,
    *,
    config: ConvertConfig,
    tokenizer: TextTokenizer | None,
    renderer: ChatRenderer | None,
    spec: RecordSpec,
    bad: BadRecords,
    fast_jsonl: bool,
) -> FileDone:
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
        num_docs, text_bytes = write_documents(
            docs, series, progress, config=config, tokenizer=tokenizer, renderer=renderer, bad=bad
        )
    # Progress counted text bytes; settle this file at its raw (JSON) input bytes.
    progress.add(0, stats["bytes"] - text_bytes)
    entry = {
        "url": source.url,
        "num_bytes": source.num_bytes,
        "num_records": stats["records"],
        "num_skipped": bad.total - skipped_before,
        "num_blank_lines": stats["blank_lines"],
    }
    return FileDone(entry, num_docs, stats["bytes"])


def task_record(
    task_index: int,
    settings_fingerprint: str,
    shards: Sequence[ShardInfo],
    blocks: Sequence[list[list[int]] | None],
    done: Sequence[FileDone],
    bad: BadRecords,
) -> dict[str, Any]:
    """The completion record of a task (and the log line of what it skipped)."""
    if bad.total:
        log.warning(
            "task %d: skipped %d bad records %s; first at %s",
            task_index,
            bad.total,
            dict(sorted(bad.counts.items())),
            bad.examples[0],
        )
    return {
        "task": task_index,
        "settings": settings_fingerprint,
        "shards": [
            {**s._asdict(), **({"blocks": b} if b is not None else {})}
            for s, b in zip(shards, blocks, strict=True)
        ],
        "sources": [d.source for d in done],
        "num_docs": sum(d.num_docs for d in done),
        "num_input_bytes": sum(d.num_bytes for d in done),
        "skipped": dict(sorted(bad.counts.items())),
        "skipped_examples": bad.examples,
    }


class TaskWriters(NamedTuple):
    """What a task writes documents with (`open_task_output`)."""

    tokenizer: TextTokenizer | None
    renderer: Any
    series: ShardSeries
    spec: RecordSpec


def open_task_output(
    config: ConvertConfig, task_index: int, schema: str, slice_index: int | None = None
) -> tuple[OutputDir, TaskWriters]:
    """The output of task ``task_index`` (its dead temporaries removed) and its writers.

    Shared by file tasks (`run_task`), slices of a big file (`shardloader.convert_slice`, whose
    shards are ``shard-{task}-{slice}-{part}``) and in-memory dataset tasks
    (`shardloader.convert_hf.run_dataset_task`), so all write the same shards.
    """
    name: int | str = task_index if slice_index is None else f"{task_index:05d}-{slice_index:05d}"
    prefix = f"{name:05d}-" if isinstance(name, int) else f"{name}-"
    out = OutputDir(config.output)
    with writing(out.url):
        out.clean_tmp(prefix)  # left by a run that died in this task
    tokenizer = (
        TextTokenizer(config.tokenizer, eos_token=config.eos_token, bos_token=config.bos_token)
        if config.tokenizer
        else None
    )
    renderer = None
    if tokenizer is not None and schema in CHAT_SCHEMAS:
        renderer = chat_renderer(config.tokenizer or "")
    series = ShardSeries(
        out,
        config,
        name,
        shard_fields(bool(config.tokenizer), config.keep_fields, schema),
        tokenizer.info.dtype if tokenizer else None,
        tmp_prefix=f"{prefix}{os.getpid()}-",
    )
    spec = RecordSpec(
        text_field=config.text_field,
        id_field=config.id_field,
        keep_fields=parse_keep_fields(config.keep_fields),
        schema=schema,
    )
    return out, TaskWriters(tokenizer, renderer, series, spec)


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
    schema = config.schema
    if schema == "auto":  # convert() passes the plan's shape; alone, the task's first file says
        schema = detect_file_schema(task.files[0], config.text_field, config.max_record_bytes)
    out, writers = open_task_output(config, task.index, schema)
    tokenizer, renderer, series, spec = writers
    bad = BadRecords(config.on_bad_record)
    progress = Throttle(report)
    try:
        done = [
            _convert_file(
                source,
                series,
                progress,
                config=config,
                tokenizer=tokenizer,
                renderer=renderer,
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
    record = task_record(task.index, settings_fingerprint, shards, series.blocks, done, bad)
    write_file(out, record_name(task.index), json.dumps(record, indent=1).encode())
    out.close()
    return record
