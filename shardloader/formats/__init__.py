"""Shard formats: the :class:`ShardFormat` protocol and the registry keyed by the manifest's format.

A format writes samples into one shard (a binary sink it does not own) and reads them back.
Samples are plain dicts: ``id`` (str), then ``text`` (str), ``input_ids`` (numpy array) or
``messages`` (chat data: a list of ``{"role", "content"}`` dicts, written as its JSON text), then
any kept fields. No format uses pickle.

Shards are read as hostile input: a reader checks what it decodes against the manifest (sample
count, token dtype and id range, field types) with the helpers below and raises `ShardError`
naming the shard, never a raw ``IndexError`` or ``RecursionError`` from deep inside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

from shardloader.blocks import block_digest
from shardloader.errors import ConfigError, ShardError
from shardloader.manifest import json_depth

if TYPE_CHECKING:
    from shardloader.manifest import Manifest

COMPRESSIONS = ("zstd", "none")
MAX_JSON_DEPTH = 64  # nesting allowed in a sample's JSON (our writers produce 1 or 2)


class ShardWriter(Protocol):
    """Writes the samples of one shard."""

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample: UTF-8 text bytes or a token id array, plus kept fields."""

    def write_columns(
        self, ids: pa.Array, texts: pa.Array, fields: Mapping[str, pa.Array], sizes: np.ndarray
    ) -> None:
        """Add many text samples at once; ``sizes`` are the UTF-8 byte lengths of ``texts``.

        The output is the same as writing the rows one by one.
        """

    def close(self) -> None:
        """Finish the shard (footer, compression frame); does not close the sink."""


@dataclass(frozen=True, kw_only=True)
class WriteSpec:
    """How to write one shard; every shard of a conversion shares all but its name.

    Attributes:
        shard_name: The shard's stem (``shard-00003-0001``); tar sample keys start with it.
        fields: Field types, in order (``id`` first, then ``text`` or ``input_ids``).
        token_dtype: ``"uint16"`` or ``"uint32"`` for tokenized shards, else ``None``.
        compression: ``"zstd"`` or ``"none"``.
        compression_level: The zstd level.
        batch_bytes: Uncompressed size of an Arrow record batch, or of a plain tar's block
            (runs of whole samples; a ``.tar.zst`` is one block).
    """

    shard_name: str
    fields: Mapping[str, str]
    token_dtype: str | None
    compression: str
    compression_level: int
    batch_bytes: int


@dataclass(frozen=True, kw_only=True)
class ReadSpec:
    """What a shard should hold, as its manifest says; a format checks the shard against it.

    Attributes:
        fields: The manifest's field types, in order.
        token_dtype: ``"uint16"`` or ``"uint32"`` for tokenized shards, else ``None``.
        compression: ``"zstd"`` or ``"none"``.
        where: Names the shard in errors (its URL).
        num_samples: The shard's sample count; ``None`` skips the count check.
        vocab_size: Token ids must be below it; ``None`` checks only the dtype's range.
        shard_path: The shard's path in the manifest (relative to the dataset's root), for
            formats that make ids from it (Parquet files without an id column: ``path:row``).
        config: The manifest's ``config``; formats that read files written elsewhere find their
            settings there (Parquet: which columns hold the text, the id and the kept fields).
    """

    fields: Mapping[str, str]
    token_dtype: str | None
    compression: str
    where: str
    num_samples: int | None = None
    vocab_size: int | None = None
    shard_path: str = ""
    config: Mapping[str, Any] | None = None

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        *,
        where: str,
        num_samples: int | None = None,
        shard_path: str = "",
    ) -> ReadSpec:
        """A shard of ``manifest`` named ``where``, its token ids checked against the vocabulary."""
        return cls(
            fields=manifest.fields,
            token_dtype=manifest.token_dtype,
            compression=manifest.compression,
            where=where,
            num_samples=num_samples,
            vocab_size=manifest.vocab_size,
            shard_path=shard_path,
            config=manifest.config,
        )

    @classmethod
    def for_shard(cls, manifest: Manifest, index: int, where: str) -> ReadSpec:
        """Shard ``index`` of ``manifest``, named ``where``: also its count is checked."""
        shard = manifest.shards[index]
        return cls.for_manifest(
            manifest, where=where, num_samples=shard.num_samples, shard_path=shard.path
        )


