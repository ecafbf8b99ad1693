"""Bad input end to end: ``shardloader.convert`` and ``python -m shardloader convert``.

By default a bad record, a damaged file or a bad path stops the conversion with a CorpusError (a
ValueError) that names the file, the line or row, and what is wrong; the CLI prints it as one
``error:`` line and exits 1; no manifest is published. With ``on_bad_record="skip"`` each bad
record is counted by kind (result, manifest, CLI summary) and every good record around it is
converted unchanged. Output that holds another dataset is refused unless overwriting. Text comes
back byte for byte in every shard format and compression.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import shardloader
from shardloader import ConfigError, ConvertConfig, CorpusError, ManifestError, storage
from tests.conftest import run_cli as conftest_run_cli

MANIFEST = "_manifest.json"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) shardloader\.")
BEFORE = [{"id": "first-0", "text": "first file, record 0"}, {"id": "first-1", "text": "r1"}]
AFTER = [{"id": "last-0", "text": "last file, record 0"}, {"id": "last-1", "text": "r1"}]


# ---- helpers ------------------------------------------------------------------------------------


def jsonl(records: list[Any], *, ascii_only: bool = False) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=ascii_only).encode() + b"\n" for r in records)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def parquet_bytes(table: pa.Table, tmp: Path) -> bytes:
    path = tmp / "_scratch.parquet"
    pq.write_table(table, path, row_group_size=2)
    data = path.read_bytes()
    path.unlink()
    return data


def config(out: Path, **kw: Any) -> ConvertConfig:
    kw.setdefault("num_proc", 1)
    return ConvertConfig(output=str(out), progress=False, **kw)


def read_back(out: Path) -> list[tuple[str, str]]:
    return [(s["id"], s["text"]) for s in shardloader.iter_samples(str(out))]


def pairs(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["id"], r["text"]) for r in records]


run_cli = functools.partial(conftest_run_cli, check=False, timeout_s=120)


def cli_convert(inputs: Path | str, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "convert", str(inputs), "-o", str(out), "--num-proc", "1", "--no-progress", *flags
    )


def assert_cli_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, nothing on stdout, one ``error:`` line last on stderr, only log lines before it."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    assert all(LOG_LINE.match(x) for x in lines[:-1]), proc.stderr
    return errors[0][len("error: ") :]


def assert_unpublished(out: Path) -> None:
    assert not (out / MANIFEST).exists()
    with pytest.raises(ManifestError, match="no manifest found"):
        shardloader.read_manifest(str(out))


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``root``."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---- the cases: one bad file between two good ones ----------------------------------------------


@dataclass(frozen=True)
class Case:
    """A bad input file.

    Attributes:
        name: File name (its suffix picks the reader); sorted between ``a_first`` and ``z_last``.
        make: Builds the file's bytes (given a scratch directory).
        location: What follows the file path in the message (``":3: "``, ``": row 1 ..."``).
        words: Phrases the message must hold (what is wrong).
        skipped: Counts by kind with ``on_bad_record="skip"``; ``None`` for damage to the whole
            file, which fails in both modes.
        survivors: The good records of this file that a skipping conversion keeps.
        keep_fields: ``keep_fields`` of the conversion.
    """

    name: str
    make: Callable[[Path], bytes]
    location: str
    words: tuple[str, ...]
    skipped: dict[str, int] | None
    survivors: list[dict[str, Any]] = field(default_factory=list)
    keep_fields: tuple[str, ...] = ()


def around(stem: str, bad: bytes) -> tuple[Callable[[Path], bytes], list[dict[str, Any]]]:
    """A good record (line 1), a blank line, ``bad`` (line 3) and a good record (line 4)."""
    good = [
        {"id": f"{stem}-1", "text": f"{stem} before"},
        {"id": f"{stem}-4", "text": f"{stem} after"},
    ]
    data = jsonl(good[:1]) + b"\n" + bad + b"\n" + jsonl(good[1:])
    return (lambda _tmp: data), good


def _jsonl_case(
    stem: str, bad: bytes, kind: str, words: tuple[str, ...], codec: str = "", **kw: Any
) -> Case:
    make, good = around(stem, bad)
    pack = {"": lambda d: d, ".gz": gz, ".zst": zst}[codec]
    return Case(
        name=f"m_{stem}.jsonl{codec}",
        make=lambda tmp: pack(make(tmp)),
        location=":3: ",
        words=words,
        skipped={kind: 1},
        survivors=good,
        **kw,
    )


def _parquet_case(stem: str, text: pa.Array, kind: str, words: tuple[str, ...]) -> Case:
    ids = [f"{stem}-{i}" for i in range(len(text))]
    table = pa.table({"id": ids, "text": text})
    survivors = [{"id": ids[0], "text": "before"}, {"id": ids[2], "text": "after"}]
    return Case(
        name=f"m_{stem}.parquet",
        make=lambda tmp: parquet_bytes(table, tmp),
        location=": row 1 (row group 0): ",
        words=words,
        skipped={kind: 1},
        survivors=survivors,
    )


def _whole_file_case(stem: str, name: str, data: Callable[[Path], bytes], words: str) -> Case:
    return Case(name=f"m_{stem}{name}", make=data, location=": ", words=(words,), skipped=None)


GOOD_PAYLOAD = jsonl([{"id": f"g-{i}", "text": f"record {i}"} for i in range(200)])
_corrupt_gz = bytearray(gz(GOOD_PAYLOAD))
_corrupt_gz[len(_corrupt_gz) // 2] ^= 0xFF
_corrupt_zst = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(GOOD_PAYLOAD))
_corrupt_zst[len(_corrupt_zst) // 2] ^= 0xFF

CASES: dict[str, Case] = {
    "malformed-json": _jsonl_case("json", b'{"text": "x"', "bad_json", ("not valid JSON",)),
    "malformed-json-gz": _jsonl_case(
        "json_gz", b"{'text': 'x'}", "bad_json", ("not valid JSON",), ".gz"
    ),
    "malformed-json-zst": _jsonl_case(
        "json_zst", b'{"text" "x"}', "bad_json", ("not valid JSON",), ".zst"
    ),
    "invalid-utf8": _jsonl_case(
        "utf8", b'{"text": "\xff"}', "bad_utf8", ("invalid UTF-8 at byte 10 of the line",)
    ),
    "invalid-utf8-zst": _jsonl_case(
        "utf8_zst", b'{"text": "a\xed\xa0\x80"}', "bad_utf8", ("invalid UTF-8",), ".zst"
    ),
    "missing-text-field": _jsonl_case(
        "missing", b'{"content": "x"}', "missing_text", ("no 'text' field", "--text-field")
    ),
    "null-text": _jsonl_case("null", b'{"text": null}', "missing_text", ("'text' is null",)),
    "non-string-text": _jsonl_case(
        "number", b'{"text": 3.5}', "bad_text_type", ("'text' is a number, expected a string",)
    ),
    "empty-document": _jsonl_case(
        "empty", b'{"text": ""}', "empty_text", ("'text' is an empty string",), ".gz"
    ),
    "not-an-object": _jsonl_case(
        "list", b'[{"text": "x"}]', "not_object", ("expected a JSON object per line",)
    ),
    "lone-surrogate": _jsonl_case(
        "surrogate", b'{"text": "ok \\ud800"}', "bad_utf8", ("lone surrogate", "'\\ud800'")
    ),
    "lone-surrogate-in-id": _jsonl_case(
        "surrogate_id",
        b'{"id": "x\\udfff", "text": "fine"}',
        "bad_utf8",
        ("field 'id' holds a lone surrogate",),
    ),
    "bad-keep-field-type": _jsonl_case(
        "score",
        b'{"text": "x", "score": "high"}',
        "bad_field",
        ("field 'score' is a string ('high'), expected int64",),
        keep_fields=("score:int64",),
    ),
    "parquet-null-text": _parquet_case(
        "pq_null", pa.array(["before", None, "after"]), "missing_text", ("'text' is null",)
    ),
    "parquet-invalid-utf8": _parquet_case(
        "pq_utf8",
        pa.array([b"before", b"\xc3", b"after"], pa.binary()).view(pa.string()),
        "bad_utf8",
        ("column 'text' holds invalid UTF-8",),
    ),
    "text-invalid-utf8": Case(
        name="m_doc.txt",
        make=lambda _tmp: b"line one\nline two \xe2\x82 ends\n",
        location=":2: ",
        words=("invalid UTF-8 at byte 18 of the file",),
        skipped={"bad_utf8": 1},
    ),
    "text-empty-file": Case(
        name="m_empty.md",
        make=lambda _tmp: b"",
        location=": ",
        words=("the file is empty",),
        skipped={"empty_text": 1},
    ),
    "truncated-gz": _whole_file_case(
        "cut", ".jsonl.gz", lambda _tmp: gz(GOOD_PAYLOAD)[:-7], "truncated gzip file"
    ),
    "truncated-zst": _whole_file_case(
        "cut", ".jsonl.zst", lambda _tmp: zst(GOOD_PAYLOAD)[:-5], "truncated zstd file"
    ),
    "empty-gz": _whole_file_case("zero", ".jsonl.gz", lambda _tmp: b"", "empty gzip file"),
    "corrupt-gz": _whole_file_case(
        "bad", ".jsonl.gz", lambda _tmp: bytes(_corrupt_gz), "corrupt gzip data"
    ),
    "corrupt-zst": _whole_file_case(
        "bad", ".jsonl.zst", lambda _tmp: bytes(_corrupt_zst), "corrupt zstd data"
    ),
    "not-zstd": _whole_file_case("fake", ".jsonl.zst", lambda _tmp: GOOD_PAYLOAD, "corrupt zstd"),
    "parquet-non-string-column": _whole_file_case(
        "pq_int",
        ".parquet",
        lambda tmp: parquet_bytes(pa.table({"text": [1, 2, 3]}), tmp),
        "column 'text' has type int64, expected string",
    ),
    "parquet-missing-column": _whole_file_case(
        "pq_cols",
        ".parquet",
        lambda tmp: parquet_bytes(pa.table({"body": ["a"], "id": ["1"]}), tmp),
        "no column 'text' (columns: body, id)",
    ),
    "parquet-not-parquet": _whole_file_case(
        "pq_junk", ".parquet", lambda _tmp: b"PAR1 this is no parquet", "not a readable Parquet"
    ),
}
RECORD_CASES = [k for k, c in CASES.items() if c.skipped is not None]
FILE_CASES = [k for k, c in CASES.items() if c.skipped is None]


def build(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, Path]]:
    """A corpus folder: ``a_first.jsonl``, the bad files, ``z_last.jsonl.zst``."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a_first.jsonl").write_bytes(jsonl(BEFORE))
    (root / "z_last.jsonl.zst").write_bytes(zst(jsonl(AFTER)))
    paths = {}
    for name in names:
        case = CASES[name]
        path = root / case.name
        path.write_bytes(case.make(tmp_path))
        paths[name] = path
    return root, paths


