"""Arrow IPC file shards: zstd-compressed record batches of a few MB, random access by batch.

A text shard has columns ``id`` (string) and ``text`` (string), a tokenized shard ``id`` and
``input_ids`` (list of uint16 or uint32), a chat shard ``id`` and ``messages`` (JSON text), each
followed by the kept fields (``json`` fields are
stored as JSON text). Shards open as they are with ``pyarrow.ipc.open_file`` and
``pyarrow.dataset.dataset(path, format="arrow")``.

Reading checks a shard as hostile input before any row is made: its schema, its row count against
the manifest (the sum of the record batches' lengths), every offset and UTF-8 string
(``validate(full=True)``), no nulls in ``id``, ``text`` or ``input_ids``, and token ids below the
vocabulary size (one ``min``/``max`` over the values).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa

from shardloader.blocks import DIGEST_HEX
from shardloader.errors import ShardError
from shardloader.formats import (
    BlockRead,
    ReadSpec,
    WriteSpec,
    check_block,
    check_num_samples,
    check_token_ids,
    counted,
    extra_fields,
    load_json,
    read_into,
    read_span,
)

BATCH_ROWS = 65536
_FILE_MAGIC_BYTES = 8  # "ARROW1" and two bytes of padding, before the schema message
_ARROW_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),
}


def arrow_schema(fields: Mapping[str, str], token_dtype: str | None) -> pa.Schema:
    """The Arrow schema of shards with these fields."""
    out = []
    for name, kind in fields.items():
        if kind == "tokens":
            out.append(pa.field(name, pa.list_(pa.from_numpy_dtype(np.dtype(token_dtype)))))
        else:
            out.append(pa.field(name, _ARROW_TYPES[kind]))
    return pa.schema(out)


def rows_before_limit(sizes: np.ndarray, used: int, limit: int) -> int:
    """How many of ``sizes`` to take so the running total (from ``used``) just reaches ``limit``.

    The row that crosses the limit is included, as a writer that checks after each row would do;
    returns ``len(sizes)`` when the limit is not reached.
    """
    if used >= limit:
        return min(1, len(sizes))
    cum = np.cumsum(sizes)
    return min(int(np.searchsorted(cum, limit - used, side="left")) + 1, len(sizes))


class ArrowShardWriter:
    """Buffers samples and writes a compressed record batch every ``batch_bytes``.

    Rows come one at a time (:meth:`write`) or as Arrow columns (:meth:`write_columns`); either
    way a batch ends after the row that brings it to ``batch_bytes`` of payload or ``BATCH_ROWS``
    rows, and its arrays are rebuilt contiguous, so the bytes do not depend on how rows came in.
    """

    def __init__(
        self,
        sink: Any,
        *,
        fields: Mapping[str, str],
        token_dtype: str | None,
        compression: str,
        compression_level: int,
        batch_bytes: int,
    ) -> None:
        self._schema = arrow_schema(fields, token_dtype)
        self._extras = extra_fields(fields)
        self._tokens = "input_ids" in fields
        self._dtype = np.dtype(token_dtype) if token_dtype else None
        codec = pa.Codec("zstd", compression_level) if compression == "zstd" else None
        self._tee = _BatchTee(sink)
        # One thread: convert runs a process per core, and a batch's few buffers gain nothing
        # from Arrow's pool but its hand-offs.
        options = pa.ipc.IpcWriteOptions(compression=codec, use_threads=False)
        self._writer = pa.ipc.new_file(self._tee, self._schema, options=options)
        self._batch_bytes = batch_bytes
        self._ids: list[str] = []
        self._payloads: list[Any] = []
        self._fields: dict[str, list[Any]] = {k: [] for k in self._extras}
        self._pieces: list[list[pa.Array]] = []  # column slices waiting for the next batch
        self._rows_only = True  # whether every piece was built here from rows
        self._buffered = 0
        self._num_rows = 0
        self._sink = sink
        # [num_samples, offset, length, decoded bytes, digest] of each record batch's IPC
        # message (`shardloader.blocks.BLOCK_ENTRY`), for the manifest. None when the sink
        # cannot tell its position (the manifest then has no block table).
        self.blocks: list[list[Any]] | None = []

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample."""
        self._ids.append(doc_id)
        self._payloads.append(payload)
        for key, values in self._fields.items():
            values.append(fields.get(key) if fields else None)
        self._buffered += len(payload) if isinstance(payload, bytes) else payload.nbytes
        self._num_rows += 1
        if self._buffered >= self._batch_bytes or self._num_rows >= BATCH_ROWS:
            self._flush()

    def write_columns(
        self, ids: pa.Array, texts: pa.Array, fields: Mapping[str, pa.Array], sizes: np.ndarray
    ) -> None:
        """Add many text samples at once; ``sizes`` are the UTF-8 byte lengths of ``texts``."""
        start, n = 0, len(texts)
        while start < n:
            take = rows_before_limit(sizes[start:], self._buffered, self._batch_bytes)
            take = min(take, BATCH_ROWS - self._num_rows)
            self._rows_to_piece()
            piece = [ids.slice(start, take), texts.slice(start, take)]
            piece += [fields[k].slice(start, take) for k in self._extras]
            self._pieces.append(piece)
            self._rows_only = False
            self._buffered += int(sizes[start : start + take].sum())
            self._num_rows += take
            start += take
            if self._buffered >= self._batch_bytes or self._num_rows >= BATCH_ROWS:
                self._flush()

    def _rows_to_piece(self) -> None:
        if not self._ids:
            return
        arrays = [pa.array(self._ids, pa.string())]
        if self._tokens:
            lengths = np.fromiter((len(p) for p in self._payloads), np.int64, len(self._payloads))
            offsets = np.zeros(len(lengths) + 1, np.int32)
            np.cumsum(lengths, out=offsets[1:])
            values = np.concatenate(self._payloads).astype(self._dtype, copy=False)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
        else:
            arrays.append(pa.array(self._payloads, pa.binary()).view(pa.string()))
        for key, kind in self._extras.items():
            values_ = self._fields[key]
            if kind == "json":
                values_ = [
                    None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True)
                    for v in values_
                ]
            arrays.append(pa.array(values_, _ARROW_TYPES[kind]))
        self._pieces.append(arrays)
        self._ids, self._payloads = [], []
        self._fields = {k: [] for k in self._extras}

    def _flush(self) -> None:
        self._rows_to_piece()
        if not self._pieces:
            return
        if len(self._pieces) == 1 and self._rows_only:
            arrays = self._pieces[0]
        elif len(self._pieces) == 1:  # slices of whole-file columns: rebased, not copied
            arrays = [_contiguous(array) for array in self._pieces[0]]
        else:  # concat_arrays normalizes slices and validity bitmaps, which serialize differently
            arrays = [pa.concat_arrays(list(column)) for column in zip(*self._pieces, strict=True)]
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        start = self._position()
        # The file's magic and schema come with batch one: they are not part of its block.
        skip = _FILE_MAGIC_BYTES + self._schema.serialize().size if start == 0 else 0
        self._tee.begin(skip)
        self._writer.write_batch(batch)
        digest, hashed = self._tee.end()
        end = self._position()
        if start is None or end is None or self.blocks is None or hashed != end - start - skip:
            self.blocks = None
        else:
            self.blocks.append([batch.num_rows, start + skip, hashed, self._buffered, digest])
        self._pieces, self._buffered, self._num_rows = [], 0, 0
        self._rows_only = True

    def _position(self) -> int | None:
        """Bytes the sink holds so far (the IPC writer writes each message through at once)."""
        tell = getattr(self._sink, "tell", None)
        try:
            return int(tell()) if tell is not None else None
        except (OSError, ValueError):  # an unseekable stream: no block table
            return None

    def close(self) -> None:
        """Write the last batch and the file footer; `blocks` then lists every batch."""
        self._flush()
        self._writer.close()


