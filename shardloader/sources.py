"""Raw corpus readers: JSONL (plain, .gz, .zst), Parquet and plain-text files -> documents.

Each document carries the file and line (or Parquet row) it came from, so every error can name
its location. Bad records either raise :class:`CorpusError` (the default) or, with
``on_bad_record="skip"``, are counted by kind in a :class:`BadRecords` tally with their first
locations. Text is kept exactly as decoded: no normalization, no stripping.

Decompression is streamed chunk by chunk through ``zlib`` / ``zstandard`` decompressor objects,
which (unlike ``zstandard``'s stream reader) let us tell a truncated file from a finished one.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import zstandard

from shardloader import storage
from shardloader.errors import ConfigError, CorpusError
from shardloader.storage import InputFile

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
MAX_EXAMPLES = 20
ON_BAD_RECORD = ("raise", "skip")
RESERVED_FIELDS = ("id", "text", "input_ids")
KEEP_FIELD_TYPES = ("string", "int64", "float64", "bool", "json")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_INT64 = (-(2**63), 2**63 - 1)
_UTF8_BOM = b"\xef\xbb\xbf"
FAST_JSONL_MAX_BYTES = 512 << 20  # whole-file parsing holds ~3x this in memory
FAST_JSONL_BLOCK = 16 << 20
_ARROW_KEEP_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


class DamagedFileError(CorpusError):
    """A file cannot be read to its end (truncated or corrupt compression, not Parquet).

    With ``on_bad_record="skip"`` the rest of the file is skipped and counted as
    ``damaged_file``; the records read before the damage are kept.
    """

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


@dataclass(frozen=True, slots=True)
class Document:
    """One raw document.

    Attributes:
        id: The record's id field, or ``"{file}:{line}"`` (``"{file}"`` for text files).
        text: The document text, exactly as decoded.
        fields: Kept extra fields (name -> value), already type-checked.
        where: ``path:line`` (or ``path: row N``) of the record, for error messages.
    """

    id: str
    text: str
    fields: Mapping[str, Any] | None
    where: str


@dataclass(frozen=True)
class DocumentTable:
    """A whole clean JSONL file as Arrow columns (see :func:`read_jsonl_table`).

    Attributes:
        ids: Document ids (string array, generated ``file:line`` ids filled in).
        texts: Document texts (string array).
        fields: Kept fields, name -> array.
        sizes: UTF-8 byte length of each text.
        where: ``path:line`` prefix for documents, by row (``f"{where}:{row + 1}"``).
    """

    ids: pa.Array
    texts: pa.Array
    fields: Mapping[str, pa.Array]
    sizes: np.ndarray
    where: str

    def slice(self, start: int, length: int) -> DocumentTable:
        """Rows ``start`` to ``start + length`` (zero-copy)."""
        return DocumentTable(
            ids=self.ids.slice(start, length),
            texts=self.texts.slice(start, length),
            fields={k: v.slice(start, length) for k, v in self.fields.items()},
            sizes=self.sizes[start : start + length],
            where=self.where,
        )

    def documents(self) -> Iterator[Document]:
        """The rows as :class:`Document` objects (for the tokenizing path)."""
        names = list(self.fields)
        columns = [self.fields[k].to_pylist() for k in names]
        rows = zip(self.ids.to_pylist(), self.texts.to_pylist(), strict=True)
        for row, (doc_id, text) in enumerate(rows):
            fields = {k: col[row] for k, col in zip(names, columns, strict=True)} if names else None
            yield Document(doc_id, text, fields, f"{self.where}:{row + 1}")


@dataclass
class BadRecords:
    """Policy and tally for bad records.

    Args:
        on_bad_record: ``"raise"`` stops at the first bad record; ``"skip"`` counts and goes on.
    """

    on_bad_record: str = "raise"
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, kind: str, where: str, message: str) -> None:
        """Raise or count one bad record of ``kind`` at ``where``."""
        if self.on_bad_record != "skip":
            raise CorpusError(f"{where}: {message}; fix it or pass --on-bad-record=skip")
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {kind}: {message}")

    @property
    def total(self) -> int:
        """Number of records skipped so far."""
        return sum(self.counts.values())


@dataclass(frozen=True, kw_only=True)
class RecordSpec:
    """Which fields of a record to read.

    Args:
        text_field: Field holding the document text.
        id_field: Field holding the document id; when a record lacks it, an id is made from the
            file and line. ``None`` always makes ids.
        keep_fields: Extra fields to keep, name -> type (one of ``KEEP_FIELD_TYPES``).
    """

    text_field: str = "text"
    id_field: str | None = "id"
    keep_fields: Mapping[str, str] = field(default_factory=dict)


def parse_keep_fields(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse ``["url", "score:float64"]`` into ``{"url": "string", "score": "float64"}``.

    Raises:
        ConfigError: Unknown type, reserved or duplicate name.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, _, kind = spec.partition(":")
        name, kind = name.strip(), (kind.strip() or "string")
        if not name:
            raise ConfigError(f"keep_fields: empty field name in {spec!r}")
        if kind not in KEEP_FIELD_TYPES:
            raise ConfigError(
                f"keep_fields: {spec!r} has type {kind!r}; use one of {', '.join(KEEP_FIELD_TYPES)}"
            )
        if name in RESERVED_FIELDS:
            raise ConfigError(f"keep_fields: {name!r} is reserved (id, text, input_ids)")
        if name in out:
            raise ConfigError(f"keep_fields: {name!r} is listed twice")
        out[name] = kind
    return out


def kind_of(url: str) -> tuple[str, str]:
    """Return (kind, codec) for a file name: kind jsonl|parquet|text, codec none|gzip|zstd."""
    name = url.rsplit("/", 1)[-1].lower()
    codec = "none"
    if name.endswith(".gz"):
        codec, name = "gzip", name[:-3]
    elif name.endswith((".zst", ".zstd")):
        codec, name = "zstd", name.rsplit(".", 1)[0]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl", codec
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet", codec
    return "text", codec


def read_documents(
    source: InputFile, *, spec: RecordSpec, bad: BadRecords, stats: Counter[str] | None = None
) -> Iterator[Document]:
    """Yield the documents of one input file.

    ``stats`` (if given) receives ``records`` (records read, skipped ones included) and
    ``bytes`` (uncompressed bytes read).

    A damaged file (truncated or corrupt compression, unreadable Parquet) raises
    :class:`DamagedFileError`, or with ``on_bad_record="skip"`` ends the file early and counts one
    ``damaged_file``: the records before the damage are kept, the partial one is not.

    Raises:
        CorpusError: A bad record or damaged file (with ``on_bad_record="raise"``), an unreadable
            path, or a Parquet file whose text column is missing or not a string.
    """
    stats = stats if stats is not None else Counter()
    kind, codec = kind_of(source.url)
    name = storage.relpath(source.url, source.root)
    try:
        f = storage.open_read(source.url)
    except FileNotFoundError as err:
        raise CorpusError(
            f"{source.url}: cannot open, no such file ({err}); is it a dangling link, or was it "
            "removed during the conversion?"
        ) from err
    except OSError as err:
        raise CorpusError(f"{source.url}: cannot open ({type(err).__name__}: {err})") from err
    with f:
        try:
            if kind == "parquet":
                if codec != "none":
                    raise CorpusError(f"{source.url}: compressed Parquet files are not supported")
                yield from _read_parquet(f, source.url, name, spec, bad, stats)
            elif kind == "jsonl":
                yield from _read_jsonl(f, codec, source.url, name, spec, bad, stats)
            else:
                yield from _read_text_file(f, codec, source.url, name, bad, stats)
        except DamagedFileError as err:
            if bad.on_bad_record != "skip":
                raise
            bad.report("damaged_file", err.where, err.what + "; the rest of the file is skipped")


def read_jsonl_table(
    source: InputFile, *, spec: RecordSpec, stats: Counter[str] | None = None
) -> DocumentTable | None:
    """Parse a whole JSONL file with pyarrow's JSON reader; ``None`` means "read it line by line".

    This is the fast path: no Python object per record, so conversion runs at the speed of zstd
    rather than of ``json.loads``. It takes only files it can prove clean: every line one object
    (no blank lines, no BOM), the text a non-empty string, the id a string or missing, kept fields
    of their declared type, valid UTF-8 throughout, and the file under ``FAST_JSONL_MAX_BYTES``.
    Anything else (including every bad record) returns ``None`` and :func:`read_documents` reads
    the file again, finding and reporting what is wrong; both paths give the same documents.
    """
    stats = stats if stats is not None else Counter()
    kind, codec = kind_of(source.url)
    keep = spec.keep_fields
    names = [spec.text_field, *([spec.id_field] if spec.id_field else []), *keep]
    if (
        kind != "jsonl"
        or source.num_bytes > FAST_JSONL_MAX_BYTES
        or "json" in keep.values()
        or len(set(names)) != len(names)
    ):
        return None
    try:
        with storage.open_read(source.url) as f:
            data = b"".join(_iter_chunks(f, codec, source.url))
    except (CorpusError, OSError):
        return None  # the line reader says what is wrong
    if not data or data.startswith(_UTF8_BOM) or len(data) > FAST_JSONL_MAX_BYTES:
        return None
    num_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    schema = pa.schema(
        [(spec.text_field, pa.string())]
        + ([(spec.id_field, pa.string())] if spec.id_field else [])
        + [(k, _ARROW_KEEP_TYPES[t]) for k, t in keep.items()]
    )
    try:
        table = pa_json.read_json(
            pa.BufferReader(data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=FAST_JSONL_BLOCK),
            parse_options=pa_json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
        columns = {name: pa.concat_arrays(table.column(name).chunks) for name in schema.names}
        for array in columns.values():
            array.validate(full=True)  # the JSON reader does not check UTF-8
    except (pa.ArrowException, ValueError):
        return None
    if table.num_rows != num_lines:
        return None  # blank lines (skipped by pyarrow) would shift the line numbers
    texts = columns.pop(spec.text_field)
    if texts.null_count:
        return None
    sizes = pc.binary_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(sizes) and sizes.min() == 0:
        return None
    name = storage.relpath(source.url, source.root)
    ids = columns.pop(spec.id_field) if spec.id_field else None
    if ids is None or ids.null_count or pc.any(pc.equal(pc.binary_length(ids), 0)).as_py():
        given = ids.to_pylist() if ids is not None else [None] * len(texts)
        ids = pa.array(
            [v if v else f"{name}:{row}" for row, v in enumerate(given, start=1)], pa.string()
        )
    stats["records"] += len(texts)
    stats["bytes"] += len(data)
    return DocumentTable(ids=ids, texts=texts, fields=columns, sizes=sizes, where=source.url)


def _iter_chunks(f: IO[bytes], codec: str, url: str) -> Iterator[bytes]:
    """Yield decompressed chunks; raise CorpusError on a truncated or corrupt stream."""
    if codec == "none":
        while chunk := f.read(CHUNK_BYTES):
            yield chunk
        return
    new = (
        (lambda: zlib.decompressobj(31))
        if codec == "gzip"
        else (lambda: zstandard.ZstdDecompressor().decompressobj())
    )
    errors: tuple[type[Exception], ...] = (zlib.error, zstandard.ZstdError)
    dec = new()
    fed = False  # whether the current member/frame has received input
    out = 0
    empty = True  # a 0-byte file lacks even the header, so it is truncated, not an empty corpus
    while data := f.read(CHUNK_BYTES):
        empty = False
        while data:
            try:
                piece = dec.decompress(data)
            except errors as err:
                raise DamagedFileError(
                    url,
                    f"corrupt {codec} data after {out} decompressed bytes ({err}); "
                    "the file is damaged, recreate or exclude it",
                ) from err
            fed = True
            out += len(piece)
            if piece:
                yield piece
            if dec.eof:
                data = dec.unused_data
                dec, fed = new(), False
            else:
                data = b""
    if empty:
        raise DamagedFileError(
            url, f"empty {codec} file (0 bytes, not even a header); recreate or exclude the file"
        )
    if fed:
        raise DamagedFileError(
            url,
            f"truncated {codec} file (the stream ends after {out} decompressed bytes "
            "without an end marker); recreate or exclude the file",
        )


def _iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a chunk stream into lines without the newline; linear in the longest line."""
    pending: list[bytes] = []
    for chunk in chunks:
        last = chunk.rfind(b"\n")
        if last < 0:
            pending.append(chunk)
            continue
        head = chunk[:last]
        if pending:
            pending.append(head)
            head = b"".join(pending)
            pending = []
        yield from head.split(b"\n")
        if last + 1 < len(chunk):
            pending.append(chunk[last + 1 :])
    if pending:
        tail = b"".join(pending)
        if tail:
            yield tail


