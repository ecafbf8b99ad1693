"""Each system's shuffled dataset over a prepared copy, built as its documentation shows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def register_webdataset_s3(storage_options: dict[str, Any]) -> None:
    """Let WebDataset open ``s3://`` URLs through fsspec (it has no handler of its own)."""
    import importlib

    import fsspec

    gopen = importlib.import_module("webdataset.gopen")  # the package exports a gopen function

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **storage_options).open()

    gopen.gopen_schemes["s3"] = gopen_fsspec


def _shardloader_dataset(spec: dict[str, Any]) -> Any:
    from shardloader import PackConfig, ShardDataset, StreamConfig

    storage_options: dict[str, Any] = spec.get("storage_options") or {}
    config = StreamConfig(
        seed=spec["seed"],
        shuffle=True,
        cache_dir=spec["cache_dir"],
        cache_bytes=spec["cache_bytes"],
        verify_local=spec.get("verify_local", True),
        shuffle_unit=spec.get("shuffle_unit", "auto"),
        decode_threads=spec.get("decode_threads"),
    )
    pack = PackConfig(seq_len=spec["block_size"]) if spec["task"] == "packed" else None
    return ShardDataset(
        spec["url"], config=config, pack=pack, storage_options=storage_options or None
    )


def _mosaic_dataset(spec: dict[str, Any]) -> Any:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # a crashed earlier pass leaves shared memory behind
    dataset = StreamingDataset(
        remote=spec["url"],
        local=spec["cache_dir"],
        shuffle=True,
        shuffle_seed=spec["seed"],
        batch_size=spec["batch_size"],
        predownload=spec["mosaic_predownload"],
    )
    # The boto3 client that fetched index.json here would be inherited by forked DataLoader
    # workers, which then share its pooled connections: responses interleave and shards
    # arrive corrupt (zstd "Data corruption detected", then a hang). Drop it, so that each
    # worker makes its own (the downloader only resets it when pickled, i.e. under spawn).
    for stream in dataset.streams:
        stream._downloader.clean_up()
    return dataset


def _litdata_dataset(spec: dict[str, Any]) -> Any:
    from litdata import StreamingDataset, TokensLoader

    storage_options: dict[str, Any] = spec.get("storage_options") or {}
    options: dict[str, Any] = {
        "shuffle": True,
        "seed": spec["seed"],
        "cache_dir": spec["cache_dir"],
    }
    if spec["task"] in ("tokens", "packed"):
        options["item_loader"] = TokensLoader(block_size=spec["block_size"])
    if spec["source"] == "s3":
        options["storage_options"] = {
            "endpoint_url": storage_options["client_kwargs"]["endpoint_url"],
            "region_name": storage_options["client_kwargs"]["region_name"],
            "aws_access_key_id": storage_options["key"],
            "aws_secret_access_key": storage_options["secret"],
        }
    return StreamingDataset(spec["url"], **options)


def _webdataset_dataset(spec: dict[str, Any]) -> Any:
    import webdataset as wds

    task, url = spec["task"], spec["url"]
    if spec["source"] == "s3":
        register_webdataset_s3(spec.get("storage_options") or {})
    urls = [f"{url}/{name}" for name in spec["files"]]
    key = "txt" if task == "text" else "npy"
    column = "text" if task == "text" else "input_ids"
    return (
        # split_by_node: the default (single_node_only) raises under torch.distributed
        wds.WebDataset(
            urls,
            shardshuffle=100,
            seed=spec["seed"],
            empty_check=False,
            nodesplitter=wds.split_by_node,
        )
        .shuffle(spec["shuffle_buffer"])
        .decode()
        .map(lambda sample: {"id": sample["__key__"], column: sample[key]})
    )


def _hf_dataset(spec: dict[str, Any]) -> Any:
    import datasets
    from datasets import load_dataset

    # datasets 5.2.0 sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) at the end of every pass over
    # Parquet that interleaves shards (as shuffle does), to let pyarrow's threads wind down
    # (apache/arrow#45214): a fixed cost per epoch, which would swamp a short pass.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

    storage_options: dict[str, Any] = spec.get("storage_options") or {}
    urls = [f"{spec['url']}/{name}" for name in spec["files"]]
    options = {"storage_options": storage_options} if spec["source"] == "s3" else {}
    ds = load_dataset(
        "parquet", data_files={"train": urls}, split="train", streaming=True, **options
    )
    # Token ids stay Python lists (the default format): with_format("numpy") makes the pass
    # ~3x slower here (datasets 5.2.0), and the collate turns lists into arrays anyway.
    return ds.shuffle(seed=spec["seed"], buffer_size=spec["shuffle_buffer"])


DATASETS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "shardloader": _shardloader_dataset,
    "mosaic": _mosaic_dataset,
    "litdata": _litdata_dataset,
    "webdataset": _webdataset_dataset,
    "hf": _hf_dataset,
}


def make_dataset(spec: dict[str, Any]) -> Any:
    """The system's dataset over ``spec["url"]``, shuffled, as its documentation shows."""
    system = spec["system"]
    if system not in DATASETS:
        raise ValueError(f"unknown system {system!r}")
    return DATASETS[system](spec)
