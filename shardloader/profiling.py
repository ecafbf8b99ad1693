"""Why is my loader slow: time each stage of the pipeline on the user's data and machine.

`profile_dataset` runs the stages one after the other in this process, each on real shards and
for a bounded time, and converts every rate to tokens/s so that they compare:

- fetch: the shard bytes onto local disk through `shardloader.fetch.ShardFetcher` (a download
  into a fresh cache for remote sources; a read of the file for local ones);
- decode: `formats` ``read_columns`` plus taking every row (decompression, Arrow to Python);
- tokenize (text shards with a tokenizer): `SampleEncoder`;
- pack: `Packer` over token documents; collate: `collate_rows` into ``[batch_size, seq_len]``;
- host-to-device: pinned copy of a batch to the GPU (when there is one);
- end to end: `ShardLoader` over `ShardDataset` with each requested ``num_workers``, with the
  share of the workers' time each stage took (`ShardLoader.stage_seconds`).

The slowest stage is the bottleneck. One worker runs decode, tokenize, pack and collate in turn,
so it makes ``1 / sum(1 / rate)`` tokens/s; `suggest` (a pure function of the figures) turns them
into advice on workers, cache, tokenizing ahead and shard size, with the rate each would reach.
A mixture (``--mix``) is profiled source by source with the same stages:
`shardloader.mix_profile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardloader import storage
from shardloader.blocks import shard_decoded_bytes
from shardloader.errors import ConfigError
from shardloader.formats import ReadSpec, get_format
from shardloader.manifest import Manifest, iter_shard_urls, read_manifest
from shardloader.options import option
from shardloader.pack import IGNORE_INDEX, PackConfig, Packer, collate_rows
from shardloader.pack_encode import SampleEncoder
from shardloader.tokenizer import TextTokenizer

DEFAULT_CACHE_BYTES = 16 << 30  # StreamConfig's default


def _worker_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes counts like 0,2; got {text!r}") from None


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """What `profile_dataset` measures; every field is also a flag of ``shardloader profile``.

    Raises:
        ConfigError: A value is out of range.
    """

    source: str = option(
        "",
        help="a converted dataset (directory or URL); or give --mix",
        positional=True,
        metavar="dataset",
    )
    mix: str | None = option(
        None, "a mixture file (YAML or JSON) to profile source by source instead of a dataset"
    )
    tokenizer: str | None = option(None, "local tokenizer (needed for text shards)")
    seq_len: int = option(2048, "tokens per packed row")
    batch_size: int = option(8, "rows per batch")
    num_workers: tuple[int, ...] = option(
        (0, 2), "comma-separated worker counts to run the loader with", parse=_worker_counts
    )
    seconds: float = option(2.0, "time budget of each stage")
    cache_dir: str | None = option(None, "cache of the loader runs (default: a temporary one)")

    def __post_init__(self) -> None:
        if not self.source and not self.mix:
            raise ConfigError("profile needs a dataset (directory or URL) or --mix FILE")
        if self.source and self.mix:
            raise ConfigError(
                f"profile takes a dataset or --mix FILE, not both (got {self.source!r} and "
                f"--mix {self.mix!r})"
            )
        if self.seconds <= 0 or self.seq_len < 1 or self.batch_size < 1:
            raise ConfigError("seconds, seq_len and batch_size must be > 0")
        if any(k < 0 for k in self.num_workers):
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class StageResult:
    """One stage's measurement.

    Attributes:
        name: ``fetch``, ``decode``, ``tokenize``, ``pack``, ``collate`` or ``host_to_device``.
        seconds: Time spent.
        amount: What it processed, in ``unit``.
        unit: ``MB``, ``samples``, ``tokens`` or ``rows``.
        tokens_per_s: The rate in tokens/s (``None`` when skipped).
        note: Why skipped, or what the figure includes.
    """

    name: str
    seconds: float
    amount: float
    unit: str
    tokens_per_s: float | None
    note: str = ""

    @property
    def rate(self) -> float:
        """``amount`` per second."""
        return self.amount / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class LoaderResult:
    """`ShardLoader` (or `MixLoader`) end to end with ``num_workers`` workers.

    Attributes:
        num_workers: DataLoader workers (0: the main process reads).
        tokens_per_s: Trained tokens per second after the first batch.
        first_batch_s: Seconds to the first batch.
        batches: Batches read.
        batches_per_s: Batches per second after the first batch.
        stage_busy: Per stage of the loader's ``stage_seconds`` (``fetch_wait``, ``decode``,
            ``pack``, ``collate``), its share of the reading processes' time: seconds over wall
            time times ``max(num_workers, 1)``.
    """

    num_workers: int
    tokens_per_s: float
    first_batch_s: float
    batches: int
    stage_busy: dict[str, float] = field(default_factory=dict)
    batches_per_s: float = 0.0


@dataclass(frozen=True)
class ProfileReport:
    """What `profile_dataset` measured, and what it suggests."""

    source: str
    remote: bool
    num_shards: int
    dataset_bytes: int
    mean_shard_bytes: float
    tokenized: bool
    stages: tuple[StageResult, ...]
    loaders: tuple[LoaderResult, ...]
    per_worker_tokens_per_s: float
    bottleneck: str
    suggestions: tuple[str, ...]
    # How `ShardDataset`'s defaults read it: "block" or "shard", what a window holds at most
    # (decoded bytes; 0: unknown), and whether its blocks could be read alone (digests known).
    shuffle_unit: str = "shard"
    window_bytes: int = 0
    window_units: int = 0
    block_digests: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``shardloader profile --json``)."""
        return dataclasses.asdict(self)


