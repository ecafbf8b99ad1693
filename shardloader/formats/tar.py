"""WebDataset-compatible tar shards: plain ``.tar`` (the default), or zstd-compressed ``.tar.zst``.

Each sample is a group of members sharing a key (``{shard}-{index:07d}``): ``.txt`` holds the
UTF-8 text, or ``.npy`` the token ids (a numpy ``.npy`` file, never pickled); ``.json`` holds the
id and the kept fields, and for chat data also ``messages`` (then there is no ``.txt``).
``webdataset.WebDataset(urls)`` reads plain ones as they are (a ``.tar.zst`` through a ``pipe:``
URL that decompresses it). Member headers carry fixed times and
owners, so the same input always gives the same bytes.

A plain tar is also cut into blocks (`shardloader.blocks`): runs of whole samples of about
``batch_bytes`` of member data each, recorded by the writer (``TarShardWriter.blocks``: count,
byte range of the members, data bytes, digest). A block is read alone from its byte range: its
members parse as a tar of their own (the end-of-archive marker is added), checked against the
block's digest first. A ``.tar.zst`` is one zstd stream that cannot be entered in the middle: one
block, the whole shard.

Reading takes a tar as hostile input: every member must be a regular file named ``key.ext``
(no directories, so two keys never merge), with ``ext`` one the schema expects, each at most once
per key and each key's members together; ``.json`` must hold an object of the manifest's field
types, ``.npy`` a 1-D array of exactly the manifest's token dtype (header checked before any
allocation, never pickled) with ids below the vocabulary size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

import numpy as np
import pyarrow as pa
import zstandard

from shardloader.blocks import DIGEST_HEX
from shardloader.errors import ShardError
from shardloader.formats import (
    ReadSpec,
    WriteSpec,
    check_block,
    check_token_ids,
    counted,
    extra_fields,
    load_json,
    read_span,
)

_BLOCK = 512
# Largest member read into memory: a record is at most 256 MiB of text at conversion
# (ConvertConfig.max_record_bytes), and its token ids at most 4 bytes per byte of text.
MAX_MEMBER_BYTES = 1 << 30
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)
_FLUSH_BYTES = 1 << 20


def _ustar_template() -> tuple[bytearray, int]:
    """A USTAR header for a regular file (mode 0444, uid/gid 0, mtime 0) with name and size blank.

    ``tarfile`` builds each header in Python at ~70 us a member, which made tar conversion 5x
    slower than Arrow; filling two fields of a template costs ~3 us.
    """
    info = tarfile.TarInfo("x")
    info.mode, info.mtime, info.size = 0o444, 0, 0
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    header[0:100] = bytes(100)  # name
    header[124:136] = bytes(12)  # size
    header[148:156] = b" " * 8  # checksum, computed as if it were spaces
    return header, sum(header)


_TEMPLATE, _TEMPLATE_SUM = _ustar_template()


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file ``name`` (< 100 bytes) of ``size`` bytes."""
    header = bytearray(_TEMPLATE)
    header[0 : len(name)] = name
    size_field = b"%011o\0" % size
    header[124:136] = size_field
    checksum = _TEMPLATE_SUM + sum(name) + sum(size_field)  # the blanked fields summed to 0
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