def _contiguous(array: pa.Array) -> pa.Array:
    """``array`` as ``pa.concat_arrays([array])`` gives it (offset 0), serialized the same.

    A string slice without nulls is rebuilt over its own bytes, with offsets from 0: a 128 KiB
    batch then costs no copy of its text (a sliced array itself serializes differently: the IPC
    writer keeps bytes before the slice). Anything else is concatenated.
    """
    if array.type != pa.string() or array.null_count:
        return pa.concat_arrays([array])
    offsets = np.frombuffer(
        array.buffers()[1], np.int32, count=len(array) + 1, offset=array.offset * 4
    )
    first, last = int(offsets[0]), int(offsets[-1])
    rebased = pa.py_buffer(offsets - np.int32(first))  # a copy of 4 bytes a row, not of the text
    data = array.buffers()[2].slice(first, last - first)
    return pa.StringArray.from_buffers(len(array), rebased, data, None, 0)


# Decoding in this thread: record batches are small (128 KiB by default), and the thread pool
# costs more than it gives (300 MB of text in 2,260 batches: 0.49 s without it, 0.76 s with it).
_READ_OPTIONS = pa.ipc.IpcReadOptions(use_threads=False)
# Decoded buffers come from the C allocator, not Arrow's default pool (mimalloc in the wheels):
# mimalloc keeps pages freed from another thread (the main thread drops what the decode threads
# decoded) until their thread allocates again, and a text pass without workers peaked 60-66 MB
# higher with it (461 against 395 MB; tokens 437/369, packed rows 465/410), at the same speed.
_DECODE_POOL = pa.system_memory_pool()
_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # continuation marker, length 0


