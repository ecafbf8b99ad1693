"""One timed pass: a system's dataset through a DataLoader (or a bound), with its RSS.

Every system's batches go through the same collate function (``collate_text`` or
``collate_tokens``), except packed rows, which are each system's own batches.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

from tools.bench.peers_stream.readers import make_dataset


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


def run_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode every text shard of shardloader's copy on 2 threads and make each text a ``str``.

    The floor of a text pass on this machine: the zstd Arrow decoding and one Python ``str`` per
    document, shard by shard, with no shuffle, no sample dicts, no checksums and no DataLoader.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.ipc as ipc

    def decode(name: str) -> Any:
        with open(os.path.join(spec["url"], name), "rb") as f:
            data = pa.py_buffer(f.read())
        return ipc.open_file(data).read_all().column("text")

    started = time.perf_counter()
    first_batch_s = 0.0
    num_samples = 0
    with ThreadPoolExecutor(2) as pool:
        for column in pool.map(decode, spec["files"]):
            num_samples += len(column.to_pylist())
            if not first_batch_s:
                first_batch_s = time.perf_counter() - started
    return {
        "job_s": time.perf_counter() - started,
        "first_batch_s": first_batch_s,
        "num_samples": num_samples,
        "num_tokens": 0,
        "num_batches": 0,
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


def _import_system(spec: dict[str, Any]) -> None:
    """Import the system (and its S3 client) before the clock starts, like every other."""
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


def run_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """One shuffled pass of a system's dataset through a DataLoader: times, counts, end RSS."""
    from torch.utils.data import DataLoader

    system = spec["system"]
    tokens = spec["task"] == "tokens"
    packed = spec["task"] == "packed"
    if spec.get("per_sample"):
        return run_items(spec)
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
    return {
        "job_s": job_s,
        "first_batch_s": first_batch_s,
        "num_samples": num_samples,
        "num_tokens": num_tokens,
        "num_batches": num_batches,
        "end_rss_anon_mb": rss_anon,
        "end_rss_file_mb": rss_file,
    }


def item_tokens(item: Any) -> int:
    """Tokens of one item: a sample dict's ``input_ids``, a packed row, or LitData's ids."""
    if isinstance(item, dict):
        return len(item["input_ids"])
    ids = getattr(item, "input_ids", item)  # shardloader's PackedRow, or a tensor of ids
    return int(ids.numel()) if hasattr(ids, "numel") else len(ids)


def run_items(spec: dict[str, Any]) -> dict[str, Any]:
    """One shuffled pass item by item: ``DataLoader(dataset, batch_size=None)``, any system.

    The way most users first iterate a dataset: no batching, no collate; a packed row, a
    document or LitData's token block is one item.
    """
    from torch.utils.data import DataLoader

    text = spec["task"] == "text"
    started = time.perf_counter()
    loader = DataLoader(make_dataset(spec), batch_size=None, num_workers=spec["num_workers"])
    first_batch_s = 0.0
    num_samples = num_tokens = 0
    for item in loader:
        if num_samples == 0:
            first_batch_s = time.perf_counter() - started
        num_samples += 1
        if not text:
            num_tokens += item_tokens(item)
    job_s = time.perf_counter() - started
    rss_anon, rss_file = rss_mb("RssAnon"), rss_mb("RssFile")
    del loader
    return {
        "job_s": job_s,
        "first_batch_s": first_batch_s,
        "num_samples": num_samples,
        "num_tokens": num_tokens,
        "num_batches": num_samples,
        "end_rss_anon_mb": rss_anon,
        "end_rss_file_mb": rss_file,
    }


def run_pass(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one shuffled pass of one system through a DataLoader (or one bound)."""
    import torch

    _import_system(spec)
    torch.set_num_threads(1)
    rss_import = rss_mb()
    import_anon, import_file = rss_mb("RssAnon"), rss_mb("RssFile")

    if spec["system"] == "memmap":
        result = run_memmap(spec)
    elif spec["system"] == "raw-get":
        result = run_raw_get(spec)
    elif spec["system"] == "decode":
        result = run_decode(spec)
    else:
        result = run_loader(spec)
    own, children = peak_rss_mb()
    result.update(
        rss_import_mb=rss_import,
        import_rss_anon_mb=import_anon,
        import_rss_file_mb=import_file,
        peak_rss_mb=own,
        workers_peak_rss_mb=children,
    )
    return result