class TarShardWriter:
    """Streams samples as tar members, through a zstd frame when compressed.

    Headers are USTAR with fixed owner, mode and time, so the same samples give the same bytes.
    A plain tar's samples are grouped into blocks of about ``batch_bytes`` of member data.
    """

    def __init__(
        self,
        sink: Any,
        *,
        shard_name: str,
        compression: str,
        compression_level: int,
        json_payload: str | None = None,
        batch_bytes: int = 128 << 10,
    ) -> None:
        self._sink = sink
        self._json_payload = json_payload
        self._zstd = None
        if compression == "zstd":
            self._zstd = zstandard.ZstdCompressor(level=compression_level).stream_writer(
                sink, closefd=False
            )
        self._prefix = shard_name
        self._index = 0
        self._buffer = bytearray()
        self._batch_bytes = max(1, batch_bytes)
        # [num_samples, offset, length, data bytes, digest] of each block (`shardloader.blocks`):
        # None for a .tar.zst (one stream) or a sink that cannot tell its position.
        self.blocks: list[list[Any]] | None = None
        self._offset = 0  # bytes of the tar so far, written or buffered
        if self._zstd is None:
            self._offset = _tell(sink)
            self.blocks = [] if self._offset >= 0 else None
        self._block_start = self._offset
        self._block_samples = 0
        self._block_data = 0
        self._block_hash = hashlib.sha256()

    def _add(self, name: str, data: bytes) -> None:
        buf = self._buffer
        start = len(buf)
        buf += ustar_header(name.encode("utf-8"), len(data))
        buf += data
        pad = -len(data) % _BLOCK
        if pad:
            buf += bytes(pad)
        if self.blocks is not None:
            self._block_hash.update(memoryview(buf)[start:])
        self._offset += len(buf) - start
        self._block_data += len(data)
        if len(buf) >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            (self._zstd or self._sink).write(bytes(self._buffer))
            self._buffer = bytearray()

    def _end_sample(self) -> None:
        """Count the sample just added in its block; end the block at ``batch_bytes``."""
        self._block_samples += 1
        if self._block_data >= self._batch_bytes:
            self._end_block()

    def _end_block(self) -> None:
        if self.blocks is not None and self._block_samples:
            length = self._offset - self._block_start
            digest = self._block_hash.hexdigest()[:DIGEST_HEX]
            entry = [self._block_samples, self._block_start, length, self._block_data, digest]
            self.blocks.append(entry)
        self._block_start = self._offset
        self._block_samples = self._block_data = 0
        self._block_hash = hashlib.sha256()

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample as ``key.txt`` or ``key.npy``, plus ``key.json``.

        A JSON payload (chat ``messages``, given as its JSON text) goes into ``key.json``.
        """
        key = f"{self._prefix}-{self._index:07d}"
        self._index += 1
        meta = {"id": doc_id, **(fields or {})}
        if self._json_payload is not None and isinstance(payload, bytes):
            # Spliced in as it is: parsing it again only to dump it would double the cost.
            head = json.dumps({"id": doc_id}, ensure_ascii=False)[:-1]
            name = json.dumps(self._json_payload)
            rest = json.dumps(fields or {}, ensure_ascii=False)[1:]
            tail = b"}" if not fields else b", " + rest.encode("utf-8")
            self._add(key + ".json", f"{head}, {name}: ".encode() + payload + tail)
        else:
            self._add(key + ".json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
            if isinstance(payload, bytes):
                self._add(key + ".txt", payload)
            else:
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(payload), allow_pickle=False)
                self._add(key + ".npy", buf.getvalue())
        self._end_sample()

    def write_columns(
        self, ids: pa.Array, texts: pa.Array, fields: Mapping[str, pa.Array], sizes: np.ndarray
    ) -> None:
        """Add many text samples at once (row by row: tar has no columns)."""
        names = list(fields)
        columns = [fields[k].to_pylist() for k in names]
        for row, (doc_id, text) in enumerate(zip(ids.to_pylist(), texts.to_pylist(), strict=True)):
            values = {k: col[row] for k, col in zip(names, columns, strict=True)} if names else None
            self.write(doc_id, text.encode("utf-8"), values)

    def close(self) -> None:
        """End the last block, write the end-of-archive blocks and end the zstd frame."""
        self._end_block()
        self._buffer += _END_OF_ARCHIVE
        self._flush()
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
            self._zstd.close()


def _tell(sink: Any) -> int:
    """The sink's position, or -1 where it cannot tell (then no block table is kept)."""
    try:
        return int(sink.tell())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return -1


