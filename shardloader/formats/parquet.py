"""Parquet files read in place: the shards of a dataset made by ``shardloader index``.

Nothing is written in this format (convert writes Arrow or tar); a manifest of format
``"parquet"`` names existing Parquet files, one shard per file, and its ``config`` says which
columns hold the text (``text_field``), the ids (``id_field``, or none) and the kept fields. A
sample is ``id`` (the id column as text, or ``<shard path>:<row>`` when the files have none),
``text``, then the kept fields under their column names; list, struct and map columns come as
Python lists and dicts (manifest type ``json``).

Reading checks a file as hostile input before any row is made: the row count of its footer
against the manifest (a file rewritten since indexing says to index again), the column types
against the manifest, every offset and UTF-8 string (``validate(full=True)``; Parquet itself does
not validate UTF-8), and no nulls in the id or text column. Only the needed columns are decoded.

Row groups are blocks (`shardloader.blocks`). Where the index hashed the file (local files), each
row group has a digest: `row_group_digest` of its column chunks' bytes followed by the file's
footer, which says how to decode them. `ParquetFormat.read_verified_block` reads those two
ranges, checks them, and decodes the row group from exactly those bytes (`_CheckedFile`), so a
process reading a few row groups of a file does not hash it whole.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardloader.blocks import DIGEST_HEX
from shardloader.errors import ConfigError, ShardError, ShardloaderError
from shardloader.formats import ReadSpec, WriteSpec, check_num_samples, counted

REINDEX = 'the file changed after it was indexed: run "shardloader index" again'
MAGIC = b"PAR1"
MAX_FOOTER_BYTES = 256 << 20  # a longer footer is refused (what one is read into memory)
_HASH_STEP = 1 << 20  # bytes read and hashed at a time when indexing (fits in L2 cache)


def read_footer(fd: int, size: int, where: str) -> bytes:
    """The footer of the Parquet file open at ``fd`` of ``size`` bytes: metadata, length, magic.

    Raises:
        ShardError: The file is too short, lacks the magic, or names a footer that does not
            fit in it (or is over ``MAX_FOOTER_BYTES``).
    """
    tail = os.pread(fd, 8, size - 8) if size >= 12 else b""
    length = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
    if tail[4:] != MAGIC or not 0 < length <= min(size - 12, MAX_FOOTER_BYTES):
        raise ShardError(f"{where}: no Parquet footer at the end of its {size} bytes; " + REINDEX)
    footer = os.pread(fd, length + 8, size - 8 - length)
    if len(footer) != length + 8:
        raise ShardError(f"{where}: its footer ends early; " + REINDEX)
    return footer


def row_group_digest(chunks: bytes | memoryview, footer: bytes) -> str:
    """A row group's block digest: sha256 of its column chunks' bytes then the file's footer.

    The footer says how those bytes decode (codecs, encodings, offsets, the schema), so it is
    checked with them; first 128 bits, hex, as `shardloader.blocks.block_digest`.
    """
    return _with_footer(hashlib.sha256(chunks), footer)


def _with_footer(hasher: Any, footer: bytes) -> str:
    hasher.update(footer)
    return str(hasher.hexdigest()[:DIGEST_HEX])


def hash_parquet_file(
    path: str, size: int, spans: Sequence[tuple[int, int]]
) -> tuple[str, list[str]]:
    """The sha256 of local file ``path`` and the `row_group_digest` of each of its ``spans``.

    One sequential read in steps of 1 MiB (memory bounded whatever the row groups' size):
    ``spans`` are ``(offset, length)``, increasing and not overlapping; each step feeds the file's
    hash and the spans it covers.

    Raises:
        ShardError: As `read_footer`, or the file ends inside a span.
        OSError: The file cannot be read.
    """
    whole = hashlib.sha256()
    hashers = [hashlib.sha256() for _ in spans]
    hashed = [0] * len(spans)
    buffer = bytearray(_HASH_STEP)  # read into, as `shardloader.cache.hash_fd` does
    with open(path, "rb") as f:
        footer = read_footer(f.fileno(), size, path) if spans else b""
        pos, first = 0, 0  # spans before ``first`` are complete
        while n := os.preadv(f.fileno(), [buffer], pos):
            view = memoryview(buffer)[:n]
            whole.update(view)
            end = pos + n
            for k in range(first, len(spans)):
                offset, length = spans[k]
                if offset >= end:
                    break
                lo, hi = max(offset, pos), min(offset + length, end)
                if hi > lo:
                    hashers[k].update(view[lo - pos : hi - pos])
                    hashed[k] += hi - lo
                if offset + length <= end:
                    first = k + 1
            pos = end
    for (offset, length), done in zip(spans, hashed, strict=True):
        if done != length:
            raise ShardError(
                f"{path}: ends inside row group bytes [{offset}, {offset + length}); " + REINDEX
            )
    return whole.hexdigest(), [_with_footer(h, footer) for h in hashers]


def field_kind(kind: pa.DataType) -> str | None:
    """The manifest type of an Arrow column type, or ``None`` where none fits."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_floating(kind):
        return "float64"
    if pa.types.is_boolean(kind):
        return "bool"
    if (
        pa.types.is_list(kind)
        or pa.types.is_large_list(kind)
        or pa.types.is_struct(kind)
        or pa.types.is_map(kind)
    ):
        return "json"
    return None


def id_column_ok(kind: pa.DataType) -> bool:
    """Whether a column of this type can serve as the ids (strings or integers)."""
    return field_kind(kind) in ("string", "int64")


def source_columns(fields: Mapping[str, str], config: Mapping[str, Any]) -> dict[str, str | None]:
    """Map each manifest field to its column in the files (``None``: ids made from the row)."""
    out: dict[str, str | None] = {name: name for name in fields}
    out["id"] = config.get("id_field")
    out["text"] = config.get("text_field", "text")
    return out


class ParquetFormat:
    """Parquet files indexed in place (``.parquet``); read only."""

    name = "parquet"

    def file_suffix(self, compression: str) -> str:
        """``.parquet``."""
        return ".parquet"

    def open_writer(self, sink: Any, spec: WriteSpec) -> Any:
        """Refused: Parquet datasets are indexed, not written.

        Raises:
            ConfigError: Always.
        """
        raise ConfigError(
            'format "parquet" is read in place: run "shardloader index" over Parquet files, or '
            'convert to "arrow" or "tar"'
        )

    def iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        """Yield the samples of one Parquet file, row group by row group."""
        yield from counted(self._iter_samples(source, spec), spec.num_samples, spec.where)

    def _iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        where = spec.where
        try:
            pf = pq.ParquetFile(source)
            check_num_samples(pf.metadata.num_rows, spec.num_samples, where)
            columns = _columns_to_read(pf.schema_arrow, spec)
            row = 0
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group, columns=columns)
                decoded = ParquetColumns(_checked(table, spec), spec, first_row=row)
                taken = decoded.take(np.arange(table.num_rows))
                names = list(taken)
                for values in zip(*taken.values(), strict=True):
                    yield dict(zip(names, values, strict=True))
                row += table.num_rows
        except ShardloaderError:  # ours (also ValueError / OSError): as it is
            raise
        except (pa.ArrowException, OSError, ValueError) as err:  # pyarrow's IOError status: OSError
            raise ShardError(f"{where}: not a readable Parquet file ({err})") from err

    def read_columns(self, path: str, spec: ReadSpec) -> ParquetColumns:
        """Read the needed columns of a local Parquet file, checked against ``spec``."""
        where = spec.where
        try:
            pf = pq.ParquetFile(path, memory_map=True)
            # Before anything is sized by the manifest's count (the reader's window ids).
            _check_rows(pf.metadata.num_rows, spec)
            columns = _columns_to_read(pf.schema_arrow, spec)
            table = pf.read(columns=columns)
            _check_rows(table.num_rows, spec)
            return ParquetColumns(_checked(table, spec), spec)
        except ShardloaderError:  # ours (also ValueError / OSError): as it is
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ShardError(f"{where}: not a readable Parquet file ({err})") from err

    def read_block(
        self, path: str, spec: ReadSpec, block_index: int, span: tuple[int, int] | None = None
    ) -> ParquetColumns:
        """Read row group ``block_index`` (a block of the manifest), checked like a whole file.

        The row group is found by the file's footer (``span`` is not needed).
        """
        where = spec.where
        try:
            return _read_row_group(pq.ParquetFile(path, memory_map=True), block_index, spec)
        except ShardloaderError:  # ours (also ValueError / OSError): as it is
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ShardError(f"{where}: not a readable Parquet file ({err})") from err

    def read_verified_block(
        self, path: str, spec: ReadSpec, block_index: int, where: tuple[int, int], digest: str
    ) -> ParquetColumns:
        """Read row group ``block_index``'s bytes and the footer, check both, decode them.

        ``where`` is ``(offset, length)`` of the row group's column chunks; ``digest`` their
        `row_group_digest`. The row group is decoded from the checked bytes alone (the footer
        parsed from the checked copy, the chunks served from memory), whatever the file does
        meanwhile; a read outside them fails.
        """
        label = f"{spec.where} row group {block_index}"
        offset, length = where
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                footer = read_footer(fd, size, spec.where)
                chunks = os.pread(fd, length, offset) if offset + length <= size else b""
            finally:
                os.close(fd)
            if len(chunks) != length or row_group_digest(chunks, footer) != digest:
                raise ShardError(
                    f"{label}: bytes [{offset}, {offset + length}) and the footer do not match "
                    "the manifest's block digest; " + REINDEX
                )
            meta = pq.read_metadata(pa.BufferReader(MAGIC + footer))
            source = _CheckedFile(
                size, [(0, MAGIC), (offset, chunks), (size - len(footer), footer)]
            )
            return _read_row_group(pq.ParquetFile(source, metadata=meta), block_index, spec)
        except ShardloaderError:  # ours (also ValueError / OSError): as it is
            raise
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ShardError(f"{label}: not a readable Parquet row group ({err})") from err


