"""Hostile shards and manifests: checksums rewritten to match, as an attacker can.

Every case edits a real converted dataset on disk (shard bytes, then the manifest's size and
checksum, so only the content is at fault) and reads it the ways users do: streaming through
`ShardDataset` (no workers) and ``shardloader.verify``. Nothing may escape but shardloader's own
errors, naming the shard or manifest. The fuzz tests at the end mutate valid shards and manifests
at random.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardloader
from shardloader import ConvertConfig, ManifestError, ShardDataset, StreamConfig, convert
from shardloader.errors import ShardError, ShardloaderError
from shardloader.formats import ReadSpec, WriteSpec, get_format
from shardloader.formats.arrow import arrow_schema
from shardloader.manifest import MANIFEST_NAME, manifest_to_json, parse_manifest
from tests.conftest import make_docs, write_jsonl

VOCAB = 600  # the tokenizer_dir fixture's vocabulary


def make_dataset(
    root: Path, fmt: str, *, compression: str = "zstd", tokenizer: Path | None = None
) -> Path:
    write_jsonl(root / "corpus" / "a.jsonl", make_docs(50))
    out = root / f"out-{fmt}-{compression}"
    convert(
        [str(root / "corpus")],
        ConvertConfig(
            output=str(out),
            format=fmt,
            compression=compression,
            shard_samples=20,
            keep_fields=("lang", "score:float64"),
            tokenizer=str(tokenizer) if tokenizer else None,
            num_proc=1,
        ),
    )
    return out


def set_count(doc: dict[str, Any], count: int) -> None:
    """Claim ``count`` samples for shard 0, in a manifest without block table (the older form;
    with one, the manifest itself contradicts the claim: see test_blocks.py)."""
    doc["shards"].pop("blocks", None)
    doc["shards"]["num_samples"][0] = count


def edit_manifest(out: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the manifest JSON, then make first ids and totals add up again."""
    path = out / MANIFEST_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    shards = doc["shards"]
    first = 0
    shards["first_sample_id"] = []
    for n in shards["num_samples"]:
        shards["first_sample_id"].append(first)
        first += n
    doc["totals"].update(num_samples=first, num_bytes=sum(shards["num_bytes"]))
    path.write_text(json.dumps(doc))


def replace_shard(out: Path, data: bytes, num_samples: int, index: int = 0) -> str:
    """Overwrite shard ``index`` with ``data`` and make the manifest match it; returns its path."""
    path = out / json.loads((out / MANIFEST_NAME).read_text())["shards"]["path"][index]
    path.write_bytes(data)

    def edit(doc: dict[str, Any]) -> None:
        shards = doc["shards"]
        shards["num_bytes"][index] = len(data)
        shards["checksum"][index] = hashlib.sha256(data).hexdigest()
        shards["num_samples"][index] = num_samples
        if "blocks" in shards:  # the new bytes' batches are unknown: read the shard whole
            blocks = shards["blocks"]
            start = sum(blocks["count"][:index])
            end = start + blocks["count"][index]
            for name in ("samples", "offset", "length", "decoded", "digest"):
                if name in blocks:
                    del blocks[name][start:end]
            blocks["count"][index] = 0

    edit_manifest(out, edit)
    return str(path)


def stream(out: Path) -> list[dict[str, Any]]:
    # Not list(dataset): list() preallocates len(dataset) slots, a size the manifest gives.
    return [sample for sample in ShardDataset(str(out), config=StreamConfig(shuffle=False))]


def assert_refused(out: Path, shard: str, match: str) -> None:
    """Streaming raises ShardError naming ``shard``; verify names it too and is not OK."""
    with pytest.raises(ShardError, match=match) as info:
        stream(out)
    assert str(info.value).startswith(shard)
    report = shardloader.verify(str(out))
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith(shard)
    assert re.search(match, report.problems[0])


def tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()


