"""Pack token documents into fixed-length rows for causal-LM training, keeping documents apart.

Rows come from `Packer` (`shardloader.pack_rows`: the modes ``concat``, ``bfd`` and ``pad``, the
resume cursor, best-fit decreasing), re-exported here; this module turns rows into batches
(`collate_rows`, `empty_batch`, and `PackingCollator`, a DataLoader ``collate_fn`` that packs).

Layout of a batch (:func:`collate_rows`), ``[B, L]`` with ``L = seq_len``: every document piece
in a row is an attention *segment* whose ``position_ids`` restart at 0, and so is the padding at
a row's end; a piece carried over from the previous row also starts at 0 (as Megatron's
``reset_position_ids`` does), so positions stay below ``seq_len``. ``labels`` follow the Hugging
Face convention: they are ``input_ids`` (the model shifts them), with -100 on padding, on SFT
prompt tokens, and (``mask_boundary_labels``, the default) on each segment's first token, so no
token is trained to predict across a boundary. ``cu_seqlens`` (int32) are the segment boundaries
of the flattened ``B * L`` tokens, padding segments included, and ``max_seqlen`` the longest.

How to feed batches to a transformers model so that documents stay apart:
:mod:`shardloader.pack_attention`.

Cost (``python -m tools.bench.pack``, one process on a shared 2-core VM, ``seq_len`` 2048,
documents of median ~370 tokens): :func:`collate_rows` builds position ids, labels and
``cu_seqlens`` with ``np.repeat`` over segment lengths; with it, batches of 8 rows come out at
60-110 M tokens/s (rows alone: 97-245 M tokens/s, `shardloader.pack_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shardloader.errors import ConfigError, CorpusError
from shardloader.pack_rows import (
    CHUNK_TOKENS,
    ENCODE_GROUP,
    LONG_DOC_POLICIES,
    MODES,
    PackConfig,
    PackedRow,
    Packer,
    PackStats,
    best_fit_decreasing,
    count_rows,
)

__all__ = [
    "CHUNK_TOKENS",
    "ENCODE_GROUP",
    "IGNORE_INDEX",
    "LONG_DOC_POLICIES",
    "MODES",
    "PAD_LONGEST_MULTIPLE",
    "PackConfig",
    "PackStats",
    "PackedRow",
    "Packer",
    "PackingCollator",
    "best_fit_decreasing",
    "count_rows",
    "collate_rows",
    "empty_batch",
]

IGNORE_INDEX = -100
PAD_LONGEST_MULTIPLE = 8


def collate_rows(rows: Sequence[PackedRow], config: PackConfig) -> dict[str, Any]:
    """Pad rows into a batch of torch tensors (module docstring: layout).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (int64 ``[B, L]``); ``attention_mask``
        (``[B, L]``, pad mode only); ``cu_seqlens`` (int32) and ``max_seqlen`` (int);
        ``sample_ids`` and ``sample_rows`` (int64, one per document piece: its sample and row);
        ``cursor`` (int64 ``[B, 2]``, each row's resume cursor). Plain tensors and ints, so the
        batch survives ``pin_memory`` and the worker-to-main transfer of a DataLoader.

    Raises:
        ConfigError: No rows, or a row longer than ``seq_len``.
    """
    import torch  # here, so that importing shardloader (the CLI) does not load torch

    if not rows:
        raise ConfigError("collate_rows needs at least one row")
    num_rows = len(rows)
    counts = [len(r.input_ids) for r in rows]
    width = config.seq_len
    if config.pad_to_longest:
        longest = max(counts)
        width = min(width, -(-longest // PAD_LONGEST_MULTIPLE) * PAD_LONGEST_MULTIPLE)
    if max(counts) > width:
        raise ConfigError(f"a row has {max(counts)} tokens, more than seq_len={config.seq_len}")
    input_ids = np.empty((num_rows, width), dtype=np.int64)
    seg_parts: list[np.ndarray] = []
    partial = []  # rows with padding or a loss mask: their labels need more than a copy
    for i, (row, count) in enumerate(zip(rows, counts, strict=True)):
        input_ids[i, :count] = row.input_ids
        seg_parts.append(row.segment_lengths)
        if count < width:
            input_ids[i, count:] = config.pad_id
            seg_parts.append(np.array([width - count], dtype=np.int64))
        if count < width or row.loss_mask is not None:
            partial.append(i)
    seg_lens = np.concatenate(seg_parts).astype(np.int64, copy=False)
    seg_ends = np.cumsum(seg_lens)
    seg_starts = seg_ends - seg_lens
    position_ids = np.arange(num_rows * width, dtype=np.int64)
    position_ids -= np.repeat(seg_starts, seg_lens)
    labels = input_ids.copy()
    if config.mask_boundary_labels:
        labels.reshape(-1)[seg_starts] = IGNORE_INDEX
    for i in partial:
        row, count = rows[i], counts[i]
        labels[i, count:] = IGNORE_INDEX
        if row.loss_mask is not None:
            labels[i, :count][~row.loss_mask] = IGNORE_INDEX
    cu_seqlens = np.concatenate([[0], seg_ends]).astype(np.int32)
    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids.reshape(num_rows, width)),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(seg_lens.max()),
        "sample_ids": torch.from_numpy(np.concatenate([r.sample_ids for r in rows])),
        "sample_rows": torch.from_numpy(
            np.repeat(np.arange(num_rows, dtype=np.int64), [len(r.sample_ids) for r in rows])
        ),
        "cursor": torch.from_numpy(np.array([r.cursor for r in rows], dtype=np.int64)),
    }
    if config.mode == "pad":
        mask = np.arange(width)[None, :] < np.array(counts)[:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
    return batch


def empty_batch(config: PackConfig, batch_size: int) -> dict[str, Any]:
    """The batch a rank with no data left feeds the model, to keep in step with the others.

    It is `collate_rows` of ``batch_size`` rows without tokens, so its keys, dtypes and layout
    are a real batch's: each row is one padding segment of ``seq_len`` tokens (``pad_id``,
    labels ``IGNORE_INDEX``, ``attention_mask`` 0 in pad mode), so it trains nothing (zero loss
    and gradient); ``sample_ids`` and ``sample_rows`` are empty, and every ``cursor`` is
    ``(0, 0)``. Rows are ``seq_len`` wide also with ``pad_to_longest``.

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    nothing = np.zeros(0, dtype=np.int64)
    row = PackedRow(nothing, nothing, nothing, None, (0, 0))
    return collate_rows([row] * batch_size, dataclasses.replace(config, pad_to_longest=False))


class PackingCollator:
    """A DataLoader ``collate_fn`` that packs the documents of one batch (no carry, no resume).

    Each call packs exactly the samples it gets, so the number of rows varies with their
    lengths; in ``concat`` mode the last row is padded. For exact resume across batches, use
    :class:`Packer` as a stage of the stream instead.

    Args:
        config: The packing settings.
        tokenizer: For text and SFT samples (see :class:`Packer`).
    """

    def __init__(self, config: PackConfig, *, tokenizer: Any = None) -> None:
        self.config = config
        self.packer = Packer(config, tokenizer=tokenizer)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Pack ``samples`` into one batch.

        Raises:
            CorpusError: The samples hold no tokens at all.
        """
        rows = list(self.packer.pack(enumerate(samples)))
        if not rows:
            raise CorpusError(f"a batch of {len(samples)} samples holds no tokens")
        return collate_rows(rows, self.config)
