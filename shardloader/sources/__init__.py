"""Raw corpus readers: JSONL (plain, .gz, .zst), Parquet and plain-text files -> documents.

Each document carries the file and line (or Parquet row) it came from, so every error can name
its location. Bad records either raise :class:`CorpusError` (the default) or, with
``on_bad_record="skip"``, are counted by kind in a :class:`BadRecords` tally with their first
locations. Text is kept exactly as decoded: no normalization, no stripping.

Modules, each importing only those above it:

- ``records``: Document, RecordSpec, BadRecords, DamagedFileError; one record -> Document
- ``chat``: chat and instruction shapes (messages, ShareGPT, Alpaca, prompt/response) -> messages
- ``streams``: decompression (none, gzip, zstd) and line splitting, bounded in memory
- ``files``: a file's kind and codec by name; refusing FIFOs, devices and sockets
- ``jsonl_table``: the JSONL fast path, a whole clean file -> Arrow columns
- ``slices``: one big JSONL file cut into slices of whole lines (byte ranges, zstd frames, a
  stream), so its parts convert in parallel
- ``jsonl``, ``parquet``, ``text``: the per-format readers that :func:`read_documents` picks
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardloader import storage
from shardloader.errors import CorpusError
from shardloader.sources.chat import CHAT_SCHEMAS, SCHEMAS, detect_schema
from shardloader.sources.files import check_regular_file, kind_of
from shardloader.sources.jsonl import read_jsonl
from shardloader.sources.jsonl_table import (
    FAST_JSONL_BLOCK,
    FAST_JSONL_MAX_BYTES,
    DocumentTable,
    read_jsonl_table,
)
from shardloader.sources.parquet import read_parquet
from shardloader.sources.records import (
    KEEP_FIELD_TYPES,
    MAX_EXAMPLES,
    MAX_RECORD_BYTES,
    ON_BAD_RECORD,
    RESERVED_FIELDS,
    BadRecords,
    DamagedFileError,
    Document,
    FileContext,
    RecordSpec,
    parse_keep_fields,
)
from shardloader.sources.streams import CHUNK_BYTES, ZSTD_FEED_BYTES, iter_chunks, iter_lines
from shardloader.sources.text import read_text_file
from shardloader.storage import InputFile

__all__ = [
    "CHAT_SCHEMAS",
    "CHUNK_BYTES",
    "FAST_JSONL_BLOCK",
    "FAST_JSONL_MAX_BYTES",
    "KEEP_FIELD_TYPES",
    "MAX_EXAMPLES",
    "MAX_RECORD_BYTES",
    "ON_BAD_RECORD",
    "RESERVED_FIELDS",
    "SCHEMAS",
    "ZSTD_FEED_BYTES",
    "BadRecords",
    "DamagedFileError",
    "Document",
    "DocumentTable",
    "RecordSpec",
    "check_regular_file",
    "detect_file_schema",
    "detect_schema",
    "kind_of",
    "parse_keep_fields",
    "read_documents",
    "read_jsonl_table",
]


def read_documents(
    source: InputFile,
    *,
    spec: RecordSpec,
    bad: BadRecords,
    stats: Counter[str] | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[Document]:
    """Yield the documents of one input file.

    ``stats`` (if given) receives ``records`` (records read, skipped ones included) and
    ``bytes`` (uncompressed bytes read).

    A record (JSONL line, Parquet row's string values, whole text file) over ``max_record_bytes``
    is a bad record of kind ``record_too_large``; it is measured while reading and never held in
    memory whole. Non-regular files (FIFOs, devices, sockets, links to them) are refused before
    they are opened, whatever ``on_bad_record`` says: reading one would hang or never end.

    A damaged file (truncated or corrupt compression, unreadable Parquet) raises
    :class:`DamagedFileError`, or with ``on_bad_record="skip"`` ends the file early and counts one
    ``damaged_file``: the records before the damage are kept, the partial one is not.

    Raises:
        CorpusError: A bad record or damaged file (with ``on_bad_record="raise"``), an unreadable
            path or non-regular file, or a Parquet file whose text column is missing or not a
            string.
    """
    stats = stats if stats is not None else Counter()
    kind, codec = kind_of(source.url)
    name = storage.relpath(source.url, source.root)
    check_regular_file(source.url)
    try:
        f = storage.open_read(source.url)
    except FileNotFoundError as err:
        raise CorpusError(
            f"{source.url}: cannot open, no such file ({err}); is it a dangling link, or was it "
            "removed during the conversion?"
        ) from err
    except OSError as err:
        raise CorpusError(f"{source.url}: cannot open ({type(err).__name__}: {err})") from err
    file = FileContext(
        url=source.url,
        name=name,
        codec=codec,
        bad=bad,
        stats=stats,
        max_record_bytes=max_record_bytes,
    )
    with f:
        try:
            if kind == "parquet":
                if codec != "none":
                    raise CorpusError(f"{source.url}: compressed Parquet files are not supported")
                yield from read_parquet(f, file, spec)
            elif kind == "jsonl":
                yield from read_jsonl(f, file, spec)
            else:
                yield from read_text_file(f, file)
        except DamagedFileError as err:
            if bad.on_bad_record != "skip":
                raise
            bad.report("damaged_file", err.where, err.what + "; the rest of the file is skipped")


DETECT_LINES = 100  # JSONL lines looked at for the first record when detecting the shape


def detect_file_schema(
    source: InputFile, text_field: str = "text", max_record_bytes: int = MAX_RECORD_BYTES
) -> str:
    """The shape of a corpus (``text`` or a chat shape), from the first record of ``source``.

    The first JSON object among the first `DETECT_LINES` lines of a JSONL file, or the column names
    of a Parquet file, decide (see `detect_schema`); plain-text files, and files whose first
    records cannot be read, are ``text`` (the reader then reports what is wrong).
    """
    kind, codec = kind_of(source.url)
    if kind == "text":
        return "text"
    check_regular_file(source.url)
    record: Any = None
    try:
        with storage.open_read(source.url) as f:
            if kind == "parquet":
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                return detect_schema(dict.fromkeys(names), text_field)
            lines = iter_lines(iter_chunks(f, codec, source.url), max_record_bytes)
            for _, raw in zip(range(DETECT_LINES), lines, strict=False):
                if isinstance(raw, int) or not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8-sig"))
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict):
                    return detect_schema(record, text_field)
    except (CorpusError, OSError, ValueError, pa.ArrowException):
        pass  # the reader reports it, with its file:line
    return "text"