def expected_pairs(names: list[str]) -> list[tuple[str, str]]:
    survivors = sorted((CASES[n].name, pairs(CASES[n].survivors)) for n in names)
    return pairs(BEFORE) + [p for _, ps in survivors for p in ps] + pairs(AFTER)


def check_message(message: str, case: Case, path: Path) -> None:
    assert message.startswith(f"{path}{case.location}"), message
    for word in case.words:
        assert word in message, (word, message)


# ---- raise (the default) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_convert_stops_naming_file_line_and_problem(tmp_path, name):
    case = CASES[name]
    root, paths = build(tmp_path, [name])
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        shardloader.convert([str(root)], config(out, keep_fields=case.keep_fields))
    assert isinstance(info.value, ValueError)
    check_message(str(info.value), case, paths[name])
    if case.skipped is not None:
        assert str(info.value).endswith("fix it or pass --on-bad-record=skip")
    assert_unpublished(out)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_stops_with_one_error_line(tmp_path, name):
    case = CASES[name]
    root, paths = build(tmp_path, [name])
    out = tmp_path / "out"
    flags = ["--keep-fields", ",".join(case.keep_fields)] if case.keep_fields else []
    message = assert_cli_error(cli_convert(root, out, *flags))
    check_message(message, case, paths[name])
    assert_unpublished(out)


