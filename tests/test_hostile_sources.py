"""Hostile raw input: non-regular files, oversized records, JSON past Python's limits, fuzzing.

Non-regular inputs (FIFOs, devices, sockets, links to them) are refused by name before they are
opened, whatever ``on_bad_record`` says. A record over ``max_record_bytes`` is a bad record
(``record_too_large``) that is measured but never held. Lines ``json.loads`` cannot take (huge
integers, deep nesting) are bad records where their excess is read, and fare the same on the
pyarrow fast path and the line reader. Garbage raises only shardloader's own errors.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import socket
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shardloader
from shardloader import ConfigError, ConvertConfig, CorpusError
from shardloader.errors import ShardloaderError
from shardloader.sources import (
    MAX_RECORD_BYTES,
    BadRecords,
    Document,
    RecordSpec,
    jsonl_table,
    read_documents,
    read_jsonl_table,
    streams,
)
from shardloader.storage import InputFile
from tests.conftest import SUFFIX, compress, line
from tests.conftest import run_cli as conftest_run_cli
from tests.documents import read, source

MiB = 1 << 20


def read_error(path: Path, **kw: Any) -> str:
    with pytest.raises(CorpusError) as info:
        read(path, **kw)
    return str(info.value)


# A FIFO read would hang: fail, do not hang the suite.
run_cli = functools.partial(conftest_run_cli, check=False, timeout_s=120)


# ---- non-regular files --------------------------------------------------------------------------


def make_input_folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_bytes(line({"text": "good"}))
    return root


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_cli_refuses_a_fifo_or_endless_device_in_a_folder(tmp_path, kind):
    root = make_input_folder(tmp_path)
    bad = root / "b.jsonl"
    if kind == "fifo":
        os.mkfifo(bad)
        words = "is a FIFO (named pipe), not a regular file"
    else:
        bad.symlink_to("/dev/zero")
        words = "is a character device (through the link to /dev/zero), not a regular file"
    for mode in ("raise", "skip"):
        out = tmp_path / f"out-{mode}"
        proc = run_cli(
            "convert", str(root), "-o", str(out), "--num-proc", "1", "--no-progress",
            f"--on-bad-record={mode}",
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(f"error: {bad}: {words}"), proc.stderr
        assert not (out / "_manifest.json").exists()


def test_socket_and_device_links_are_refused_by_both_readers(tmp_path):
    sock_path = tmp_path / "s.jsonl"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        message = read_error(sock_path, skip=True)
        assert message.startswith(f"{sock_path}: is a socket, not a regular file"), message
    null = tmp_path / "null.jsonl"
    null.symlink_to("/dev/null")  # harmless to open, so a regression fails instead of hanging
    words = f"{null}: is a character device (through the link to /dev/null), not a regular file"
    assert read_error(null, skip=True).startswith(words)
    with pytest.raises(CorpusError) as info:
        read_jsonl_table(InputFile(str(null), 0, str(tmp_path)), spec=RecordSpec())
    assert str(info.value).startswith(words), str(info.value)


def test_regular_files_through_links_and_file_urls_still_read(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_bytes(line({"text": "kept"}))
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert [d.text for d in read(link)[0]] == ["kept"]
    url = InputFile(f"file://{real}", real.stat().st_size, f"file://{tmp_path}")
    docs = list(read_documents(url, spec=RecordSpec(), bad=BadRecords()))
    assert [d.text for d in docs] == ["kept"]


# ---- max_record_bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_overlong_line_raises_or_is_counted(tmp_path, monkeypatch, codec, chunk_bytes):
    monkeypatch.setattr(streams, "CHUNK_BYTES", chunk_bytes)
    big = line({"text": "x" * 200})
    payload = line({"text": "a"}) + big + line({"text": "b"})
    path = tmp_path / f"c.jsonl{SUFFIX[codec]}"
    path.write_bytes(compress(payload, codec))
    size = len(big) - 1
    message = read_error(path, max_record_bytes=100)
    assert message == (
        f"{path}:2: record is {size} bytes, over --max-record-bytes 100; raise the limit or "
        "pass --on-bad-record=skip"
    )
    docs, bad, stats = read(path, skip=True, max_record_bytes=100)
    assert [d.text for d in docs] == ["a", "b"]
    assert dict(bad.counts) == {"record_too_large": 1}
    assert stats["records"] == 3
    assert stats["bytes"] == len(payload)
    # exactly at the limit is fine
    docs, bad, _ = read(path, skip=True, max_record_bytes=size)
    assert [len(d.text) for d in docs] == [1, 200, 1]
    assert bad.total == 0


def test_overlong_last_line_without_newline(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 16)
    path = tmp_path / "t.jsonl"
    path.write_bytes(line({"text": "a"}) + b'{"text": "' + b"y" * 100 + b'"}')
    assert read_error(path, max_record_bytes=50).startswith(f"{path}:2: record is 112 bytes")


def test_overlong_line_is_never_held_in_memory(tmp_path):
    path = tmp_path / "huge.jsonl.gz"  # 64 MiB line, a 64 KiB file: a small gzip bomb
    payload = b'{"text": "' + b"z" * (64 * MiB) + b'"}\n' + line({"text": "after"})
    path.write_bytes(gzip.compress(payload, compresslevel=1))
    tracemalloc.start()
    try:
        docs, bad, _ = read(path, skip=True, max_record_bytes=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [d.text for d in docs] == ["after"]
    assert dict(bad.counts) == {"record_too_large": 1}
    assert f"record is {64 * MiB + 12} bytes" in bad.examples[0]
    assert peak < 8 * MiB, peak  # a chunk plus the limit, not the line


@pytest.mark.parametrize("codec", ["none", "gzip"])
def test_text_file_over_the_limit(tmp_path, codec):
    path = tmp_path / f"doc.txt{SUFFIX[codec]}"
    path.write_bytes(compress(b"w" * 5000, codec))
    assert read_error(path, max_record_bytes=4999) == (
        f"{path}: record is 5000 bytes, over --max-record-bytes 4999; raise the limit or pass "
        "--on-bad-record=skip"
    )
    docs, bad, stats = read(path, skip=True, max_record_bytes=4999)
    assert docs == []
    assert dict(bad.counts) == {"record_too_large": 1}
    assert stats["bytes"] == 5000
    assert read(path, max_record_bytes=5000)[0][0].text == "w" * 5000


def test_parquet_row_over_the_limit(tmp_path):
    path = tmp_path / "p.parquet"
    table = pa.table({"id": ["a", "b", "c", "d"], "text": ["one", "t" * 300, "three", "é" * 60]})
    pq.write_table(table, path, row_group_size=3)
    message = read_error(path, max_record_bytes=100)
    assert message.startswith(
        f"{path}: row 1 (row group 0): record is 301 bytes, over --max-record-bytes 100"
    ), message
    docs, bad, stats = read(path, skip=True, max_record_bytes=100)
    assert [d.id for d in docs] == ["a", "c"]
    assert dict(bad.counts) == {"record_too_large": 2}
    assert "row 3 (row group 1): record_too_large: record is 121 bytes" in bad.examples[1]
    assert stats["records"] == 4


def test_parquet_row_over_the_limit_beside_invalid_utf8(tmp_path):
    path = tmp_path / "p.parquet"
    texts = pa.array([b"ok", b"x" * 300, b"bad \xff", b"fine"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), path)
    docs, bad, _ = read(path, skip=True, max_record_bytes=100)
    assert [d.text for d in docs] == ["ok", "fine"]
    assert dict(bad.counts) == {"record_too_large": 1, "bad_utf8": 1}
    assert any("row 2 (row group 0): bad_utf8" in e for e in bad.examples), bad.examples


def test_fast_path_declines_a_file_with_an_overlong_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(line({"text": "a"}) + line({"text": "b" * 50, "other": "c" * 100}))
    spec = RecordSpec()
    assert read_jsonl_table(source(path), spec=spec, max_record_bytes=1000) is not None
    assert read_jsonl_table(source(path), spec=spec, max_record_bytes=100) is None


@given(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.integers(1, 60), st.booleans())
def test_has_line_over_matches_the_plain_definition(lengths, limit, final_newline):
    data = b"\n".join(b"x" * n for n in lengths) + (b"\n" if final_newline else b"")
    expected = any(len(part) > limit for part in data.split(b"\n"))
    assert jsonl_table.has_line_over(data, limit) == expected


def test_convert_config_and_cli_take_the_limit(tmp_path):
    assert ConvertConfig(output=str(tmp_path / "o")).max_record_bytes == MAX_RECORD_BYTES
    with pytest.raises(ConfigError, match="max_record_bytes must be positive, got 0"):
        ConvertConfig(output=str(tmp_path / "o"), max_record_bytes=0)
    root = tmp_path / "in"
    root.mkdir()
    big = {"id": "big", "text": "q" * 3000}
    (root / "a.jsonl").write_bytes(line({"id": "s", "text": "small"}) + line(big))
    out = tmp_path / "out"
    proc = run_cli(
        "convert", str(root), "-o", str(out), "--num-proc", "1", "--no-progress",
        "--max-record-bytes", "2KiB",
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{root / 'a.jsonl'}:2: record is 3025 bytes, over --max-record-bytes 2048" in (
        proc.stderr
    )
    proc = run_cli(
        "convert", str(root), "-o", str(out), "--num-proc", "1", "--no-progress",
        "--max-record-bytes", "2KiB", "--on-bad-record=skip",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = shardloader.read_manifest(str(out))
    assert dict(manifest.skipped) == {"record_too_large": 1}
    assert [s["id"] for s in shardloader.iter_samples(str(out))] == ["s"]
    out2 = tmp_path / "out2"
    shardloader.convert(
        [str(root)], ConvertConfig(output=str(out2), progress=False, max_record_bytes=4096)
    )
    assert sorted(s["id"] for s in shardloader.iter_samples(str(out2))) == ["big", "s"]


# ---- JSON past Python's limits ------------------------------------------------------------------

HUGE_INT = b"1" + b"0" * 5000
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("case", "bad_line"),
    [
        ("huge-int-id", b'{"id": ' + HUGE_INT + b', "text": "t"}'),
        ("huge-int-text", b'{"text": ' + HUGE_INT + b"}"),
        ("deep-text", b'{"text": ' + DEEP + b"}"),
        ("deep-top-level", DEEP),
        ("deep-kept-json", b'{"text": "t", "meta": ' + DEEP + b"}"),
    ],
)
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_json_past_python_limits_in_a_read_field_is_a_bad_record(tmp_path, case, bad_line, codec):
    spec = RecordSpec(keep_fields={"meta": "json"}) if case == "deep-kept-json" else RecordSpec()
    path = tmp_path / f"{case}.jsonl{SUFFIX[codec]}"
    path.write_bytes(compress(line({"text": "a"}) + bad_line + b"\n" + line({"text": "b"}), codec))
    message = read_error(path, spec=spec)
    assert message.startswith(f"{path}:2: valid JSON, but it "), message
    assert message.endswith("; fix it or pass --on-bad-record=skip")
    docs, bad, _ = read(path, skip=True, spec=spec)
    assert [d.text for d in docs] == ["a", "b"]
    assert dict(bad.counts) == {"bad_json": 1}
    assert read_jsonl_table(source(path), spec=spec) is None  # the fast path agrees


@pytest.mark.parametrize(
    "extra", [HUGE_INT, DEEP, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000], ids=["int", "arr", "obj"]
)
def test_json_past_python_limits_in_an_unread_field_is_kept_by_both_paths(tmp_path, extra):
    spec = RecordSpec(keep_fields={"score": "float64"})
    path = tmp_path / "x.jsonl"
    records = line({"id": "a", "text": "first"})
    records += b'{"id": "b", "text": "second \\u00e9", "score": 2.5, "junk": ' + extra + b"}\n"
    path.write_bytes(records)
    docs, bad, stats = read(path, spec=spec)
    assert [(d.id, d.text, dict(d.fields or {})) for d in docs] == [
        ("a", "first", {"score": None}),
        ("b", "second é", {"score": 2.5}),
    ]
    assert bad.total == 0
    assert stats["records"] == 2
    table = read_jsonl_table(source(path), spec=spec)
    assert table is not None
    assert [(d.id, d.text, dict(d.fields or {})) for d in table.documents()] == [
        (d.id, d.text, dict(d.fields or {})) for d in docs
    ]


def test_convert_counts_a_huge_integer_like_any_bad_record(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_bytes(
        line({"id": "x", "text": "x"}) + b'{"id": ' + HUGE_INT + b', "text": "y"}\n'
    )
    with pytest.raises(CorpusError, match=r"a\.jsonl:2: valid JSON, but it holds a number"):
        shardloader.convert([str(root)], ConvertConfig(output=str(tmp_path / "o"), num_proc=1))
    result = shardloader.convert(
        [str(root)],
        ConvertConfig(output=str(tmp_path / "o2"), num_proc=1, on_bad_record="skip"),
    )
    assert dict(result.skipped) == {"bad_json": 1}
    assert result.num_docs == 1


# ---- fuzzing ------------------------------------------------------------------------------------

GOOD = [{"id": f"g{i}", "text": f"good record {i} é"} for i in range(4)]
GARBAGE_LINES = st.one_of(
    st.binary(max_size=60).filter(lambda b: b"\n" not in b and b.strip()),
    st.sampled_from(
        [
            b'{"text": 1' + b"0" * 4400 + b"}",
            b"[" * 3000 + b"]" * 3000,
            b'{"text": "a", "id": ' + b"[" * 3000 + b"]" * 3000 + b"}",
            b'{"text": "\\ud800"}',
            b'{"text": ""}',
            b'{"text": null}',
            b'{"text": "ok", "id": 1.5}',
            b'{"text": "ok", "id": ""}',
            b'{"text": "x" ' + b"}" * 20,
            b'{"text": "\xff\xfe"}',
            b'"just a string"',
            b"\x00\x00\x00",
            b'{"text": "t", "text": 5}',
            b'{"text": "' + b"L" * 300 + b'"}',  # over the fuzz limit of 256
        ]
    ),
)


def fuzz_read(path: Path, skip: bool, spec: RecordSpec) -> tuple[list[Document], BadRecords]:
    bad = BadRecords("skip" if skip else "raise")
    docs = list(read_documents(source(path), spec=spec, bad=bad, max_record_bytes=256))
    return docs, bad


def mutate(data: bytes, cuts: list[tuple[int, bytes]], truncate: int | None) -> bytes:
    """``data`` with each cut's bytes written over it at its offset, then cut short."""
    out = bytearray(data)
    for offset, replacement in cuts:
        at = offset % (len(out) + 1)
        out[at : at + len(replacement)] = replacement
    if truncate is not None:
        del out[truncate % (len(out) + 1) :]
    return bytes(out)


