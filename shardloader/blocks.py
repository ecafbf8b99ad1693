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

The column is read as hostile input (`check_block_column`): every count a positive integer,
offsets increasing and inside the file, the counts adding up to the shard's ``num_samples``, and
at most `MAX_BLOCKS_PER_SHARD` blocks per shard; an error names the shard. The checks are numpy
passes over the flattened column. Cost (``python -m tools.bench.manifest --shards 100000 --blocks
16``): 1.6 M blocks make the manifest 50 MB instead of 12 MB, and reading it takes 2.3 s and
516 MB peak instead of 0.10 s and 56 MB, mostly JSON's lists of triples; a more compact encoding
(flat or delta-coded columns) is still to do before block tables suit 100,000-shard datasets.
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


def block_table(
    num_samples: Sequence[int], num_bytes: Sequence[int], blocks: Sequence[Any] | None
) -> BlockTable:
    """The blocks of a shard table: its ``blocks`` column, a whole shard where it has none.

    Args:
        num_samples: Samples per shard.
        num_bytes: Bytes per shard file.
        blocks: The manifest's ``blocks`` column (checked by `check_block_column`), or ``None``.
    """
    n = len(num_samples)
    if blocks is None:
        blocks = [None] * n
    counts = np.fromiter((1 if b is None else len(b) for b in blocks), np.int64, n)
    triples = [
        [[s, 0, size]] if b is None else b
        for b, s, size in zip(blocks, num_samples, num_bytes, strict=True)
    ]
    flat = np.fromiter(chain.from_iterable(chain.from_iterable(triples)), np.int64)
    flat = flat.reshape(-1, 3)
    shard_index = np.repeat(np.arange(n, dtype=np.int64), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    batch_index = np.arange(len(flat), dtype=np.int64) - np.repeat(starts, counts)
    whole = np.fromiter((b is None for b in blocks), np.bool_, n)
    batch_index[np.repeat(whole, counts)] = WHOLE_SHARD
    return BlockTable(
        num_samples=flat[:, 0].copy(),
        shard_index=shard_index,
        batch_index=batch_index,
        offset=flat[:, 1].copy(),
        length=flat[:, 2].copy(),
    )


def check_block_column(
    blocks: Any,
    paths: Sequence[str],
    num_samples: Sequence[int],
    num_bytes: Sequence[int],
    where: str,
) -> None:
    """Check a manifest's ``blocks`` column as hostile input.

    Raises:
        ManifestError: Naming the shard: not a list of ``[num_samples, offset, length]``
            triples, a count not positive, a block outside the file or overlapping the one
            before it, counts not adding up to the shard's ``num_samples``, or too many blocks.
    """
    if not isinstance(blocks, list) or len(blocks) != len(paths):
        n = len(blocks) if isinstance(blocks, list) else type(blocks).__name__
        raise ManifestError(
            f"{where}: shard column 'blocks' has {n} entries, expected a list of {len(paths)}"
        )
    for i, entry in enumerate(blocks):
        if entry is not None and (type(entry) is not list or len(entry) > MAX_BLOCKS_PER_SHARD):
            what = f"{len(entry)} blocks" if type(entry) is list else type(entry).__name__
            raise ManifestError(
                f"{where}: shard {paths[i]}: blocks entry is {what}, expected a list of at most "
                f"{MAX_BLOCKS_PER_SHARD} [num_samples, offset, length] triples or null"
            )
    present = [i for i, entry in enumerate(blocks) if entry is not None]
    triples = list(chain.from_iterable(blocks[i] for i in present))
    if not all(type(t) is list and len(t) == 3 for t in triples):
        _raise_at(blocks, present, paths, where, lambda t: type(t) is list and len(t) == 3)
    values = list(chain.from_iterable(triples))
    if not all(type(v) is int and 0 <= v < 1 << 62 for v in values):
        _raise_at(
            blocks,
            present,
            paths,
            where,
            lambda t: all(type(v) is int and 0 <= v < 1 << 62 for v in t),
        )
    if not present:
        return
    flat = np.array(values, dtype=np.int64).reshape(-1, 3)
    counts = np.array([len(blocks[i]) for i in present], dtype=np.int64)
    owner = np.repeat(np.array(present, dtype=np.int64), counts)
    samples, offset, length = flat[:, 0], flat[:, 1], flat[:, 2]
    end = offset + length
    size = np.array(num_bytes, dtype=np.int64)[owner]
    overlap = np.zeros(len(flat), dtype=np.bool_)
    if len(flat) > 1:
        same = owner[1:] == owner[:-1]
        overlap[1:] = same & (offset[1:] < end[:-1])
    bad = np.flatnonzero((samples <= 0) | (length <= 0) | (end > size) | overlap)
    if len(bad):
        k = int(bad[0])
        raise ManifestError(
            f"{where}: shard {paths[int(owner[k])]}: block [{samples[k]}, {offset[k]}, "
            f"{length[k]}] has no samples, lies outside the file's {size[k]} bytes or overlaps "
            "the block before it; the manifest is corrupt or tampered with: reconvert or restore it"
        )
    sums = np.zeros(len(paths), dtype=np.int64)
    np.add.at(sums, owner, samples)
    expected = np.array(num_samples, dtype=np.int64)
    wrong = [i for i in present if sums[i] != expected[i]]
    if wrong:
        i = wrong[0]
        raise ManifestError(
            f"{where}: shard {paths[i]}: its blocks hold {sums[i]} samples but the shard "
            f"{expected[i]}; the manifest is corrupt or tampered with: reconvert or restore it"
        )


def _raise_at(
    blocks: list[Any], present: list[int], paths: Sequence[str], where: str, ok: Any
) -> None:
    for i in present:
        for t in blocks[i]:
            if not (type(t) is list and len(t) == 3 and ok(t)):
                raise ManifestError(
                    f"{where}: shard {paths[i]}: block {t!r:.60} is not a [num_samples, "
                    "offset, length] triple of non-negative integers"
                )