@functools.lru_cache(maxsize=64)
def _schema_message(fields: tuple[tuple[str, str], ...], token_dtype: str | None) -> bytes:
    """The schema the manifest's fields give, as an IPC stream's first message.

    A checked block is decoded as a one-batch stream after this message, not after the schema
    in its file's footer: the footer is not covered by the digest, convert writes exactly this
    schema, and a batch that does not fit it fails validation. (So no footer is read per file.)
    """
    return bytes(_expected_schema(fields, token_dtype).serialize())


class _BatchTee:
    """The sink an Arrow writer writes through, hashing what one record batch writes.

    Between :meth:`begin` and :meth:`end`, each write past the first ``skip`` bytes also feeds
    the block digest (`shardloader.blocks.block_digest` of the batch's message, computed as it
    passes: no copy of the batch and no second read).
    """

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self._hash: Any = None
        self._skip = 0
        self._hashed = 0

    def begin(self, skip: int) -> None:
        """Start the digest of one batch, after the next ``skip`` bytes (the file's header)."""
        self._hash, self._skip, self._hashed = hashlib.sha256(), skip, 0

    def end(self) -> tuple[str, int]:
        """The digest of the bytes written since `begin` (less the skipped), and their count."""
        digest = self._hash.hexdigest()[:DIGEST_HEX]
        self._hash = None
        return digest, self._hashed

    def write(self, data: Any) -> int:
        if self._hash is not None:
            view = memoryview(data).cast("B")
            if self._skip:
                cut = min(self._skip, len(view))
                view, self._skip = view[cut:], self._skip - cut
            self._hash.update(view)
            self._hashed += len(view)
        return int(self._sink.write(data))

    def tell(self) -> int:
        tell = getattr(self._sink, "tell", None)
        if tell is None:
            raise OSError("the sink cannot tell its position")
        return int(tell())

    def flush(self) -> None:
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return bool(getattr(self._sink, "closed", False))

    def close(self) -> None:
        close = getattr(self._sink, "close", None)
        if close is not None:
            close()