# ---- skip ---------------------------------------------------------------------------------------


def assert_skipped(result: shardloader.ConvertResult, expected: dict[str, int] | None) -> None:
    """The conversion counted ``expected`` skips by kind, and so does its manifest."""
    assert dict(result.skipped) == expected
    assert result.manifest is not None
    assert dict(result.manifest.skipped) == expected


@pytest.mark.parametrize("name", RECORD_CASES)
def test_skip_counts_the_bad_record_and_keeps_its_neighbours(tmp_path, name):
    case = CASES[name]
    root, paths = build(tmp_path, [name])
    out = tmp_path / "out"
    result = shardloader.convert(
        [str(root)], config(out, on_bad_record="skip", keep_fields=case.keep_fields)
    )
    assert_skipped(result, case.skipped)
    assert len(result.skipped_examples) == 1
    check_message(result.skipped_examples[0], case, paths[name])
    assert result.manifest.skipped_examples == result.skipped_examples
    assert read_back(out) == expected_pairs([name])
    assert result.num_docs == len(expected_pairs([name]))
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk["skipped"] == case.skipped
    by_url = {s["url"]: s for s in on_disk["sources"]}
    assert by_url[str(paths[name])]["num_skipped"] == 1
    assert by_url[str(root / "a_first.jsonl")]["num_skipped"] == 0


