"""Shared fixtures and helpers: small deterministic corpora in every input format, a tiny
tokenizer, the streaming datasets of ``tests/streaming.py``, and CLI runs in subprocesses."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import shardloader
from shardloader.testing import S3Server

ROOT = Path(__file__).resolve().parent.parent  # the repository
SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}  # file suffix of each codec

SCRIPTS = [
    "plain ascii words",
    "naïve café déjà vu",
    "Ελληνικά κείμενα",
    "русский текст",
    "中文文本测试",
    "日本語のテキスト",
    "한국어 텍스트",
    "עברית",
    "العربية",
    "emoji 🙂🚀👩‍👩‍👧",
    "control \x01\x02\x1f\x7f chars\ttab",
    "windows\r\nnewline",
]


def make_docs(n: int, seed: int = 0, *, with_ids: bool = True) -> list[dict[str, Any]]:
    """Deterministic documents of varied (long-tailed) lengths and scripts."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = rng.choices(SCRIPTS, k=max(1, int(rng.lognormvariate(2.5, 1.0))))
        text = f"doc {i}: " + " ".join(words)
        doc: dict[str, Any] = {"text": text, "score": rng.random(), "lang": rng.choice("ab")}
        if with_ids:
            doc["id"] = f"doc-{seed}-{i:05d}"
        docs.append(doc)
    return docs


def compress(data: bytes, codec: str) -> bytes:
    """``data`` compressed with ``codec`` (``"gzip"``, ``"zstd"``; anything else: as is)."""
    if codec == "gzip":
        return gzip.compress(data, mtime=0)
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def line(obj: Any) -> bytes:
    """One JSONL line of ``obj`` (UTF-8, not ASCII-escaped)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"


def write_jsonl(path: Path, docs: Sequence[dict[str, Any]]) -> Path:
    """Write ``docs`` as JSONL, compressed by the suffix (.gz, .zst)."""
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = {".gz": "gzip", ".zst": "zstd"}.get(path.suffix, "none")
    path.write_bytes(compress(data, codec))
    return path


def write_parquet(path: Path, docs: Sequence[dict[str, Any]], row_group_size: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(docs)), path, row_group_size=row_group_size)
    return path


def run_cli(
    *args: str, check: bool = True, timeout_s: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m shardloader ARGS`` in a subprocess; with ``check``, fail on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "shardloader", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,  # a hang (e.g. a FIFO read) fails the test, not the suite
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_torchrun(script: Path, nproc: int, *args: str, timeout_s: float = 300) -> None:
    """``torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGS`` from the repository root.

    One thread per rank; fails, with the tails of its output, on a non-zero exit.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]
    result = subprocess.run(
        [*cmd, str(script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def start_cli(*args: str) -> subprocess.Popen[bytes]:
    """``python -m shardloader ARGS`` started in a session of its own (so ``os.killpg`` stops its
    pool workers too), output discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", "shardloader", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_while_running(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], ended: str, timeout_s: float = 120
) -> None:
    """Poll until ``ready()``; fail with ``ended`` once ``proc`` exits, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, ended
        assert time.monotonic() < deadline
        time.sleep(0.01)


def kill_convert_midway(args: Sequence[str], out: Path, records: str, at_least: int) -> None:
    """Run ``shardloader <args> -o out``; kill -9 it once ``at_least`` ``_work/<records>`` exist."""
    proc = start_cli(*args, "-o", str(out))
    wait_while_running(
        proc,
        lambda: len(list((out / "_work").glob(records))) >= at_least,
        "conversion ended before it could be killed",
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "_manifest.json").exists()


def convert_docs(tmp_path: Path, docs: Sequence[dict[str, Any]], **config: Any) -> Path:
    """Write ``docs`` to ``tmp_path/in.jsonl`` and convert it into ``tmp_path/out`` (returned)."""
    write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "out"
    config = shardloader.ConvertConfig(output=str(out), **config)
    shardloader.convert([str(tmp_path / "in.jsonl")], config)
    return out


def published(root: Path) -> dict[str, str]:
    """sha256 of each published file (shards and manifest) directly in ``root``, by name."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.iterdir())
        if p.is_file()
    }


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A mixed corpus: JSONL, .gz, .zst and Parquet files; returns (dir, docs in order)."""
    root = tmp_path / "corpus"
    docs = make_docs(600)
    write_jsonl(root / "a.jsonl", docs[:150])
    write_jsonl(root / "b.jsonl.gz", docs[150:300])
    write_jsonl(root / "c.jsonl.zst", docs[300:450])
    write_parquet(root / "d.parquet", docs[450:])
    return root, docs


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 600) trained on the test documents."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d["text"] for d in make_docs(2000, seed=1)]
    shardloader.train_bpe_tokenizer(texts, str(out), vocab_size=600)
    return out


@pytest.fixture
def read_back() -> Callable[[Path], list[dict[str, Any]]]:
    def _read(path: Path) -> list[dict[str, Any]]:
        return list(shardloader.iter_samples(str(path)))

    return _read


# The streaming datasets (tests/streaming.py), converted once per test module that uses them.


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.streaming import make_dataset  # it imports this module

    return make_dataset(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The streaming dataset with Arrow record batches of about 2 KB: 173 blocks in 7 shards."""
    from tests.streaming import make_dataset

    return make_dataset(tmp_path_factory.mktemp("stream-blocks"), batch_bytes=2000)


@pytest.fixture(scope="module")
def tar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.streaming import make_dataset

    return make_dataset(tmp_path_factory.mktemp("stream-tar"), fmt="tar")


@pytest.fixture(scope="module")
def tar_blocks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The streaming dataset as plain tar shards cut into blocks of about 2 KB of members."""
    from tests.streaming import make_dataset

    return make_dataset(tmp_path_factory.mktemp("stream-tar-blocks"), fmt="tar", batch_bytes=2000)


@pytest.fixture(scope="module")
def tar_zst_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.streaming import make_dataset

    return make_dataset(
        tmp_path_factory.mktemp("stream-tar-zst"), fmt="tar", batch_bytes=2000, compression="zstd"
    )


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.streaming import make_dataset

    return make_dataset(tmp_path_factory.mktemp("stream-tok"), tokenizer=str(tokenizer_dir))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """``rclone serve s3`` on 127.0.0.1, reached by plain ``s3://bucket/key`` URLs.

    For the session, fsspec's config sends ``s3://`` to it in this process
    (``fsspec.config.conf["s3"]``) and in child processes (``FSSPEC_S3``, read when fsspec is
    imported: CLI subprocesses and spawned pool workers). Both are restored afterwards.
    """
    import fsspec.config

    server = S3Server()
    try:
        server.start()
        had_conf = "s3" in fsspec.config.conf
        old_conf = fsspec.config.conf.get("s3")
        with pytest.MonkeyPatch.context() as mp:
            for name, value in server.env.items():
                mp.setenv(name, value)
            fsspec.config.conf["s3"] = server.storage_options
            try:
                yield server
            finally:
                if had_conf:
                    fsspec.config.conf["s3"] = old_conf
                else:
                    fsspec.config.conf.pop("s3", None)
    finally:
        server.close()
