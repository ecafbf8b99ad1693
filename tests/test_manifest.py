"""Manifest: canonical JSON round trip, validation with clear errors."""

from __future__ import annotations

import json

import pytest

from shardloader import ManifestError
from shardloader.manifest import (
    Manifest,
    ShardInfo,
    manifest_to_json,
    parse_manifest,
    read_manifest,
    shards_with_ids,
)


def example(num_shards: int = 3) -> Manifest:
    shards = shards_with_ids(
        [
            ShardInfo(
                path=f"shard-{i:05d}.arrow",
                num_samples=10 + i,
                num_bytes=1000 + i,
                checksum=f"{i:064x}",
                num_tokens=5 * i,
            )
            for i in range(num_shards)
        ]
    )
    return Manifest(
        format="arrow",
        compression="zstd",
        fields={"id": "string", "input_ids": "tokens"},
        shards=shards,
        token_dtype="uint16",
        tokenizer={"fingerprint": "sha256:x", "vocab_size": 9},
    )


def test_round_trip_and_totals():
    m = example()
    data = manifest_to_json(m)
    back = parse_manifest(data)
    assert back == m
    assert [s.first_sample_id for s in back.shards] == [0, 10, 21]
    assert back.num_samples == 33
    assert back.num_tokens == 15
    assert back.num_bytes == 3003
    assert json.loads(data)["totals"] == {
        "num_shards": 3,
        "num_samples": 33,
        "num_bytes": 3003,
        "num_tokens": 15,
    }
    assert manifest_to_json(back) == data  # canonical


def _mutate(fn) -> bytes:
    doc = json.loads(manifest_to_json(example()))
    fn(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["shards"]["path"].__setitem__(1, "../escape.arrow"), "not a relative path"),
        (lambda d: d["shards"]["path"].__setitem__(1, "/abs.arrow"), "not a relative path"),
        (lambda d: d["shards"]["path"].__setitem__(1, "s3://b/x.arrow"), "not a relative path"),
        (lambda d: d["shards"]["first_sample_id"].__setitem__(2, 5), "expected 21"),
        (lambda d: d["totals"].update(num_samples=1), "totals.num_samples is 1"),
        (lambda d: d["shards"]["num_bytes"].pop(), "different lengths"),
        (lambda d: d.update(format="zip"), "unknown shard format"),
        (lambda d: d.pop("format"), "malformed manifest"),
    ],
)
def test_invalid_manifests_are_refused(mutate, message):
    with pytest.raises(ManifestError, match=message) as info:
        parse_manifest(_mutate(mutate), where="s3://bucket/ds/_manifest.json")
    assert str(info.value).startswith("s3://bucket/ds/_manifest.json: ")


def test_not_json(tmp_path):
    (tmp_path / "_manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match=r"_manifest.json: not valid JSON"):
        read_manifest(str(tmp_path))


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(ManifestError, match="no manifest found; convert a corpus there first"):
        read_manifest(str(tmp_path))


def test_large_manifest_round_trip():
    m = example(100_000)
    back = parse_manifest(manifest_to_json(m))
    assert len(back.shards) == 100_000
    assert back.shards[-1].first_sample_id == sum(10 + i for i in range(99_999))
