"""Unit tests of the raw corpus readers on bad and awkward input.

Every bad record must raise a CorpusError (also a ValueError) that starts with ``file:line`` (or
the Parquet row) and says what is wrong, or, with ``on_bad_record="skip"``, be counted by kind
while the good records around it come through unchanged.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from shardloader import storage
from shardloader.errors import ConfigError, CorpusError
from shardloader.sources import (
    MAX_EXAMPLES,
    BadRecords,
    Document,
    RecordSpec,
    kind_of,
    parse_keep_fields,
    read_documents,
    streams,
)
from tests.conftest import SUFFIX, compress, line
from tests.documents import read, source

GOOD_A = {"id": "a", "text": "first good record"}
GOOD_B = {"id": "b", "text": "last good record"}


# ---- helpers ------------------------------------------------------------------------------------


def write(path: Path, data: bytes, codec: str = "none") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(data, codec))
    return path


def read_error(path: Path, *, skip: bool = False, spec: RecordSpec | None = None) -> CorpusError:
    with pytest.raises(CorpusError) as info:
        read(path, skip=skip, spec=spec)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err).startswith(str(path)), str(err)
    assert "Traceback" not in str(err)
    return err


def texts(docs: list[Document]) -> list[str]:
    return [d.text for d in docs]


# ---- one bad record between two good ones, in every JSONL codec ---------------------------------

SCORE_INT = RecordSpec(keep_fields={"score": "int64"})
META_JSON = RecordSpec(keep_fields={"meta": "json", "url": "string"})

# (case id, the bad line's bytes, kind, words the message must hold, spec)
BAD_LINES: list[tuple[str, bytes, str, tuple[str, ...], RecordSpec]] = [
    ("malformed-json", b'{"text": "unterminated', "bad_json", ("not valid JSON",), RecordSpec()),
    ("trailing-comma", b'{"text": "x",}', "bad_json", ("not valid JSON",), RecordSpec()),
    (
        "invalid-utf8",
        b'{"text": "caf\xe9 \xff"}',
        "bad_utf8",
        ("invalid UTF-8 at byte 13 of the line", r"b'\xe9"),
        RecordSpec(),
    ),
    (
        "overlong-utf8",
        b'{"text": "\xc0\xaf"}',
        "bad_utf8",
        ("invalid UTF-8 at byte 10",),
        RecordSpec(),
    ),
    (
        "missing-text-field",
        b'{"id": "m", "body": "x"}',
        "missing_text",
        ("no 'text' field", "fields present: body, id", "--text-field"),
        RecordSpec(),
    ),
    ("null-text", b'{"text": null}', "missing_text", ("field 'text' is null",), RecordSpec()),
    (
        "number-text",
        b'{"text": 42}',
        "bad_text_type",
        ("field 'text' is a number, expected a string",),
        RecordSpec(),
    ),
    (
        "array-text",
        b'{"text": ["a", "b"]}',
        "bad_text_type",
        ("field 'text' is an array, expected a string",),
        RecordSpec(),
    ),
    (
        "object-text",
        b'{"text": {"en": "a"}}',
        "bad_text_type",
        ("field 'text' is an object, expected a string",),
        RecordSpec(),
    ),
    (
        "empty-text",
        b'{"text": ""}',
        "empty_text",
        ("field 'text' is an empty string",),
        RecordSpec(),
    ),
    (
        "list-not-object",
        b'["text", "x"]',
        "not_object",
        ("expected a JSON object per line, found an array",),
        RecordSpec(),
    ),
    (
        "null-not-object",
        b"null",
        "not_object",
        ("expected a JSON object per line, found null",),
        RecordSpec(),
    ),
    (
        "string-not-object",
        b'"just text"',
        "not_object",
        ("expected a JSON object per line, found a string",),
        RecordSpec(),
    ),
    (
        "number-not-object",
        b"12",
        "not_object",
        ("expected a JSON object per line, found a number",),
        RecordSpec(),
    ),
    (
        "lone-high-surrogate",
        b'{"text": "ab\\ud800cd"}',
        "bad_utf8",
        ("field 'text' holds a lone surrogate", "at character 2", "must come in pairs"),
        RecordSpec(),
    ),
    (
        "lone-low-surrogate",
        b'{"text": "\\uDC00"}',
        "bad_utf8",
        ("field 'text' holds a lone surrogate", "at character 0"),
        RecordSpec(),
    ),
    (
        "reversed-surrogate-pair",
        b'{"text": "x\\ude00\\ud83d"}',
        "bad_utf8",
        ("lone surrogate", "at character 1"),
        RecordSpec(),
    ),
    (
        "lone-surrogate-in-id",
        b'{"id": "\\ud800", "text": "fine"}',
        "bad_utf8",
        ("field 'id' holds a lone surrogate",),
        RecordSpec(),
    ),
    (
        "lone-surrogate-in-kept-json-field",
        b'{"text": "fine", "meta": {"k": ["\\udfff"]}}',
        "bad_utf8",
        ("field 'meta' holds a lone surrogate",),
        META_JSON,
    ),
    (
        "lone-surrogate-in-kept-string-field",
        b'{"text": "fine", "url": "http://x/\\ud801"}',
        "bad_utf8",
        ("field 'url' holds a lone surrogate",),
        META_JSON,
    ),
    (
        "bool-id",
        b'{"id": true, "text": "x"}',
        "bad_id",
        ("id field 'id' is a boolean (True)", "non-empty string or an integer"),
        RecordSpec(),
    ),
    (
        "empty-id",
        b'{"id": "", "text": "x"}',
        "bad_id",
        ("id field 'id' is a string ('')",),
        RecordSpec(),
    ),
    (
        "keep-field-string-for-int64",
        b'{"text": "x", "score": "12"}',
        "bad_field",
        ("field 'score' is a string ('12'), expected int64", "declare it score:json"),
        SCORE_INT,
    ),
    (
        "keep-field-float-for-int64",
        b'{"text": "x", "score": 1.5}',
        "bad_field",
        ("field 'score' is a number (1.5), expected int64",),
        SCORE_INT,
    ),
    (
        "keep-field-bool-for-int64",
        b'{"text": "x", "score": true}',
        "bad_field",
        ("field 'score' is a boolean (True), expected int64",),
        SCORE_INT,
    ),
    (
        "keep-field-int64-overflow",
        b'{"text": "x", "score": 9223372036854775808}',
        "bad_field",
        ("field 'score' is a number (9223372036854775808), expected int64",),
        SCORE_INT,
    ),
]


def bad_line_file(tmp_path: Path, bad_line: bytes, codec: str) -> Path:
    """good (line 1), blank (line 2), bad (line 3), good (line 4)."""
    data = line(GOOD_A) + b"\n" + bad_line + b"\n" + line(GOOD_B)
    return write(tmp_path / f"part.jsonl{SUFFIX[codec]}", data, codec)


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
@pytest.mark.parametrize(
    ("bad_line", "kind", "words", "spec"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_bad_record_raises_naming_file_line_and_problem(
    tmp_path, codec, bad_line, kind, words, spec
):
    path = bad_line_file(tmp_path, bad_line, codec)
    err = read_error(path, spec=spec)
    message = str(err)
    assert message.startswith(f"{path}:3: "), message
    for word in words:
        assert word in message, (word, message)
    assert message.endswith("fix it or pass --on-bad-record=skip")


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
@pytest.mark.parametrize(
    ("bad_line", "kind", "words", "spec"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_bad_record_skipped_and_counted_by_kind(tmp_path, codec, bad_line, kind, words, spec):
    path = bad_line_file(tmp_path, bad_line, codec)
    docs, bad, stats = read(path, skip=True, spec=spec)
    assert [(d.id, d.text) for d in docs] == [("a", GOOD_A["text"]), ("b", GOOD_B["text"])]
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:4"]
    assert dict(bad.counts) == {kind: 1}
    assert bad.total == 1
    assert len(bad.examples) == 1
    assert bad.examples[0].startswith(f"{path}:3: {kind}: "), bad.examples[0]
    assert words[0] in bad.examples[0]
    assert stats["records"] == 3
    assert stats["blank_lines"] == 1


def test_every_kind_in_one_file_counts_exactly(tmp_path):
    lines = [line({"text": f"good {i}"}) for i in range(4)]
    bad = [b"{", b'{"text": "\xff"}', b'{"x": 1}', b'{"text": 1}', b'{"text": ""}', b"[]"]
    bad += [b'{"text": "\\ud800"}', b'{"id": 1.5, "text": "x"}', b"{", b"[1]"]
    data = b"".join(lines[:2]) + b"\n".join(bad) + b"\n" + b"".join(lines[2:])
    path = write(tmp_path / "mixed.jsonl", data)
    docs, tally, stats = read(path, skip=True)
    assert texts(docs) == [f"good {i}" for i in range(4)]
    assert dict(tally.counts) == {
        "bad_json": 2,
        "bad_utf8": 2,
        "missing_text": 1,
        "bad_text_type": 1,
        "empty_text": 1,
        "not_object": 2,
        "bad_id": 1,
    }
    assert [e.split(": ")[0] for e in tally.examples] == [f"{path}:{n}" for n in range(3, 13)]
    assert stats["records"] == 14


def test_examples_are_capped_but_counts_are_not(tmp_path):
    data = b"".join(b"{broken\n" if i % 2 else line({"text": str(i)}) for i in range(100))
    path = write(tmp_path / "many.jsonl", data)
    docs, bad, _ = read(path, skip=True)
    assert len(docs) == 50
    assert dict(bad.counts) == {"bad_json": 50}
    assert len(bad.examples) == MAX_EXAMPLES
    assert bad.examples[0].startswith(f"{path}:2: ")
    assert bad.examples[-1].startswith(f"{path}:{2 * MAX_EXAMPLES}: ")


# ---- escapes that are not errors ----------------------------------------------------------------


def test_surrogate_pairs_and_escaped_backslash_u_are_not_errors(tmp_path):
    raw = b'{"id": "\\ud83d\\ude00", "text": "\\ud83d\\ude00 \\u00e9 \\\\ud800 \\uD834\\uDD1E"}\n'
    path = write(tmp_path / "esc.jsonl", raw)
    docs, bad, _ = read(path)
    assert bad.total == 0
    assert docs[0].id == "\U0001f600"
    assert docs[0].text == "\U0001f600 \u00e9 \\ud800 \U0001d11e"
    docs[0].text.encode("utf-8")  # encodable: no surrogate left


# ---- line structure: blank lines, CRLF, no trailing newline -------------------------------------


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_blank_lines_are_counted_not_records(tmp_path, codec):
    data = b"\n" + line({"text": "one"}) + b"   \n\t\n\r\n" + line({"text": "two"}) + b"\n\n"
    path = write(tmp_path / f"blank.jsonl{SUFFIX[codec]}", data, codec)
    docs, bad, stats = read(path)
    assert texts(docs) == ["one", "two"]
    assert [d.id for d in docs] == ["blank.jsonl" + SUFFIX[codec] + ":2", f"{path.name}:6"]
    assert bad.total == 0
    assert stats["blank_lines"] == 6
    assert stats["records"] == 2


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_crlf_line_endings(tmp_path, codec):
    data = b'{"text": "a\\r\\nb"}\r\n\r\n{"text": "c"}\r\n{"text": 7}\r\n{"text": "d"}'
    path = write(tmp_path / f"crlf.jsonl{SUFFIX[codec]}", data, codec)
    docs, bad, stats = read(path, skip=True)
    assert texts(docs) == ["a\r\nb", "c", "d"]  # escaped CRLF kept, line-ending CR dropped
    assert dict(bad.counts) == {"bad_text_type": 1}
    assert bad.examples[0].startswith(f"{path}:4: ")
    assert stats["blank_lines"] == 1
    err = read_error(path)
    assert str(err).startswith(f"{path}:4: ")


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_last_line_without_newline_is_read(tmp_path, codec):
    data = line({"text": "x"}) + b'{"text": "no newline at the end"}'
    path = write(tmp_path / f"tail.jsonl{SUFFIX[codec]}", data, codec)
    docs, _, stats = read(path)
    assert texts(docs) == ["x", "no newline at the end"]
    assert stats["bytes"] == len(data) + 1  # each line counts its newline, the last one too


def test_bad_last_line_without_newline_is_reported(tmp_path):
    path = write(tmp_path / "tail.jsonl", line({"text": "x"}) + b'{"text": ')
    err = read_error(path)
    assert str(err).startswith(f"{path}:2: not valid JSON")


def test_long_line_across_many_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 1000)
    text = "".join(chr(0x4E00 + i % 2000) for i in range(50_000))  # 150 kB of 3-byte UTF-8
    path = write(tmp_path / "long.jsonl.zst", line({"text": "a"}) + line({"text": text}), "zstd")
    docs, _, _ = read(path)
    assert texts(docs) == ["a", text]


# ---- multi-member gzip, multi-frame zstd --------------------------------------------------------

RECORDS = [{"text": f"record {i} " + "é" * (i % 7)} for i in range(40)]
PAYLOAD = b"".join(line(r) for r in RECORDS)


def split_points(n: int) -> list[int]:
    # mid-line, mid-character, the edges, and one empty member/frame (n // 3 twice)
    return [0, 1, 17, n // 3, n // 3, n // 2, n // 2 + 1, n - 1, n]


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 20])
def test_multi_member_gzip_reads_every_member(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(streams, "CHUNK_BYTES", chunk_bytes)
    cuts = split_points(len(PAYLOAD))
    members = [gzip.compress(PAYLOAD[a:b], mtime=0) for a, b in zip(cuts, cuts[1:], strict=False)]
    assert len(members) == 8
    assert gzip.compress(b"", mtime=0) in members
    path = write(tmp_path / "multi.jsonl.gz", b"".join(members))
    docs, bad, stats = read(path)
    assert texts(docs) == [r["text"] for r in RECORDS]
    assert bad.total == 0
    assert stats["bytes"] == len(PAYLOAD)


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 20])
def test_multi_frame_zstd_reads_every_frame(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(streams, "CHUNK_BYTES", chunk_bytes)
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    cuts = split_points(len(PAYLOAD))
    frames = [cctx.compress(PAYLOAD[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    skippable = struct.pack("<II", 0x184D2A50, 8) + b"\x00" * 8  # as pzstd writes
    path = write(tmp_path / "multi.jsonl.zst", skippable + skippable.join(frames))
    docs, bad, _ = read(path)
    assert texts(docs) == [r["text"] for r in RECORDS]
    assert bad.total == 0


def test_streamed_zstd_without_content_size(tmp_path):
    path = tmp_path / "stream.jsonl.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
        for i in range(0, len(PAYLOAD), 100):
            w.write(PAYLOAD[i : i + 100])
            w.flush(zstandard.FLUSH_BLOCK)
    docs, _, _ = read(path)
    assert texts(docs) == [r["text"] for r in RECORDS]


# ---- truncated, corrupt and empty compressed files ----------------------------------------------


def _truncations(codec: str) -> list[tuple[str, bytes]]:
    whole = compress(PAYLOAD, codec)
    second = compress(PAYLOAD, codec)
    return [
        ("inside-header", whole[:5]),
        ("inside-body", whole[: len(whole) // 2]),
        ("before-end-marker", whole[:-3]),
        ("inside-second-member", whole + second[: len(second) // 2]),
    ]


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("where", range(4), ids=[t[0] for t in _truncations("gzip")])
def test_truncated_file_raises_or_is_counted_when_skipping(tmp_path, codec, where, skip):
    _, data = _truncations(codec)[where]
    path = write(tmp_path / f"cut.jsonl{SUFFIX[codec]}", data)
    bad = BadRecords("skip" if skip else "raise")
    docs: list[Document] = []
    if skip:
        docs.extend(read_documents(source(path), spec=RecordSpec(), bad=bad))
        assert dict(bad.counts) == {"damaged_file": 1}
        message = bad.examples[0]
        assert message.startswith(f"{path}: damaged_file: truncated {codec} file"), message
        assert message.endswith("the rest of the file is skipped")
    else:
        with pytest.raises(CorpusError) as info:
            docs.extend(read_documents(source(path), spec=RecordSpec(), bad=bad))
        message = str(info.value)
        assert message.startswith(f"{path}: truncated {codec} file"), message
        assert bad.total == 0
    assert "decompressed bytes" in message
    assert "recreate or exclude" in message
    # the lines decoded before the cut came through whole; the partial line is not a record
    whole = [r["text"] for r in RECORDS]
    assert texts(docs) == (whole * 2)[: len(docs)]
    if where == 3:  # cut inside the second member: the whole first member came through
        assert len(docs) >= len(RECORDS)


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_empty_compressed_file_is_damaged_not_empty(tmp_path, codec):
    path = write(tmp_path / f"empty.jsonl{SUFFIX[codec]}", b"")
    message = str(read_error(path))
    assert message.startswith(f"{path}: empty {codec} file (0 bytes"), message
    docs, bad, _ = read(path, skip=True)
    assert docs == []
    assert dict(bad.counts) == {"damaged_file": 1}


def test_empty_plain_jsonl_is_an_empty_corpus(tmp_path):
    docs, bad, stats = read(write(tmp_path / "empty.jsonl", b""))
    assert docs == []
    assert bad.total == 0
    assert stats["records"] == 0


def _corruptions(codec: str) -> list[tuple[str, bytes]]:
    if codec == "gzip":
        body = bytearray(gzip.compress(PAYLOAD, mtime=0))
        body[len(body) // 2] ^= 0xFF
        crc = bytearray(gzip.compress(PAYLOAD, mtime=0))
        crc[-6] ^= 0x01  # the stored CRC-32 no longer matches
        return [
            ("flipped-body-byte", bytes(body)),
            ("bad-crc", bytes(crc)),
            ("not-gzip-at-all", PAYLOAD),
            ("garbage-after-member", gzip.compress(PAYLOAD, mtime=0) + b"\x00garbage"),
        ]
    body = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD))
    body[len(body) // 2] ^= 0xFF
    return [
        ("flipped-byte-with-checksum", bytes(body)),
        ("not-zstd-at-all", PAYLOAD),
        ("bad-magic", b"\x00\x00\x00\x00" + zstandard.ZstdCompressor().compress(PAYLOAD)[4:]),
        ("garbage-after-frame", zstandard.ZstdCompressor().compress(PAYLOAD) + b"garbage!"),
    ]


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("which", range(4))
def test_corrupt_compressed_data_raises_or_is_counted(tmp_path, codec, which, skip):
    name, data = _corruptions(codec)[which]
    path = write(tmp_path / f"bad.jsonl{SUFFIX[codec]}", data)
    if skip:
        _, bad, _ = read(path, skip=True)
        assert dict(bad.counts) == {"damaged_file": 1}
        message = bad.examples[0].replace("damaged_file: ", "", 1)
    else:
        message = str(read_error(path))
    assert message.startswith(f"{path}: corrupt {codec} data after "), (name, message)
    assert "the file is damaged" in message


# ---- plain-text files ---------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_text_file_invalid_utf8(tmp_path, codec):
    data = b"line one\nline two \xc3\x28 here\nline three\n"
    path = write(tmp_path / f"doc.txt{SUFFIX[codec]}", data, codec)
    message = str(read_error(path))
    assert message.startswith(f"{path}:2: invalid UTF-8 at byte 18 of the file"), message
    assert "--on-bad-record=skip" in message
    docs, bad, _ = read(path, skip=True)
    assert docs == []
    assert dict(bad.counts) == {"bad_utf8": 1}
    assert bad.examples[0].startswith(f"{path}:2: bad_utf8: ")


def test_latin1_text_file_is_bad_utf8(tmp_path):
    path = write(tmp_path / "old.txt", "première ligne\n".encode("latin-1"))
    assert str(read_error(path)).startswith(f"{path}:1: invalid UTF-8 at byte 5 of the file")


@pytest.mark.parametrize("codec", ["none", "gzip", "zstd"])
def test_empty_text_file(tmp_path, codec):
    path = write(tmp_path / f"empty.txt{SUFFIX[codec]}", b"", codec)
    message = str(read_error(path))
    assert message == f"{path}: the file is empty; fix it or pass --on-bad-record=skip"
    docs, bad, _ = read(path, skip=True)
    assert docs == []
    assert dict(bad.counts) == {"empty_text": 1}


def test_text_file_kept_byte_for_byte(tmp_path):
    data = "\ufeffBOM first\r\nCRLF\rCR\x00NUL\x0b\x0c\x1b[0m \u2028\u2029\x85 end".encode()
    path = write(tmp_path / "sub" / "raw.md", data)
    docs, _, stats = read(path)
    assert len(docs) == 1
    assert docs[0].text.encode("utf-8") == data
    assert docs[0].id == "raw.md"
    assert stats["bytes"] == len(data)


# ---- Parquet ------------------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 3) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_null_and_empty_text(tmp_path):
    table = pa.table({"id": ["r0", "r1", "r2", "r3", "r4"], "text": ["a", None, "c", "", "e"]})
    path = write_parquet(tmp_path / "t.parquet", table)
    message = str(read_error(path))
    assert message.startswith(f"{path}: row 1 (row group 0): field 'text' is null"), message
    docs, bad, stats = read(path, skip=True)
    assert [(d.id, d.text) for d in docs] == [("r0", "a"), ("r2", "c"), ("r4", "e")]
    assert dict(bad.counts) == {"missing_text": 1, "empty_text": 1}
    assert bad.examples[1].startswith(f"{path}: row 3 (row group 1): empty_text: ")
    assert stats["records"] == 5


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
@pytest.mark.parametrize(
    ("column", "words"),
    [
        (pa.array([1, 2], pa.int64()), "int64"),
        (pa.array([["a"], ["b"]]), "list<"),  # list<item: ...> or list<element: ...>
        (pa.array([b"a", b"b"], pa.binary()), "binary"),
    ],
    ids=["int64", "list", "binary"],
)
def test_parquet_non_string_text_column(tmp_path, column, words, skip):
    path = write_parquet(tmp_path / "t.parquet", pa.table({"text": column}))
    message = str(read_error(path, skip=skip))
    assert message.startswith(f"{path}: column 'text' has type {words}"), message
    assert message.endswith(", expected string")


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
def test_parquet_missing_text_column(tmp_path, skip):
    path = write_parquet(tmp_path / "t.parquet", pa.table({"body": ["x"], "id": ["1"]}))
    message = str(read_error(path, skip=skip))
    assert message.startswith(f"{path}: no column 'text' (columns: body, id)"), message
    assert "--text-field" in message


def test_parquet_text_field_option_finds_other_column(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", pa.table({"body": ["x", "y"]}))
    docs, _, _ = read(path, spec=RecordSpec(text_field="body"))
    assert [(d.id, d.text) for d in docs] == [("t.parquet:0", "x"), ("t.parquet:1", "y")]


def test_parquet_invalid_utf8_in_string_column(tmp_path):
    raw = [b"ok 0", b"ok 1", b"ok 2", b"ok 3", b"bad \xff\xfe", b"ok 5", b"ok 6"]
    column = pa.array(raw, pa.binary()).view(pa.string())  # Parquet does not validate UTF-8
    path = write_parquet(tmp_path / "t.parquet", pa.table({"text": column}))
    message = str(read_error(path))
    assert message.startswith(f"{path}: row 4 (row group 1): column 'text' holds invalid UTF-8")
    docs, bad, stats = read(path, skip=True)
    assert texts(docs) == ["ok 0", "ok 1", "ok 2", "ok 3", "ok 5", "ok 6"]
    assert [d.id for d in docs] == [f"t.parquet:{i}" for i in (0, 1, 2, 3, 5, 6)]
    assert dict(bad.counts) == {"bad_utf8": 1}
    assert stats["records"] == 7


def test_parquet_invalid_utf8_in_id_column(tmp_path):
    ids = pa.array([b"i0", b"\x80"], pa.binary()).view(pa.string())
    path = write_parquet(tmp_path / "t.parquet", pa.table({"text": ["a", "b"], "id": ids}))
    assert "column 'id' holds invalid UTF-8" in str(read_error(path))


def test_parquet_bad_keep_field_type(tmp_path):
    table = pa.table({"text": ["a", "b"], "score": ["1", "2"]})
    path = write_parquet(tmp_path / "t.parquet", table)
    message = str(read_error(path, spec=SCORE_INT))
    assert message.startswith(f"{path}: row 0 (row group 0): field 'score' is a string ('1')")


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip"])
def test_truncated_parquet(tmp_path, skip):
    whole = write_parquet(tmp_path / "whole.parquet", pa.table({"text": ["a"] * 10}))
    path = write(tmp_path / "cut.parquet", whole.read_bytes()[:-20])
    if not skip:
        assert str(read_error(path)).startswith(f"{path}: not a readable Parquet file")
        return
    docs, bad, _ = read(path, skip=True)
    assert docs == []
    assert dict(bad.counts) == {"damaged_file": 1}
    assert bad.examples[0].startswith(f"{path}: damaged_file: not a readable Parquet file")


def test_compressed_parquet_is_refused(tmp_path):
    whole = write_parquet(tmp_path / "whole.parquet", pa.table({"text": ["a"]}))
    path = write(tmp_path / "t.parquet.gz", whole.read_bytes(), "gzip")
    assert "compressed Parquet files are not supported" in str(read_error(path))


# ---- missing and unreadable files ---------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "gone.jsonl"
    message = str(read_error(path))
    assert message.startswith(f"{path}: cannot open, no such file"), message


def test_dangling_link(tmp_path):
    path = tmp_path / "link.jsonl"
    path.symlink_to(tmp_path / "nowhere.jsonl")
    assert "dangling link" in str(read_error(path))


def test_directory_in_place_of_file(tmp_path):
    path = tmp_path / "dir.jsonl"
    path.mkdir()
    message = str(read_error(path))
    assert message.startswith(f"{path}: cannot open (IsADirectoryError"), message


def test_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path / "secret.jsonl", line(GOOD_A))

    def deny(url: str, **_: Any) -> Any:
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(storage, "open_read", deny)
    message = str(read_error(path, skip=True))
    assert message.startswith(f"{path}: cannot open (PermissionError"), message


# ---- keep_fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "kept"),
    [
        ("int64", -(2**63), -(2**63)),
        ("int64", None, None),
        ("float64", 3, 3.0),
        ("float64", 2.5, 2.5),
        ("bool", False, False),
        ("string", "s", "s"),
        ("json", {"a": [1, None]}, {"a": [1, None]}),
        ("json", "\U0001f600", "\U0001f600"),
    ],
)
def test_keep_field_values_accepted(tmp_path, kind, value, kept):
    path = write(tmp_path / "k.jsonl", line({"text": "x", "f": value}))
    docs, _, _ = read(path, spec=RecordSpec(keep_fields={"f": kind}))
    assert docs[0].fields == {"f": kept}
    assert type(docs[0].fields["f"]) is type(kept)


@pytest.mark.parametrize(
    ("kind", "value"),
    [("float64", "1.0"), ("float64", True), ("bool", 1), ("string", 5), ("string", ["a"])],
)
def test_keep_field_values_refused(tmp_path, kind, value):
    path = write(tmp_path / "k.jsonl", line({"text": "x", "f": value}))
    message = str(read_error(path, spec=RecordSpec(keep_fields={"f": kind})))
    assert message.startswith(f"{path}:1: field 'f' is "), message
    assert f"expected {kind}; declare it f:json" in message


@pytest.mark.parametrize(
    ("specs", "words"),
    [
        (["score:int32"], "has type 'int32'; use one of string, int64"),
        (["text"], "'text' is reserved"),
        (["id:string"], "'id' is reserved"),
        (["a", "a:int64"], "'a' is listed twice"),
        ([":int64"], "empty field name"),
    ],
)
def test_parse_keep_fields_refuses(specs, words):
    with pytest.raises(ConfigError, match="^keep_fields: ") as info:
        parse_keep_fields(specs)
    assert isinstance(info.value, ValueError)
    assert words in str(info.value)


def test_parse_keep_fields_defaults_to_string():
    assert parse_keep_fields([" url ", "score: float64"]) == {"url": "string", "score": "float64"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jsonl", ("jsonl", "none")),
        ("a.JSONL.GZ", ("jsonl", "gzip")),
        ("a.ndjson.zst", ("jsonl", "zstd")),
        ("a.json.zstd", ("jsonl", "zstd")),
        ("a.parquet", ("parquet", "none")),
        ("a.txt.gz", ("text", "gzip")),
        ("README", ("text", "none")),
    ],
)
def test_kind_of(name, expected):
    assert kind_of(f"s3://bucket/dir/{name}") == expected
