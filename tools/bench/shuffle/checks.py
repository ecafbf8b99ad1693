"""Checks against the real systems: ShardDataset under a DataLoader yields the reconstructed
order (shard mode and block mode), and WebDataset's ``detshuffle`` repeats epoch 0 without
persistent workers."""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from shardloader.dataset import BLOCK_WINDOW
from shardloader.plan import PlanConfig
from tools.bench.shuffle.orders import (
    WDS_INITIAL,
    WDS_SAMPLE_BUFFER,
    IdArray,
    Topology,
    plan_order,
    shardloader_order,
)


def _collate_ids(batch: list[dict[str, Any]]) -> list[int]:
    return [int(sample["sample_id"]) for sample in batch]


def _write_corpus(corpus: Path, sizes: IdArray) -> None:
    """One JSONL file per shard, ``sizes[i]`` documents in file ``i``, ids in global order."""
    corpus.mkdir()
    start = 0
    for index, size in enumerate(sizes.tolist()):
        lines = [json.dumps({"text": f"doc {start + i}"}) for i in range(size)]
        (corpus / f"part-{index:02d}.jsonl").write_text("\n".join(lines) + "\n")
        start += size


def _loader_ids(dataset: Any, num_workers: int, batch_size: int) -> IdArray:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_ids,
        multiprocessing_context="fork",
    )
    return np.array([i for batch in loader for i in batch], dtype=np.int64)


def check_shard_dataset(
    num_workers: int = 2,
    batch_size: int = 7,
    world_size: int = 2,
    block_window: int = 3,
    batch_bytes: int = 256,
) -> tuple[int, int]:
    """Convert a tiny uneven corpus and compare ShardDataset under a DataLoader with the order.

    Shard mode (``StreamConfig(shuffle_unit="shard")``) is compared with `shardloader_order`;
    block mode (``StreamConfig()``, the default, with ``shuffle_bytes`` of ``block_window``
    record batches so that a worker reads several windows; shards written in record batches of
    ``batch_bytes`` so most have several) with `plan_order` over the manifest's block sizes,
    decoded sizes and shards, which is what `shardloader_default_order` models with blocks of a
    fixed size.

    Args:
        num_workers: DataLoader workers.
        batch_size: Samples per batch.
        world_size: Ranks (each read in this process, with an explicit rank).
        block_window: ``shuffle_bytes`` of the block-mode check, in record batches.
        batch_bytes: Convert's record batch size (uncompressed bytes).

    Returns:
        Samples compared in shard mode, and in block mode.

    Raises:
        AssertionError: The DataLoader yielded another order than the reconstruction.
    """
    from shardloader import ConvertConfig, ShardDataset, StreamConfig, convert, read_manifest

    sizes = np.array([300, 17, 200, 153, 1, 212, 120, 64, 333, 9], dtype=np.int64)
    compared = {"shard": 0, "block": 0}
    with tempfile.TemporaryDirectory(prefix="bench-shuffle-") as tmp:
        corpus = Path(tmp) / "corpus"
        _write_corpus(corpus, sizes)
        out = Path(tmp) / "shards"
        convert(
            [str(corpus)],
            ConvertConfig(output=str(out), task_bytes=1, num_proc=1, batch_bytes=batch_bytes),
        )
        manifest = read_manifest(str(out))
        written = np.array(manifest.shards.column("num_samples"), dtype=np.int64)
        assert np.array_equal(written, sizes), f"one shard per file expected, got {written}"
        blocks = manifest.shards.block_table()
        assert len(blocks.num_samples) > 2 * len(sizes), "expected several blocks per shard"
        configs = {
            "shard": StreamConfig(shuffle_unit="shard"),
            "block": StreamConfig(shuffle_bytes=block_window * batch_bytes),
        }
        for (mode, config), epoch, rank in itertools.product(
            configs.items(), (0, 1), range(world_size)
        ):
            dataset = ShardDataset(str(out), config=config, rank=rank, world_size=world_size)
            dataset.set_epoch(epoch)
            resolved = dataset.resume_spec().config
            assert resolved.shuffle_unit == mode, f"{config} planned {resolved}"
            seen = _loader_ids(dataset, num_workers, batch_size)
            topology = Topology(
                world_size=world_size, rank=rank, num_workers=num_workers, batch_size=batch_size
            )
            if mode == "shard":
                expected = shardloader_order(sizes, seed=0, epoch=epoch, topology=topology).loop
            else:
                expected = plan_order(
                    np.asarray(blocks.num_samples, dtype=np.int64),
                    config=PlanConfig(
                        shuffle_unit="block",
                        shuffle_window=BLOCK_WINDOW,
                        shuffle_bytes=block_window * batch_bytes,
                    ),
                    epoch=epoch,
                    topology=topology,
                    unit_bytes=blocks.decoded,
                    unit_groups=blocks.shard_index,
                ).loop
            assert np.array_equal(seen, expected), (
                f"{mode} mode, epoch {epoch} rank {rank}: the DataLoader order differs from the "
                "reconstruction"
            )
            compared[mode] += len(seen)
    return compared["shard"], compared["block"]


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
