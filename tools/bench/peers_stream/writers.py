"""Each system's copy of the corpus, written by the system's own writer (``prepare``).

One writer per system, each taking the spec and returning (samples, tokens) written, as the
system's own index reports them where it has one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def read_jsonl(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Every record of the JSONL files, in order."""
    for path in paths:
        with open(path, "rb") as lines:
            for line in lines:
                yield json.loads(line)


def iter_docs(spec: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(id, text) of the corpus, or (id, uint16 token ids) of shardloader's tokenized shards."""
    if spec["task"] == "text":
        for record in read_jsonl(spec["inputs"]):
            yield record["id"], record["text"]
        return
    import numpy as np

    from shardloader import iter_samples

    for sample in iter_samples(spec["tokens_source"]):
        yield sample["id"], np.asarray(sample["input_ids"], dtype=np.uint16)


def _shard_items(dataset: str) -> list[tuple[str, int]]:
    from shardloader import read_manifest

    return [(dataset, index) for index in range(len(read_manifest(dataset).shards))]


def litdata_text_fn(path: str) -> Iterator[dict[str, str]]:
    """LitData ``optimize`` fn: one ``{"id", "text"}`` item per document of a JSONL file."""
    for record in read_jsonl([path]):
        yield {"id": record["id"], "text": record["text"]}


def litdata_tokens_fn(item: tuple[str, int]) -> Iterator[Any]:
    """LitData ``optimize`` fn: the uint16 token ids of each document of one shardloader shard."""
    import numpy as np

    from shardloader import read_manifest
    from shardloader.manifest import iter_shard_urls
    from shardloader.verify import decode_shard, read_shard

    dataset, index = item
    manifest = read_manifest(dataset)
    shard, url = list(iter_shard_urls(dataset, manifest))[index]
    for sample in decode_shard(read_shard(url, shard, manifest), manifest, where=url):
        yield np.asarray(sample["input_ids"], dtype=np.uint16)


def _write_shardloader(spec: dict[str, Any]) -> tuple[int, int]:
    import shardloader

    config = shardloader.ConvertConfig(
        output=spec["output"],
        shard_bytes=spec["shard_bytes"],
        num_proc=spec["num_proc"],
        tokenizer=spec["tokenizer"] if spec["task"] == "tokens" else None,
        progress=False,
        overwrite=True,
    )
    result = shardloader.convert(spec["inputs"], config)
    assert result.manifest is not None
    return result.manifest.num_samples, result.manifest.num_tokens


def _write_mosaic(spec: dict[str, Any]) -> tuple[int, int]:
    from streaming import MDSWriter

    task, out, shard_bytes = spec["task"], spec["output"], spec["shard_bytes"]
    num_samples = num_tokens = 0
    value = "str" if task == "text" else "ndarray:uint16"
    column = "text" if task == "text" else "input_ids"
    columns = {"id": "str", column: value}
    with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=shard_bytes) as w:
        for doc_id, value_ in iter_docs(spec):
            w.write({"id": doc_id, column: value_})
            num_samples += 1
            num_tokens += 0 if task == "text" else len(value_)
    return num_samples, num_tokens


def _write_litdata(spec: dict[str, Any]) -> tuple[int, int]:
    from litdata import TokensLoader, optimize

    task, out = spec["task"], spec["output"]
    num_tokens = 0
    options: dict[str, Any] = {
        "output_dir": out,
        "num_workers": spec["num_proc"],
        "chunk_bytes": spec["shard_bytes"],
        "compression": "zstd",
        "reorder_files": False,
        "verbose": False,
    }
    if task == "text":
        optimize(fn=litdata_text_fn, inputs=list(spec["inputs"]), **options)
    else:  # TokensLoader with zstd only accepts compression_level="chunk" (litdata 0.2.76)
        options.update(item_loader=TokensLoader(), compression_level="chunk")
        optimize(fn=litdata_tokens_fn, inputs=_shard_items(spec["tokens_source"]), **options)
    index = json.loads(Path(out, "index.json").read_text())
    num_samples = sum(chunk["chunk_size"] for chunk in index["chunks"])
    if task == "tokens":
        num_tokens = sum(chunk.get("dim") or 0 for chunk in index["chunks"])
    return num_samples, num_tokens


def _write_webdataset(spec: dict[str, Any]) -> tuple[int, int]:
    import webdataset as wds

    task = spec["task"]
    num_samples = num_tokens = 0
    pattern = os.path.join(spec["output"], "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=spec["shard_bytes"], verbose=0) as sink:
        for doc_id, value_ in iter_docs(spec):
            # WebDataset keys cannot hold dots; the corpus ids ("doc-000000042") have none.
            key = "txt" if task == "text" else "npy"
            sink.write({"__key__": doc_id, key: value_})
            num_samples += 1
            num_tokens += 0 if task == "text" else len(value_)
    return num_samples, num_tokens


def _write_hf(spec: dict[str, Any]) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    task, out, shard_bytes = spec["task"], spec["output"], spec["shard_bytes"]
    num_samples = num_tokens = 0
    column = "text" if task == "text" else "input_ids"
    kind = pa.string() if task == "text" else pa.list_(pa.uint16())
    schema = pa.schema([("id", pa.string()), (column, kind)])
    ids: list[str] = []
    values: list[Any] = []
    pending = file_index = 0

    def flush() -> None:
        nonlocal ids, values, pending, file_index
        table = pa.table([pa.array(ids, pa.string()), pa.array(values, kind)], schema=schema)
        path = os.path.join(out, f"part-{file_index:05d}.parquet")
        pq.write_table(table, path, compression="zstd", row_group_size=1000)
        ids, values, pending, file_index = [], [], 0, file_index + 1

    for doc_id, value_ in iter_docs(spec):
        ids.append(doc_id)
        values.append(value_)
        pending += len(value_.encode()) if task == "text" else 2 * len(value_)
        num_samples += 1
        num_tokens += 0 if task == "text" else len(value_)
        if pending >= shard_bytes:
            flush()
    if ids:
        flush()
    return num_samples, num_tokens


def _write_memmap(spec: dict[str, Any]) -> tuple[int, int]:
    import numpy as np

    num_samples = num_tokens = 0
    with open(os.path.join(spec["output"], "train.bin"), "wb") as f:
        for _, tokens in iter_docs(spec):
            f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
            num_samples += 1
            num_tokens += len(tokens)
    return num_samples, num_tokens


WRITERS: dict[str, Callable[[dict[str, Any]], tuple[int, int]]] = {
    "shardloader": _write_shardloader,
    "mosaic": _write_mosaic,
    "litdata": _write_litdata,
    "webdataset": _write_webdataset,
    "hf": _write_hf,
    "memmap": _write_memmap,
}


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write ``spec["system"]``'s copy of the corpus for ``spec["task"]`` into ``spec["output"]``.

    Returns the number of samples and tokens written, as the system's own index reports them
    where it has one.
    """
    system = spec["system"]
    os.makedirs(spec["output"], exist_ok=True)
    if system not in WRITERS:
        raise ValueError(f"unknown system {system!r}")
    num_samples, num_tokens = WRITERS[system](spec)
    return {"num_samples": num_samples, "num_tokens": num_tokens}