class TarFormat:
    """WebDataset tar shards (``.tar`` or ``.tar.zst``)."""

    name = "tar"

    def file_suffix(self, compression: str) -> str:
        """``.tar.zst`` when compressed, else ``.tar``."""
        return ".tar.zst" if compression == "zstd" else ".tar"

    def open_writer(self, sink: Any, spec: WriteSpec) -> TarShardWriter:
        """Start a tar shard."""
        return TarShardWriter(
            sink,
            shard_name=spec.shard_name,
            compression=spec.compression,
            compression_level=spec.compression_level,
            json_payload=_json_payload(spec.fields),
            batch_bytes=spec.batch_bytes,
        )

    def iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        """Yield the samples of a tar shard in member order."""
        yield from counted(self._iter_samples(source, spec), spec.num_samples, spec.where)

    def _iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        """The samples of a shard, member by member.

        A plain tar is read into memory and its headers parsed in one pass (`_ustar_members`:
        several times faster than ``tarfile``, every header checked); a ``.tar.zst`` streams
        through ``tarfile``.
        """
        where, schema = spec.where, _Schema(spec)
        if spec.compression != "zstd":
            yield from _samples(_ustar_members(source.read(), where), schema, where)
            return
        stream = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:

                def members() -> Iterator[tuple[str, bytes, int, Callable[[], bytes]]]:
                    for member in tar:
                        reader = functools.partial(_extract, tar, member)
                        yield member.name, member.type, member.size, reader

                yield from _samples(members(), schema, where)
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as err:
            raise ShardError(f"{where}: not a readable tar shard ({err})") from err

    def read_columns(self, path: str, spec: ReadSpec) -> TarColumns:
        """Decode a whole tar shard (tar has no random access); counts are checked as it goes."""
        with open(path, "rb") as source:
            samples = list(self.iter_samples(source, spec))
        return TarColumns(samples, list(spec.fields))

    def read_block(
        self, path: str, spec: ReadSpec, block_index: int, span: tuple[int, int] | None = None
    ) -> TarColumns:
        """Decode block ``block_index`` of a plain tar from its byte range ``span``.

        A tar has no index of its members: the range comes from the manifest's block table.
        ``spec.num_samples`` is the block's count.
        """
        if span is None:
            raise ShardError(f"{spec.where} block {block_index}: no byte range to read it from")
        return self._decode_marked(_read_block(path, span, spec, block_index), spec, block_index)

    def read_verified_block(
        self, path: str, spec: ReadSpec, block_index: int, where: tuple[int, int], digest: str
    ) -> TarColumns:
        """Read a block's members, check them against the block's digest, decode them."""
        data = _read_block(path, where, spec, block_index)
        members = memoryview(data)[: where[1]]
        check_block(members, digest, f"{spec.where} block {block_index}", where)
        return self._decode_marked(data, spec, block_index)

    def decode_block(self, data: bytes, spec: ReadSpec, block_index: int) -> TarColumns:
        """Decode a block from its members' bytes (checked by the caller), as a tar of its own."""
        return self._decode_marked(bytes(data) + _END_OF_ARCHIVE, spec, block_index)

    def _decode_marked(
        self, data: bytes | bytearray, spec: ReadSpec, block_index: int
    ) -> TarColumns:
        """Decode a block's members followed by the end-of-archive marker."""
        if spec.compression == "zstd":
            raise ShardError(f"{spec.where}: a .tar.zst has no blocks; read it whole")
        checked = dataclasses.replace(spec, where=f"{spec.where} block {block_index}")
        samples = list(self.iter_samples(io.BytesIO(data), checked))
        return TarColumns(samples, list(spec.fields))


def _read_block(path: str, span: tuple[int, int], spec: ReadSpec, block_index: int) -> bytearray:
    """A block's bytes of a local shard, then the end-of-archive marker; all of them or an error."""
    offset, length = span
    data, got = read_span(path, offset, length, tail=_END_OF_ARCHIVE)
    if got != length:
        raise ShardError(
            f"{spec.where} block {block_index}: bytes [{offset}, {offset + length}) run past "
            f"the end of the shard ({offset + got} bytes); the shard was truncated or "
            "replaced: convert it again"
        )
    return data


class TarColumns:
    """A decoded tar shard held as Python objects.

    Args:
        samples: The shard's samples in order.
        names: The manifest's field names.
    """

    def __init__(self, samples: list[dict[str, Any]], names: list[str]) -> None:
        self._columns = {name: [s.get(name) for s in samples] for name in names}
        self.num_rows = len(samples)

    def take(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """The values of ``rows``, column by column."""
        index = rows.tolist()
        return {name: [column[i] for i in index] for name, column in self._columns.items()}

    def token_lengths(self, rows: np.ndarray, field: str) -> np.ndarray:
        """Token counts of ``rows`` of ``field``."""
        column = self._columns[field]
        return np.fromiter((len(column[i]) for i in rows.tolist()), np.int64, len(rows))

    def take_tokens(self, rows: np.ndarray, field: str) -> list[np.ndarray]:
        """The token ids of ``rows`` of ``field``."""
        column = self._columns[field]
        return [column[i] for i in rows.tolist()]


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int64": (int,),
    "float64": (float, int),
    "bool": (bool,),
}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _json_payload(fields: Mapping[str, str]) -> str | None:
    """The payload field's name when it is ``json`` (chat ``messages``), else ``None``."""
    names = list(fields)
    return names[1] if len(names) > 1 and fields[names[1]] == "json" else None