def _read_row_group(pf: pq.ParquetFile, block_index: int, spec: ReadSpec) -> ParquetColumns:
    """Row group ``block_index`` of ``pf``: its needed columns, checked against ``spec``."""
    if not 0 <= block_index < pf.num_row_groups:
        raise ShardError(
            f"{spec.where}: has {pf.num_row_groups} row groups, the manifest names block "
            f"{block_index}; " + REINDEX
        )
    meta = pf.metadata
    first = sum(meta.row_group(i).num_rows for i in range(block_index))
    _check_rows(meta.row_group(block_index).num_rows, spec)
    table = pf.read_row_group(block_index, columns=_columns_to_read(pf.schema_arrow, spec))
    _check_rows(table.num_rows, spec)
    return ParquetColumns(_checked(table, spec), spec, first_row=first)


class _CheckedFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only ``pieces`` (checked bytes) can be read.

    What pyarrow reads a verified row group from: a read outside the pieces raises ``OSError``
    (so nothing unchecked is decoded).
    """

    def __init__(self, size: int, pieces: list[tuple[int, bytes]]) -> None:
        super().__init__()
        self._size = size
        self._pieces = pieces
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        for start, data in self._pieces:
            if start <= self._pos and self._pos + n <= start + len(data):
                at = self._pos - start
                view[:n] = data[at : at + n]
                self._pos += n
                return n
        raise OSError(f"a read of bytes [{self._pos}, {self._pos + n}) outside the checked ones")


def _check_rows(actual: int, spec: ReadSpec) -> None:
    if spec.num_samples is not None and actual != spec.num_samples:
        raise ShardError(
            f"{spec.where}: holds {actual} rows but the manifest says {spec.num_samples}; "
            + REINDEX
        )


def _columns_to_read(schema: pa.Schema, spec: ReadSpec) -> list[str]:
    """The file's columns that the manifest's fields need, their types checked."""
    mapping = source_columns(spec.fields, spec.config or {})
    out = []
    for name, column in mapping.items():
        if column is None:
            continue
        if column not in schema.names:
            raise ShardError(
                f"{spec.where}: no column {column!r} (the manifest's {name!r}); " + REINDEX
            )
        kind = schema.field(column).type
        expected = spec.fields[name]
        ok = id_column_ok(kind) if name == "id" else field_kind(kind) == expected
        if not ok:
            raise ShardError(
                f"{spec.where}: column {column!r} has type {kind}, the manifest says {expected}; "
                + REINDEX
            )
        out.append(column)
    return list(dict.fromkeys(out))


def _checked(table: pa.Table, spec: ReadSpec) -> pa.Table:
    """``table`` validated in full (offsets, UTF-8), without nulls in the id and text."""
    table.validate(full=True)
    mapping = source_columns(spec.fields, spec.config or {})
    for name in ("id", "text"):
        column = mapping[name]
        if column is not None and table.column(column).null_count:
            nulls = table.column(column).null_count
            raise ShardError(f"{spec.where}: column {column!r} ({name}) holds {nulls} nulls")
    return table


class ParquetColumns:
    """The needed columns of a Parquet file, each made a Python list on first use.

    Args:
        table: The file's needed columns, checked (`_checked`).
        spec: What the manifest says of the file.
        first_row: Row number of the table's first row in the file (for made ids).
    """

    def __init__(self, table: pa.Table, spec: ReadSpec, *, first_row: int = 0) -> None:
        self._table = table
        self._fields = dict(spec.fields)
        self._columns = source_columns(spec.fields, spec.config or {})
        self._prefix = spec.shard_path or spec.where
        self._first_row = first_row
        self._ready: dict[str, list[Any]] = {}
        self.num_rows = table.num_rows

    def _column(self, name: str) -> list[Any]:
        if name not in self._ready:
            column = self._table.column(self._columns[name])
            if name == "id" and not pa.types.is_string(column.type):
                column = pc.cast(column, pa.string())
            self._ready[name] = column.to_pylist()
        return self._ready[name]

    def take(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """The values of ``rows``, column by column."""
        index = rows.tolist()
        out: dict[str, list[Any]] = {}
        for name in self._fields:
            if name == "id" and self._columns["id"] is None:
                first, prefix = self._first_row, self._prefix
                out[name] = [f"{prefix}:{first + i}" for i in index]
            else:
                column = self._column(name)
                out[name] = [column[i] for i in index]
        return out

    def token_lengths(self, rows: np.ndarray, field: str) -> np.ndarray:
        """Refused: Parquet datasets hold text, not token ids.

        Raises:
            ShardError: Always.
        """
        raise self._no_tokens(field)

    def take_tokens(self, rows: np.ndarray, field: str) -> list[np.ndarray]:
        """Refused, like `token_lengths`.

        Raises:
            ShardError: Always.
        """
        raise self._no_tokens(field)

    def _no_tokens(self, field: str) -> ShardError:
        return ShardError(f"{self._prefix}: field {field!r} holds no token ids (a text dataset)")
