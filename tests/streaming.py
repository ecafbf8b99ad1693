"""Helpers for the streaming tests: small converted datasets with uneven shards."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardloader import ConvertConfig, convert, read_manifest
from shardloader.testing import S3Server
from tests.conftest import make_docs, write_jsonl

# 1,003 samples in 7 shards of very different sizes (one file per shard).
SHARD_SIZES = (300, 17, 200, 153, 1, 212, 120)
NUM_SAMPLES = sum(SHARD_SIZES)


def make_dataset(
    root: Path,
    *,
    fmt: str = "arrow",
    tokenizer: str | None = None,
    batch_bytes: int | None = None,
    compression: str | None = None,
) -> Path:
    """Convert ``SHARD_SIZES`` documents per file into one shard per file under ``root``.

    A small ``batch_bytes`` cuts the shards into many blocks (Arrow record batches, runs of
    samples of a plain tar).
    """
    docs = make_docs(NUM_SAMPLES, seed=7)
    corpus = root / "corpus"
    start = 0
    for index, size in enumerate(SHARD_SIZES):
        write_jsonl(corpus / f"part-{index}.jsonl", docs[start : start + size])
        start += size
    out = root / f"dataset-{fmt}{'-tok' if tokenizer else ''}{'-blocks' if batch_bytes else ''}"
    extra: dict[str, Any] = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
    if compression is not None:
        extra["compression"] = compression
    config = ConvertConfig(
        output=str(out),
        format=fmt,
        task_bytes=1,
        num_proc=1,
        keep_fields=("score:float64", "lang"),
        tokenizer=tokenizer,
        **extra,
    )
    convert([str(corpus)], config)
    sizes = tuple(read_manifest(str(out)).shards.column("num_samples"))
    assert sizes == SHARD_SIZES
    return out


@contextlib.contextmanager
def serve_dataset(dataset: Path) -> Iterator[S3Server]:
    """A loopback S3 server of the caller's own, holding ``dataset`` at ``s3://data/set``."""
    with S3Server() as s3:
        shutil.copytree(dataset, s3.data_dir / "data" / "set")
        yield s3


def source_docs() -> list[dict[str, Any]]:
    """The documents of `make_dataset`, in sample-id order."""
    return make_docs(NUM_SAMPLES, seed=7)


def ids_of(batch: list[dict[str, Any]]) -> list[int]:
    """A collate_fn that keeps only the sample ids (cheap, picklable)."""
    return [int(sample["sample_id"]) for sample in batch]