class ArrowFormat:
    """Arrow IPC file shards (``.arrow``)."""

    name = "arrow"

    def file_suffix(self, compression: str) -> str:
        """Always ``.arrow``: compression is per record batch, inside the file."""
        return ".arrow"

    def open_writer(self, sink: Any, spec: WriteSpec) -> ArrowShardWriter:
        """Start an Arrow shard."""
        return ArrowShardWriter(
            sink,
            fields=spec.fields,
            token_dtype=spec.token_dtype,
            compression=spec.compression,
            compression_level=spec.compression_level,
            batch_bytes=spec.batch_bytes,
        )

    def iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        """Yield the samples of an Arrow shard."""
        yield from counted(self._iter_samples(source, spec), spec.num_samples, spec.where)

    def _iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        fields, where = spec.fields, spec.where
        try:
            reader = pa.ipc.open_file(source, memory_pool=_DECODE_POOL)
            _check_schema(reader.schema, fields, spec.token_dtype, where)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                _check_batch(batch, fields, spec.vocab_size, where)
                yield from _batch_samples(batch, fields, where)
        except (pa.ArrowException, OSError) as err:  # pyarrow's IOError status: OSError
            raise ShardError(f"{where}: not a readable Arrow shard ({err})") from err

    def read_columns(self, path: str, spec: ReadSpec) -> ArrowColumns:
        """Memory-map an Arrow shard and decode its record batches."""
        fields, where = spec.fields, spec.where
        try:
            with pa.memory_map(path) as source:
                reader = pa.ipc.open_file(source, options=_READ_OPTIONS, memory_pool=_DECODE_POOL)
                _check_schema(reader.schema, fields, spec.token_dtype, where)
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            # Before anything is sized by the manifest's count (the reader's window ids).
            check_num_samples(sum(b.num_rows for b in batches), spec.num_samples, where)
            table = pa.Table.from_batches(batches, schema=reader.schema)
            _check_batch(table, fields, spec.vocab_size, where)
        except (pa.ArrowException, OSError) as err:  # pyarrow's IOError status: OSError
            raise ShardError(f"{where}: not a readable Arrow shard ({err})") from err
        return ArrowColumns(table, fields, where)

    def read_block(
        self, path: str, spec: ReadSpec, block_index: int, span: tuple[int, int] | None = None
    ) -> ArrowColumns:
        """Memory-map an Arrow shard and decode record batch ``block_index`` only.

        The batch is found by the file's footer (``span`` is not needed).

        ``spec.num_samples`` is the block's count (the manifest's block table); the batch is
        checked like a whole shard (schema, count, offsets, UTF-8, nulls, token ids).
        """
        fields, where = spec.fields, spec.where
        try:
            with pa.memory_map(path) as source:
                reader = pa.ipc.open_file(source, options=_READ_OPTIONS, memory_pool=_DECODE_POOL)
                _check_schema(reader.schema, fields, spec.token_dtype, where)
                if not 0 <= block_index < reader.num_record_batches:
                    raise ShardError(
                        f"{where}: the manifest names record batch {block_index} but the shard "
                        f"holds {reader.num_record_batches}; the manifest does not describe "
                        'this shard: run "shardloader verify", then reconvert'
                    )
                batch = reader.get_batch(block_index)
            return _block_columns(batch, reader.schema, spec, f"{where} batch {block_index}")
        except (pa.ArrowException, OSError) as err:  # pyarrow's IOError status: OSError
            raise ShardError(f"{where}: not a readable Arrow shard ({err})") from err

    def read_verified_block(
        self, path: str, spec: ReadSpec, block_index: int, where: tuple[int, int], digest: str
    ) -> ArrowColumns:
        """Read a record batch's bytes, check them against its digest, decode those bytes.

        ``where`` is ``(offset, length)`` of batch ``block_index``'s IPC message in the shard.

        The batch is decoded with the schema of the manifest's fields (`_schema_message`; the
        file's footer is not read) and checked like `read_block`'s. So a damaged or replaced
        block is caught without hashing the whole shard.
        """
        label = f"{spec.where} batch {block_index}"
        offset, length = where
        try:
            # A copy (one block): what is checked is what is decoded, whatever the file does.
            head = _schema_message(tuple(spec.fields.items()), spec.token_dtype)
            message, got = read_span(path, offset, length, head=head)
            check_block(memoryview(message)[len(head) : len(head) + got], digest, label, where)
            return _decode_message(message, spec, label)
        except OSError as err:
            raise ShardError(f"{label}: not a readable Arrow record batch ({err})") from err

    def read_verified_blocks(self, reads: Sequence[BlockRead]) -> list[ArrowColumns]:
        """Read, check and decode many blocks (of any shards of one dataset) together.

        Every block's bytes are read into one buffer after the schema message and checked
        against their digests (a read without one is not checked: ``verify_local`` off, or a
        shard hashed whole when it was opened). The buffer is then decoded as one IPC stream
        and validated in two calls that release the GIL for the whole group (one call per
        block takes it back about ten times: on a thread beside a busy one, each time costs a
        switch interval), and split into the blocks, each checked like `read_verified_block`'s.

        Raises:
            ShardError: A block does not match its digest, does not decode or fails a check
                (read that block alone for which).
        """
        if not reads:
            return []
        first = reads[0].spec
        head = _schema_message(tuple(first.fields.items()), first.token_dtype)
        total = len(head) + sum(r.span[1] for r in reads) + len(_END_OF_STREAM)
        message = bytearray(total)
        message[: len(head)] = head
        view = memoryview(message)
        position = len(head)
        labels = [f"{read.spec.where} batch {read.block_index}" for read in reads]
        for read, label in zip(reads, labels, strict=True):
            offset, length = read.span
            part = view[position : position + length]
            got = read_into(read.path, offset, part)
            if read.digest:
                check_block(part[:got], read.digest, label, read.span)
            elif got != length:
                raise ShardError(f"{label}: the shard ends inside the record batch")
            position += length
        view[position:] = _END_OF_STREAM
        try:
            stream = pa.ipc.open_stream(
                pa.py_buffer(message), options=_READ_OPTIONS, memory_pool=_DECODE_POOL
            )
            table = stream.read_all()
            batches = table.to_batches()
            if len(batches) != len(reads):
                raise ShardError(f"{len(reads)} blocks decoded as {len(batches)} record batches")
            _check_batch(table, first.fields, first.vocab_size, "a group of blocks")
        except (pa.ArrowException, OSError) as err:
            raise ShardError(f"a group of blocks: not readable record batches ({err})") from err
        out = []
        for read, label, batch in zip(reads, labels, batches, strict=True):
            check_num_samples(batch.num_rows, read.spec.num_samples, label)
            block = pa.Table.from_batches([batch], schema=table.schema)
            out.append(ArrowColumns(block, read.spec.fields, read.spec.where))
        return out

    def decode_block(self, data: bytes, spec: ReadSpec, block_index: int) -> ArrowColumns:
        """Decode record batch ``block_index`` from its IPC message bytes ``data``.

        For a block read from remote storage by a ranged read, whose bytes the caller has
        already checked against the block's digest. Decoded with the schema of the manifest's
        fields and checked like `read_block`'s.
        """
        head = _schema_message(tuple(spec.fields.items()), spec.token_dtype)
        message = bytearray(len(head) + len(data))
        message[: len(head)] = head
        message[len(head) :] = data
        return _decode_message(message, spec, f"{spec.where} batch {block_index}")