def assert_only_our_errors(path: Path) -> None:
    """Raising or skipping, reading ``path`` raises only shardloader's errors, and every text
    it yields is valid UTF-8 (no lone surrogate)."""
    for skip in (False, True):
        try:
            docs, _ = fuzz_read(path, skip, RecordSpec())
        except ShardloaderError:
            continue
        for doc in docs:
            doc.text.encode("utf-8")


LIMIT = {"max_record_bytes": 256}
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(
    codec=st.sampled_from(["none", "gzip", "zstd"]),
    slots=st.lists(st.one_of(st.none(), GARBAGE_LINES), min_size=1, max_size=8),
    chunk_bytes=st.sampled_from([5, 64, 1 << 20]),
)
def test_fuzz_jsonl_garbage_lines_between_good_ones(tmp_path, codec, slots, chunk_bytes):
    payload = b""
    expected = []
    for i, slot in enumerate(slots):  # None: a good record; bytes: a garbage line
        if slot is None:
            record = GOOD[i % len(GOOD)]
            payload += line(record)
            expected.append(record["text"])
        else:
            payload += slot + b"\n"
    path = tmp_path / f"f.jsonl{SUFFIX[codec]}"
    path.write_bytes(compress(payload, codec))
    spec = RecordSpec(keep_fields={"meta": "json"})
    old = streams.CHUNK_BYTES
    streams.CHUNK_BYTES = chunk_bytes
    try:
        bad = BadRecords("skip")
        stats: Counter[str] = Counter()
        docs = list(read_documents(source(path), spec=spec, bad=bad, stats=stats, **LIMIT))
        if bad.total:
            with pytest.raises(CorpusError):
                fuzz_read(path, False, spec)
        else:
            assert fuzz_read(path, False, spec)[0] == docs
    finally:
        streams.CHUNK_BYTES = old
    assert [d.text for d in docs if d.text.startswith("good record")] == expected
    # every line is a kept document, a counted bad record or a blank line
    assert len(docs) + bad.total + stats["blank_lines"] == len(slots)
    assert stats["records"] == len(slots) - stats["blank_lines"]
    for doc in docs:
        doc.text.encode("utf-8")  # no lone surrogate got through


