"""Checks against the real systems: ShardDataset under a DataLoader yields the reconstructed
order, and WebDataset's ``detshuffle`` repeats epoch 0 without persistent workers."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from tools.bench.shuffle.orders import (
    WDS_INITIAL,
    WDS_SAMPLE_BUFFER,
    Topology,
    shardloader_order,
)


def _collate_ids(batch: list[dict[str, Any]]) -> list[int]:
    return [int(sample["sample_id"]) for sample in batch]


def check_shard_dataset(num_workers: int = 2, batch_size: int = 7, world_size: int = 2) -> int:
    """Convert a tiny uneven corpus and compare ShardDataset under a DataLoader with the order.

    Args:
        num_workers: DataLoader workers.
        batch_size: Samples per batch.
        world_size: Ranks (each read in this process, with an explicit rank).

    Returns:
        Number of samples compared.

    Raises:
        AssertionError: The DataLoader yielded another order than `shardloader_order`.
    """
    from shardloader import ConvertConfig, ShardDataset, convert, read_manifest

    sizes = np.array([300, 17, 200, 153, 1, 212, 120, 64, 333, 9], dtype=np.int64)
    compared = 0
    with tempfile.TemporaryDirectory(prefix="bench-shuffle-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        start = 0
        for index, size in enumerate(sizes.tolist()):
            lines = [json.dumps({"text": f"doc {start + i}"}) for i in range(size)]
            (corpus / f"part-{index:02d}.jsonl").write_text("\n".join(lines) + "\n")
            start += size
        out = Path(tmp) / "shards"
        convert([str(corpus)], ConvertConfig(output=str(out), task_bytes=1, num_proc=1))
        written = np.array(read_manifest(str(out)).shards.column("num_samples"), dtype=np.int64)
        assert np.array_equal(written, sizes), f"one shard per file expected, got {written}"
        for epoch, rank in itertools.product((0, 1), range(world_size)):
            dataset = ShardDataset(str(out), rank=rank, world_size=world_size)
            dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_collate_ids,
                multiprocessing_context="fork",
            )
            seen = np.array([i for batch in loader for i in batch], dtype=np.int64)
            topology = Topology(
                world_size=world_size, rank=rank, num_workers=num_workers, batch_size=batch_size
            )
            expected = shardloader_order(sizes, seed=0, epoch=epoch, topology=topology).loop
            assert np.array_equal(seen, expected), (
                f"epoch {epoch} rank {rank}: the DataLoader order differs from the reconstruction"
            )
            compared += len(seen)
    return compared


class _Range(torch.utils.data.IterableDataset):
    """The integers ``0 .. n-1``: a stand-in for a WebDataset shard list."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


def check_webdataset_epochs() -> dict[str, bool]:
    """Whether ``detshuffle`` gives epoch 1 the order of epoch 0 under a real DataLoader.

    ``detshuffle`` counts epochs in its own attribute, so a worker that gets a fresh copy of the
    pipeline each epoch (``persistent_workers=False``, the DataLoader default) restarts the count.

    Returns:
        ``"persistent_workers=False"``, ``"persistent_workers=True"`` and ``"in-process"`` mapped
        to whether epochs 0 and 1 came out in the same order.
    """
    import webdataset as wds

    pipeline = wds.DataPipeline(
        _Range(5000), wds.detshuffle(WDS_SAMPLE_BUFFER, WDS_INITIAL, seed=0)
    )
    same = {}
    for persistent in (False, True):
        loader = torch.utils.data.DataLoader(
            pipeline,
            batch_size=None,
            num_workers=1,
            persistent_workers=persistent,
            multiprocessing_context="fork",
        )
        epochs = [[int(i) for i in loader] for _ in range(2)]
        same[f"persistent_workers={persistent}"] = epochs[0] == epochs[1]
    same["in-process"] = list(pipeline) == list(pipeline)
    return same