SCHEMA_CASES = ["parquet-non-string-column", "parquet-missing-column"]
DAMAGED_CASES = [n for n in FILE_CASES if n not in SCHEMA_CASES]


@pytest.mark.parametrize("name", SCHEMA_CASES)
def test_skip_still_stops_on_a_schema_mismatch(tmp_path, name):
    """A file without a usable text column is a settings problem, not a bad record."""
    case = CASES[name]
    root, paths = build(tmp_path, [name])
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        shardloader.convert([str(root)], config(out, on_bad_record="skip"))
    check_message(str(info.value), case, paths[name])
    assert_unpublished(out)


@pytest.mark.parametrize("name", DAMAGED_CASES)
def test_skip_counts_a_damaged_file_and_keeps_the_rest(tmp_path, name):
    """A damaged file is counted (never dropped silently); every other file converts."""
    case = CASES[name]
    root, paths = build(tmp_path, [name])
    out = tmp_path / "out"
    result = shardloader.convert([str(root)], config(out, on_bad_record="skip"))
    assert_skipped(result, {"damaged_file": 1})
    (example,) = result.skipped_examples
    assert example.startswith(f"{paths[name]}"), example
    check_message(example.replace("damaged_file: ", "", 1), case, paths[name])
    got = read_back(out)
    assert got[:2] == pairs(BEFORE)
    assert got[-2:] == pairs(AFTER)
    assert len(got) == len(set(got))


def _all_record_cases(tmp_path: Path) -> tuple[Path, dict[str, Path], dict[str, int]]:
    root, paths = build(tmp_path, RECORD_CASES)
    total: Counter[str] = Counter()
    for name in RECORD_CASES:
        total.update(CASES[name].skipped or {})
    return root, paths, dict(sorted(total.items()))


def _expected_examples(paths: dict[str, Path]) -> list[str]:
    ordered = sorted(RECORD_CASES, key=lambda n: CASES[n].name)
    return [f"{paths[n]}{CASES[n].location}{next(iter(CASES[n].skipped or {}))}: " for n in ordered]


