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
import os
import stat
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
# Input fed to a zstd decompressor per call. zstd's densest block (RLE: 4 bytes for 128 KiB)
# inflates 32,768x, so 1 KiB of input yields at most 32 MiB: a small .zst cannot expand into
# gigabytes in one call. Measured: 1 KiB pieces decompress as fast as 1 MiB pieces (0.13 vs
# 0.14 s for 99 MB of JSONL).
ZSTD_FEED_BYTES = 1 << 10
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
MAX_RECORD_BYTES = 256 << 20  # one JSONL line, Parquet row or text file; --max-record-bytes
_FILE_TYPES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
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

    def report(self, kind: str, where: str, message: str, remedy: str = "fix it") -> None:
        """Raise or count one bad record of ``kind`` at ``where``."""
        if self.on_bad_record != "skip":
            raise CorpusError(f"{where}: {message}; {remedy} or pass --on-bad-record=skip")
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


def check_regular_file(url: str) -> None:
    """Refuse ``url`` unless it is a regular file (or a link to one), before anyone opens it.

    Opening a FIFO blocks until a writer appears and ``/dev/zero`` never ends, so both would
    hang a conversion or fill memory. A directory or a missing file passes: opening it says
    what is wrong. Remote inputs are checked by the type their filesystem reports.

    Raises:
        CorpusError: ``url`` is a FIFO, device or socket (or a link to one).
    """
    if storage.is_local(url):
        path = url.removeprefix("file://")
        try:
            mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
        except OSError:
            return  # missing, dangling or unreadable: opening it gives the precise error
        what = next((name for is_kind, name in _FILE_TYPES if is_kind(mode)), None)
        if what is not None and os.path.islink(path):
            what += f" (through the link to {os.path.realpath(path)})"
    else:
        fs, path = storage.url_to_fs(url)
        try:
            info = storage.with_retries(lambda: fs.info(path), url=url, what="stat")
        except OSError:
            return
        kind = info.get("type")
        what = None if kind in ("file", "directory", None) else f"of type {kind!r}"
    if what is not None:
        raise CorpusError(
            f"{url}: is {what}, not a regular file; reading it could hang or never end, so "
            "remove it from the input (or name the regular files to convert)"
        )


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
    with f:
        try:
            if kind == "parquet":
                if codec != "none":
                    raise CorpusError(f"{source.url}: compressed Parquet files are not supported")
                yield from _read_parquet(f, source.url, name, spec, bad, stats, max_record_bytes)
            elif kind == "jsonl":
                yield from _read_jsonl(
                    f, codec, source.url, name, spec, bad, stats, max_record_bytes
                )
            else:
                yield from _read_text_file(f, codec, source.url, name, bad, stats, max_record_bytes)
        except DamagedFileError as err:
            if bad.on_bad_record != "skip":
                raise
            bad.report("damaged_file", err.where, err.what + "; the rest of the file is skipped")


def read_jsonl_table(
    source: InputFile,
    *,
    spec: RecordSpec,
    stats: Counter[str] | None = None,
    max_record_bytes: int = MAX_RECORD_BYTES,
) -> DocumentTable | None:
    """Parse a whole JSONL file with pyarrow's JSON reader; ``None`` means "read it line by line".

    This is the fast path: no Python object per record, so conversion runs at the speed of zstd
    rather than of ``json.loads``. It takes only files it can prove clean: every line one object
    (no blank lines, no BOM) of at most ``max_record_bytes``, the text a non-empty string, the id
    a string or missing, kept fields of their declared type, valid UTF-8 throughout, and the file
    under ``FAST_JSONL_MAX_BYTES``. Anything else (including every bad record) returns ``None``
    and :func:`read_documents` reads the file again, finding and reporting what is wrong; both
    paths give the same documents.

    Raises:
        CorpusError: ``source`` is not a regular file (see :func:`check_regular_file`).
    """
    stats = stats if stats is not None else Counter()
    kind, codec = kind_of(source.url)
    schema = _arrow_schema(spec)
    if kind != "jsonl" or source.num_bytes > FAST_JSONL_MAX_BYTES or schema is None:
        return None
    check_regular_file(source.url)
    chunks: list[bytes] = []
    size = 0
    try:
        with storage.open_read(source.url) as f:
            for chunk in _iter_chunks(f, codec, source.url):
                size += len(chunk)
                if size > FAST_JSONL_MAX_BYTES:  # a small file that inflates: stream it instead
                    return None
                chunks.append(chunk)
    except (CorpusError, OSError):
        return None  # the line reader says what is wrong
    data = b"".join(chunks)
    del chunks
    if not data or data.startswith(_UTF8_BOM) or _has_line_over(data, max_record_bytes):
        return None
    num_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
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