def text_sample(key: str, doc_id: str = "x", text: str = "hello") -> list[tuple[str, bytes]]:
    return [(f"{key}.json", json.dumps({"id": doc_id}).encode()), (f"{key}.txt", text.encode())]


# --- 3: manifest sample counts against what the shard holds ---------------------------------


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
@pytest.mark.parametrize("delta", [1, -1])
def test_sample_count_off_by_one_is_refused_naming_both_counts(tmp_path, fmt, delta):
    out = make_dataset(tmp_path, fmt)
    assert len(stream(out)) == 50  # the untouched dataset streams
    edit_manifest(out, lambda d: set_count(d, 20 + delta))
    shard = str(out / json.loads((out / MANIFEST_NAME).read_text())["shards"]["path"][0])
    with pytest.raises(ShardError) as info:
        stream(out)
    message = str(info.value)
    assert message.startswith(f"{shard}: shard holds 20 samples but the manifest says {20 + delta}")
    report = shardloader.verify(str(out))
    assert [p.split(";")[0] for p in report.problems] == [message.split(";")[0]]


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
@pytest.mark.parametrize("claim", [10**8, 10**15, 2**70])
def test_absurd_sample_counts_stop_at_the_manifest(tmp_path, fmt, claim):
    out = make_dataset(tmp_path, fmt)
    edit_manifest(out, lambda d: d["shards"]["num_samples"].__setitem__(0, claim))
    with pytest.raises(ManifestError, match=f"{claim}") as info:
        stream(out)
    assert str(info.value).startswith(str(out / MANIFEST_NAME) + ": ")


def test_count_is_checked_before_the_window_ids_are_made(tmp_path):
    """A claim within the manifest's bounds fails on opening the shard, before its ids exist."""
    out = make_dataset(tmp_path, "arrow")
    doc = json.loads((out / MANIFEST_NAME).read_text())
    claim = doc["shards"]["num_bytes"][0] * shardloader.manifest.MAX_SAMPLES_PER_BYTE
    edit_manifest(out, lambda d: set_count(d, claim))
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=f"holds 20 samples but the manifest says {claim}"):
            stream(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert claim > 1_000_000  # its int64 ids alone would take 8 bytes each
    assert peak < claim * 8 / 4


# --- 4: hostile tar shards ------------------------------------------------------------------


@pytest.fixture
def tar_out(tmp_path: Path) -> Path:
    return make_dataset(tmp_path, "tar", compression="none")


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([("k.json", b"[1]"), ("k.txt", b"hi")], "JSON holds a list, expected an object"),
        ([("k.json", b'{"id": 7}'), ("k.txt", b"hi")], "id is int, expected a string"),
        (
            [("k.json", b'{"id": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")]
            + [("k.txt", b"hi")],
            "undecodable JSON .RecursionError",
        ),
        (
            [("k.json", b'{"id": "a", "x": ' + b"[" * 100 + b"]" * 100 + b"}"), ("k.txt", b"")],
            "nested deeper than 64",
        ),
        (
            [("k.json", b'{"id": "a", "x": ' + b"9" * 5000 + b"}"), ("k.txt", b"hi")],
            "undecodable JSON .ValueError",
        ),
        (
            [("k.json", b'{"id": "a", "score": "high"}'), ("k.txt", b"hi")],
            "field 'score' holds 'high', not float64",
        ),
        ([("k.json", b'{"id": "a"}'), ("k.txt", b"\xff\xfe")], "not UTF-8"),
        ([("k.json", b'{"id": "a"}')], "incomplete sample, no .txt"),
        (text_sample("x/a") + text_sample("y/a"), "not KEY.EXT without directories"),
        (text_sample("a") + [("a.txt", b"again")], "a second .txt for one key"),
        (text_sample("a") + text_sample("b") + text_sample("a"), "key 'a' was already read"),
        ([*text_sample("a"), ("a.exe", b"MZ")], r"unexpected member type \.exe"),
        ([("noext", b"x")], "not KEY.EXT"),
    ],
)
def test_hostile_tar_members_are_refused(tar_out, members, match):
    shard = replace_shard(tar_out, tar_bytes(members), num_samples=1)
    assert_refused(tar_out, shard, match)


@pytest.mark.parametrize("kind", [tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.FIFOTYPE])
def test_tar_members_that_are_not_regular_files_are_refused(tar_out, kind):
    info = tarfile.TarInfo("a.txt")
    info.type = kind
    info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    shard = replace_shard(tar_out, tar_bytes([*text_sample("a"), info]), num_samples=1)
    assert_refused(tar_out, shard, "not a regular file")


def test_directories_do_not_merge_two_samples(tar_out):
    """Before: x/a.* and y/a.* became one sample, the other lost, and verify said OK."""
    data = tar_bytes(text_sample("x/a", "first") + text_sample("y/a", "second"))
    shard = replace_shard(tar_out, data, num_samples=1)
    assert_refused(tar_out, shard, "without directories")


def _corrupt_second_header_name(data: bytes) -> bytes:
    out = bytearray(data)
    second = 1024  # a.json's header, its 512 bytes of data, then a.txt's header
    out[second] ^= 0x01  # the name changes, the stored checksum does not
    return bytes(out)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_corrupt_second_header_name(tar_bytes(text_sample("a"))), "not a readable tar shard"),
        (tar_bytes(text_sample("a"))[: 1536 + 100], "not a readable tar shard"),
    ],
)
def test_tar_headers_that_do_not_check_out_are_refused(tar_out, data, match):
    """A header whose checksum does not match, or a member cut short, fails the whole shard."""
    shard = replace_shard(tar_out, data, num_samples=1)
    assert_refused(tar_out, shard, match)