class ShardFormat(Protocol):
    """A shard file format."""

    name: str

    def file_suffix(self, compression: str) -> str:
        """File name suffix for shards with this compression (``.arrow``, ``.tar.zst``)."""

    def open_writer(self, sink: Any, spec: WriteSpec) -> ShardWriter:
        """Start a shard written to ``sink`` (a binary file-like object) as ``spec`` says."""

    def iter_samples(self, source: IO[bytes], spec: ReadSpec) -> Iterator[dict[str, Any]]:
        """Yield the samples of one shard in order, checked against ``spec``.

        With ``spec.num_samples``, a shard holding another count raises `ShardError` (at the
        first extra sample, or at the end); with ``spec.vocab_size``, so does a token id outside
        it.
        """

    def read_columns(self, path: str, spec: ReadSpec) -> ShardColumns:
        """Decode the local shard file ``path`` for random access, checked against ``spec``.

        With ``spec.num_samples``, a shard holding another count raises `ShardError` before any
        row is made; with ``spec.vocab_size``, so does a token id outside it.
        """


class BlockFormat(Protocol):
    """A format whose shards are read block by block (Arrow: record batches)."""

    def read_block(
        self, path: str, spec: ReadSpec, block_index: int, span: tuple[int, int] | None = None
    ) -> ShardColumns:
        """Decode block ``block_index`` of local shard ``path``; ``spec.num_samples`` is its count.

        ``span`` is the block's ``(offset, length)`` from the block table: formats whose files
        index their blocks (Arrow's footer, Parquet's) find them without it; tar needs it.

        Raises:
            ShardError: No such block, or it does not hold the count (or fails the checks).
        """


class VerifiedBlockFormat(BlockFormat, Protocol):
    """A block format that can check a block's bytes against its digest before decoding them."""

    def read_verified_block(
        self, path: str, spec: ReadSpec, block_index: int, where: tuple[int, int], digest: str
    ) -> ShardColumns:
        """Read a block's bytes, check them against its digest, and decode those bytes.

        ``where`` is ``(offset, length)`` in local shard ``path``; ``digest`` is
        `shardloader.blocks.block_digest` of those bytes.

        Raises:
            ShardError: The bytes do not match the digest (naming the shard and block), or as
                `BlockFormat.read_block`.
        """


class BlockRead(NamedTuple):
    """One block of a local shard to read in a group (`GroupBlockFormat.read_verified_blocks`)."""

    path: str  # the local shard
    spec: ReadSpec  # its manifest's spec; ``num_samples`` is the block's count
    block_index: int
    span: tuple[int, int]  # (offset, length) of the block's bytes in the shard
    digest: str  # `shardloader.blocks.block_digest` of those bytes; "": not checked


class GroupBlockFormat(VerifiedBlockFormat, Protocol):
    """A verified block format that decodes many blocks (of any shards) in one call."""

    def read_verified_blocks(self, reads: Sequence[BlockRead]) -> list[ShardColumns]:
        """`VerifiedBlockFormat.read_verified_block` of every read, decoded together.

        Raises:
            ShardError: Some block fails (which one is not said: read it alone for that).
        """


class RangeBlockFormat(VerifiedBlockFormat, Protocol):
    """A verified block format whose blocks decode from their bytes alone (ranged reads)."""

    def decode_block(self, data: bytes, spec: ReadSpec, block_index: int) -> ShardColumns:
        """Decode block ``block_index`` from its bytes ``data`` (checked by the caller).

        Raises:
            ShardError: The bytes do not decode, or fail `BlockFormat.read_block`'s checks.
        """