def _arrow_schema(spec: RecordSpec) -> pa.Schema | None:
    """The fast path's explicit schema for ``spec``; ``None`` where it cannot express it."""
    keep = spec.keep_fields
    names = [spec.text_field, *([spec.id_field] if spec.id_field else []), *keep]
    if "json" in keep.values() or len(set(names)) != len(names):
        return None
    return pa.schema(
        [(spec.text_field, pa.string())]
        + ([(spec.id_field, pa.string())] if spec.id_field else [])
        + [(k, _ARROW_KEEP_TYPES[t]) for k, t in keep.items()]
    )


def _has_line_over(data: bytes, max_bytes: int) -> bool:
    """Whether a line of ``data`` (newline excluded) is longer than ``max_bytes``.

    A line longer than ``2 * step - 1`` bytes covers a whole aligned block of ``step`` bytes, so
    looking for a newline in each block (``memchr``, which stops at the first) finds every
    candidate; only newline-free blocks cost a look at their line's real length.
    """
    if len(data) <= max_bytes:
        return False
    step = max(1, max_bytes // 2)
    start = 0
    while start < len(data):
        if data.find(b"\n", start, start + step) >= 0:
            start += step
            continue
        line_start = data.rfind(b"\n", 0, start) + 1
        line_end = data.find(b"\n", start)
        line_end = len(data) if line_end < 0 else line_end
        if line_end - line_start > max_bytes:
            return True
        start = line_end + 1
    return False


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
    dec: Any = new()  # zlib and zstd decompressor objects share the calls used here
    fed = False  # whether the current member/frame has received input
    out = 0
    empty = True  # a 0-byte file lacks even the header, so it is truncated, not an empty corpus
    while raw := f.read(CHUNK_BYTES):
        empty = False
        data: bytes | memoryview = memoryview(raw)  # zstd slices it without copying
        rest: bytes | memoryview = b""
        held = False  # whether zlib may hold output back (it stopped at max_length)
        while data or held:
            try:
                # zlib's output is bounded per call (a gzip bomb inflates 1000x); zstd's is not,
                # so zstd gets at most ZSTD_FEED_BYTES of input per call (see the constant).
                if codec == "gzip":
                    piece = dec.decompress(data, CHUNK_BYTES)
                else:
                    piece = dec.decompress(data[:ZSTD_FEED_BYTES])
                    rest = data[ZSTD_FEED_BYTES:]
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
            held = False
            if dec.eof:
                data = dec.unused_data + bytes(rest) if codec == "zstd" else dec.unused_data
                rest = b""
                dec, fed = new(), False
            elif codec == "gzip":
                data = dec.unconsumed_tail
                held = len(piece) == CHUNK_BYTES
            else:
                data = rest
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


def _iter_lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[bytes | int]:
    """Split a chunk stream into lines without the newline; linear in the longest line.

    A line longer than ``max_bytes`` comes out as its length (an ``int``): it is measured to its
    end but never held, so memory stays within ``max_bytes`` plus a chunk. Lines inside one chunk
    come out whole (the caller checks their length).
    """
    pending: list[bytes] = []
    size = 0  # bytes of the unfinished line; held in ``pending`` while within max_bytes
    for chunk in chunks:
        last = chunk.rfind(b"\n")
        if last < 0:
            size += len(chunk)
            if size <= max_bytes:
                pending.append(chunk)
            else:
                pending.clear()
            continue
        lines: list[bytes] = chunk[:last].split(b"\n")
        if size:
            size += len(lines[0])
            if size > max_bytes:
                yield size
                del lines[0]
            else:
                pending.append(lines[0])
                lines[0] = b"".join(pending)
        yield from lines
        size = len(chunk) - last - 1
        pending = [chunk[last + 1 :]] if 0 < size <= max_bytes else []
    if size:
        yield b"".join(pending) if size <= max_bytes else size


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
    max_record_bytes: int,
) -> Iterator[Document]:
    loads = json.loads
    num_bytes = 0
    lines = _iter_lines(_iter_chunks(f, codec, url), max_record_bytes)
    for line_no, raw in enumerate(lines, start=1):
        if isinstance(raw, int) or len(raw) > max_record_bytes:
            size = raw if isinstance(raw, int) else len(raw)
            num_bytes += size + 1
            stats["records"] += 1
            _report_too_large(bad, f"{url}:{line_no}", size, max_record_bytes)
            continue
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