@FUZZ
@given(
    codec=st.sampled_from(["none", "gzip", "zstd"]),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=8)), max_size=4),
    truncate=st.integers(0, 10_000) | st.none(),
)
def test_fuzz_mutated_jsonl_files_raise_only_our_errors(tmp_path, codec, cuts, truncate):
    data = mutate(compress(b"".join(line(r) for r in GOOD * 3), codec), cuts, truncate)
    path = tmp_path / f"m.jsonl{SUFFIX[codec]}"
    path.write_bytes(data)
    assert_only_our_errors(path)
    with contextlib.suppress(ShardloaderError):
        read_jsonl_table(source(path), spec=RecordSpec(), max_record_bytes=256)


@FUZZ
@given(
    cuts=st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=8)), max_size=3),
    truncate=st.integers(0, 4000) | st.none(),
)
# A byte that makes a column name in the footer invalid UTF-8: pyarrow raised UnicodeDecodeError.
@example(cuts=[(1500, b"\x80")], truncate=None)
def test_fuzz_mutated_parquet_raises_only_our_errors(tmp_path, cuts, truncate):
    buf = io.BytesIO()
    table = pa.table({"id": [r["id"] for r in GOOD], "text": [r["text"] for r in GOOD]})
    pq.write_table(table, buf, row_group_size=2)
    data = mutate(buf.getvalue(), cuts, truncate)
    path = tmp_path / "m.parquet"
    path.write_bytes(data)
    assert_only_our_errors(path)


