"""Blocks: the record batches inside shards, as the manifest records them and the plan uses them.

An Arrow shard is a sequence of record batches of about ``batch_bytes`` each (a "block"). Convert
records, per shard, one entry per batch in the manifest's optional ``blocks`` column: the
batch's sample count; where its IPC message (metadata and body, the footer's ``Block`` entry)
lies in the file, so that a range read can fetch one block; its decoded payload bytes (what the
plan bounds a window by); and its digest (`block_digest`: the first 128 bits of the sha256 of
the message's bytes), so that a reader checks the block it decodes instead of hashing the whole
shard. ``shardloader index`` records Parquet row groups the same way, with their uncompressed
size and no digest (the whole file's checksum is used).
A shard without an entry (``null``, or a manifest written before blocks existed) is one block,
the whole shard. A plain tar shard's blocks are runs of whole samples (their members' byte
range, data bytes and digest; `shardloader.formats.tar`); a ``.tar.zst`` is one zstd stream that
cannot be entered in the middle, so it has no entry.

Blocks are contiguous runs of global sample ids in shard order, so a plan made over block sizes
(`BlockTable.num_samples`) instead of shard sizes keeps every sample id and every guarantee of
`shardloader.plan`; only the unit it permutes and groups into windows changes. `BlockTable` maps
a plan's unit index back to its shard and batch.

The column is stored flat, as lists (`BlockColumns`: ``count`` per shard, then ``samples``,
``offset``, ``length`` and optionally ``decoded`` and ``digest`` per block; manifests written before
the last two existed read with them unknown), and read as hostile input (`parse_block_columns`):
every value a non-negative integer, offsets increasing and inside the file, the counts adding up to
the shard's ``num_samples``, at most `MAX_BLOCKS_PER_SHARD` blocks per shard, digests of 32
lowercase hex characters; an error names the shard. Every check is a numpy pass. Cost (``python -m
tools.bench.manifest --shards 100000 --blocks 16``, 1.6 M blocks with decoded sizes and digests):
the manifest is 117 MB instead of 12 MB and reads in 1.8 s and 838 MB peak instead of 0.10 s and 56
MB (without the digests and sizes: 47 MB, 0.69 s). Past a million blocks the table is written to a
binary file beside the manifest instead (`shardloader.block_file`; the same 1.6 M blocks: 115 MB,
read in 0.65 s and 407 MB peak, on a busy machine where the JSON took 4.5 s).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from shardloader.errors import ManifestError

MAX_BLOCKS_PER_SHARD = 1 << 20  # a 64 GB shard of 64 KB batches; ours hold tens
WHOLE_SHARD = -1  # batch index of a block that is the whole shard (no block table)

Int64Array = npt.NDArray[np.int64]


class BlockTable(NamedTuple):
    """Every block of a dataset in manifest order, column by column (one row per plan unit).

    Attributes:
        num_samples: Samples per block.
        shard_index: The shard holding each block.
        batch_index: The record batch inside its shard (`WHOLE_SHARD` for a whole-shard block).
        offset: Byte offset of the block's IPC message in the shard (0 for a whole shard).
        length: Bytes of the block's IPC message (the shard's size for a whole shard).
        decoded: Bytes the block holds decoded (its payload); 0 where unknown.
        digest: Per block the first 128 bits of the sha256 of its bytes ``[offset, offset +
            length)``, hex; ``""`` where unknown (the whole shard's checksum is used).
    """

    num_samples: Int64Array
    shard_index: Int64Array
    batch_index: Int64Array
    offset: Int64Array
    length: Int64Array
    decoded: Int64Array
    digest: npt.NDArray[np.str_]

    @property
    def num_blocks(self) -> int:
        """Number of blocks (units of a plan over blocks)."""
        return len(self.num_samples)

    @property
    def all_known(self) -> bool:
        """Whether every block's decoded size and digest are recorded.

        Then each block can be read alone and checked, and a window bounded by bytes: "auto"
        reads such local data in blocks.
        """
        return bool(self.decoded.all() and self.digest.all())


class BlockColumns(NamedTuple):
    """A manifest's block table, flat: how the ``blocks`` column is stored and kept.

    Attributes:
        counts: Blocks per shard (the stored ``count``); 0 for a shard without a table (read
            whole, one block).
        samples: Samples of every block, shard after shard.
        offset: Byte offset of every block in its shard.
        length: Bytes of every block.
        decoded: Decoded (payload) bytes of every block, 0 where unknown; ``None``: none known
            (a manifest written before they were recorded).
        digest: Every block's `block_digest` (``""`` where unknown), or ``None``: none known.
    """

    counts: Int64Array
    samples: Int64Array
    offset: Int64Array
    length: Int64Array
    decoded: Int64Array | None = None
    digest: npt.NDArray[np.str_] | None = None

    def to_json(self) -> dict[str, list[Any]]:
        """The column as the manifest stores it: flat lists (integers, and the digests)."""
        out: dict[str, list[Any]] = {
            "count": self.counts.tolist(),
            "samples": self.samples.tolist(),
            "offset": self.offset.tolist(),
            "length": self.length.tolist(),
        }
        if self.decoded is not None:
            out["decoded"] = self.decoded.tolist()
        if self.digest is not None:
            out["digest"] = self.digest.tolist()
        return out

    def per_shard(self) -> list[list[list[Any]] | None]:
        """Per shard its blocks (`BLOCK_ENTRY` lists), or ``None`` (a whole shard)."""
        n = len(self.samples)
        decoded = self.decoded if self.decoded is not None else np.zeros(n, np.int64)
        digest = self.digest if self.digest is not None else np.full(n, "", dtype=f"<U{DIGEST_HEX}")
        rows = [
            [a, b, c, d, e]
            for a, b, c, d, e in zip(
                self.samples.tolist(),
                self.offset.tolist(),
                self.length.tolist(),
                decoded.tolist(),
                digest.tolist(),
                strict=True,
            )
        ]
        out: list[list[list[Any]] | None] = []
        start = 0
        for count in self.counts.tolist():
            out.append(rows[start : start + count] if count else None)
            start += count
        return out


# What a writer records per block: [num_samples, offset, length] and optionally the decoded
# bytes and the digest (older task records hold the first three only).
BLOCK_ENTRY = ("samples", "offset", "length", "decoded", "digest")
DIGEST_HEX = 32  # hex characters of a block digest: the first 128 bits of a sha256


def block_digest(data: bytes | memoryview) -> str:
    """The digest the block table records for a block's bytes: sha256, first 128 bits, hex."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_HEX]


def block_columns(blocks: Sequence[Sequence[Sequence[Any]] | None]) -> BlockColumns | None:
    """Flatten per-shard block lists (``None``: a shard without blocks); ``None`` if none has any.

    A block is ``[num_samples, offset, length]`` or ``[num_samples, offset, length, decoded,
    digest]`` (`BLOCK_ENTRY`); a column that no block knows is left out.
    """
    if all(b is None for b in blocks):
        return None
    count = np.fromiter((0 if b is None else len(b) for b in blocks), np.int64, len(blocks))
    entries = list(chain.from_iterable(b for b in blocks if b is not None))
    flat = np.array([e[:3] for e in entries], dtype=np.int64).reshape(-1, 3)
    decoded = np.array([e[3] if len(e) > 3 else 0 for e in entries], dtype=np.int64)
    digest = np.array([e[4] if len(e) > 4 else "" for e in entries], dtype=f"<U{DIGEST_HEX}")
    return BlockColumns(
        count,
        flat[:, 0].copy(),
        flat[:, 1].copy(),
        flat[:, 2].copy(),
        decoded if decoded.any() else None,
        digest if (digest != "").any() else None,
    )


def block_table(
    num_samples: Sequence[int], num_bytes: Sequence[int], columns: BlockColumns | None
) -> BlockTable:
    """The blocks of a shard table: its block columns, a whole shard where a shard has none.

    Args:
        num_samples: Samples per shard.
        num_bytes: Bytes per shard file.
        columns: The manifest's block columns (checked by `parse_block_columns`), or ``None``.
    """
    n = len(num_samples)
    shard_samples = np.asarray(num_samples, dtype=np.int64).reshape(n)
    shard_bytes = np.asarray(num_bytes, dtype=np.int64).reshape(n)
    if columns is None:
        return BlockTable(
            num_samples=shard_samples.copy(),
            shard_index=np.arange(n, dtype=np.int64),
            batch_index=np.full(n, WHOLE_SHARD, dtype=np.int64),
            offset=np.zeros(n, dtype=np.int64),
            length=shard_bytes.copy(),
            decoded=np.zeros(n, dtype=np.int64),
            digest=np.full(n, "", dtype=f"<U{DIGEST_HEX}"),
        )
    whole = columns.counts == 0
    units = np.where(whole, 1, columns.counts)  # blocks per shard in the table
    total = int(units.sum())
    shard_index = np.repeat(np.arange(n, dtype=np.int64), units)
    first_unit = np.concatenate([[0], np.cumsum(units)[:-1]]).astype(np.int64)
    batch_index = np.arange(total, dtype=np.int64) - np.repeat(first_unit, units)
    unit_whole = np.repeat(whole, units)
    batch_index[unit_whole] = WHOLE_SHARD
    samples = np.empty(total, dtype=np.int64)
    offset = np.zeros(total, dtype=np.int64)
    length = np.empty(total, dtype=np.int64)
    samples[unit_whole] = shard_samples[whole]
    length[unit_whole] = shard_bytes[whole]
    samples[~unit_whole] = columns.samples
    offset[~unit_whole] = columns.offset
    length[~unit_whole] = columns.length
    decoded = np.zeros(total, dtype=np.int64)
    digest = np.full(total, "", dtype=f"<U{DIGEST_HEX}")
    if columns.decoded is not None:
        decoded[~unit_whole] = columns.decoded
    if columns.digest is not None:
        digest[~unit_whole] = columns.digest
    return BlockTable(samples, shard_index, batch_index, offset, length, decoded, digest)


def shard_decoded_bytes(table: BlockTable, num_shards: int) -> Int64Array:
    """Decoded bytes per shard: the sum of its blocks', 0 where a block's is unknown."""
    total = np.zeros(num_shards, dtype=np.int64)
    np.add.at(total, table.shard_index, table.decoded)
    unknown = np.zeros(num_shards, dtype=np.bool_)
    unknown[table.shard_index[table.decoded == 0]] = True
    total[unknown] = 0
    return total


_BLOCK_KEYS = ("count", "samples", "offset", "length")
_OPTIONAL_KEYS = ("decoded", "digest")
_HEX = re.compile(r"[0-9a-f]*")


def _int_column(value: Any, name: str, where: str) -> Int64Array:
    if isinstance(value, np.ndarray) and value.dtype == np.int64:  # from a block file
        if len(value) and (value.min() < 0 or value.max() >= 1 << 62):
            value = [0.5]  # refused below, as a list would be
        else:
            return value
    if not isinstance(value, list):
        raise ManifestError(
            f"{where}: shard column 'blocks' has {name} of type {type(value).__name__}, "
            "expected a list of integers"
        )
    if not value:
        return np.zeros(0, dtype=np.int64)
    try:
        array = np.array(value)
    except (ValueError, OverflowError):  # ragged nesting, ints beyond int64: refused below
        array = np.array([0.5])
    if array.dtype.kind != "i" or array.ndim != 1 or (array.min() < 0 or array.max() >= 1 << 62):
        raise ManifestError(
            f"{where}: shard column 'blocks' has {name} values that are not non-negative "
            "integers below 2**62; the manifest is corrupt or tampered with: reconvert or "
            "restore it"
        )
    return array.astype(np.int64, copy=False)


def parse_block_columns(
    value: Any,
    paths: Sequence[str],
    num_samples: Sequence[int],
    num_bytes: Sequence[int],
    where: str,
) -> BlockColumns | None:
    """Read a manifest's ``blocks`` column as hostile input; ``None`` when no shard has blocks.

    The column is ``{"count": [per shard], "samples": [...], "offset": [...], "length": [...]}``
    (`BlockColumns`). Every check is a numpy pass, so 1.6 M blocks parse in a fraction of a second.

    Raises:
        ManifestError: Naming the shard where one is to blame: not four integer lists, a count
            per shard that is not ``len(paths)`` long or over `MAX_BLOCKS_PER_SHARD`, counts that
            do not add up to the flat columns' length, a block without samples, outside the file
            or overlapping the one before it, or a shard whose blocks do not hold its samples.
    """
    if (
        not isinstance(value, dict)
        or not set(_BLOCK_KEYS) <= set(value)
        or not set(value) <= {*_BLOCK_KEYS, *_OPTIONAL_KEYS}
    ):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ManifestError(
            f"{where}: shard column 'blocks' is {keys}, expected an object of "
            f"{', '.join(_BLOCK_KEYS)} integer lists (and optionally {', '.join(_OPTIONAL_KEYS)}"
            "); the manifest is corrupt or tampered with"
        )
    count, samples, offset, length = (_int_column(value[k], k, where) for k in _BLOCK_KEYS)
    if len(count) != len(paths):
        raise ManifestError(
            f"{where}: shard column 'blocks' counts blocks of {len(count)} shards, expected a "
            f"list of {len(paths)}"
        )
    too_many = np.flatnonzero(count > MAX_BLOCKS_PER_SHARD)
    if len(too_many):
        i = int(too_many[0])
        raise ManifestError(
            f"{where}: shard {paths[i]}: {count[i]} blocks, more than {MAX_BLOCKS_PER_SHARD}; "
            "the manifest is corrupt or tampered with: reconvert or restore it"
        )
    total = int(count.sum())
    if not len(samples) == len(offset) == len(length) == total:
        raise ManifestError(
            f"{where}: shard column 'blocks' counts {total} blocks but holds "
            f"{len(samples)}/{len(offset)}/{len(length)} samples/offsets/lengths"
        )
    decoded = _int_column(value["decoded"], "decoded", where) if "decoded" in value else None
    digest = _digest_column(value["digest"], where) if "digest" in value else None
    for name, column in (("decoded", decoded), ("digest", digest)):
        if column is not None and len(column) != total:
            raise ManifestError(
                f"{where}: shard column 'blocks' counts {total} blocks but holds {len(column)} "
                f"{name} values; the manifest is corrupt or tampered with"
            )
    if total == 0:
        return None
    owner = np.repeat(np.arange(len(paths), dtype=np.int64), count)
    end = offset + length
    size = np.asarray(num_bytes, dtype=np.int64)[owner]
    overlap = np.zeros(total, dtype=np.bool_)
    if total > 1:
        overlap[1:] = (owner[1:] == owner[:-1]) & (offset[1:] < end[:-1])
    bad = np.flatnonzero((samples <= 0) | (length <= 0) | (end > size) | overlap)
    if len(bad):
        k = int(bad[0])
        raise ManifestError(
            f"{where}: shard {paths[int(owner[k])]}: block [{samples[k]}, {offset[k]}, "
            f"{length[k]}] has no samples, lies outside the file's {size[k]} bytes or overlaps "
            "the block before it; the manifest is corrupt or tampered with: reconvert or restore it"
        )
    expected = np.asarray(num_samples, dtype=np.int64)
    # A block never holds more than its shard (so the per-shard sums below cannot overflow).
    over = np.flatnonzero(samples > expected[owner])
    present = np.flatnonzero(count > 0)
    starts = (np.cumsum(count) - count)[present]
    sums = np.zeros(len(paths), dtype=np.int64)
    if not len(over):
        sums[present] = np.add.reduceat(samples, starts)
    wrong = np.flatnonzero((count > 0) & (sums != expected))
    if len(over) or len(wrong):
        i = int(owner[over[0]]) if len(over) else int(wrong[0])
        if len(over):
            sums[i] = int(samples[over[0]])
        raise ManifestError(
            f"{where}: shard {paths[i]}: its blocks hold {sums[i]} samples but the shard "
            f"{expected[i]}; the manifest is corrupt or tampered with: reconvert or restore it"
        )
    return BlockColumns(count, samples, offset, length, decoded, digest)


def _digest_column(value: Any, where: str) -> npt.NDArray[np.str_]:
    """Block digests: a list of `DIGEST_HEX` lowercase hex characters each, or ``""``."""
    if isinstance(value, np.ndarray) and value.dtype == np.dtype(f"S{DIGEST_HEX}"):
        return _digest_bytes(value, where)  # from a block file
    ok = isinstance(value, list) and all(type(v) is str for v in value)
    if ok:
        lengths = {len(v) for v in value}
        ok = lengths <= {0, DIGEST_HEX} and _HEX.fullmatch("".join(value)) is not None
    if not ok:
        raise ManifestError(
            f"{where}: shard column 'blocks' has digest values that are not {DIGEST_HEX} "
            "lowercase hex characters (or empty); the manifest is corrupt or tampered with: "
            "reconvert or restore it"
        )
    return np.array(value, dtype=f"<U{DIGEST_HEX}")


def _digest_bytes(value: npt.NDArray[np.bytes_], where: str) -> npt.NDArray[np.str_]:
    """Digests stored as ``DIGEST_HEX`` ASCII bytes each (all zero bytes: unknown)."""
    raw = value.view(np.uint8).reshape(len(value), DIGEST_HEX)
    hexed = ((raw >= ord("0")) & (raw <= ord("9"))) | ((raw >= ord("a")) & (raw <= ord("f")))
    if not (hexed.all(axis=1) | (raw == 0).all(axis=1)).all():
        raise ManifestError(
            f"{where}: shard column 'blocks' has digest values that are not {DIGEST_HEX} "
            "lowercase hex characters (or empty); the manifest is corrupt or tampered with: "
            "reconvert or restore it"
        )
    return value.astype(f"<U{DIGEST_HEX}")
