"""One timed pass of one system in a fresh subprocess, its counts checked against the corpus."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tools.bench.harness import BENCH_DIR, Corpus, cpu_marks, log_tail, other_cpu_share
from tools.bench.stream import (
    BATCH_SIZE,
    BLOCK_SIZE,
    BUCKET,
    CACHE_BYTES,
    CHECKSUM_TASKS,
    MOSAIC_PREDOWNLOAD,
    NO_VERIFY,
    PACK_BATCH,
    PACK_SEQ_LEN,
    PACKED_SYSTEMS,
    SEED,
    SHUFFLE_BUFFER,
    STREAM_DIR,
)
from tools.bench.stream.prepare import (
    Prepared,
    data_system,
    data_task,
    job_env,
    link_copy,
    run_subprocess,
    shard_files,
)

if TYPE_CHECKING:
    from shardloader.testing import S3Server


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    """One pass of one system.

    Args:
        system: A system of ``SYSTEMS``, or a bound (``memmap``, ``decode``, ``raw-get``).
        task: ``"text"`` or ``"tokens"``.
        source: ``"local"`` or ``"s3"``.
        num_workers: DataLoader workers.
        size: ``"main"`` or ``"large"`` (the second corpus size, for RSS).
        repeat: Repeat index, from 0.
        ok: Whether the pass finished with the expected number of samples.
        job_s: Wall time of the pass, from after imports to the last batch.
        process_s: Wall time of the whole subprocess.
        first_batch_s: From constructing the dataset to the first batch.
        num_samples: Samples (or, for LitData tokens, token blocks) the pass yielded.
        num_tokens: Tokens the pass yielded (tokens task).
        stored_bytes: Bytes of the system's files (what a full pass reads).
        text_bytes: UTF-8 bytes of the corpus's texts (text task).
        rss_import_mb: RSS after the imports, before the pass.
        import_rss_anon_mb: Anonymous memory then.
        import_rss_file_mb: Resident pages of mapped files (libraries) then.
        end_rss_anon_mb: Anonymous memory (heap, buffers) of the iterating process after its
            last batch.
        end_rss_file_mb: Resident pages of files it maps (e.g. memory-mapped shards), then.
        peak_rss_mb: Peak RSS of the iterating process (both kinds).
        workers_peak_rss_mb: Largest peak RSS among its DataLoader workers (0 without workers).
        error: What went wrong, when not ok.
        note: Something odd that did not fail the pass.
        other_cpu_share: Share of the machine's CPU that processes other than the pass and the
            S3 server used meanwhile.
    """

    system: str
    task: str
    source: str
    num_workers: int
    size: str
    repeat: int
    ok: bool
    job_s: float = 0.0
    process_s: float = 0.0
    first_batch_s: float = 0.0
    num_samples: int = 0
    num_tokens: int = 0
    stored_bytes: int = 0
    text_bytes: int = 0
    rss_import_mb: float = 0.0
    import_rss_anon_mb: float = 0.0
    import_rss_file_mb: float = 0.0
    end_rss_anon_mb: float = 0.0
    end_rss_file_mb: float = 0.0
    peak_rss_mb: float = 0.0
    workers_peak_rss_mb: float = 0.0
    error: str = ""
    note: str = ""
    other_cpu_share: float = 0.0

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        """(size, task, source, num_workers, system)."""
        return (self.size, self.task, self.source, self.num_workers, self.system)


def s3_job_env(server: Any) -> dict[str, str]:
    """How each system in a subprocess reaches the S3 server.

    fsspec (shardloader, HF, WebDataset's handler, raw-get) gets ``FSSPEC_S3`` besides explicit
    ``storage_options``; boto3 (Mosaic, LitData) the credentials and, for Mosaic,
    ``S3_ENDPOINT_URL``; botocore must not validate checksums of rclone's ranged GETs.
    """
    options = server.storage_options
    return {
        **server.env,
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": server.endpoint_url,
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    }


def process_cpu_s(pid: int | None) -> float:
    """CPU seconds a running process has used (``/proc/PID/stat``), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mosaic_shared_memory() -> set[str]:
    """Names of Mosaic Streaming's shared memory blocks (``/dev/shm/NNNNNN_*``)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names if len(n) > 7 and n[:6].isdigit() and n[6] == "_"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What every pass needs from the parent."""

    python: str
    server: S3Server | None  # None without S3 passes
    timeout_s: float
    shardloader_loader: bool  # iterate shardloader with ShardLoader (else a plain DataLoader)
    per_sample: bool = False  # every system through DataLoader(batch_size=None): item by item
    shuffle_unit: str = "auto"  # shardloader's StreamConfig.shuffle_unit


def _pass_spec(
    ctx: Context, *, system: str, task: str, source: str, num_workers: int
) -> dict[str, Any]:
    """What ``peers_stream pass`` needs besides the data's URL, files and cache folder.

    ``NO_VERIFY`` runs as shardloader with ``verify_local`` off.
    """
    return {
        "system": "shardloader" if system == NO_VERIFY else system,
        "verify_local": system != NO_VERIFY,
        "task": task,
        "source": source,
        "num_workers": num_workers,
        "url": "",
        "files": [],
        "cache_dir": "",
        "cache_bytes": CACHE_BYTES,
        "storage_options": ctx.server.storage_options
        if source == "s3" and ctx.server is not None
        else None,
        "seed": SEED,
        "batch_size": PACK_BATCH if task == "packed" else BATCH_SIZE,
        "block_size": PACK_SEQ_LEN if task == "packed" else BLOCK_SIZE,
        "shuffle_buffer": SHUFFLE_BUFFER,
        "mosaic_predownload": MOSAIC_PREDOWNLOAD,
        "shardloader_loader": ctx.shardloader_loader,
        "per_sample": ctx.per_sample,
        "shuffle_unit": ctx.shuffle_unit,
    }


def measure(
    ctx: Context,
    *,
    system: str,
    task: str,
    source: str,
    num_workers: int,
    size: str,
    repeat: int,
    corpus: Corpus,
    text_bytes: int,
    prepared: dict[tuple[str, str], Prepared],
) -> Measurement:
    """Run one pass in a fresh subprocess with a fresh cache folder; check its counts."""
    data = prepared[(data_system(system), data_task(task))]
    name = f"stream-{size}-{system}-{task}-{source}-w{num_workers}-r{repeat}"
    cache_dir = STREAM_DIR / "cache" / name
    shutil.rmtree(cache_dir, ignore_errors=True)
    log_path = BENCH_DIR / "logs" / f"{name}.log"
    url = str(data.path) if source == "local" else f"s3://{BUCKET}/{data.name}"
    if system == "litdata" and source == "local":  # it rewrites its input folder: give it a copy
        url = str(link_copy(data, cache_dir / "dataset"))
    spec = _pass_spec(ctx, system=system, task=task, source=source, num_workers=num_workers)
    spec.update(
        url=url,
        files=shard_files(data) if system in ("webdataset", "hf", "raw-get", "decode") else [],
    )
    spec["cache_dir"] = str(cache_dir)
    env = job_env(system, s3_job_env(ctx.server) if source == "s3" else None)
    server_pid = ctx.server._proc.pid if ctx.server is not None and ctx.server._proc else None
    marks = cpu_marks()
    server_before = process_cpu_s(server_pid)
    shm_before = mosaic_shared_memory()
    try:
        code, result, process_s = run_subprocess(
            "pass", spec, python=ctx.python, env=env, log_path=log_path, timeout_s=ctx.timeout_s
        )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        if system == "mosaic":
            # A killed Mosaic pass leaves its shared memory behind, and Mosaic's own
            # clean_stale_shared_memory() stops at the first unused prefix: remove what this
            # pass made.
            for name in mosaic_shared_memory() - shm_before:
                Path("/dev/shm", name).unlink(missing_ok=True)
    server_s = process_cpu_s(server_pid) - server_before
    base = Measurement(
        system=system,
        task=task,
        source=source,
        num_workers=num_workers,
        size=size,
        repeat=repeat,
        ok=False,
        process_s=process_s,
        stored_bytes=data.stored_bytes,
        text_bytes=text_bytes if task == "text" else 0,
        other_cpu_share=other_cpu_share(marks, process_s, exclude_s=server_s),
    )
    if code != 0 or result is None:
        return dataclasses.replace(base, error=f"exit {code}: {log_tail(log_path)}")
    done = dataclasses.replace(
        base,
        job_s=result["job_s"],
        first_batch_s=result["first_batch_s"],
        num_samples=result["num_samples"],
        num_tokens=result["num_tokens"],
        stored_bytes=result.get("bytes_read", data.stored_bytes),
        rss_import_mb=result["rss_import_mb"],
        import_rss_anon_mb=result.get("import_rss_anon_mb", 0.0),
        import_rss_file_mb=result.get("import_rss_file_mb", 0.0),
        end_rss_anon_mb=result.get("end_rss_anon_mb", 0.0),
        end_rss_file_mb=result.get("end_rss_file_mb", 0.0),
        peak_rss_mb=result["peak_rss_mb"],
        workers_peak_rss_mb=result["workers_peak_rss_mb"],
    )
    return check_counts(done, corpus, prepared)


def check_counts(
    m: Measurement, corpus: Corpus, prepared: dict[tuple[str, str], Prepared]
) -> Measurement:
    """ok if the pass yielded the corpus once: every document (tokens: every token).

    A shortfall over 1% fails the pass; a smaller difference (a peer padding or dropping to even
    out workers, LitData's last partial token block) is kept as a note.
    """
    if m.system == "raw-get":
        expected = sum(
            (prepared[("shardloader", data_task(m.task))].path / f).stat().st_size
            for f in shard_files(prepared[("shardloader", data_task(m.task))])
        )
        got, what = m.stored_bytes, "bytes"
    elif m.task in ("tokens", "packed"):
        expected, got, what = prepared[("shardloader", "tokens")].num_tokens, m.num_tokens, "tokens"
    else:
        expected, got, what = corpus.num_docs, m.num_samples, "samples"
    if m.system == "memmap":  # whole batches of random windows
        if m.task == "packed":
            expected -= expected % (PACK_BATCH * PACK_SEQ_LEN)
        else:
            expected -= expected % (BATCH_SIZE * BLOCK_SIZE)
    if got == expected:
        return dataclasses.replace(m, ok=True)
    message = f"yielded {got:,} {what}, expected {expected:,}"
    if got < 0.99 * expected or got > 1.01 * expected:
        return dataclasses.replace(m, error=message)
    return dataclasses.replace(m, ok=True, note=message)


def plan_passes(
    *,
    systems: Sequence[str],
    tasks: Sequence[str],
    sources: Sequence[str],
    workers: Sequence[int],
    quick: bool,
) -> list[tuple[str, str, str, int]]:
    """(system, task, source, num_workers) of the main corpus size, bounds included.

    ``quick`` runs three configurations that between them take every code path of every
    system (text and tokens, local and S3, with and without workers): text local w0, text S3
    with the most workers, tokens local with the most workers.

    With shardloader, its local text and tokens passes run again as ``NO_VERIFY``
    (``verify_local=False``), to measure what hashing local shards costs.
    """
    passes = []
    combos = list(itertools.product(tasks, sources, workers))
    if quick:
        few, most = min(workers), max(workers)
        wanted = [("text", "local", few), ("text", "s3", most), ("tokens", "local", most)]
        wanted.append(("packed", "local", few))
        combos = [c for c in wanted if c[0] in tasks and c[1] in sources]
        if "tokens" in tasks and "s3" in sources and "local" not in sources:
            combos.append(("tokens", "s3", few))
    for task, source, num_workers in combos:
        takes_part = [s for s in systems if task != "packed" or s in PACKED_SYSTEMS]
        passes += [(system, task, source, num_workers) for system in takes_part]
        if "shardloader" in systems and source == "local" and task in CHECKSUM_TASKS:
            passes.append((NO_VERIFY, task, source, num_workers))
    for task, source in sorted({(task, source) for task, source, _ in combos}):
        if task in ("tokens", "packed") and source == "local":
            passes.append(("memmap", task, "local", 0))
        if task == "text" and source == "local" and "shardloader" in systems:
            passes.append(("decode", task, "local", 0))
        if source == "s3":
            passes.append(("raw-get", task, "s3", 0))
    return passes
