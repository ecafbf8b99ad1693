"""Blocks: the record batches inside shards, as the manifest records them and the plan uses them.

An Arrow shard is a sequence of record batches of about ``batch_bytes`` each (a "block"). Convert
records, per shard, one ``[num_samples, offset, length]`` triple per batch in the manifest's
optional ``blocks`` column: the batch's sample count, and where its IPC message (metadata and
body, the footer's ``Block`` entry) lies in the file, so that a range read can fetch one block.
A shard without an entry (``null``, or a manifest written before blocks existed) is one block,
the whole shard. Tar shards are always one block: a ``.tar.zst`` is one zstd stream that cannot
be entered in the middle, and an uncompressed tar has no index of its members.

Blocks are contiguous runs of global sample ids in shard order, so a plan made over block sizes
(`BlockTable.num_samples`) instead of shard sizes keeps every sample id and every guarantee of
`shardloader.plan`; only the unit it permutes and groups into windows changes. `BlockTable` maps
a plan's unit index back to its shard and batch.

The column is stored flat, as four integer lists (`BlockColumns`: ``count`` per shard, then
``samples``, ``offset`` and ``length`` per block), and read as hostile input
(`parse_block_columns`): every value a non-negative integer, offsets increasing and inside the
file, the counts adding up to the shard's ``num_samples``, at most `MAX_BLOCKS_PER_SHARD` blocks
per shard; an error names the shard. Every check is a numpy pass. Cost (``python -m
tools.bench.manifest --shards 100000 --blocks 16``, 1.6 M blocks): the manifest is 47 MB instead
of 12 MB and reads in 0.69 s and 349 MB peak instead of 0.10 s and 56 MB (nested triples took
2.3 s and 516 MB); most of it is JSON's integers.
"""

from __future__ import annotations

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
    """

    num_samples: Int64Array
    shard_index: Int64Array
    batch_index: Int64Array
    offset: Int64Array
    length: Int64Array

    @property
    def num_blocks(self) -> int:
        """Number of blocks (units of a plan over blocks)."""
        return len(self.num_samples)


class BlockColumns(NamedTuple):
    """A manifest's block table, flat: how the ``blocks`` column is stored and kept.

    Attributes:
        counts: Blocks per shard (the stored ``count``); 0 for a shard without a table (read
            whole, one block).
        samples: Samples of every block, shard after shard.
        offset: Byte offset of every block in its shard.
        length: Bytes of every block.
    """

    counts: Int64Array
    samples: Int64Array
    offset: Int64Array
    length: Int64Array

    def to_json(self) -> dict[str, list[int]]:
        """The column as the manifest stores it: four flat integer lists."""
        return {
            "count": self.counts.tolist(),
            "samples": self.samples.tolist(),
            "offset": self.offset.tolist(),
            "length": self.length.tolist(),
        }

    def per_shard(self) -> list[list[list[int]] | None]:
        """Per shard its ``[num_samples, offset, length]`` triples, or ``None`` (whole shard)."""
        triples = np.stack([self.samples, self.offset, self.length], axis=1).tolist()
        out: list[list[list[int]] | None] = []
        start = 0
        for n in self.counts.tolist():
            out.append(triples[start : start + n] if n else None)
            start += n
        return out


def block_columns(blocks: Sequence[Sequence[Sequence[int]] | None]) -> BlockColumns | None:
    """Flatten per-shard triples (``None``: a shard without blocks); ``None`` if none has any."""
    if all(b is None for b in blocks):
        return None
    count = np.fromiter((0 if b is None else len(b) for b in blocks), np.int64, len(blocks))
    flat = np.fromiter(
        chain.from_iterable(chain.from_iterable(b for b in blocks if b is not None)), np.int64
    ).reshape(-1, 3)
    return BlockColumns(count, flat[:, 0].copy(), flat[:, 1].copy(), flat[:, 2].copy())


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
    return BlockTable(samples, shard_index, batch_index, offset, length)


_BLOCK_KEYS = ("count", "samples", "offset", "length")


def _int_column(value: Any, name: str, where: str) -> Int64Array:
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
    if not isinstance(value, dict) or sorted(value) != sorted(_BLOCK_KEYS):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ManifestError(
            f"{where}: shard column 'blocks' is {keys}, expected an object of "
            f"{', '.join(_BLOCK_KEYS)} integer lists; the manifest is corrupt or tampered with"
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
    return BlockColumns(count, samples, offset, length)
