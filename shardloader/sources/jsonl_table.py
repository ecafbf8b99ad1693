"""The JSONL fast path: a whole clean file parsed by pyarrow's JSON reader into Arrow columns.

No Python object is made per record, so conversion runs at the speed of zstd rather than of
``json.loads``. Only files proven clean are taken; anything else returns ``None`` and goes to the
line reader (:mod:`shardloader.sources.jsonl`), which finds and reports what is wrong. Both paths
give the same documents.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from shardloader import storage
from shardloader.errors import CorpusError
from shardloader.sources.files import check_regular_file, kind_of
from shardloader.sources.records import MAX_RECORD_BYTES, Document, RecordSpec
from shardloader.sources.streams import count_newlines_in, iter_chunks
from shardloader.storage import InputFile

UTF8_BOM = b"\xef\xbb\xbf"
FAST_JSONL_MAX_BYTES = 512 << 20  # whole-file parsing holds ~3x this in memory
FAST_JSONL_BLOCK = 16 << 20
_ARROW_KEEP_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


@dataclass(frozen=True)
class DocumentTable:
    """A whole clean JSONL file as Arrow columns (see :func:`read_jsonl_table`).

    Attributes:
        ids: Document ids (string array, generated ``file:line`` ids filled in).
        texts: Document texts (string array).
        fields: Kept fields, name -> array.
        sizes: UTF-8 byte length of each text.
        where: ``path:line`` prefix for documents, by row (``f"{where}:{row + first_line}"``).
        first_line: The line number of the first row (later than 1 in a slice of a file).
    """

    ids: pa.Array
    texts: pa.Array
    fields: Mapping[str, pa.Array]
    sizes: np.ndarray
    where: str
    first_line: int = 1

    def slice(self, start: int, length: int) -> DocumentTable:
        """Rows ``start`` to ``start + length`` (zero-copy)."""
        return DocumentTable(
            ids=self.ids.slice(start, length),
            texts=self.texts.slice(start, length),
            fields={k: v.slice(start, length) for k, v in self.fields.items()},
            sizes=self.sizes[start : start + length],
            where=self.where,
            first_line=self.first_line + start,
        )

    def documents(self) -> Iterator[Document]:
        """The rows as :class:`Document` objects (for the tokenizing path)."""
        names = list(self.fields)
        columns = [self.fields[k].to_pylist() for k in names]
        rows = zip(self.ids.to_pylist(), self.texts.to_pylist(), strict=True)
        for row, (doc_id, text) in enumerate(rows):
            fields = {k: col[row] for k, col in zip(names, columns, strict=True)} if names else None
            yield Document(doc_id, text, fields, f"{self.where}:{row + self.first_line}")


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
    schema = arrow_schema(spec)
    if kind != "jsonl" or source.num_bytes > FAST_JSONL_MAX_BYTES or schema is None:
        return None
    check_regular_file(source.url)
    chunks: list[bytes] = []
    size = 0
    try:
        with storage.open_read(source.url) as f:
            if codec == "none":  # in one read: no chunks to join (a copy of the whole file)
                chunks.append(f.read(FAST_JSONL_MAX_BYTES + 1))
                size = len(chunks[0])
            else:
                for chunk in iter_chunks(f, codec, source.url):
                    size += len(chunk)
                    if size > FAST_JSONL_MAX_BYTES:  # a small file that inflates: stream it
                        return None
                    chunks.append(chunk)
    except (CorpusError, OSError):
        return None  # the line reader says what is wrong
    if size > FAST_JSONL_MAX_BYTES:  # grew since it was listed
        return None
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    del chunks
    return jsonl_table_from_bytes(
        data, source, spec=spec, stats=stats, max_record_bytes=max_record_bytes
    )


def jsonl_table_from_bytes(
    data: bytes,
    source: InputFile,
    *,
    spec: RecordSpec,
    stats: Counter[str],
    max_record_bytes: int = MAX_RECORD_BYTES,
    first_line: int = 1,
) -> DocumentTable | None:
    """Parse whole JSONL lines ``data`` of ``source`` (its lines from ``first_line`` on).

    The checks and the result are those of :func:`read_jsonl_table`; a slice of a big file
    (`shardloader.sources.slices`) is parsed here with its own first line number.
    """
    schema = arrow_schema(spec)
    if schema is None:
        return None
    if not data or data.startswith(UTF8_BOM) or has_line_over(data, max_record_bytes):
        return None
    num_lines = count_newlines_in(data) + (0 if data.endswith(b"\n") else 1)
    try:
        table = pa_json.read_json(
            pa.BufferReader(data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=FAST_JSONL_BLOCK),
            parse_options=pa_json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="ignore"
            ),
        )
        columns = {name: _one_array(table.column(name)) for name in schema.names}
        for array in columns.values():
            array.validate(full=True)  # the JSON reader does not check UTF-8
    except (pa.ArrowException, ValueError):
        return None
    if table.num_rows != num_lines:
        return None  # blank lines (skipped by pyarrow) would shift the line numbers
    texts = columns.pop(spec.text_field)
    if texts.null_count:
        return None
    sizes = byte_lengths(texts)
    if len(sizes) and sizes.min() == 0:
        return None
    name = storage.relpath(source.url, source.root)
    ids = columns.pop(spec.id_field) if spec.id_field else None
    if ids is None or ids.null_count or not byte_lengths(ids).all():
        given = ids.to_pylist() if ids is not None else [None] * len(texts)
        ids = pa.array(
            [v if v else f"{name}:{row}" for row, v in enumerate(given, start=first_line)],
            pa.string(),
        )
    stats["records"] += len(texts)
    stats["bytes"] += len(data)
    return DocumentTable(
        ids=ids, texts=texts, fields=columns, sizes=sizes, where=source.url, first_line=first_line
    )


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """``column`` as one array; a file of one JSON block is one chunk already (no copy)."""
    return column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)


def byte_lengths(strings: pa.Array) -> np.ndarray:
    """The UTF-8 byte length of each string of ``strings`` (int64), from its offsets.

    Not ``pc.binary_length(...).to_numpy()``: that, and comparing with a Python scalar, imports
    pandas where it is installed (0.26 s in every convert process).
    """
    offsets = np.frombuffer(
        strings.buffers()[1], np.int32, count=len(strings) + 1, offset=strings.offset * 4
    )
    return np.diff(offsets).astype(np.int64)


def arrow_schema(spec: RecordSpec) -> pa.Schema | None:
    """The fast path's explicit schema for ``spec``; ``None`` where it cannot express it."""
    keep = spec.keep_fields
    names = [spec.text_field, *([spec.id_field] if spec.id_field else []), *keep]
    if spec.schema != "text" or "json" in keep.values() or len(set(names)) != len(names):
        return None
    return pa.schema(
        [(spec.text_field, pa.string())]
        + ([(spec.id_field, pa.string())] if spec.id_field else [])
        + [(k, _ARROW_KEEP_TYPES[t]) for k, t in keep.items()]
    )


def has_line_over(data: bytes, max_bytes: int) -> bool:
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