def test_extended_tar_headers_are_refused(tar_out):
    """Convert writes plain USTAR headers; a pax header (a long name here) is not a regular file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in text_sample("k" * 120):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard = replace_shard(tar_out, buf.getvalue(), num_samples=1)
    with pytest.raises(ShardError, match=r"not a regular file \(tar type b'x'\)") as info:
        stream(tar_out)
    assert str(info.value).startswith(shard)


@pytest.fixture(scope="module")
def token_tar(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("tok"), "tar", compression="none", tokenizer=tokenizer_dir
    )


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (
            np.array([1, -1, 10**9], np.int64),
            "holds int64 of shape .3,.; the manifest says 1-D uint16",
        ),
        (np.array([1, 2], ">u2"), "holds >u2"),
        (np.array([[1, 2]], np.uint16), r"shape \(1, 2\)"),
        (np.array([1, None], object), "holds object"),
        (np.array([5, VOCAB, 7], np.uint16), rf"\[5, {VOCAB}\], outside \[0, the vocabulary size"),
        (np.array([65535], np.uint16), "outside"),
    ],
)
def test_hostile_token_arrays_are_refused(tmp_path, token_tar, array, match):
    out = tmp_path / "ds"
    shutil.copytree(token_tar, out)
    members = [("k.json", b'{"id": "a"}'), ("k.npy", npy(array))]
    shard = replace_shard(out, tar_bytes(members), num_samples=1)
    assert_refused(out, shard, match)


def test_npy_header_claiming_a_huge_shape_allocates_nothing(tmp_path, token_tar):
    """np.load would allocate the 20 GB the header claims before finding 4 bytes of data."""
    out = tmp_path / "ds"
    shutil.copytree(token_tar, out)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<u2", "fortran_order": False, "shape": (10**10,)}
    )
    members = [("k.json", b'{"id": "a"}'), ("k.npy", header.getvalue() + b"\x01\x00\x02\x00")]
    shard = replace_shard(out, tar_bytes(members), num_samples=1)
    tracemalloc.start()
    try:
        assert_refused(
            out, shard, "header says 10000000000 ids .20000000000 bytes., the member holds 4"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20


def test_valid_tokens_stream_unchanged(token_tar):
    samples = stream(token_tar)
    assert len(samples) == 50
    assert all(s["input_ids"].dtype == np.uint16 for s in samples)
    assert max(int(s["input_ids"].max()) for s in samples) < VOCAB
    assert shardloader.verify(str(token_tar)).ok


# --- 4: token ids on the Arrow path -----------------------------------------------------------


def test_arrow_token_ids_beyond_the_vocabulary_are_refused(tmp_path, tokenizer_dir):
    out = make_dataset(tmp_path, "arrow", tokenizer=tokenizer_dir)
    manifest = shardloader.read_manifest(str(out))
    buf = io.BytesIO()
    spec = WriteSpec(
        shard_name="s",
        fields=manifest.fields,
        token_dtype=manifest.token_dtype,
        compression="zstd",
        compression_level=3,
        batch_bytes=1 << 20,
    )
    writer = get_format("arrow").open_writer(buf, spec)
    writer.write("a", np.array([3, 4], np.uint16), None)
    writer.write("b", np.array([3, VOCAB + 5], np.uint16), None)
    writer.close()
    shard = replace_shard(out, buf.getvalue(), num_samples=2)
    assert_refused(out, shard, rf"range over \[3, {VOCAB + 5}\]")


# --- 11: Python's limits inside a manifest ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"version": 1, "x": ' + "7" * 5000 + "}", "Exceeds the limit"),
        ('{"version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "recursion"),
        ('{"version": 1, "x": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
    ],
)
def test_python_limits_in_a_manifest_become_manifest_errors(tmp_path, text, match):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(ManifestError, match=match) as info:
        shardloader.read_manifest(str(tmp_path))
    assert str(info.value).startswith(str(tmp_path / MANIFEST_NAME) + ": ")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(token_dtype="object"), "token_dtype 'object'"),
        (lambda d: d.update(compression="lz4"), "unknown compression"),
        (lambda d: d.update(checksum_algorithm="nope"), "unknown checksum algorithm"),
        (lambda d: d.update(fields={"text": "string"}), "do not start with id"),
        (lambda d: d["shards"]["checksum"].__setitem__(0, 5), "not a string"),
        (lambda d: d["shards"].__setitem__("num_tokens", 3), "not a list"),
        (lambda d: d.update(sources="abc"), "sources is a str"),
    ],
)
def test_malformed_manifest_fields_are_refused(tmp_path, edit, match):
    out = make_dataset(tmp_path, "arrow")
    edit_manifest(out, lambda d: None)
    doc = json.loads((out / MANIFEST_NAME).read_text())
    edit(doc)
    with pytest.raises(ManifestError, match=match):
        parse_manifest(json.dumps(doc).encode(), where="m.json")


# --- fuzz -------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
MUTATIONS = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), max_size=6)
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


@pytest.fixture(scope="module")
def valid_manifest(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = make_dataset(tmp_path_factory.mktemp("m"), "arrow")
    return (out / MANIFEST_NAME).read_bytes()


@FUZZ
@given(doc=JSON, key=st.sampled_from(["", "version", "fields", "shards", "tokenizer", "totals"]))
def test_fuzz_manifest_json(valid_manifest, doc, key):
    if key:  # one part of a valid manifest replaced by random JSON
        base = json.loads(valid_manifest)
        base[key] = doc
        doc = base
    try:
        manifest = parse_manifest(json.dumps(doc).encode(), where="m.json")
    except ShardloaderError:
        return
    manifest_to_json(manifest)  # what parses also serializes


@FUZZ
@given(flips=MUTATIONS, cut=st.none() | st.integers(0, 4000))
def test_fuzz_manifest_bytes(valid_manifest, flips, cut):
    try:
        manifest = parse_manifest(mutate(valid_manifest, flips, cut), where="m.json")
    except ShardloaderError:
        return
    assert manifest.num_samples >= 0


def _shard_bytes(fmt: str, compression: str, tokens: bool) -> tuple[bytes, dict[str, str]]:
    fields = (
        {"id": "string", "input_ids": "tokens"} if tokens else {"id": "string", "text": "string"}
    )
    fields |= {"meta": "json", "score": "float64", "n": "int64"}
    buf = io.BytesIO()
    spec = WriteSpec(
        shard_name="s",
        fields=fields,
        token_dtype="uint16" if tokens else None,
        compression=compression,
        compression_level=3,
        batch_bytes=64,  # several record batches
    )
    writer = get_format(fmt).open_writer(buf, spec)
    for i in range(6):
        payload = np.arange(i, i + 3, dtype=np.uint16) if tokens else f"text {i}".encode()
        writer.write(f"d{i}", payload, {"meta": {"k": [i]}, "score": i / 2, "n": i})
    writer.close()
    return buf.getvalue(), fields


SHARDS = [
    (fmt, compression, tokens)
    for fmt in ("arrow", "tar")
    for compression in ("zstd", "none")
    for tokens in (False, True)
]


def read_everything(
    fmt: str, data: bytes, fields: dict[str, str], compression: str, tokens: bool
) -> int:
    spec = ReadSpec(
        fields=fields,
        token_dtype="uint16" if tokens else None,
        compression=compression,
        where="s",
        num_samples=6,
        vocab_size=100,
    )
    n = sum(1 for _ in get_format(fmt).iter_samples(io.BytesIO(data), spec))
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        columns = get_format(fmt).read_columns(f.name, spec)
        columns.take(np.arange(columns.num_rows))
    return n


@pytest.mark.parametrize(("fmt", "compression", "tokens"), SHARDS)
@settings(FUZZ, max_examples=40)
@given(flips=MUTATIONS, cut=st.none() | st.integers(0, 5000))
def test_fuzz_shard_readers(fmt, compression, tokens, flips, cut):
    data, fields = _shard_bytes(fmt, compression, tokens)
    assert read_everything(fmt, data, fields, compression, tokens) == 6  # the valid shard reads
    with contextlib.suppress(ShardloaderError):  # and nothing else
        read_everything(fmt, mutate(data, flips, cut), fields, compression, tokens)


def test_arrow_json_field_limits(tmp_path):
    fields = {"id": "string", "text": "string", "meta": "json"}
    table = pa.table(
        {"id": ["a"], "text": ["t"], "meta": ['{"x": ' + "1" * 5000 + "}"]},
        schema=arrow_schema(fields, None),
    )
    path = tmp_path / "s.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    spec = ReadSpec(fields=fields, token_dtype=None, compression="none", where="s.arrow")
    columns = get_format("arrow").read_columns(str(path), spec)
    with pytest.raises(ShardError, match="s.arrow: field 'meta' of row 0: undecodable JSON"):
        columns.take(np.arange(1))


def test_a_tar_zst_member_that_inflates_past_the_limit_is_refused_before_reading(tmp_path):
    import tracemalloc

    import zstandard

    from shardloader.formats.tar import MAX_MEMBER_BYTES, ustar_header

    out = make_dataset(tmp_path, "tar")  # .tar.zst
    size = MAX_MEMBER_BYTES + (64 << 20)
    packed = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(packed, closefd=False) as z:
        z.write(tar_bytes(text_sample("a"))[: 2 * 512])  # a.json: header + one block
        z.write(ustar_header(b"a.txt", size))
        zeros = bytes(16 << 20)
        for _ in range(size // len(zeros)):
            z.write(zeros)  # a few KiB compressed, 1.06 GiB inflated
    assert len(packed.getvalue()) < 1 << 20
    shard = replace_shard(out, packed.getvalue(), num_samples=1)
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="over the .*-byte limit") as info:
            stream(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith(shard)
    assert peak < 64 << 20  # refused at the header, nothing inflated into memory