class _Schema:
    """What the manifest says a sample holds, resolved once per shard."""

    def __init__(self, spec: ReadSpec) -> None:
        self.json_payload = _json_payload(spec.fields)
        self.payload = "input_ids" if "input_ids" in spec.fields else "text"
        exts = {"input_ids": ("json", "npy"), "text": ("json", "txt")}[self.payload]
        self.exts = frozenset(("json",) if self.json_payload else exts)
        self.extras = extra_fields(spec.fields)
        self.dtype = np.dtype(spec.token_dtype) if spec.token_dtype else None
        self.vocab_size = spec.vocab_size


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    reader = tar.extractfile(member)
    return reader.read() if reader else b""


def _samples(
    members: Iterable[tuple[str, bytes, int, Callable[[], bytes]]], schema: _Schema, where: str
) -> Iterator[dict[str, Any]]:
    """Group members ``(name, tar type, size, read)`` into samples, refusing what we never write."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    done: set[str] = set()
    for name, kind, size, read in members:
        member_key, ext = _member_key(name, kind, size, schema, f"{where}:{name!r}")
        if member_key != key:
            if key is not None:
                yield _sample(parts, schema, f"{where}:{key}")
                done.add(key)
            if member_key in done:
                raise ShardError(
                    f"{where}:{name!r}: key {member_key!r} was already read; "
                    "the members of a sample must be adjacent"
                )
            key, parts = member_key, {}
        if ext in parts:
            raise ShardError(f"{where}:{name!r}: a second .{ext} for one key")
        parts[ext] = read()
    if key is not None:
        yield _sample(parts, schema, f"{where}:{key}")


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
_SUM_ROWS = 4096  # headers whose checksums are summed at once (2 MB of rows)
_ZERO_HEADER = bytes(_BLOCK)


def _ustar_members(
    data: bytes, where: str
) -> Iterator[tuple[str, bytes, int, Callable[[], bytes]]]:
    """The members of a tar held in memory, as ``(name, type, size, read)``, header by header.

    Parses the USTAR headers convert writes (and ``tarfile`` writes in USTAR format): name and
    prefix, octal size, type, and the header checksum, checked for every header before any
    member is handed out. Extended headers (pax, GNU long names) are not regular files and are
    refused by the caller, as sizes not in octal are here. Reading stops at the first zero
    header (the end-of-archive marker, as ``tarfile`` does); data that runs past the end of the
    bytes is refused.
    """
    found: list[tuple[str, bytes, int, int]] = []
    heads: list[int] = []
    sums: list[int] = []
    pos, end = 0, len(data)
    while True:
        if pos + _BLOCK > end:
            raise ShardError(f"{where}: not a readable tar shard (unexpected end of data)")
        header = data[pos : pos + _BLOCK]
        if header == _ZERO_HEADER:
            break
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            stored = int(header[148:156].rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(
                f"{where}: not a readable tar shard (a header at byte {pos} has a size or "
                "checksum that is not octal)"
            ) from None
        name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix + b"/" + name
        heads.append(pos)
        sums.append(stored)
        start = pos + _BLOCK
        found.append((name.decode("utf-8", "surrogateescape"), header[156:157], size, start))
        pos = start + size + (-size % _BLOCK)
        if pos > end:
            raise ShardError(f"{where}: not a readable tar shard (unexpected end of data)")
    _check_header_sums(data, heads, sums, where)
    view = memoryview(data)
    for member, kind, size, start in found:
        yield member, kind, size, functools.partial(_member_bytes, view, start, size)


def _member_bytes(view: memoryview, start: int, size: int) -> bytes:
    return bytes(view[start : start + size])


def _check_header_sums(data: bytes, heads: list[int], sums: list[int], where: str) -> None:
    """Every header's checksum: its bytes summed with the checksum field as spaces.

    Headers sit at multiples of 512 bytes: the data is viewed as rows of 512 (no copy) and the
    header rows are summed `_SUM_ROWS` at a time, so the temporary memory stays a few MB.
    """
    if not heads:
        return
    raw = np.frombuffer(data, dtype=np.uint8)
    rows = raw[: len(raw) // _BLOCK * _BLOCK].reshape(-1, _BLOCK)
    index = np.asarray(heads, dtype=np.int64) // _BLOCK
    expected = np.asarray(sums, dtype=np.int64)
    for start in range(0, len(index), _SUM_ROWS):
        part = rows[index[start : start + _SUM_ROWS]]
        total = part.sum(axis=1, dtype=np.int64) - part[:, 148:156].sum(axis=1, dtype=np.int64)
        bad = np.flatnonzero(total + 8 * 32 != expected[start : start + _SUM_ROWS])
        if len(bad):
            raise ShardError(
                f"{where}: not a readable tar shard (bad checksum in the header at byte "
                f"{heads[start + int(bad[0])]})"
            )


def _member_key(name: str, kind: bytes, size: int, schema: _Schema, where: str) -> tuple[str, str]:
    """The sample key and extension of a member, refusing anything a writer of ours never makes."""
    if kind not in _REGULAR:
        raise ShardError(f"{where}: not a regular file (tar type {kind!r}); refused")
    if size > MAX_MEMBER_BYTES:  # a .tar.zst can inflate to any size: check before reading
        raise ShardError(
            f"{where}: member of {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit of "
            "one sample's part (convert bounds a record at 256 MiB); refused"
        )
    key, dot, ext = name.partition(".")
    if "/" in name or "\\" in name or not key or not dot:
        raise ShardError(f"{where}: member name is not KEY.EXT without directories")
    if ext not in schema.exts:
        raise ShardError(
            f"{where}: unexpected member type .{ext}; this shard's samples hold "
            + " and ".join(f".{e}" for e in sorted(schema.exts))
        )
    return key, ext


def _sample(parts: dict[str, bytes], schema: _Schema, where: str) -> dict[str, Any]:
    missing = schema.exts - parts.keys()
    if missing:
        raise ShardError(f"{where}: incomplete sample, no .{' or .'.join(sorted(missing))}")
    meta = load_json(parts["json"], f"{where}.json", want_object=True)
    doc_id = meta.get("id")
    if not isinstance(doc_id, str):
        raise ShardError(f"{where}.json: id is {type(doc_id).__name__}, expected a string")
    sample: dict[str, Any] = {"id": doc_id}
    if schema.json_payload is not None:
        value = meta.get(schema.json_payload)
        if not isinstance(value, list):
            raise ShardError(
                f"{where}.json: {schema.json_payload} is {type(value).__name__}, expected a list"
            )
        sample[schema.json_payload] = value
    elif schema.payload == "text":
        try:
            sample["text"] = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ShardError(f"{where}.txt: not UTF-8 ({err})") from err
    else:
        sample["input_ids"] = _load_tokens(parts["npy"], schema, f"{where}.npy")
    for key, kind in schema.extras.items():
        value = meta.get(key)
        if value is not None and kind in _FIELD_TYPES:
            bad = not isinstance(value, _FIELD_TYPES[kind]) or (
                kind != "bool" and isinstance(value, bool)
            )
            if bad or (kind == "int64" and not _INT64[0] <= value <= _INT64[1]):
                raise ShardError(f"{where}.json: field {key!r} holds {value!r:.40}, not {kind}")
        sample[key] = value
    return sample


def _load_tokens(data: bytes, schema: _Schema, where: str) -> np.ndarray:
    """A ``.npy`` member as a 1-D array of the manifest's dtype, its header checked first.

    ``np.load`` would allocate whatever shape the header claims before reading the data.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy version {version} is not supported")
    except Exception as err:  # numpy parses the header with tokenize and ast: any of their errors
        raise ShardError(f"{where}: not a valid .npy header ({err})") from err
    if dtype != schema.dtype or len(shape) != 1:
        raise ShardError(
            f"{where}: holds {dtype} of shape {shape}; the manifest says 1-D {schema.dtype}"
        )
    body = len(data) - stream.tell()
    if shape[0] * dtype.itemsize != body:
        raise ShardError(
            f"{where}: header says {shape[0]} ids ({shape[0] * dtype.itemsize} bytes), "
            f"the member holds {body} bytes"
        )
    values = np.frombuffer(data, dtype=dtype, count=shape[0], offset=stream.tell())
    check_token_ids(values, schema.vocab_size, where)
    return values