def _report_too_large(bad: BadRecords, where: str, size: int, max_record_bytes: int) -> None:
    bad.report(
        "record_too_large",
        where,
        f"record is {size} bytes, over --max-record-bytes {max_record_bytes}",
        remedy="raise the limit",
    )


def _loads_like_arrow(raw: bytes, spec: RecordSpec) -> dict[str, Any] | None:
    """Parse one JSONL line with pyarrow's JSON reader, reading only the fields of ``spec``.

    Used for lines ``json.loads`` cannot take (too deep, too many digits), so that they fare
    exactly as on the fast path; ``None`` where pyarrow refuses the line too or where the fast
    path would not have run (JSON-typed kept fields).
    """
    schema = _arrow_schema(spec)
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
    f: IO[bytes],
    codec: str,
    url: str,
    name: str,
    bad: BadRecords,
    stats: Counter[str],
    max_record_bytes: int,
) -> Iterator[Document]:
    chunks: list[bytes] = []
    size = 0
    for chunk in _iter_chunks(f, codec, url):
        size += len(chunk)
        if size <= max_record_bytes:
            chunks.append(chunk)
        else:
            chunks.clear()  # measured to its end, never held
    stats["records"] += 1
    stats["bytes"] += size
    if size > max_record_bytes:
        _report_too_large(bad, url, size, max_record_bytes)
        return
    data = b"".join(chunks)
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
    max_record_bytes: int,
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
        sizes = _row_bytes(table)
        over = np.flatnonzero(sizes > max_record_bytes)
        for index in over:  # counted first, then left out before any value becomes Python
            where = f"{url}: row {row + index} (row group {group})"
            _report_too_large(bad, where, int(sizes[index]), max_record_bytes)
        kept = np.flatnonzero(sizes <= max_record_bytes) if len(over) else None
        if kept is not None:
            table = table.take(pa.array(kept))
        try:
            rows: list[dict[str, Any] | None] = list(table.to_pylist())
        except UnicodeDecodeError:  # Parquet does not validate UTF-8; find the bad rows
            numbers = [row + int(i) for i in kept] if kept is not None else None
            rows = _decode_rows(table, url, row, group, bad, numbers)
        if kept is not None:
            padded: list[dict[str, Any] | None] = [None] * len(sizes)
            for index, record in zip(kept, rows, strict=True):
                padded[index] = record
            rows = padded
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


def _row_bytes(table: pa.Table) -> np.ndarray:
    """Bytes each row holds in its string and binary columns (its variable-size values)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        t = column.type
        if (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or (pa.types.is_large_binary(t))
        ):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    return sizes


def _decode_rows(
    table: pa.Table,
    url: str,
    first_row: int,
    group: int,
    bad: BadRecords,
    numbers: list[int] | None = None,
) -> list[dict[str, Any] | None]:
    """Decode a row group cell by cell, reporting invalid UTF-8; ``None`` marks a bad row.

    ``numbers`` are the rows' numbers in the file when ``table`` is not the whole row group.
    Only used when the fast whole-table decode fails, so its cost (a few microseconds per cell)
    is paid for bad row groups alone.
    """
    rows: list[dict[str, Any] | None] = []
    for index in range(table.num_rows):
        number = numbers[index] if numbers is not None else first_row + index
        record: dict[str, Any] = {}
        for column in table.column_names:
            try:
                record[column] = table.column(column)[index].as_py()
            except UnicodeDecodeError as err:
                bad.report(
                    "bad_utf8",
                    f"{url}: row {number} (row group {group})",
                    f"column {column!r} holds invalid UTF-8 "
                    f"({err.object[err.start : err.start + 4]!r}: {err.reason})",
                )
                break
        else:
            rows.append(record)
            continue
        rows.append(None)
    return rows
