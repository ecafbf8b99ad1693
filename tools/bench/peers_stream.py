"""The subprocess side of ``tools.bench.stream``: write each system's dataset, or time one pass.

Runs in ``.venv-bench`` (``tools/bench_setup.sh``), one process per call, so that every pass
starts with a fresh interpreter and its peak RSS (``ru_maxrss``) is its own::

    python -m tools.bench.peers_stream prepare SPEC.json   # write one system's copy of the corpus
    python -m tools.bench.peers_stream pass SPEC.json      # one shuffled pass through a DataLoader

``SPEC.json`` is written by ``tools.bench.stream``; the result goes to ``spec["result"]``.

Every system is read the way its documentation shows, with its own shuffle on, through a
``torch.utils.data.DataLoader`` (for shardloader its subclass ``ShardLoader``, which also records
what the loop consumed, unless the spec says otherwise) with the same ``batch_size`` and the same
collate function:
``collate_text`` (a list of the texts) or ``collate_tokens`` (one flat tensor of all the token ids
of the batch, so that one object per batch crosses from a worker to the main process). Packed
rows (task ``packed``) are each system's own batches: shardloader's ``ShardLoader`` collate of
``PackConfig`` rows (a dict of ``[8, 2048]`` tensors), LitData's stacked ``TokensLoader`` blocks.

- shardloader: ``ShardDataset`` over Arrow shards (zstd), ``StreamConfig(seed, shuffle=True)``.
- mosaic: ``StreamingDataset`` over MDS (zstd) written by one ``MDSWriter``; ``remote`` is the
  dataset (a local folder or ``s3://``) and ``local`` a fresh folder per pass, because reading
  compressed shards with only ``local=`` decompresses them beside the shards and keeps the copies.
  ``predownload=2048`` and ``batch_size`` are passed (without ``predownload`` its iterator sleeps
  7 ms whenever it is ``predownload`` samples ahead, ~1,000 samples/s).
- litdata: ``StreamingDataset`` over ``optimize`` output (zstd chunks); tokens through
  ``TokensLoader(block_size)``, which yields fixed blocks of the concatenated token stream. From
  local disk it reads a hard-linked copy of the dataset (made by the parent): with ``TokensLoader``
  it decompresses each whole-chunk ``chunk-*.zstd.bin`` into ``chunk-*.bin`` in the input folder
  itself and deletes the compressed file, even with a ``cache_dir`` (its index still names the
  ``.zstd.bin``, so the same folder served over S3 then fails with ``NoSuchKey``).
- webdataset: ``WebDataset(urls, shardshuffle=100).shuffle(1000).decode()`` over plain tar shards
  written by ``ShardWriter`` (Python 3.11's ``tarfile`` reads no zstd). WebDataset has no ``s3://``
  handler: one that opens the URL with fsspec (like every other system here, s3fs) is added to
  ``webdataset.gopen.gopen_schemes``.
- hf: ``datasets.load_dataset("parquet", streaming=True).shuffle(seed, buffer_size=1000)`` over
  Parquet files (zstd, row groups of 1,000 rows) written by pyarrow; token ids come as Python
  lists (its default format: ``with_format("numpy")`` is ~3x slower).
  ``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` is set to 0: otherwise a shuffled pass over
  Parquet ends with a 5 s sleep.
- memmap (bound): nanoGPT's ``get_batch``: a ``np.memmap`` of all token ids (uint16) re-opened per
  batch, ``batch_size`` random windows of ``block_size`` tokens stacked into an int64 tensor, as
  many batches as cover the corpus's tokens once.
- raw-get (bound): ``fsspec`` ``cat`` of all of shardloader's shard files from the S3 server at
  once (s3fs issues the GETs concurrently); no decoding.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def rss_mb(field: str = "VmRSS") -> float:
    """A field of ``/proc/self/status`` in MB: ``VmRSS`` (resident set size), ``RssAnon``
    (anonymous memory: heap, buffers) or ``RssFile`` (resident pages of mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> tuple[float, float]:
    """(peak RSS of this process, largest peak RSS of its waited-for children), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


# --------------------------------------------------------------------------------------------
# Collate functions: the same for every system


def collate_text(samples: list[Any]) -> list[str]:
    """A batch of text samples as the list of their texts."""
    return [sample["text"] for sample in samples]


def collate_tokens(samples: list[Any]) -> tuple[Any, int]:
    """A batch of token samples as (one flat int64 tensor of all their ids, number of samples).

    A sample is a dict with ``input_ids`` (an array, or a list for HF) or, for LitData's
    ``TokensLoader``, the ids themselves. int64, as an embedding lookup wants and as the memmap
    bound makes, whatever the system stores.
    """
    import numpy as np
    import torch

    arrays = [np.asarray(s["input_ids"] if isinstance(s, dict) else s) for s in samples]
    ids = np.concatenate(arrays).astype(np.int64, copy=False)
    return torch.from_numpy(ids), len(samples)


# --------------------------------------------------------------------------------------------
# Preparing each system's copy of the corpus


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


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write ``spec["system"]``'s copy of the corpus for ``spec["task"]`` into ``spec["output"]``.

    Returns the number of samples and tokens written, as the system's own index reports them
    where it has one.
    """
    system, task, out = spec["system"], spec["task"], spec["output"]
    shard_bytes, num_proc = spec["shard_bytes"], spec["num_proc"]
    os.makedirs(out, exist_ok=True)
    num_samples = num_tokens = 0

    if system == "shardloader":
        import shardloader

        config = shardloader.ConvertConfig(
            output=out,
            shard_bytes=shard_bytes,
            num_proc=num_proc,
            tokenizer=spec["tokenizer"] if task == "tokens" else None,
            progress=False,
            overwrite=True,
        )
        result = shardloader.convert(spec["inputs"], config)
        assert result.manifest is not None
        num_samples, num_tokens = result.manifest.num_samples, result.manifest.num_tokens

    elif system == "mosaic":
        from streaming import MDSWriter

        value = "str" if task == "text" else "ndarray:uint16"
        column = "text" if task == "text" else "input_ids"
        columns = {"id": "str", column: value}
        with MDSWriter(out=out, columns=columns, compression="zstd", size_limit=shard_bytes) as w:
            for doc_id, value_ in iter_docs(spec):
                w.write({"id": doc_id, column: value_})
                num_samples += 1
                num_tokens += 0 if task == "text" else len(value_)

    elif system == "litdata":
        from litdata import TokensLoader, optimize

        options: dict[str, Any] = {
            "output_dir": out,
            "num_workers": num_proc,
            "chunk_bytes": shard_bytes,
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

    elif system == "webdataset":
        import webdataset as wds

        pattern = os.path.join(out, "shard-%06d.tar")
        with wds.ShardWriter(pattern, maxsize=shard_bytes, verbose=0) as sink:
            for doc_id, value_ in iter_docs(spec):
                # WebDataset keys cannot hold dots; the corpus ids ("doc-000000042") have none.
                key = "txt" if task == "text" else "npy"
                sink.write({"__key__": doc_id, key: value_})
                num_samples += 1
                num_tokens += 0 if task == "text" else len(value_)

    elif system == "hf":
        import pyarrow as pa
        import pyarrow.parquet as pq

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

    elif system == "memmap":
        import numpy as np

        with open(os.path.join(out, "train.bin"), "wb") as f:
            for _, tokens in iter_docs(spec):
                f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
                num_samples += 1
                num_tokens += len(tokens)

    else:
        raise ValueError(f"unknown system {system!r}")
    return {"num_samples": num_samples, "num_tokens": num_tokens}


# --------------------------------------------------------------------------------------------
# One pass


def register_webdataset_s3(storage_options: dict[str, Any]) -> None:
    """Let WebDataset open ``s3://`` URLs through fsspec (it has no handler of its own)."""
    import importlib

    import fsspec

    gopen = importlib.import_module("webdataset.gopen")  # the package exports a gopen function

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
        return fsspec.open(url, mode, **storage_options).open()

    gopen.gopen_schemes["s3"] = gopen_fsspec


def make_dataset(spec: dict[str, Any]) -> Any:
    """The system's dataset over ``spec["url"]``, shuffled, as its documentation shows."""
    system, task, url = spec["system"], spec["task"], spec["url"]
    s3 = spec["source"] == "s3"
    storage_options: dict[str, Any] = spec.get("storage_options") or {}
    seed, batch_size = spec["seed"], spec["batch_size"]

    if system == "shardloader":
        from shardloader import PackConfig, ShardDataset, StreamConfig

        config = StreamConfig(
            seed=seed, shuffle=True, cache_dir=spec["cache_dir"], cache_bytes=spec["cache_bytes"]
        )
        pack = PackConfig(seq_len=spec["block_size"]) if task == "packed" else None
        return ShardDataset(url, config=config, pack=pack, storage_options=storage_options or None)

    if system == "mosaic":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # a crashed earlier pass leaves shared memory behind
        dataset = StreamingDataset(
            remote=url,
            local=spec["cache_dir"],
            shuffle=True,
            shuffle_seed=seed,
            batch_size=batch_size,
            predownload=spec["mosaic_predownload"],
        )
        # The boto3 client that fetched index.json here would be inherited by forked DataLoader
        # workers, which then share its pooled connections: responses interleave and shards
        # arrive corrupt (zstd "Data corruption detected", then a hang). Drop it, so that each
        # worker makes its own (the downloader only resets it when pickled, i.e. under spawn).
        for stream in dataset.streams:
            stream._downloader.clean_up()
        return dataset

    if system == "litdata":
        from litdata import StreamingDataset, TokensLoader

        options: dict[str, Any] = {"shuffle": True, "seed": seed, "cache_dir": spec["cache_dir"]}
        if task in ("tokens", "packed"):
            options["item_loader"] = TokensLoader(block_size=spec["block_size"])
        if s3:
            options["storage_options"] = {
                "endpoint_url": storage_options["client_kwargs"]["endpoint_url"],
                "region_name": storage_options["client_kwargs"]["region_name"],
                "aws_access_key_id": storage_options["key"],
                "aws_secret_access_key": storage_options["secret"],
            }
        return StreamingDataset(url, **options)

    if system == "webdataset":
        import webdataset as wds

        if s3:
            register_webdataset_s3(storage_options)
        urls = [f"{url}/{name}" for name in spec["files"]]
        key = "txt" if task == "text" else "npy"
        column = "text" if task == "text" else "input_ids"
        return (
            # split_by_node: the default (single_node_only) raises under torch.distributed
            wds.WebDataset(
                urls,
                shardshuffle=100,
                seed=seed,
                empty_check=False,
                nodesplitter=wds.split_by_node,
            )
            .shuffle(spec["shuffle_buffer"])
            .decode()
            .map(lambda sample: {"id": sample["__key__"], column: sample[key]})
        )

    if system == "hf":
        import datasets
        from datasets import load_dataset

        # datasets 5.2.0 sleeps SLEEP_TIME_ON_THREADS_SHUTDOWN (5 s) at the end of every pass over
        # Parquet that interleaves shards (as shuffle does), to let pyarrow's threads wind down
        # (apache/arrow#45214): a fixed cost per epoch, which would swamp a short pass.
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

        urls = [f"{url}/{name}" for name in spec["files"]]
        options = {"storage_options": storage_options} if s3 else {}
        ds = load_dataset(
            "parquet", data_files={"train": urls}, split="train", streaming=True, **options
        )
        # Token ids stay Python lists (the default format): with_format("numpy") makes the pass
        # ~3x slower here (datasets 5.2.0), and the collate turns lists into arrays anyway.
        return ds.shuffle(seed=seed, buffer_size=spec["shuffle_buffer"])

    raise ValueError(f"unknown system {system!r}")


def run_memmap(spec: dict[str, Any]) -> dict[str, Any]:
    """nanoGPT's ``get_batch`` over a memmap, for as many tokens as the corpus holds."""
    import numpy as np
    import torch

    path = os.path.join(spec["url"], "train.bin")
    batch_size, block_size = spec["batch_size"], spec["block_size"]
    num_tokens = os.path.getsize(path) // 2
    num_batches = num_tokens // (batch_size * block_size)
    generator = torch.Generator().manual_seed(spec["seed"])
    started = time.perf_counter()
    first_batch_s = 0.0
    seen = 0
    for step in range(num_batches):
        data = np.memmap(path, dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT does
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
        seen += x.numel()
        if step == 0:
            first_batch_s = time.perf_counter() - started
    return {
        "job_s": time.perf_counter() - started,
        "first_batch_s": first_batch_s,
        "num_samples": num_batches * batch_size,
        "num_tokens": seen,
        "num_batches": num_batches,
    }


def run_raw_get(spec: dict[str, Any]) -> dict[str, Any]:
    """GET every shard file of the dataset from S3 with fsspec, concurrently; no decoding."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, **spec["storage_options"])
    urls = [f"{spec['url']}/{name}" for name in spec["files"]]
    started = time.perf_counter()
    blobs = fs.cat(urls)
    job_s = time.perf_counter() - started
    return {
        "job_s": job_s,
        "first_batch_s": 0.0,
        "num_samples": 0,
        "num_tokens": 0,
        "num_batches": 0,
        "bytes_read": sum(len(blob) for blob in blobs.values()),
    }


def run_pass(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one shuffled pass of one system through a DataLoader (or one bound)."""
    import torch
    from torch.utils.data import DataLoader

    system = spec["system"]
    if system == "shardloader":
        import shardloader  # noqa: F401  (imported outside the timed region, like the others)
    elif system == "mosaic":
        import streaming  # noqa: F401
    elif system == "litdata":
        import litdata  # noqa: F401
    elif system == "webdataset":
        import webdataset  # noqa: F401
    elif system == "hf":
        import datasets  # noqa: F401
    if spec["source"] == "s3":
        # Every system's S3 client library (s3fs: shardloader, WebDataset here, HF, raw GET;
        # boto3: Mosaic, LitData) is imported before the clock starts, like the system itself:
        # an import is paid once per process, and ~0.25 s of it would otherwise swamp the
        # first batch of some systems and not others.
        import boto3  # noqa: F401
        import s3fs  # noqa: F401
    torch.set_num_threads(1)
    rss_import = rss_mb()
    import_anon, import_file = rss_mb("RssAnon"), rss_mb("RssFile")

    if system == "memmap":
        result = run_memmap(spec)
    elif system == "raw-get":
        result = run_raw_get(spec)
    else:
        tokens = spec["task"] == "tokens"
        packed = spec["task"] == "packed"
        started = time.perf_counter()
        dataset = make_dataset(spec)
        loader_class: Any = DataLoader
        if system == "shardloader" and spec.get("shardloader_loader", True):
            from shardloader import ShardLoader  # a DataLoader that also tracks what was consumed

            loader_class = ShardLoader
        collate: dict[str, Any] = {}  # packed: each system's own batches of rows
        if not packed:
            collate["collate_fn"] = collate_tokens if tokens else collate_text
        loader = loader_class(
            dataset, batch_size=spec["batch_size"], num_workers=spec["num_workers"], **collate
        )
        first_batch_s = 0.0
        num_samples = num_tokens = num_batches = 0
        for batch in loader:
            if num_batches == 0:
                first_batch_s = time.perf_counter() - started
            num_batches += 1
            if packed:  # [batch, seq_len] rows: shardloader's dict, LitData's tensor
                rows = batch["input_ids"] if isinstance(batch, dict) else batch
                num_samples += rows.shape[0]
                num_tokens += rows.numel()
            elif tokens:
                ids, count = batch
                num_samples += count
                num_tokens += ids.numel()
            else:
                num_samples += len(batch)
        job_s = time.perf_counter() - started
        rss_anon, rss_file = rss_mb("RssAnon"), rss_mb("RssFile")  # before anything is freed
        del loader  # joins the workers, so that RUSAGE_CHILDREN counts them
        result = {
            "job_s": job_s,
            "first_batch_s": first_batch_s,
            "num_samples": num_samples,
            "num_tokens": num_tokens,
            "num_batches": num_batches,
            "end_rss_anon_mb": rss_anon,
            "end_rss_file_mb": rss_file,
        }
    own, children = peak_rss_mb()
    result.update(
        rss_import_mb=rss_import,
        import_rss_anon_mb=import_anon,
        import_rss_file_mb=import_file,
        peak_rss_mb=own,
        workers_peak_rss_mb=children,
    )
    return result


def main(argv: list[str]) -> int:
    """``prepare SPEC`` or ``pass SPEC``: run it and write the result JSON to ``spec["result"]``."""
    command, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if command == "prepare":
        started = time.perf_counter()
        result = prepare(spec)
        result["prepare_s"] = time.perf_counter() - started
    elif command == "pass":
        result = run_pass(spec)
    else:
        raise SystemExit(f"unknown command {command!r}; use prepare or pass")
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