@FUZZ
@given(files=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_fuzz_text_folder_keeps_good_files_and_counts_bad_ones(tmp_path, files):
    root = tmp_path / "texts"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        old.unlink()
    expected = []
    num_bad = 0
    for i, data in enumerate(files):
        (root / f"{i}.txt").write_bytes(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            num_bad += 1
            continue
        if not text or len(data) > 256:
            num_bad += 1
        else:
            expected.append(text)
    bad = BadRecords("skip")
    docs = []
    for f in shardloader.storage.list_files([str(root)]):
        docs += read_documents(f, spec=RecordSpec(), bad=bad, max_record_bytes=256)
    assert [d.text for d in docs] == expected
    assert bad.total == num_bad
    if num_bad:
        with pytest.raises(CorpusError):
            read_all(root)


def read_all(root: Path) -> None:
    for f in shardloader.storage.list_files([str(root)]):
        list(read_documents(f, spec=RecordSpec(), bad=BadRecords(), max_record_bytes=256))


def test_zstd_bomb_inflates_in_bounded_pieces_and_multiframe_files_stay_whole() -> None:
    import io

    from shardloader.sources.streams import ZSTD_FEED_BYTES, iter_chunks

    bomb = zstandard.ZstdCompressor(level=19).compress(b"\n" * (256 << 20))
    assert len(bomb) < 64 << 10  # 256 MiB from a few KiB
    pieces = [len(p) for p in iter_chunks(io.BytesIO(bomb), "zstd", "bomb.jsonl.zst")]
    assert sum(pieces) == 256 << 20
    assert max(pieces) <= ZSTD_FEED_BYTES * 32768  # 32 MiB, however dense the input
    frames = [b'{"text": "frame %d"}\n' % i * 3000 for i in range(4)]
    packed = b"".join(zstandard.ZstdCompressor().compress(f) for f in frames)
    assert b"".join(iter_chunks(io.BytesIO(packed), "zstd", "multi.jsonl.zst")) == b"".join(frames)