def test_skip_every_kind_at_once_with_two_processes(tmp_path):
    root, paths, total = _all_record_cases(tmp_path)
    expected = expected_pairs(RECORD_CASES)
    manifests = []
    for num_proc, task_bytes in ((1, 64 << 20), (2, 1)):  # one task; one task per file
        out = tmp_path / f"out{num_proc}"
        result = shardloader.convert(
            [str(root)],
            config(
                out,
                on_bad_record="skip",
                keep_fields=("score:int64",),
                num_proc=num_proc,
                task_bytes=task_bytes,
            ),
        )
        assert_skipped(result, total)
        assert sum(total.values()) == len(RECORD_CASES)
        examples = list(result.manifest.skipped_examples)
        assert [e[: len(p)] for e, p in zip(examples, _expected_examples(paths), strict=True)] == (
            _expected_examples(paths)
        )
        assert read_back(out) == expected
        manifests.append((out / MANIFEST).read_text())
    assert json.loads(manifests[0])["skipped"] == json.loads(manifests[1])["skipped"]


def test_cli_skip_prints_the_counts_and_first_locations(tmp_path):
    root, paths, total = _all_record_cases(tmp_path)
    out = tmp_path / "out"
    proc = cli_convert(root, out, "--on-bad-record=skip", "--keep-fields", "score:int64")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"  skipped:    {sum(total.values())} {total}" in proc.stdout.splitlines()
    assert f"  skipped records: {total}" in proc.stdout.splitlines()
    shown = [x.strip() for x in proc.stdout.splitlines() if x.startswith("    ")]
    expected = _expected_examples(paths)[:5]
    assert [x[: len(p)] for x, p in zip(shown, expected, strict=True)] == expected
    assert json.loads((out / MANIFEST).read_text())["skipped"] == total
    assert read_back(out) == expected_pairs(RECORD_CASES)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("score:int32", "keep_fields: 'score:int32' has type 'int32'"),
        ("text", "keep_fields: 'text' is reserved"),
    ],
)
def test_bad_keep_fields_option(tmp_path, spec, words):
    root, _ = build(tmp_path, [])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=re.escape(words)):
        shardloader.convert([str(root)], config(out, keep_fields=(spec,)))
    message = assert_cli_error(cli_convert(root, out, "--keep-fields", spec))
    assert message.startswith(words)
    assert_unpublished(out)


# ---- raise with a process pool ------------------------------------------------------------------


def test_bad_record_in_a_worker_process(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (root / f"part-{i}.jsonl").write_bytes(jsonl([{"text": f"doc {i}-{j}"} for j in range(5)]))
    bad = root / "part-3.jsonl"
    bad.write_bytes(bad.read_bytes() + b'{"text": "ok"}\n{"text": \n')
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        shardloader.convert([str(root)], config(out, num_proc=2, task_bytes=1))
    assert str(info.value).startswith(f"{bad}:7: not valid JSON"), str(info.value)
    # guard against a vacuous pass: the error really crossed a process boundary
    assert "RemoteTraceback" in type(info.value.__cause__).__name__
    assert_unpublished(out)


# ---- paths that are missing or unreadable -------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda tmp: tmp / "no-such-dir", "no-such-dir: no such file or directory"),
        (lambda tmp: tmp / "no-such.jsonl.gz", "no-such.jsonl.gz: no such file or directory"),
        (lambda tmp: tmp / "*.parquet", "*.parquet: the pattern matches no file"),
        (
            lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
            "empty: the directory holds no file",
        ),
    ],
    ids=["missing-dir", "missing-file", "empty-glob", "empty-dir"],
)
def test_missing_input_path(tmp_path, make, words):
    path = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        shardloader.convert([str(path)], config(out))
    assert str(info.value).startswith(f"{path}:"), str(info.value)
    assert words in str(info.value)
    assert not out.exists()
    message = assert_cli_error(cli_convert(path, out))
    assert message.startswith(f"{path}:")
    assert words in message
    assert not out.exists()