def _decode_message(message: bytearray, spec: ReadSpec, label: str) -> ArrowColumns:
    """The schema message and one checked batch message, read as a one-batch IPC stream.

    So the read options apply: no thread pool for a small batch.
    """
    try:
        reader = pa.ipc.open_stream(
            pa.py_buffer(message), options=_READ_OPTIONS, memory_pool=_DECODE_POOL
        )
        return _block_columns(reader.read_next_batch(), reader.schema, spec, label)
    except (pa.ArrowException, OSError, StopIteration) as err:
        raise ShardError(f"{label}: not a readable Arrow record batch ({err})") from err


def _block_columns(
    batch: pa.RecordBatch, schema: pa.Schema, spec: ReadSpec, label: str
) -> ArrowColumns:
    """One decoded block, checked like a whole shard.

    Its count (``spec.num_samples``, from the manifest's block table), offsets, UTF-8, nulls and
    token ids.
    """
    check_num_samples(batch.num_rows, spec.num_samples, label)
    table = pa.Table.from_batches([batch], schema=schema)
    _check_batch(table, spec.fields, spec.vocab_size, spec.where)
    return ArrowColumns(table, spec.fields, spec.where)


class ArrowColumns:
    """A decoded Arrow shard, each column made ready for indexing on first use.

    Token columns become numpy views of each record batch's values plus offsets over them all
    (`_TokenColumn`: a sample is a zero-copy slice); other columns become one Python list (or
    parsed JSON). Taking rows is then plain indexing,
    several times faster than an Arrow ``take`` per window slice.

    Args:
        table: The shard's rows, checked (`_check_batch`).
        fields: The manifest's field types.
        where: The shard, for errors in ``json`` fields.
    """

    def __init__(self, table: pa.Table, fields: Mapping[str, str], where: str) -> None:
        self._table: pa.Table | None = table
        self._fields = dict(fields)
        self._where = where
        self._ready: dict[str, Any] = {}
        self.num_rows = table.num_rows

    def _column(self, name: str) -> Any:
        if name not in self._ready:
            kind = self._fields[name]
            assert self._table is not None  # (dropped only once every column is ready)
            column = self._table.column(name)
            if kind == "tokens":
                self._ready[name] = _token_column(column)
            elif kind == "json":
                self._ready[name] = _parse_json(column.to_pylist(), name, self._where)
            else:
                self._ready[name] = column.to_pylist()
        return self._ready[name]

    def take(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """The values of ``rows``, column by column."""
        index = rows.tolist()
        out: dict[str, list[Any]] = {}
        for name, kind in self._fields.items():
            column = self._column(name)
            if kind == "tokens":
                out[name] = column.take(rows)
            else:
                out[name] = [column[i] for i in index]
        self._drop_table()
        return out

    def _drop_table(self) -> None:
        """Let the Arrow table go once every column is ready.

        Text columns are then Python lists and token columns numpy views that keep their own
        buffers, so the decoded text is not held twice.
        """
        if self._table is not None and len(self._ready) == len(self._fields):
            self._table = None

    def token_lengths(self, rows: np.ndarray, field: str) -> np.ndarray:
        """Token counts of ``rows`` of ``field``, from the offsets alone."""
        offsets = self._column(field).offsets  # int64 (`_token_column`)
        return offsets[rows + 1] - offsets[rows]

    def take_tokens(self, rows: np.ndarray, field: str) -> list[np.ndarray]:
        """The token ids of ``rows`` of ``field``: views of the decoded values."""
        column: _TokenColumn = self._column(field)
        return column.take(rows)


class _TokenColumn:
    """A token column as numpy views of its decoded record batches, without joining them.

    ``offsets`` index the batches' values as if they were one array (a row's ids lie in one
    batch); ``bounds`` is where each batch starts in that array. A whole shard is many record
    batches: `pa.ChunkedArray.combine_chunks` copied all its ids into new memory first (about 8
    ms of every 8 MiB shard, most of it page faults).
    """

    def __init__(self, values: list[np.ndarray], offsets: np.ndarray, bounds: np.ndarray) -> None:
        self.values, self.offsets, self.bounds = values, offsets, bounds

    def take(self, rows: np.ndarray) -> list[np.ndarray]:
        """The ids of ``rows``: views of the decoded values."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        if len(self.values) == 1:
            values = self.values[0]
            return [values[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        batch = np.searchsorted(self.bounds, starts, side="right") - 1
        base = self.bounds[batch]
        parts = self.values
        return [
            parts[i][a:b]
            for i, a, b in zip(
                batch.tolist(), (starts - base).tolist(), (ends - base).tolist(), strict=True
            )
        ]


def _token_column(column: pa.ChunkedArray) -> _TokenColumn:
    """``column`` (a checked list of ints per row) as a `_TokenColumn` over its own buffers."""
    values: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    bounds = np.zeros(max(column.num_chunks, 1), np.int64)
    total = 0
    for index, array in enumerate(column.chunks):
        local = _numpy_view(array.offsets).astype(np.int64)
        first = int(local[0]) if len(local) else 0
        last = int(local[-1]) if len(local) else 0
        values.append(_numpy_view(array.values)[first:last])
        bounds[index] = total
        offsets.append(local[:-1] - first + total)
        total += last - first
    if not values:
        values.append(np.zeros(0, np.uint16))
    offsets.append(np.array([total], np.int64))
    return _TokenColumn(values, np.concatenate(offsets), bounds)


def _numpy_view(values: pa.Array) -> np.ndarray:
    """A primitive Arrow array without nulls as a numpy array over the same memory.

    ``Array.to_numpy(zero_copy_only=False)`` would do, but takes pyarrow's pandas path and so
    imports pandas where it is installed: 0.13 s in every DataLoader worker's first batch.
    """
    if values.null_count:
        return values.to_numpy(zero_copy_only=False)
    return _buffer_view(values)


def _buffer_view(values: pa.Array) -> np.ndarray:
    """The values buffer of primitive array ``values`` as numpy (null slots hold anything)."""
    dtype = np.dtype(str(values.type))
    offset = values.offset * dtype.itemsize
    return np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=offset)


def _filled_lengths(lengths: pa.Array) -> np.ndarray:
    """``lengths`` (integers) as int64, nulls as 0, from the buffers.

    Not ``pc.fill_null(lengths, 0)`` and ``to_numpy``: a Python scalar and ``to_numpy`` import
    pandas where it is installed (0.26 s of a ``shardloader stats`` run).
    """
    values = _buffer_view(lengths).astype(np.int64)
    if lengths.null_count:
        bits = np.unpackbits(np.frombuffer(lengths.buffers()[0], np.uint8), bitorder="little")
        values[bits[lengths.offset : lengths.offset + len(lengths)] == 0] = 0
    return values


@functools.lru_cache(maxsize=64)
def _expected_schema(fields: tuple[tuple[str, str], ...], token_dtype: str | None) -> pa.Schema:
    return arrow_schema(dict(fields), token_dtype)


def _check_schema(
    schema: pa.Schema, fields: Mapping[str, str], token_dtype: str | None, where: str
) -> None:
    expected = _expected_schema(tuple(fields.items()), token_dtype)
    if not schema.equals(expected):
        raise ShardError(f"{where}: schema {schema} does not match the manifest's {expected}")


def _check_batch(
    batch: pa.RecordBatch | pa.Table,
    fields: Mapping[str, str],
    vocab_size: int | None,
    where: str,
) -> None:
    """Full validation (offsets, UTF-8), no nulls where a writer puts none, token id range."""
    batch.validate(full=True)
    for position, (name, kind) in enumerate(fields.items()):
        column = batch.column(name)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        if position < 2 and column.null_count:  # id and the payload
            raise ShardError(f"{where}: column {name!r} holds {column.null_count} nulls")
        if kind != "tokens":
            continue
        for chunk in chunks:
            if chunk.values.null_count:
                raise ShardError(f"{where}: column {name!r} holds null token ids")
            if len(chunk):
                offsets = _numpy_view(chunk.offsets)
                values = _numpy_view(chunk.values)[offsets[0] : offsets[-1]]
                check_token_ids(values, vocab_size, where)


def _parse_json(texts: list[str | None], name: str, where: str) -> list[Any]:
    return [
        None if v is None else load_json(v, f"{where}: field {name!r} of row {row}")
        for row, v in enumerate(texts)
    ]


def _batch_samples(
    batch: pa.RecordBatch, fields: Mapping[str, str], where: str
) -> Iterator[dict[str, Any]]:
    columns: dict[str, list[Any]] = {}
    for name, kind in fields.items():
        column = batch.column(name)
        if kind == "tokens":
            values = _numpy_view(column.values)
            offsets = _numpy_view(column.offsets)
            columns[name] = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        elif kind == "json":
            columns[name] = _parse_json(column.to_pylist(), name, where)
        else:
            columns[name] = column.to_pylist()
    names = list(columns)
    for row in zip(*columns.values(), strict=True):
        yield dict(zip(names, row, strict=True))


def read_lengths(
    source: Any, field: str, kind: str, where: str, *, limit: int | None = None
) -> np.ndarray:
    """The lengths of one column of an Arrow shard, reading that column only.

    Token columns give token counts (from the list offsets), others their characters (UTF-8
    code points, counted by Arrow without making Python strings). The IPC reader is told to
    load only ``field``, so a memory-mapped shard reads no other column's pages.

    Args:
        source: A memory map or a seekable binary file.
        field: The column.
        kind: Its manifest kind (``tokens``, ``string``, ``json``).
        where: The shard, for errors.
        limit: Read record batches until at least this many rows (``None``: all).

    Raises:
        ShardError: Not a readable Arrow shard, or no such column.
    """
    import pyarrow.compute as pc

    out: list[np.ndarray] = []
    count = 0
    try:
        schema = pa.ipc.open_file(source).schema
        if field not in schema.names:
            raise ShardError(f"{where}: no column {field!r} (columns: {', '.join(schema.names)})")
        options = pa.ipc.IpcReadOptions(included_fields=[schema.get_field_index(field)])
        reader = pa.ipc.open_file(source, options=options)
        for index in range(reader.num_record_batches):
            if limit is not None and count >= limit:
                break
            column = reader.get_batch(index).column(0)
            if kind == "tokens":
                offsets = _numpy_view(column.offsets)
                out.append(np.diff(offsets).astype(np.int64))
            else:
                out.append(_filled_lengths(pc.utf8_length(column)))
            count += len(column)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"{where}: not a readable Arrow shard ({err})") from err
    return np.concatenate(out) if out else np.zeros(0, np.int64)
