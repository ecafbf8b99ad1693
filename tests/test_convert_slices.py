"""One big file on all cores: slices of whole lines, byte-identical for any num_proc, resumable."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import shardloader
from shardloader import ConvertConfig, CorpusError, convert
from shardloader.sources.slices import (
    count_newlines,
    iter_slice_chunks,
    iter_stream_slices,
    plan_slices,
)
from shardloader.storage import InputFile
from tests.conftest import kill_convert_midway, make_docs, published, run_cli

KINDS = ("plain", "frames", "zstd", "gzip")
NAMES = {
    "plain": "big.jsonl",
    "frames": "big.jsonl.zst",
    "zstd": "big.jsonl.zst",
    "gzip": "big.jsonl.gz",
}


def write_big(root: Path, kind: str, data: bytes) -> Path:
    """``data`` as one file: plain, zstd in independent frames, one zstd frame, or gzip."""
    path = root / NAMES[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "plain":
        path.write_bytes(data)
    elif kind == "frames":
        c = zstandard.ZstdCompressor()  # frames cut mid-line, as pzstd and chunked writers do
        path.write_bytes(
            b"".join(c.compress(data[i : i + 20_000]) for i in range(0, len(data), 20_000))
        )
    elif kind == "zstd":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(gzip.compress(data))
    return path


def corpus_bytes(num_docs: int, seed: int = 4) -> tuple[list[dict], bytes]:
    docs = make_docs(num_docs, seed=seed)
    for doc in docs[::3]:
        del doc["id"]  # generated ids (file:line) must count the lines of earlier slices
    return docs, b"".join(json.dumps(d).encode() + b"\n" for d in docs)


@pytest.mark.parametrize("kind", KINDS)
def test_slices_identical_for_any_num_proc(tmp_path, kind):
    docs, data = corpus_bytes(1500)
    path = write_big(tmp_path / "in", kind, data)
    base = dict(shard_bytes=40_000, batch_bytes=8_000, slice_bytes=60_000)
    digests = []
    for num_proc in (1, 2):
        out = tmp_path / f"out{num_proc}"
        result = convert([str(path)], ConvertConfig(output=str(out), num_proc=num_proc, **base))
        assert result.manifest is not None
        digests.append(published(out))
    assert digests[0] == digests[1]
    names = [n for n in digests[0] if n.startswith("shard-")]
    assert len({n.split("-")[2] for n in names}) > 3  # really cut into slices
    samples = list(shardloader.iter_samples(str(tmp_path / "out1")))
    assert [s["text"] for s in samples] == [d["text"] for d in docs]
    name = path.name
    assert [s["id"] for s in samples] == [
        d.get("id") or f"{name}:{line}" for line, d in enumerate(docs, start=1)
    ]
    manifest = result.manifest
    assert manifest.config["slice_bytes"] == 60_000
    assert [(s["num_records"], s["num_blank_lines"]) for s in manifest.sources] == [(1500, 0)]


@pytest.mark.parametrize("kind", ["plain", "gzip"])
def test_slice_bigger_than_the_file_is_todays_output(tmp_path, kind):
    """A file under slice_bytes is not cut: its output (and plan) are as before slicing."""
    _, data = corpus_bytes(300)
    path = write_big(tmp_path / "in", kind, data)
    outs = []
    for slice_bytes in (10**9, 2 * 10**9):
        out = tmp_path / f"out{slice_bytes}"
        r = convert(
            [str(path)], ConvertConfig(output=str(out), slice_bytes=slice_bytes, num_proc=1)
        )
        assert r.manifest is not None
        assert "slice_bytes" not in r.manifest.config
        outs.append(published(out))
    assert outs[0] == outs[1]
    assert sorted(n for n in outs[0] if n.startswith("shard-")) == ["shard-00000-0000.arrow"]


@pytest.mark.parametrize("kind", ["plain", "frames", "gzip"])
def test_bad_line_in_a_later_slice_names_the_file_line(tmp_path, kind):
    docs, data = corpus_bytes(1000)
    lines = data.split(b"\n")
    bad_line = 700  # well past the first slices
    lines[bad_line - 1] = b'{"text": "unterminated'
    path = write_big(tmp_path / "in", kind, b"\n".join(lines))
    config = ConvertConfig(output=str(tmp_path / "out"), slice_bytes=30_000, num_proc=2)
    with pytest.raises(CorpusError, match=rf"{path.name}:{bad_line}: not valid JSON"):
        convert([str(path)], config)
    skip = ConvertConfig(
        output=str(tmp_path / "skip"), slice_bytes=30_000, num_proc=2, on_bad_record="skip"
    )
    manifest = convert([str(path)], skip).manifest
    assert manifest is not None
    assert manifest.skipped == {"bad_json": 1}
    assert manifest.skipped_examples[0].startswith(f"{path}:{bad_line}: bad_json")
    assert manifest.num_samples == len(docs) - 1


@pytest.mark.parametrize("kind", ["plain", "gzip"])
def test_a_line_too_long_is_measured_not_held_and_named(tmp_path, kind):
    docs, data = corpus_bytes(600)
    lines = data.split(b"\n")
    long_line = 400
    lines[long_line - 1] = b'{"text": "' + b"x" * 200_000 + b'"}'
    path = write_big(tmp_path / "in", kind, b"\n".join(lines))
    base = dict(slice_bytes=30_000, max_record_bytes=50_000, num_proc=2)
    with pytest.raises(CorpusError, match=rf"{path.name}:{long_line}: record is 200012 bytes"):
        convert([str(path)], ConvertConfig(output=str(tmp_path / "raise"), **base))
    skip = ConvertConfig(output=str(tmp_path / "skip"), on_bad_record="skip", **base)
    manifest = convert([str(path)], skip).manifest
    assert manifest is not None
    assert manifest.skipped == {"record_too_large": 1}
    assert manifest.skipped_examples[0].startswith(f"{path}:{long_line}: record_too_large")
    samples = list(shardloader.iter_samples(str(tmp_path / "skip")))
    kept = docs[: long_line - 1] + docs[long_line:]
    assert [s["text"] for s in samples] == [d["text"] for d in kept]
    assert manifest.sources[0]["num_records"] == len(docs)


def test_the_stream_reader_holds_no_long_line():
    import io

    class Dribble(io.BytesIO):  # decompressed text arrives in pieces
        def read(self, size: int | None = -1) -> bytes:
            return super().read(7)

    data = b"a\n" * 10 + b"b" * 1000 + b"\n" + b"c\n" * 5
    cut = list(iter_stream_slices(Dribble(data), "none", "f", 8, 100))
    assert sum(len(b"".join(c.pieces)) for c in cut) == len(data) - 1001
    # the slice of lines 10-11 holds line 10; line 11 is measured
    long = [(c.first_line, b"".join(c.pieces), c.long_line) for c in cut if c.long_line]
    assert long == [(10, b"a\n", 1000)]
    assert b"".join(b"".join(c.pieces) for c in cut) == b"a\n" * 10 + b"c\n" * 5


def test_a_truncated_stream_keeps_the_lines_before_the_damage_under_skip(tmp_path):
    docs, data = corpus_bytes(900)
    whole = gzip.compress(data)
    path = tmp_path / "in" / "big.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(whole[: len(whole) * 2 // 3])
    base = dict(slice_bytes=30_000, num_proc=2)
    with pytest.raises(CorpusError, match=r"big\.jsonl\.gz: truncated gzip file"):
        convert([str(path)], ConvertConfig(output=str(tmp_path / "raise"), **base))
    skip = ConvertConfig(output=str(tmp_path / "skip"), on_bad_record="skip", **base)
    manifest = convert([str(path)], skip).manifest
    assert manifest is not None
    assert manifest.skipped == {"damaged_file": 1}
    texts = [s["text"] for s in shardloader.iter_samples(str(tmp_path / "skip"))]
    assert 300 < len(texts) < len(docs)
    assert texts == [d["text"] for d in docs[: len(texts)]]


def _as_killed_before_slice_ended(out: Path, index: int) -> None:
    """Leave task 0 as a kill -9 in slice ``index`` would: no manifest, task or slice record."""
    (out / "_manifest.json").unlink()
    (out / "_work" / "task-00000.json").unlink()
    (out / "_work" / f"slice-00000-{index:05d}.json").unlink()


def test_a_half_done_sliced_task_redoes_only_its_missing_slices(tmp_path):
    _, data = corpus_bytes(1200)
    path = write_big(tmp_path / "in", "plain", data)
    config = ConvertConfig(output=str(tmp_path / "out"), slice_bytes=50_000, num_proc=1)
    convert([str(path)], config)
    out = tmp_path / "out"
    reference = published(out)
    _as_killed_before_slice_ended(out, 3)
    for shard in out.glob("shard-00000-00003-*"):
        shard.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    result = convert([str(path)], config)
    assert result.tasks_run == 1
    assert published(out) == reference
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*") if p.name in before}
    assert after == before  # the finished slices were not written again


def test_stream_resume_skips_finished_slices(tmp_path):
    _, data = corpus_bytes(1200)
    path = write_big(tmp_path / "in", "gzip", data)
    config = ConvertConfig(output=str(tmp_path / "out"), slice_bytes=50_000, num_proc=2)
    convert([str(path)], config)
    out = tmp_path / "out"
    reference = published(out)
    _as_killed_before_slice_ended(out, 1)
    result = convert([str(path)], config)
    assert result.num_docs < 400  # only slice 1 ran again
    assert published(out) == reference
    assert list((out / "_work" / "tmp").iterdir()) == []  # the slices handed to workers


@pytest.mark.slow
def test_kill_9_inside_a_sliced_file_then_rerun_is_byte_identical(tmp_path):
    _, data = corpus_bytes(8000, seed=9)
    path = write_big(tmp_path / "in", "plain", data)
    args = [
        "convert",
        str(path),
        "--slice-bytes",
        "40KB",
        "--shard-samples",
        "50",
        "--num-proc",
        "2",
    ]
    reference = tmp_path / "reference"
    run_cli(*args, "-o", str(reference))
    out = tmp_path / "out"
    kill_convert_midway(args, out, "slice-*.json", 3)
    run_cli(*args, "-o", str(out))
    assert published(out) == published(reference)
    assert shardloader.verify(str(out)).ok


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=40),
    trailing=st.booleans(),
    slice_bytes=st.integers(1, 120),
)
def test_slices_partition_the_lines(tmp_path_factory, lines, trailing, slice_bytes):
    """Byte ranges and the stream reader cut the same whole lines; line numbers are exact."""
    data = b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    path = tmp_path_factory.mktemp("s") / "f.jsonl"
    path.write_bytes(data)
    source = InputFile(str(path), len(data), str(path.parent))
    split, ranges = plan_slices(source, slice_bytes)
    ranges = ranges if split else [(0, len(data))]
    parts = [
        b"".join(iter_slice_chunks(source, a, b, first=k == 0)) if data else b""
        for k, (a, b) in enumerate(ranges)
    ]
    assert b"".join(parts) == data
    owned = [p for p in parts if p]
    assert all(p.endswith(b"\n") for p in owned[:-1])
    counts = [count_newlines(source, a, b) for a, b in ranges] if data else [0]
    offset = 0
    for k, part in enumerate(parts):
        if part:
            first_line = 1 if k == 0 else sum(counts[:k]) + 2
            assert data[:offset].count(b"\n") + 1 == first_line
        offset += len(part)
    with path.open("rb") as f:
        streamed = [
            (c.first_line, b"".join(c.pieces))
            for c in iter_stream_slices(f, "none", str(path), slice_bytes, 10**9)
        ]
    assert [p for p in parts if p] == [p for _, p in streamed if p]
    offset, expected = 0, []
    for part in parts:
        if part:
            expected.append(data[:offset].count(b"\n") + 1)
        offset += len(part)
    assert [n for n, p in streamed if p] == expected


def test_slices_into_an_fsspec_output(tmp_path):
    docs, data = corpus_bytes(600)
    path = write_big(tmp_path / "in", "gzip", data)
    url = f"memory://shardloader-slices-{os.getpid()}/out"
    result = convert([str(path)], ConvertConfig(output=url, slice_bytes=30_000, num_proc=1))
    assert result.manifest is not None
    assert len({s.path.split("-")[2] for s in result.manifest.shards}) > 2
    assert [s["text"] for s in shardloader.iter_samples(url)] == [d["text"] for d in docs]
    assert shardloader.verify(url).ok


class _Unpicklable(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}: {b}")


def _fail(report):
    raise _Unpicklable("where", "what")


def test_an_error_that_does_not_pickle_still_reaches_the_parent():
    """A pool hangs on a worker error it cannot unpickle; the executor sends its message."""
    from shardloader.convert_executor import PoolExecutor
    from shardloader.errors import ShardloaderError

    executor = PoolExecutor(2, "fork", lambda docs, nbytes: None)
    try:
        pending = executor.submit(_fail)
        with pytest.raises(ShardloaderError, match="_Unpicklable: where: what"):
            pending.get(timeout=60)
    finally:
        executor.close()