def test_dangling_link_in_input_folder(tmp_path):
    root, _ = build(tmp_path, [])
    link = root / "m_link.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    for mode in ("raise", "skip"):
        out = tmp_path / f"out-{mode}"
        with pytest.raises(CorpusError, match=re.escape(f"{link}: cannot open, no such file")):
            shardloader.convert([str(root)], config(out, on_bad_record=mode))
        assert_unpublished(out)
    message = assert_cli_error(cli_convert(root, tmp_path / "out-cli", "--on-bad-record=skip"))
    assert message.startswith(f"{link}: cannot open")


def test_unreadable_input_file(tmp_path, monkeypatch):
    root, _ = build(tmp_path, [])
    secret = root / "m_secret.jsonl"
    secret.write_bytes(jsonl([{"text": "x"}]))
    open_read = storage.open_read

    def deny(url: str, **kw: Any) -> Any:
        if url == str(secret):
            raise PermissionError(13, "Permission denied", url)
        return open_read(url, **kw)

    monkeypatch.setattr(storage, "open_read", deny)  # tests run as root; chmod would not stop it
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        shardloader.convert([str(root)], config(out, on_bad_record="skip"))
    assert str(info.value).startswith(f"{secret}: cannot open (PermissionError"), str(info.value)
    assert_unpublished(out)


# ---- inputs that are unusual but fine -----------------------------------------------------------


def test_hidden_files_in_input_folder_are_ignored(tmp_path):
    root = tmp_path / "in"
    (root / ".git").mkdir(parents=True)
    (root / "_tmp").mkdir()
    (root / "sub").mkdir()
    (root / "a.jsonl").write_bytes(jsonl([{"id": "a", "text": "visible a"}]))
    (root / "sub" / "b.jsonl.gz").write_bytes(gz(jsonl([{"id": "b", "text": "visible b"}])))
    for junk in (".hidden.jsonl", "_SUCCESS", ".git/config", "_tmp/part.jsonl", "sub/.DS_Store"):
        (root / junk).write_bytes(b"\xff not json \x00")
    out = tmp_path / "out"
    result = shardloader.convert([str(root)], config(out))
    assert result.manifest is not None
    assert read_back(out) == [("a", "visible a"), ("b", "visible b")]
    urls = [s["url"] for s in result.manifest.sources]
    assert urls == [str(root / "a.jsonl"), str(root / "sub" / "b.jsonl.gz")]
    proc = cli_convert(root, tmp_path / "out2")
    assert proc.returncode == 0, proc.stderr
    assert "ignored 5 hidden files" in proc.stderr


