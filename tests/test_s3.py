"""End to end against a real S3-compatible server (``rclone serve s3`` on 127.0.0.1).

URLs are plain ``s3://bucket/...``: the ``s3_server`` fixture points fsspec's config at the
server, in this process and (through ``FSSPEC_S3``) in CLI subprocesses and pool workers.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest

import shardloader
from shardloader import ConvertConfig, convert
from shardloader.manifest import MANIFEST_NAME
from shardloader.testing import S3Server
from tests.conftest import make_docs, published, write_jsonl
from tests.conftest import run_cli as conftest_run_cli

pytestmark = pytest.mark.s3

_bucket_ids = itertools.count()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for this test; returns its ``s3://`` URL."""
    name = f"test-{os.getpid()}-{next(_bucket_ids)}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


run_cli = functools.partial(conftest_run_cli, timeout_s=120)


def on_disk(server: S3Server, url: str) -> Path:
    """Where the server keeps the object or prefix ``url``."""
    return server.data_dir / url.removeprefix("s3://")


def texts(dataset: str) -> list[tuple[str, str]]:
    return [(s["id"], s["text"]) for s in shardloader.iter_samples(dataset)]


def _read_in_child(url: str, queue: Any) -> None:
    queue.put(shardloader.storage.read_bytes(url))


def test_spawned_process_and_cli_subprocess_reach_the_server(s3_server, bucket):
    url = f"{bucket}/probe.bin"
    fsspec.filesystem("s3").pipe_file(url, b"probe \x00\xff")
    assert on_disk(s3_server, url).read_bytes() == b"probe \x00\xff"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(url, queue))
    proc.start()
    try:
        assert queue.get(timeout=60) == b"probe \x00\xff"
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    # A fresh interpreter knows the server only through the FSSPEC_S3 environment variable.
    code = (
        "import fsspec, sys; sys.stdout.buffer.write(fsspec.open(sys.argv[1], 'rb').open().read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, timeout=60, check=True
    )
    assert out.stdout == b"probe \x00\xff"


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
def test_convert_to_s3_is_byte_identical_to_local(s3_server, bucket, corpus, tmp_path, fmt):
    root, docs = corpus
    settings: dict[str, Any] = {"format": fmt, "shard_samples": 100, "task_bytes": 1}
    local = tmp_path / "local"
    convert([str(root)], ConvertConfig(output=str(local), num_proc=1, **settings))
    expected = published(local)
    assert MANIFEST_NAME in expected
    assert len(expected) == 1 + 8  # 4 files of 150 docs, a task each: 100 + 50 samples
    for num_proc in (1, 2):
        url = f"{bucket}/ds{num_proc}"
        result = convert([str(root)], ConvertConfig(output=url, num_proc=num_proc, **settings))
        assert result.manifest is not None
        assert result.tasks_run == 4
        assert published(on_disk(s3_server, url)) == expected
        fs = fsspec.filesystem("s3")
        for name in expected:  # and the same bytes through S3, not only on the server's disk
            data = fs.cat_file(f"{url}/{name}")
            assert hashlib.sha256(data).hexdigest() == expected[name]
        assert texts(url) == [(d["id"], d["text"]) for d in docs]
        report = shardloader.verify(url)
        assert report.ok, report.problems
        assert (report.num_shards, report.num_samples) == (len(expected) - 1, len(docs))


def test_rerun_to_s3_is_a_no_op(s3_server, bucket, corpus):
    root, docs = corpus
    url = f"{bucket}/ds"
    config = ConvertConfig(output=url, shard_samples=100, num_proc=1)
    first = convert([str(root)], config)
    assert first.manifest is not None
    assert first.tasks_run == first.tasks_total == 1
    disk = on_disk(s3_server, url)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in disk.rglob("*") if p.is_file()}
    second = convert([str(root)], config)
    assert (second.tasks_run, second.tasks_skipped, second.num_docs) == (0, 1, 0)
    assert second.manifest == first.manifest
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in disk.rglob("*") if p.is_file()}
    assert after == before
    proc = run_cli("convert", str(root), "-o", url, "--shard-samples", "100", "--num-proc", "1")
    assert f"{url}: already converted, nothing to do" in proc.stdout
    assert texts(url) == [(d["id"], d["text"]) for d in docs]


def test_inputs_on_s3_by_glob_and_by_prefix(s3_server, bucket, tmp_path):
    docs = make_docs(300, seed=5)
    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", docs[:120])
    write_jsonl(raw / "b.jsonl", docs[120:200])
    write_jsonl(raw / "c.jsonl", docs[200:])
    fs = fsspec.filesystem("s3")
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        fs.put_file(str(raw / name), f"{bucket}/raw/{name}")
    fs.pipe_file(f"{bucket}/raw/_SUCCESS", b"")  # hidden in a directory, unmatched by the glob
    fs.pipe_file(f"{bucket}/raw-other/d.jsonl", b'{"text": "not mine"}\n')  # shares the prefix
    assert sorted(p.name for p in on_disk(s3_server, f"{bucket}/raw").iterdir()) == [
        "_SUCCESS",
        "a.jsonl",
        "b.jsonl",
        "c.jsonl",
    ]
    local = tmp_path / "from-local"
    convert([str(raw)], ConvertConfig(output=str(local), num_proc=1))
    expected = texts(str(local))
    assert expected == [(d["id"], d["text"]) for d in docs]
    for name, pattern in [("glob", f"{bucket}/raw/*.jsonl"), ("prefix", f"{bucket}/raw")]:
        out = tmp_path / name
        result = convert([pattern], ConvertConfig(output=str(out), num_proc=2, task_bytes=1))
        assert result.manifest is not None
        assert result.tasks_run == 3
        assert texts(str(out)) == expected
        assert [s["url"] for s in result.manifest.sources] == [
            f"{bucket}/raw/{n}" for n in ("a.jsonl", "b.jsonl", "c.jsonl")
        ]
        assert [s["num_records"] for s in result.manifest.sources] == [120, 80, 100]


def test_cli_convert_inspect_verify_on_s3(s3_server, bucket, corpus):
    root, docs = corpus
    url = f"{bucket}/cli"
    proc = run_cli("convert", str(root), "-o", url, "--shard-samples", "100", "--num-proc", "1")
    assert f"converted {len(docs):,} documents" in proc.stdout
    proc = run_cli("inspect", url, "--samples", "2")
    assert f"{len(docs):,} samples" in proc.stdout
    assert docs[0]["id"] in proc.stdout
    proc = run_cli("verify", url)
    assert proc.stdout.startswith("OK: 6 shards"), proc.stdout

    shards = shardloader.read_manifest(url).shards
    victim = on_disk(s3_server, f"{url}/{shards[2].path}")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_cli("verify", url, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1, proc.stdout
    assert f"{url}/{shards[2].path}" in bad[0]
    assert "does not match manifest" in bad[0]
    assert "FAILED: 1 bad shard" in proc.stdout
