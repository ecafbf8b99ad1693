"""The JSONL line reader: one JSON object per line -> documents, every bad line reported.

Reads any JSONL file (plain, .gz, .zst) in bounded memory and is the reference for what a bad
record is; :mod:`shardloader.sources.jsonl_table` is the fast path for files proven clean.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.json as pa_json

from shardloader.sources.chat import SCHEMA_FIELDS, make_chat_document
from shardloader.sources.jsonl_table import UTF8_BOM, arrow_schema
from shardloader.sources.records import (
    BadRecords,
    Document,
    FileContext,
    RecordSpec,
    make_document,
    type_name,
)
from shardloader.sources.streams import iter_chunks, iter_lines


def read_jsonl(f: IO[bytes], file: FileContext, spec: RecordSpec) -> Iterator[Document]:
    """Yield the documents of the JSONL stream ``f``, reporting each bad line to ``file.bad``.

    ``file.stats`` receives ``records``, ``blank_lines`` and ``bytes`` (uncompressed, one newline
    counted per line); ``file.name`` makes the ids of records without one (``name:line``).
    """
    yield from read_jsonl_chunks(iter_chunks(f, file.codec, file.url), file, spec)


def read_jsonl_chunks(
    chunks: Iterable[bytes], file: FileContext, spec: RecordSpec
) -> Iterator[Document]:
    """`read_jsonl` over decompressed ``chunks``, their first line numbered ``file.first_line``."""
    url, name, bad, stats = file.url, file.name, file.bad, file.stats
    max_record_bytes = file.max_record_bytes
    loads = json.loads
    make = make_document if spec.schema == "text" else make_chat_document
    num_bytes = 0
    lines = iter_lines(iter(chunks), max_record_bytes)
    for line_no, raw in enumerate(lines, start=file.first_line):
        if isinstance(raw, int) or len(raw) > max_record_bytes:
            size = raw if isinstance(raw, int) else len(raw)
            num_bytes += size + 1
            stats["records"] += 1
            bad.report_too_large(f"{url}:{line_no}", size, max_record_bytes)
            continue
        num_bytes += len(raw) + 1
        if line_no == 1 and raw.startswith(UTF8_BOM):  # written by some Windows tools
            raw = raw[len(UTF8_BOM) :]
        if not raw.strip():
            stats["blank_lines"] += 1
            continue
        stats["records"] += 1
        try:
            record = loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            bad.report("bad_utf8", f"{url}:{line_no}", _utf8_error(err))
            continue
        except json.JSONDecodeError as err:
            bad.report(
                "bad_json", f"{url}:{line_no}", f"not valid JSON ({err.msg}, column {err.colno})"
            )
            continue
        except (ValueError, RecursionError) as err:
            # Valid JSON past Python's limits (a number of 4,300+ digits, arrays nested 1,000+
            # deep); pyarrow's reader, the fast path, takes such lines when the excess lies in
            # fields we do not read, so read this line the way it would.
            record = _loads_like_arrow(raw, spec)
            if record is None:
                problem = (
                    "nested too deeply"
                    if isinstance(err, RecursionError)
                    else "holds a number with too many digits"
                )
                bad.report(
                    "bad_json",
                    f"{url}:{line_no}",
                    f"valid JSON, but it {problem} for Python's JSON parser in a field that is "
                    "read",
                )
                continue
        if not isinstance(record, dict):
            bad.report(
                "not_object",
                f"{url}:{line_no}",
                f"expected a JSON object per line, found {type_name(record)}",
            )
            continue
        doc = make(record, f"{name}:{line_no}", f"{url}:{line_no}", spec, bad)
        if doc is not None and not has_lone_surrogate(doc, spec, bad):
            yield doc
    stats["bytes"] += num_bytes


def _loads_like_arrow(raw: bytes, spec: RecordSpec) -> dict[str, Any] | None:
    """Parse one JSONL line with pyarrow's JSON reader, reading only the fields of ``spec``.

    Used for lines ``json.loads`` cannot take (too deep, too many digits), so that they fare
    exactly as on the fast path; ``None`` where pyarrow refuses the line too or where the fast
    path would not have run (JSON-typed kept fields).
    """
    schema = arrow_schema(spec)
    if schema is None:
        return None
    try:
        table = pa_json.read_json(
            pa.BufferReader(raw),
            parse_options=pa_json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
        for column in table.columns:
            column.validate(full=True)
        rows = table.to_pylist()
    except (pa.ArrowException, ValueError):
        return None
    if len(rows) != 1:
        return None
    return {k: v for k, v in rows[0].items() if v is not None}


def has_lone_surrogate(doc: Document, spec: RecordSpec, bad: BadRecords) -> bool:
    """Whether ``doc`` holds a lone surrogate (`lone_surrogate`), reported as ``bad_utf8``.

    Records parsed from JSON or made in Python may hold them; ASCII values cost nothing.
    """
    if doc.text.isascii() and doc.id.isascii() and not doc.fields:
        return False
    problem = lone_surrogate(doc, spec)
    if problem:
        bad.report("bad_utf8", doc.where, problem)
    return bool(problem)


def lone_surrogate(doc: Document, spec: RecordSpec) -> str:
    r"""Describe the first lone surrogate in ``doc``'s text, id or kept fields ("" if none).

    Only JSON ``\uD8xx`` escapes produce them (UTF-8 decoding never does), and they cannot be
    encoded, so the shard writers (or the tokenizer trainer) would fail on them far from the
    input line. ``str.isascii`` is O(1) in CPython, so ASCII values cost nothing; any other costs
    one UTF-8 encode, about a tenth of the time it takes to parse that JSON line (scanning the raw
    line for ``\u`` escapes first measured no cheaper overall).
    """
    # A chat record's text is its normalized turns: name the fields they came from.
    text_name = spec.text_field if spec.schema == "text" else "/".join(SCHEMA_FIELDS[spec.schema])
    values: list[tuple[str, Any]] = [(text_name, doc.text), (spec.id_field or "id", doc.id)]
    values += list((doc.fields or {}).items())
    for name, value in values:
        if value is None or isinstance(value, (bool, int, float)):
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if text.isascii():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return (
                f"field {name!r} holds a lone surrogate {text[err.start]!r} at character "
                f"{err.start} (JSON \\uD8xx escapes must come in pairs)"
            )
    return ""


def _utf8_error(err: UnicodeDecodeError) -> str:
    bad = err.object[err.start : err.start + 4]
    return f"invalid UTF-8 at byte {err.start} of the line ({bad!r}: {err.reason})"