def _type_name(value: Any) -> str:
    """Name ``value``'s type as JSON does (``null``, ``an array``), not as Python does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _lone_surrogate(doc: Document, spec: RecordSpec) -> str:
    r"""Describe the first lone surrogate in ``doc``'s text, id or kept fields ("" if none).

    Only JSON ``\uD8xx`` escapes produce them (UTF-8 decoding never does), and they cannot be
    encoded, so the shard writers (or the tokenizer trainer) would fail on them far from the
    input line. ``str.isascii`` is O(1) in CPython, so ASCII values cost nothing; any other costs
    one UTF-8 encode, about a tenth of the time it takes to parse that JSON line (scanning the raw
    line for ``\u`` escapes first measured no cheaper overall).
    """
    values: list[tuple[str, Any]] = [(spec.text_field, doc.text), (spec.id_field or "id", doc.id)]
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


def _read_jsonl(
    f: IO[bytes],
    codec: str,
    url: str,
    name: str,
    spec: RecordSpec,
    bad: BadRecords,
    stats: Counter[str],
) -> Iterator[Document]:
    loads = json.loads
    num_bytes = 0
    for line_no, raw in enumerate(_iter_lines(_iter_chunks(f, codec, url)), start=1):
        num_bytes += len(raw) + 1
        if line_no == 1 and raw.startswith(_UTF8_BOM):  # written by some Windows tools
            raw = raw[len(_UTF8_BOM) :]
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
        if not isinstance(record, dict):
            bad.report(
                "not_object",
                f"{url}:{line_no}",
                f"expected a JSON object per line, found {_type_name(record)}",
            )
            continue
        doc = _make_document(record, f"{name}:{line_no}", f"{url}:{line_no}", spec, bad)
        if doc is None:
            continue
        if not (doc.text.isascii() and doc.id.isascii()) or doc.fields:
            problem = _lone_surrogate(doc, spec)
            if problem:
                bad.report("bad_utf8", doc.where, problem)
                continue
        yield doc
    stats["bytes"] += num_bytes


def _make_document(
    record: Mapping[str, Any], default_id: str, where: str, spec: RecordSpec, bad: BadRecords
) -> Document | None:
    if spec.text_field not in record:
        present = ", ".join(sorted(record)[:8]) or "none"
        bad.report(
            "missing_text",
            where,
            f"no {spec.text_field!r} field (fields present: {present}); "
            "choose the text field with --text-field",
        )
        return None
    text = record[spec.text_field]
    if text is None:
        bad.report("missing_text", where, f"field {spec.text_field!r} is null, expected a string")
        return None
    if not isinstance(text, str):
        bad.report(
            "bad_text_type",
            where,
            f"field {spec.text_field!r} is {_type_name(text)}, expected a string",
        )
        return None
    if not text:
        bad.report("empty_text", where, f"field {spec.text_field!r} is an empty string")
        return None
    doc_id = default_id
    if spec.id_field is not None:
        value = record.get(spec.id_field)
        if isinstance(value, str) and value:
            doc_id = value
        elif isinstance(value, int) and not isinstance(value, bool):
            doc_id = str(value)
        elif value is not None:
            bad.report(
                "bad_id",
                where,
                f"id field {spec.id_field!r} is {_type_name(value)} ({value!r:.40}), expected a "
                "non-empty string or an integer",
            )
            return None
    fields = None
    if spec.keep_fields:
        fields = {}
        for key, kind in spec.keep_fields.items():
            value = record.get(key)
            problem = _check_field(value, kind)
            if problem:
                bad.report("bad_field", where, f"field {key!r} {problem}; declare it {key}:json")
                return None
            fields[key] = float(value) if kind == "float64" and value is not None else value
    return Document(doc_id, text, fields, where)


def _check_field(value: Any, kind: str) -> str:
    if value is None or kind == "json":
        return ""
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int64": isinstance(value, int)
        and not isinstance(value, bool)
        and _INT64[0] <= value <= _INT64[1],
        "float64": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    return "" if ok else f"is {_type_name(value)} ({value!r:.40}), expected {kind}"


def _read_text_file(
    f: IO[bytes], codec: str, url: str, name: str, bad: BadRecords, stats: Counter[str]
) -> Iterator[Document]:
    data = b"".join(_iter_chunks(f, codec, url))
    stats["records"] += 1
    stats["bytes"] += len(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad.report(
            "bad_utf8",
            f"{url}:{line}",
            f"invalid UTF-8 at byte {err.start} of the file "
            f"({err.object[err.start : err.start + 4]!r}"
            f": {err.reason}), so not a UTF-8 text file",
        )
        return
    if not text:
        bad.report("empty_text", url, "the file is empty")
        return
    yield Document(name, text, None, url)


def _read_parquet(
    f: IO[bytes],
    url: str,
    name: str,
    spec: RecordSpec,
    bad: BadRecords,
    stats: Counter[str],
) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        raise DamagedFileError(url, f"not a readable Parquet file ({err})") from err
    schema = pf.schema_arrow
    if spec.text_field not in schema.names:
        raise CorpusError(
            f"{url}: no column {spec.text_field!r} (columns: {', '.join(schema.names)}); "
            "choose the text column with --text-field"
        )
    if not (
        pa.types.is_string(schema.field(spec.text_field).type)
        or pa.types.is_large_string(schema.field(spec.text_field).type)
    ):
        raise CorpusError(
            f"{url}: column {spec.text_field!r} has type {schema.field(spec.text_field).type}, "
            "expected string"
        )
    columns = [spec.text_field]
    if spec.id_field is not None and spec.id_field in schema.names:
        columns.append(spec.id_field)
    columns += [k for k in spec.keep_fields if k in schema.names and k not in columns]
    row = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise DamagedFileError(f"{url}: row group {group}", f"cannot be read ({err})") from err
        try:
            rows: list[dict[str, Any] | None] = list(table.to_pylist())
        except UnicodeDecodeError:  # Parquet does not validate UTF-8; find the bad rows
            rows = _decode_rows(table, url, row, group, bad)
        for offset, record in enumerate(rows):
            stats["records"] += 1
            if record is None:
                continue
            where = f"{url}: row {row + offset} (row group {group})"
            text = record.get(spec.text_field)
            if isinstance(text, str):
                stats["bytes"] += len(text.encode("utf-8"))
            doc = _make_document(record, f"{name}:{row + offset}", where, spec, bad)
            if doc is not None:
                yield doc
        row += len(rows)


def _decode_rows(
    table: pa.Table, url: str, first_row: int, group: int, bad: BadRecords
) -> list[dict[str, Any] | None]:
    """Decode a row group cell by cell, reporting invalid UTF-8; ``None`` marks a bad row.

    Only used when the fast whole-table decode fails, so its cost (a few microseconds per cell)
    is paid for bad row groups alone.
    """
    rows: list[dict[str, Any] | None] = []
    for index in range(table.num_rows):
        record: dict[str, Any] = {}
        for column in table.column_names:
            try:
                record[column] = table.column(column)[index].as_py()
            except UnicodeDecodeError as err:
                bad.report(
                    "bad_utf8",
                    f"{url}: row {first_row + index} (row group {group})",
                    f"column {column!r} holds invalid UTF-8 "
                    f"({err.object[err.start : err.start + 4]!r}: {err.reason})",
                )
                break
        else:
            rows.append(record)
            continue
        rows.append(None)
    return rows