def profile_dataset(
    source: str,
    *,
    tokenizer: str | None = None,
    seq_len: int = 2048,
    batch_size: int = 8,
    num_workers: Sequence[int] = (0, 2),
    seconds: float = 2.0,
    cache_dir: str | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> ProfileReport:
    """Measure every stage of reading ``source`` (module docstring).

    Args:
        source: A converted dataset (directory or URL).
        tokenizer: Local tokenizer path; needed to pack text shards.
        seq_len: Tokens per packed row.
        batch_size: Rows per batch.
        num_workers: Worker counts to run the whole loader with.
        seconds: Time budget of each stage (at least one shard is always read).
        cache_dir: Cache of the end-to-end runs (default: a temporary directory, removed).
        cache_bytes: The cache size to judge the dataset against.
        storage_options: For fsspec (remote sources).

    Raises:
        ConfigError: Text shards without a tokenizer, or a bad setting.
        ManifestError: ``source`` holds no dataset.
    """
    if seconds <= 0 or seq_len < 1 or batch_size < 1:
        raise ConfigError("seconds, seq_len and batch_size must be > 0")
    options = dict(storage_options or {})
    url = storage.normalize(source)
    manifest = read_manifest(url, **options)
    tokenized = manifest.token_dtype is not None
    if not tokenized and tokenizer is None:
        raise ConfigError(
            f"{source}: text shards; pass --tokenizer to measure tokenizing and packing"
        )
    text_tokenizer = TextTokenizer(tokenizer) if tokenizer is not None else None
    urls = [shard_url for _, shard_url in iter_shard_urls(url, manifest)]
    remote = not storage.is_local(urls[0]) if urls else False
    scratch = tempfile.mkdtemp(prefix="shardloader-profile-")
    try:
        stages = _measure_stages(
            manifest, urls, options, scratch, text_tokenizer, seq_len, batch_size, seconds
        )
        loaders = tuple(
            _run_loader(
                url,
                tokenizer,
                seq_len,
                batch_size,
                k,
                seconds,
                cache_dir or os.path.join(scratch, "cache"),
                options,
            )
            for k in num_workers
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _report(url, manifest, remote, stages, loaders, cache_bytes)


def _measure_stages(
    manifest: Manifest,
    urls: list[str],
    options: Mapping[str, Any],
    scratch: str,
    tokenizer: TextTokenizer | None,
    seq_len: int,
    batch_size: int,
    seconds: float,
) -> list[StageResult]:
    """Time fetch, decode, tokenize, pack, collate and host-to-device, each rated in tokens/s."""
    fetch, paths = _fetch(manifest, urls, options, scratch, seconds)
    decode, samples, num_decoded = _decode(manifest, urls, paths, seconds)
    docs, tokenize = _tokenize(samples, tokenizer, seconds)
    tokens_per_sample = sum(len(d) for d in docs) / max(len(docs), 1)
    stored = sum(manifest.shards[i].num_bytes for i in range(num_decoded))
    tokens_per_byte = tokens_per_sample * len(samples) / max(stored, 1)
    fetch = dataclasses.replace(fetch, tokens_per_s=fetch.rate * 1e6 * tokens_per_byte)
    decode = dataclasses.replace(decode, tokens_per_s=decode.rate * tokens_per_sample)
    pack, rows = _pack(docs, PackConfig(seq_len=seq_len), seconds)
    collate, batch = _collate(rows, PackConfig(seq_len=seq_len), batch_size, seconds)
    return [fetch, decode, tokenize, pack, collate, _host_to_device(batch)]


def _report(
    url: str,
    manifest: Manifest,
    remote: bool,
    stages: list[StageResult],
    loaders: tuple[LoaderResult, ...],
    cache_bytes: int,
) -> ProfileReport:
    """The report of the measured stages and loaders, with the bottleneck and `suggest`'s advice."""
    cpu = [s for s in stages if s.name != "fetch" and s.name != "host_to_device"]
    per_worker = serial_rate([s.tokens_per_s for s in cpu])
    timed = [s for s in stages if s.tokens_per_s]
    bottleneck = min(timed, key=lambda s: s.tokens_per_s or 0.0).name
    sizes = manifest.shards.column("num_bytes")
    unit, window_bytes, window_units, digests = _default_reading(manifest, remote)
    report = ProfileReport(
        source=url,
        remote=remote,
        num_shards=len(sizes),
        dataset_bytes=int(sum(sizes)),
        mean_shard_bytes=float(np.mean(sizes)) if sizes else 0.0,
        tokenized=manifest.token_dtype is not None,
        stages=tuple(stages),
        loaders=loaders,
        per_worker_tokens_per_s=per_worker,
        bottleneck=bottleneck,
        suggestions=(),
        shuffle_unit=unit,
        window_bytes=window_bytes,
        window_units=window_units,
        block_digests=digests,
    )
    advice = suggest(report, cpu_count=os.cpu_count() or 1, cache_bytes=cache_bytes)
    return dataclasses.replace(report, suggestions=tuple(advice))


def _default_reading(manifest: Manifest, remote: bool) -> tuple[str, int, int, bool]:
    """How `StreamConfig()` reads ``manifest``: unit, window bytes and units, digests known."""
    from shardloader.dataset import StreamConfig  # (imports torch: only when profiling)

    plan = StreamConfig().resolve(manifest, remote=remote)
    config, table = plan.config, plan.blocks
    if table is None and manifest.shards.block_columns is not None:  # (whole shards)
        table = manifest.shards.block_table()
    digests = table is not None and table.all_known
    window = int(config.shuffle_window or 0)  # (resolve always sets it)
    if config.shuffle_unit == "block":
        return "block", int(config.shuffle_bytes or 0), window, digests
    held = 0
    if table is not None and window and table.decoded.all():  # the largest shards, decoded
        per_shard = shard_decoded_bytes(table, len(manifest.shards.column("num_samples")))
        held = int(np.sort(per_shard)[-window:].sum())
    return "shard", held, window, digests


def serial_rate(rates: Sequence[float | None]) -> float:
    """Tokens/s of stages run one after the other by one process."""
    known = [r for r in rates if r]
    return 1.0 / sum(1.0 / r for r in known) if known else 0.0


def _fetch(
    manifest: Manifest,
    urls: list[str],
    options: Mapping[str, Any],
    scratch: str,
    seconds: float,
) -> tuple[StageResult, list[str]]:
    from shardloader.fetch import ShardFetcher

    fetcher = ShardFetcher(
        cache_dir=os.path.join(scratch, "fetch"), storage_options=options, prefetch_threads=0
    )
    paths: list[str] = []
    done = 0
    start = time.perf_counter()
    try:
        for index, shard_url in enumerate(urls):
            info = manifest.shards[index]
            local = fetcher.open(
                shard_url,
                num_bytes=info.num_bytes,
                checksum=info.checksum,
                algorithm=manifest.checksum_algorithm,
            )
            if storage.is_local(shard_url):  # no download: time reading the file instead
                with open(local.path, "rb") as f:
                    while f.read(1 << 22):
                        pass
            paths.append(local.path)
            done += info.num_bytes
            local.release()
            if time.perf_counter() - start >= seconds:
                break
    finally:
        fetcher.close()
    note = "download into a fresh cache" if not storage.is_local(urls[0]) else "file read"
    elapsed = time.perf_counter() - start
    return StageResult("fetch", elapsed, done / 1e6, "MB", None, note), paths


def _decode(
    manifest: Manifest, urls: list[str], paths: list[str], seconds: float
) -> tuple[StageResult, list[dict[str, Any]], int]:
    fmt = get_format(manifest.format)
    field = "input_ids" if manifest.token_dtype is not None else "text"
    samples: list[dict[str, Any]] = []
    num_decoded = 0
    start = time.perf_counter()
    for index, path in enumerate(paths):
        num_decoded += 1
        # The reader's checks (sample count, token ids in the vocabulary) are part of decoding.
        columns = fmt.read_columns(path, ReadSpec.for_shard(manifest, index, urls[index]))
        taken = columns.take(np.arange(columns.num_rows))
        first = manifest.shards[index].first_sample_id
        samples.extend(
            {"sample_id": first + i, field: value} for i, value in enumerate(taken[field])
        )
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return StageResult("decode", elapsed, len(samples), "samples", None), samples, num_decoded


def _tokenize(
    samples: list[dict[str, Any]], tokenizer: TextTokenizer | None, seconds: float
) -> tuple[list[np.ndarray], StageResult]:
    if not samples or "text" not in samples[0]:
        docs = [np.asarray(s["input_ids"]) for s in samples]
        return docs, StageResult("tokenize", 0.0, 0, "tokens", None, "tokenized shards")
    encoder = SampleEncoder(tokenizer)
    docs = []
    start = time.perf_counter()
    for begin in range(0, len(samples), 256):
        docs.extend(d.input_ids for d in encoder(samples[begin : begin + 256]))
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    tokens = sum(len(d) for d in docs)
    return docs, StageResult("tokenize", elapsed, tokens, "tokens", tokens / max(elapsed, 1e-9))


def _pack(
    docs: list[np.ndarray], config: PackConfig, seconds: float
) -> tuple[StageResult, list[Any]]:
    packer = Packer(config)
    rows = []
    tokens = 0
    start = time.perf_counter()
    samples = ((i, {"input_ids": d}) for i, d in enumerate(docs))
    for row in packer.pack(samples):
        rows.append(row)
        tokens += len(row.input_ids)
        if len(rows) % 64 == 0 and time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    rate = tokens / max(elapsed, 1e-9)
    return StageResult("pack", elapsed, tokens, "tokens", rate), rows


def _collate(
    rows: list[Any], config: PackConfig, batch_size: int, seconds: float
) -> tuple[StageResult, dict[str, Any] | None]:
    if rows:  # the first call imports torch: not part of the rate
        collate_rows(rows[:batch_size], config)
    batch = None
    tokens = 0
    start = time.perf_counter()
    for begin in range(0, len(rows), batch_size):
        batch = collate_rows(rows[begin : begin + batch_size], config)
        tokens += int(batch["input_ids"].numel())
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    rate = tokens / max(elapsed, 1e-9) if tokens else None
    return StageResult("collate", elapsed, tokens, "tokens", rate), batch


def _host_to_device(batch: dict[str, Any] | None) -> StageResult:
    import torch

    if batch is None or not torch.cuda.is_available():
        return StageResult("host_to_device", 0.0, 0, "tokens", None, "no GPU")
    tensors = [v.pin_memory() for v in batch.values() if isinstance(v, torch.Tensor)]
    tokens = int(batch["input_ids"].numel())
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        for t in tensors:
            t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = tokens * repeats / elapsed
    return StageResult("host_to_device", elapsed, tokens * repeats, "tokens", rate, "pinned")


def _run_loader(
    url: str,
    tokenizer: str | None,
    seq_len: int,
    batch_size: int,
    num_workers: int,
    seconds: float,
    cache_dir: str,
    options: Mapping[str, Any],
) -> LoaderResult:
    from shardloader.dataset import ShardDataset, StreamConfig
    from shardloader.loader import ShardLoader

    dataset = ShardDataset(
        url,
        config=StreamConfig(cache_dir=cache_dir),
        pack=PackConfig(seq_len=seq_len),
        tokenizer=tokenizer,
        rank=0,
        world_size=1,
        storage_options=options,
    )
    try:
        loader = ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        return time_loader(loader, num_workers, seconds, trained_tokens)
    finally:
        dataset.close()


def trained_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens of a `collate_rows` batch that carry a label."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def time_loader(
    loader: Any, num_workers: int, seconds: float, count: Callable[[Any], int]
) -> LoaderResult:
    """Read ``loader`` for ``seconds`` after its first batch (or to its end), counting tokens.

    Args:
        loader: A `ShardLoader` or `MixLoader` (anything iterable with ``stage_seconds()``).
        num_workers: Its workers, to turn stage seconds into busy shares.
        seconds: How long to read after the first batch.
        count: Trained tokens of one batch.
    """
    tokens = batches = 0
    first = 0.0
    start = time.perf_counter()
    iterator = iter(loader)
    try:
        for batch in iterator:
            if batches == 0:
                first = time.perf_counter() - start
            batches += 1
            tokens += count(batch)
            if time.perf_counter() - start >= seconds + first:
                break
    finally:
        del iterator  # shuts the workers down
    wall = time.perf_counter() - start
    elapsed = wall - first
    rate = tokens / elapsed if elapsed > 0 else 0.0
    per_s = (batches - 1) / elapsed if elapsed > 0 and batches > 1 else 0.0
    capacity = max(wall, 1e-9) * max(num_workers, 1)
    busy = {name: s / capacity for name, s in loader.stage_seconds().items()}
    return LoaderResult(num_workers, rate, first, batches, busy, per_s)


def suggest(report: ProfileReport, *, cpu_count: int, cache_bytes: int) -> list[str]:
    """Advice from the measured figures, each with the rate it would reach (pure)."""
    rates = {s.name: s.tokens_per_s for s in report.stages if s.tokens_per_s}
    fetch = rates.get("fetch", float("inf"))
    workers = worker_advice(report.per_worker_tokens_per_s, fetch, cpu_count)
    return (
        workers
        + data_advice(report, cache_bytes=cache_bytes)
        + stream_advice(report)
        + transfer_advice(report.loaders)
    )


# What one crossing of a worker's transfer costs the main process in DataLoader machinery
# (queue, poll, unpickle, the next request), however small the batch: 0.1-0.15 ms measured on
# the 2-core benchmark VM (issue 19). `ShardLoader` sends `TRANSFER_BATCHES` batches at once.
HANDOFF_S = 0.15e-3
HANDOFF_SHARE = 0.05  # advise above this share of the main process's time
HANDOFF_TARGET = 0.02  # the share the advised transfer_batches brings it to
MAX_TRANSFER_BATCHES = 64


def transfer_advice(
    loaders: Sequence[LoaderResult], transfer_batches: int | None = None
) -> list[str]:
    """Advice to raise ``transfer_batches`` where hand-offs from workers cost the main process.

    That is where batches with workers come so fast that their transfers (`HANDOFF_S` each,
    ``transfer_batches`` batches at a time; default: `ShardLoader`'s) take `HANDOFF_SHARE` of
    the main process's time or more. Pure.
    """
    if transfer_batches is None:
        from shardloader.loader import TRANSFER_BATCHES  # (imports torch: only when profiling)

        transfer_batches = TRANSFER_BATCHES
    advice = []
    for run in loaders:
        share = run.batches_per_s * HANDOFF_S / transfer_batches
        if run.num_workers == 0 or share < HANDOFF_SHARE:
            continue
        need = run.batches_per_s * HANDOFF_S / HANDOFF_TARGET
        advised = transfer_batches
        while advised < need and advised < MAX_TRANSFER_BATCHES:
            advised *= 2
        advice.append(
            f"with num_workers={run.num_workers} the main process takes "
            f"{run.batches_per_s:,.0f} batches/s, and each transfer from a worker costs it about "
            f"{HANDOFF_S * 1e3:.2f} ms: at transfer_batches={transfer_batches} that is "
            f"{share:.0%} of its time. Pass ShardLoader(..., transfer_batches={advised}) (batches "
            "a worker sends at once; order and state_dict do not change), or a larger batch_size"
        )
        break  # one line is enough: the first worker count that needs it
    return advice


def stream_advice(report: ProfileReport) -> list[str]:
    """Advice on how the defaults read this dataset: the unit of the shuffle and its memory."""
    advice = []
    held = f"{report.window_bytes / 2**20:.0f} MiB" if report.window_bytes else "a window"
    if report.shuffle_unit == "block":
        advice.append(
            f"read in blocks: each reading process (the main one, or each DataLoader worker) "
            f"holds at most {held} decoded (shuffle_bytes); per node that is num_workers x "
            "ranks x shuffle_bytes. Lower it to save memory, raise it to mix more shards "
            "(README, Shuffle quality: 16 MiB sees 67-69% of a uniform permutation's shards "
            "per 1,000 samples, the 64 MiB default 102-108%, 256 MiB 102-111%)"
        )
        if report.remote and report.bottleneck == "fetch":
            advice.append(
                "blocks of a remote dataset are ranged GETs: raise range_requests (GETs in "
                "flight per process, default 8; a bucket far away wants 16-32) and "
                "range_bytes (bytes read ahead, default 64 MiB)"
            )
        return advice
    mixes = f"{report.window_units} shards ({held} decoded)"
    if report.remote and report.block_digests:
        advice.append(
            f"read in whole shards (remote data, shuffle_unit 'auto'): a window mixes only "
            f"{mixes}, so a corpus stored in order is served in long runs of one shard. "
            "For an order close to a uniform permutation pass StreamConfig(shuffle_unit="
            "'block'): each block is one ranged GET checked against its digest, range_requests "
            "in flight (default 8), and an epoch fetches the dataset's bytes once; on a "
            "dataset many windows large that is about one GET per block, slower than whole "
            "shards where requests are slow"
        )
    elif not report.block_digests:
        advice.append(
            f"read in whole shards: a window mixes only {mixes}; this manifest has no block "
            "digests (converted by an earlier version, or Parquet indexed from remote "
            "storage): convert it again (or index it locally) to read it in blocks, which mix "
            "as well as a uniform permutation in bounded memory"
        )
    return advice


def worker_advice(per_worker: float, fetch: float, cpu_count: int) -> list[str]:
    """The fewest workers that reach 90% of what the cores (less one) and the fetch allow."""
    usable = max(1, cpu_count - 1)  # one core for the training process
    best = min(usable * per_worker, fetch)
    for k in sorted({k for k in (1, 2, 4, 8, 16, 32) if k < usable} | {usable}):
        reach = min(k * per_worker, fetch)
        if reach >= 0.9 * best:
            capped = " (capped by fetch)" if reach == fetch else ""
            return [
                f"num_workers={k}: about {format_rate(reach)} tokens/s "
                f"({k} x {format_rate(per_worker)} per worker{capped}); "
                f"this machine has {cpu_count} cores"
            ]
    return []


def data_advice(report: ProfileReport, *, cache_bytes: int) -> list[str]:
    """Advice on the data itself: tokenizing ahead, the fetch, the cache and shard sizes."""
    advice = []
    rates = {s.name: s.tokens_per_s for s in report.stages if s.tokens_per_s}
    per_worker = report.per_worker_tokens_per_s
    fetch = rates.get("fetch", float("inf"))
    tokenize = rates.get("tokenize")
    if tokenize and per_worker and per_worker / tokenize > 0.3:  # a third of a worker's time
        decode_only = serial_rate(
            [rates.get(n) for n in ("decode", "pack", "collate") if rates.get(n)]
        )
        advice.append(
            f"tokenizing costs {per_worker / tokenize:.0%} of a worker's time: convert with "
            f"--tokenizer to store token ids; a worker would then make about "
            f"{format_rate(decode_only)} tokens/s instead of {format_rate(per_worker)}"
        )
    if report.bottleneck == "fetch":
        advice.append(
            f"fetching is the slowest stage ({format_rate(fetch)} tokens/s): keep prefetch on "
            "(prefetch_windows, prefetch_threads), put cache_dir on a local SSD, or use larger "
            "shards so that each request moves more bytes"
        )
    if report.bottleneck == "decode" and report.shuffle_unit == "block" and not report.remote:
        advice.append(
            f"decoding is the slowest stage ({format_rate(rates.get('decode', 0.0))} tokens/s): "
            "add DataLoader workers (each decodes its own blocks); checked Arrow blocks are "
            "already decoded in groups on 2 threads per process (decode_threads), and more "
            "threads help only where cores are free"
        )
    elif report.bottleneck == "decode":
        advice.append(
            f"decoding is the slowest stage ({format_rate(rates.get('decode', 0.0))} tokens/s): "
            "raise decode_threads (threads per process that decompress and check blocks ahead "
            "of the samples, with the GIL released) before adding workers; with num_workers=0 "
            "they also overlap decoding with the training step"
        )
    if report.remote:
        if report.dataset_bytes > cache_bytes:
            advice.append(
                f"the dataset ({report.dataset_bytes / 1e9:.1f} GB) is larger than the cache "
                f"({cache_bytes / 1e9:.1f} GB): every epoch downloads it again; raise cache_bytes "
                f"to at least {report.dataset_bytes / 1e9:.1f} GB if the disk allows"
            )
        else:
            advice.append(
                f"the cache ({cache_bytes / 1e9:.1f} GB) holds the whole dataset "
                f"({report.dataset_bytes / 1e9:.2f} GB): epochs after the first read local disk"
            )
    if report.mean_shard_bytes < 8e6 and report.num_shards > 16:
        advice.append(
            f"shards are small ({report.mean_shard_bytes / 1e6:.1f} MB on average): each costs a "
            "request and an open; reconvert with --shard-bytes 64MB"
        )
    elif report.mean_shard_bytes > 2e9:
        advice.append(
            f"shards are large ({report.mean_shard_bytes / 1e9:.1f} GB): the first batch waits "
            "for a whole shard; reconvert with --shard-bytes 256MB"
        )
    return advice


def format_rate(rate: float) -> str:
    """A rate as ``2.5M`` or ``850k``."""
    if rate >= 1e6:
        return f"{rate / 1e6:.1f}M"
    return f"{rate / 1e3:.0f}k"
