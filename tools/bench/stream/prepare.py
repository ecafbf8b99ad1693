"""Each system's copy of a corpus for each task, written once and reused by later runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench import harness
from tools.bench.harness import BENCH_DIR, ROOT, Corpus, log_tail
from tools.bench.stream import BUCKET, NO_VERIFY, PEERS_MODULE, SHARD_BYTES, STREAM_DIR


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


def data_task(task: str) -> str:
    """The copy of the corpus a task reads: packed rows are made from the tokenized copy."""
    return "tokens" if task == "packed" else task


def data_system(system: str) -> str:
    """The system whose copy a pass reads: raw GET, decode and ``NO_VERIFY`` read shardloader's."""
    return "shardloader" if system in ("raw-get", "decode", NO_VERIFY) else system


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


def shard_files(prepared: Prepared) -> list[str]:
    """The shard files (no index or manifest) of a prepared dataset."""
    suffix = {"webdataset": ".tar", "hf": ".parquet", "shardloader": ".arrow"}[prepared.system]
    return [f for f in prepared.files if f.endswith(suffix)]


def job_env(system: str, s3_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a subprocess: offline, quiet, and pointed at the S3 server for S3 passes."""
    offline = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(STREAM_DIR / "hf-home"),
        "OMP_NUM_THREADS": "1",
    }
    return harness.job_env(system, {**offline, **(s3_env or {})}, drop_aws=True)


def run_subprocess(
    command: str,
    spec: dict[str, Any],
    *,
    python: str,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
) -> tuple[int, dict[str, Any] | None, float]:
    """Run ``python -m tools.bench.peers_stream COMMAND SPEC``: (exit code, result, wall s)."""
    spec_path = log_path.with_suffix(".spec.json")
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            code = subprocess.run(
                [python, "-m", PEERS_MODULE, command, str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
            log.write(f"\ntools.bench.stream: killed after {timeout_s:.0f} s\n")
    wall_s = time.perf_counter() - started
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    spec_path.unlink(missing_ok=True)
    result_path.unlink(missing_ok=True)
    return code, result, wall_s


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
    harness.warm_page_cache(p.path / name for p in prepared.values() for name in p.files)