def test_blank_lines_crlf_and_no_final_newline(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    data = b'\r\n{"id": "1", "text": "a"}\r\n\r\n  \r\n{"id": "2", "text": "b\\r\\n"}\r\n\n'
    (root / "crlf.jsonl").write_bytes(data)
    (root / "tail.jsonl.gz").write_bytes(gz(b'{"id": "3", "text": "c"}\n{"id": "4", "text": "d"}'))
    (root / "tail.jsonl.zst").write_bytes(zst(b'{"id": "5", "text": "e"}'))
    out = tmp_path / "out"
    result = shardloader.convert([str(root)], config(out))
    assert read_back(out) == [("1", "a"), ("2", "b\r\n"), ("3", "c"), ("4", "d"), ("5", "e")]
    assert result.skipped == {}
    assert result.manifest is not None
    sources = {Path(s["url"]).name: s for s in result.manifest.sources}
    assert sources["crlf.jsonl"]["num_blank_lines"] == 4
    assert sources["crlf.jsonl"]["num_records"] == 2
    assert sources["tail.jsonl.gz"]["num_blank_lines"] == 0


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    records = [{"id": f"r{i}", "text": f"record {i} " + "ü" * i} for i in range(30)]
    data = jsonl(records)
    cuts = [0, 5, 5, len(data) // 2, len(data) - 3, len(data)]  # mid-line, mid-char, empty
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl.gz").write_bytes(
        b"".join(gz(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    )
    cctx = zstandard.ZstdCompressor()
    (root / "b.jsonl.zst").write_bytes(
        b"".join(cctx.compress(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
    )
    out = tmp_path / "out"
    shardloader.convert([str(root)], config(out))
    assert read_back(out) == pairs(records) * 2


# ---- output that already holds a dataset --------------------------------------------------------


def _two_corpora(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]], list[dict[str, Any]]]:
    old = [{"id": f"old-{i}", "text": f"old {i}"} for i in range(3)]
    new = [{"id": "new-0", "text": "new 0"}]
    (tmp_path / "old.jsonl").write_bytes(jsonl(old))
    (tmp_path / "new.jsonl").write_bytes(jsonl(new))
    return tmp_path / "old.jsonl", tmp_path / "new.jsonl", old, new


def test_output_with_another_dataset_is_refused_and_left_intact(tmp_path):
    old_path, new_path, old, _ = _two_corpora(tmp_path)
    out = tmp_path / "out"
    shardloader.convert([str(old_path)], config(out, shard_samples=1))
    before = tree(out)
    for other in (config(out), config(out, shard_samples=1, format="tar")):
        inputs = [str(new_path)] if other.format == "arrow" else [str(old_path)]
        with pytest.raises(ConfigError) as info:
            shardloader.convert(inputs, other)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert message.startswith(f"{out}: already holds another dataset (3 samples, 3 shards")
        assert message.endswith("pass --overwrite")
    message = assert_cli_error(cli_convert(new_path, out))
    assert message.startswith(f"{out}: already holds another dataset")
    assert "--overwrite" in message
    assert tree(out) == before  # nothing lost, nothing touched
    assert read_back(out) == pairs(old)


def test_overwrite_replaces_the_old_dataset_entirely(tmp_path):
    old_path, new_path, _, new = _two_corpora(tmp_path)
    out = tmp_path / "out"
    shardloader.convert([str(old_path)], config(out, shard_samples=1))
    assert len(list(out.glob("shard-*.arrow"))) == 3
    result = shardloader.convert([str(new_path)], config(out, format="tar", overwrite=True))
    assert result.manifest is not None
    assert read_back(out) == pairs(new)
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("shard-"))
    assert shards == [s.path for s in result.manifest.shards] == ["shard-00000-0000.tar"]
    assert shardloader.verify(str(out)).ok
    proc = cli_convert(old_path, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000-0000.arrow"]


def test_identical_rerun_is_a_no_op(tmp_path):
    old_path, _, old, _ = _two_corpora(tmp_path)
    out = tmp_path / "out"
    first = shardloader.convert([str(old_path)], config(out))
    before = tree(out)
    again = shardloader.convert([str(old_path)], config(out))
    assert again.tasks_run == 0
    assert again.tasks_skipped == again.tasks_total == 1
    assert again.num_docs == 0
    assert again.manifest == first.manifest
    proc = cli_convert(old_path, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{out}: already converted, nothing to do"
    assert tree(out) == before
    assert read_back(out) == pairs(old)


def test_unrelated_files_in_output_are_refused_and_kept(tmp_path):
    old_path, _, _, _ = _two_corpora(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError, match=re.escape(f"{out}: is not empty (1 entries, e.g. 'notes")
    ):
        shardloader.convert([str(old_path)], config(out))
    assert (out / "notes.txt").read_text() == "mine"
    assert_unpublished(out)


@pytest.mark.parametrize("remedy", ["fix-the-file", "pass-skip"])
def test_following_the_error_advice_after_a_failed_run(tmp_path, remedy):
    """The error says "fix it or pass --on-bad-record=skip"; either must then just work.

    A failed run publishes no manifest and finishes no task, so nothing would be lost by
    replacing its plan; demanding --overwrite here sends the user round a second time.
    """
    root, paths = build(tmp_path, ["malformed-json"])
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match="fix it or pass --on-bad-record=skip"):
        shardloader.convert([str(root)], config(out))
    if remedy == "fix-the-file":
        paths["malformed-json"].write_bytes(jsonl(CASES["malformed-json"].survivors) + b"\n")
        result = shardloader.convert([str(root)], config(out))
        assert result.skipped == {}
    else:
        result = shardloader.convert([str(root)], config(out, on_bad_record="skip"))
        assert result.skipped == {"bad_json": 1}
    assert read_back(out) == expected_pairs(["malformed-json"])


# ---- text is kept byte for byte -----------------------------------------------------------------

CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0))
TRICKY = [
    "English, Français, Deutsch: ß, Ελληνικά, Русский, Українська, Türkçe",
    "中文 日本語 한국어 ไทย हिन्दी தமிழ் ქართული Հայերեն አማርኛ",
    "עברית والعربية‎ mixed with LTR\u200f and RTL marks \u202e reversed \u202c",
    "emoji 😀 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👍🏽 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 🀄",
    "combining: e\u0301 vs \u00e9, Å vs A\u030a, 가 vs \u1100\u1161 (not normalized)",
    CONTROL,
    "NUL \x00 inside, DEL \x7f, ESC \x1b[31mred\x1b[0m, bell \x07",
    "windows\r\nline\r\nendings\r\n",
    "old mac\rline endings\r",
    "unicode separators \u2028 \u2029 \x85 \u000b \u000c",
    "BOM \ufeff in the middle, noncharacters \ufdd0 \uffff \U0010ffff",
    "  leading and trailing whitespace\t\n  ",
    "\n",
    " ",
    '{"text": "JSON inside text"}\\n with backslashes C:\\path\\to\\file',
    "zero width \u200b\u200c\u200d joiners, soft\u00adhyphen",
]


def _big_text() -> str:
    unit = "".join(TRICKY)
    text = unit * (5_000_000 // len(unit.encode()) + 1)
    return text[: len(text) - 7]  # about 5 MB, ending mid-pattern


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def tricky_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    root = tmp_path_factory.mktemp("tricky")
    raw = [{"id": f"raw-{i}", "text": t} for i, t in enumerate(TRICKY)]
    escaped = [{"id": f"esc-{i}", "text": t} for i, t in enumerate(TRICKY)]
    big = [{"id": "big", "text": _big_text()}]
    (root / "a_raw.jsonl").write_bytes(jsonl(raw))
    (root / "b_escaped.jsonl.gz").write_bytes(gz(jsonl(escaped, ascii_only=True)))
    (root / "c_big.jsonl.zst").write_bytes(zst(jsonl(big)))
    file_bytes = ("\ufeff" + "".join(TRICKY)).encode("utf-8")  # no trailing newline
    (root / "d_file.txt").write_bytes(file_bytes)
    expected = pairs(raw) + pairs(escaped) + pairs(big) + [("d_file.txt", file_bytes.decode())]
    assert len(expected[-2][1].encode()) > 5_000_000
    return root, [(i, _sha(t)) for i, t in expected]


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("fmt", ["arrow", "tar"])
def test_text_round_trips_byte_for_byte(tmp_path, tricky_corpus, fmt, compression):
    root, expected = tricky_corpus
    out = tmp_path / "out"
    result = shardloader.convert(
        [str(root)], config(out, format=fmt, compression=compression, shard_bytes=1 << 20)
    )
    assert result.skipped == {}
    got = [(s["id"], _sha(s["text"])) for s in shardloader.iter_samples(str(out))]
    assert got == expected
    small = {s["id"]: s["text"] for s in shardloader.iter_samples(str(out)) if s["id"] != "big"}
    for i, text in enumerate(TRICKY):  # readable diffs if a hash differs
        assert small[f"raw-{i}"] == text
        assert small[f"esc-{i}"] == text