class ShardColumns(Protocol):
    """A decoded shard, for random access by row."""

    num_rows: int

    def take(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """The values of rows ``rows`` (offsets in the shard, any order), column by column.

        Text and string fields come as ``str``, token ids as numpy arrays, ``json`` fields parsed.
        """

    def token_lengths(self, rows: np.ndarray, field: str) -> np.ndarray:
        """Token counts of ``rows`` of the token field ``field`` (int64), without making samples."""

    def take_tokens(self, rows: np.ndarray, field: str) -> list[np.ndarray]:
        """The token ids of ``rows`` of the token field ``field``, one array each."""


def get_format(name: str) -> ShardFormat:
    """Return the format registered as ``name``.

    Raises:
        ConfigError: No such format.
    """
    from shardloader.formats.arrow import ArrowFormat
    from shardloader.formats.parquet import ParquetFormat
    from shardloader.formats.tar import TarFormat

    registry: dict[str, ShardFormat] = {
        "arrow": ArrowFormat(),
        "tar": TarFormat(),
        "parquet": ParquetFormat(),
    }
    if name not in registry:
        raise ConfigError(f"format {name!r} is not known; use one of {', '.join(registry)}")
    return registry[name]


def extra_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """The kept fields of a schema: all after ``id`` and the payload (text, input_ids, messages)."""
    return dict(list(fields.items())[2:])


def check_num_samples(actual: int, expected: int | None, where: str) -> None:
    """Raise unless a shard holds the count its manifest entry says.

    Raises:
        ShardError: ``actual`` differs from ``expected`` (unless ``expected`` is None).
    """
    if expected is not None and actual != expected:
        raise ShardError(
            f"{where}: shard holds {actual} samples but the manifest says {expected}; the "
            'manifest does not describe this shard: run "shardloader verify", then reconvert '
            "or restore the manifest"
        )


def counted(
    samples: Iterable[dict[str, Any]], expected: int | None, where: str
) -> Iterator[dict[str, Any]]:
    """``samples``, checked against the manifest's count as they pass (see `check_num_samples`).

    A sample beyond ``expected`` raises before it is yielded; a short shard raises at its end.
    """
    n = 0
    for sample in samples:
        n += 1
        if expected is not None and n > expected:
            # Count the rest for the message: the shard has been read this far anyway.
            n += sum(1 for _ in samples) if isinstance(samples, Iterator) else 0
            check_num_samples(n, expected, where)
        yield sample
    check_num_samples(n, expected, where)


def check_token_ids(values: np.ndarray, vocab_size: int | None, where: str) -> None:
    """Raise unless every token id is in ``[0, vocab_size)`` (in the dtype's range when None).

    One ``min``/``max`` pass over the values: about 7 ms for 64 M uint16 ids (128 MB).

    Raises:
        ShardError: An id is negative or not below ``vocab_size``.
    """
    if not len(values) or (vocab_size is None and values.dtype.kind == "u"):
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bound = f"the vocabulary size {vocab_size}" if vocab_size is not None else "0"
        raise ShardError(
            f"{where}: token ids range over [{low}, {high}], outside [0, {bound}); the shard "
            "was not written by this tokenizer or was tampered with: reconvert it"
        )


def load_json(data: str | bytes, where: str, *, want_object: bool = False) -> Any:
    """Parse one JSON value from a shard, nested at most `MAX_JSON_DEPTH` deep.

    Python's own limits (integers of over 4,300 digits, nesting past the recursion limit)
    become `ShardError` too.

    Raises:
        ShardError: Not valid JSON, too deep, or (with ``want_object``) not an object.
    """
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise ShardError(f"{where}: undecodable JSON ({type(err).__name__}: {err})") from err
    if want_object and not isinstance(value, dict):
        raise ShardError(f"{where}: JSON holds a {type(value).__name__}, expected an object")
    if _openers(data) > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise ShardError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _openers(data: str | bytes) -> int:
    """Opening brackets in JSON text, an upper bound of its nesting depth.

    Each level needs one literal ``[`` or ``{`` (escapes live inside strings; in UTF-16 or -32
    bytes each still holds the byte). Counted in C: the walk over the parsed value runs only
    when this bound is not enough.
    """
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def read_span(
    path: str, offset: int, length: int, *, head: bytes = b"", tail: bytes = b""
) -> tuple[bytearray, int]:
    """``head``, the ``length`` bytes at ``offset`` of local file ``path``, then ``tail``.

    Read in place into one buffer (no copy of the span); returns it and how many bytes of the
    span were there (fewer than ``length`` past the end of the file; the rest stays zero).
    """
    data = bytearray(len(head) + length + len(tail))
    data[: len(head)] = head
    data[len(head) + length :] = tail
    return data, read_into(path, offset, memoryview(data)[len(head) : len(head) + length])


def read_into(path: str, offset: int, buffer: memoryview) -> int:
    """Fill ``buffer`` with the bytes at ``offset`` of local file ``path``; how many were there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)


def check_block(data: bytes | memoryview, digest: str, label: str, span: tuple[int, int]) -> None:
    """Refuse a block whose bytes (all ``span[1]`` of them) do not match its digest.

    Raises:
        ShardError: Naming ``label`` (the shard and block) and the byte range.
    """
    offset, length = span
    if len(data) != length or block_digest(data) != digest:
        raise ShardError(
            f"{label}: bytes [{offset}, {offset + length}) do not match the manifest's "
            'block digest; the shard was modified or corrupted: run "shardloader '
            'verify", then restore or convert it again'
        )
