"""Block tables: what convert records, hostile tables refused by shard, old manifests, the plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardloader import ShardDataset, StreamConfig, read_manifest
from shardloader.errors import ManifestError, ShardError
from shardloader.manifest import MANIFEST_NAME
from shardloader.plan import PlanConfig, plan_epoch
from tests.streaming import NUM_SAMPLES, SHARD_SIZES, source_docs


def edited_manifest(source: Path, out: Path, change: Any) -> Path:
    """``source``'s manifest alone in ``out``, with ``change`` applied to its shard table."""
    out.mkdir()
    (out / MANIFEST_NAME).write_bytes((source / MANIFEST_NAME).read_bytes())
    edit(out, change)
    return out


def edit(path: Path, change: Any) -> None:
    doc = json.loads((path / MANIFEST_NAME).read_text())
    change(doc["shards"])
    (path / MANIFEST_NAME).write_text(json.dumps(doc))


def test_convert_records_every_record_batch_at_its_offset(blocks_dir: Path) -> None:
    manifest = read_manifest(str(blocks_dir))
    blocks = manifest.shards.blocks
    assert blocks is not None
    for shard, entry in zip(manifest.shards, blocks, strict=True):
        data = (blocks_dir / shard.path).read_bytes()
        reader = pa.ipc.open_file(pa.BufferReader(data))
        assert len(entry) == reader.num_record_batches > 1 or shard.num_samples < 20
        assert sum(n for n, _, _ in entry) == shard.num_samples
        for index, (n, offset, length) in enumerate(entry):
            # A range read of [offset, offset + length) is one decodable IPC message.
            message = pa.ipc.read_message(pa.BufferReader(data[offset : offset + length]))
            batch = pa.ipc.read_record_batch(message, reader.schema)
            assert batch.num_rows == n
            assert batch.equals(reader.get_batch(index))


def test_tar_manifests_have_no_block_table(tar_dir: Path) -> None:
    manifest = read_manifest(str(tar_dir))
    assert manifest.shards.blocks is None
    assert b'"blocks"' not in (tar_dir / MANIFEST_NAME).read_bytes()
    table = manifest.shards.block_table()
    assert table.num_samples.tolist() == list(SHARD_SIZES)  # one block per shard


def test_a_manifest_without_blocks_reads_in_both_units(blocks_dir: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for p in blocks_dir.glob("*.arrow"):
        (old / p.name).write_bytes(p.read_bytes())
    (old / MANIFEST_NAME).write_bytes((blocks_dir / MANIFEST_NAME).read_bytes())
    edit(old, lambda s: s.pop("blocks"))
    docs = source_docs()
    for unit in ("shard", "block"):
        samples = list(ShardDataset(str(old), config=StreamConfig(shuffle_unit=unit)))
        assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
        assert all(s["text"] == docs[s["sample_id"]]["text"] for s in samples)


def nested(shards: dict[str, Any]) -> list[Any]:
    """The stored (flat) block column as per-shard triples (``None``: no table)."""
    flat = shards["blocks"]
    triples = [list(t) for t in zip(flat["samples"], flat["offset"], flat["length"], strict=True)]
    out, start = [], 0
    for n in flat["count"]:
        out.append(triples[start : start + n] if n else None)
        start += n
    return out


def store(shards: dict[str, Any], per_shard: list[Any]) -> None:
    """Write per-shard triples back in the stored (flat) form."""
    triples = [t for entry in per_shard if entry for t in entry]
    shards["blocks"] = {
        "count": [len(entry) if entry else 0 for entry in per_shard],
        "samples": [t[0] for t in triples],
        "offset": [t[1] for t in triples],
        "length": [t[2] for t in triples],
    }


def on_shard_2(change: Any) -> Any:
    """An edit of shard 2's triples, applied through the flat form."""

    def edit(shards: dict[str, Any]) -> None:
        per_shard = nested(shards)
        change(per_shard[2])
        store(shards, per_shard)

    return edit


BAD_TABLES = [
    (on_shard_2(lambda b: b[0].__setitem__(0, b[0][0] + 1)), "blocks hold"),
    (on_shard_2(lambda b: b[0].__setitem__(0, 0)), "no samples"),
    (on_shard_2(lambda b: b[-1].__setitem__(2, 10**9)), "outside the file"),
    (on_shard_2(lambda b: b[1].__setitem__(1, 0)), "overlaps"),
    (on_shard_2(lambda b: b[0].__setitem__(0, b[0][0] + 10**6)), "blocks hold"),
]
BAD_COLUMNS = [
    (lambda s: s["blocks"]["offset"].__setitem__(0, -5), "not non-negative integers"),
    (lambda s: s["blocks"]["samples"].__setitem__(0, 1.5), "not non-negative integers"),
    (lambda s: s["blocks"]["length"].__setitem__(0, "7"), "not non-negative integers"),
    (lambda s: s["blocks"]["length"].__setitem__(0, [1, 2]), "not non-negative integers"),
    (lambda s: s["blocks"]["count"].__setitem__(0, 10**30), "not non-negative integers"),
    (lambda s: s["blocks"].pop("length"), "expected an object of"),
    (lambda s: s.__setitem__("blocks", [[1, 0, 1]]), "expected an object of"),
    (lambda s: s["blocks"]["samples"].pop(), "counts .* blocks but holds"),
]


@pytest.mark.parametrize(("change", "match"), BAD_COLUMNS)
def test_a_malformed_block_column_is_refused(
    blocks_dir: Path, tmp_path: Path, change: Any, match: str
) -> None:
    out = edited_manifest(blocks_dir, tmp_path / "bad", change)
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(str(out))
    assert "blocks" in str(info.value)


def test_too_many_blocks_in_a_shard_is_refused_naming_it(blocks_dir: Path, tmp_path: Path) -> None:
    out = edited_manifest(
        blocks_dir, tmp_path / "many", lambda s: s["blocks"]["count"].__setitem__(2, 1 << 20 | 1)
    )
    path = json.loads((out / MANIFEST_NAME).read_text())["shards"]["path"][2]
    with pytest.raises(ManifestError, match=f"shard {path}: 1048577 blocks, more than"):
        read_manifest(str(out))


@pytest.mark.parametrize(("change", "match"), BAD_TABLES)
def test_a_bad_block_table_is_refused_naming_the_shard(
    blocks_dir: Path, tmp_path: Path, change: Any, match: str
) -> None:
    out = edited_manifest(blocks_dir, tmp_path / "bad", change)
    path = json.loads((out / MANIFEST_NAME).read_text())["shards"]["path"][2]
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(str(out))
    assert f"shard {path}" in str(info.value)


def test_a_blocks_column_of_the_wrong_length_or_on_tar_is_refused(
    blocks_dir: Path, tar_dir: Path, tmp_path: Path
) -> None:
    for source, change, match in [
        (blocks_dir, lambda s: s["blocks"]["count"].pop(), "expected a list of 7"),
        (tar_dir, lambda s: store(s, [None] * 6 + [[[120, 0, 10]]]), "tar"),
    ]:
        out = tmp_path / source.name
        out.mkdir()
        (out / MANIFEST_NAME).write_bytes((source / MANIFEST_NAME).read_bytes())
        edit(out, change)
        with pytest.raises(ManifestError, match=match):
            read_manifest(str(out))


def test_block_counts_that_add_up_but_miss_the_batches_fail_at_read(
    blocks_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "moved"
    out.mkdir()
    for p in blocks_dir.glob("*.arrow"):
        (out / p.name).write_bytes(p.read_bytes())
    (out / MANIFEST_NAME).write_bytes((blocks_dir / MANIFEST_NAME).read_bytes())

    def shift(shards: dict[str, Any]) -> None:  # one sample moved from batch 0 to batch 1
        per_shard = nested(shards)
        first, second = per_shard[0][:2]
        first[0] -= 1
        second[0] += 1
        store(shards, per_shard)

    edit(out, shift)
    path = json.loads((out / MANIFEST_NAME).read_text())["shards"]["path"][0]
    with pytest.raises(ShardError, match=f"{path} batch [01]: shard holds"):
        list(ShardDataset(str(out), config=StreamConfig(shuffle_unit="block")))


def test_block_mode_holds_blocks_and_mixes_shards(blocks_dir: Path) -> None:
    """A window of blocks draws from several shards; its ids are whole blocks' ids."""
    manifest = read_manifest(str(blocks_dir))
    table = manifest.shards.block_table()
    plan = plan_epoch(
        table.num_samples,
        config=PlanConfig(shuffle_unit="block", shuffle_window=6),
        epoch=0,
        world_size=1,
        rank=0,
        num_workers=0,
    )
    (worker,) = plan.workers
    shards_per_window = [
        len({int(table.shard_index[s.shard_index]) for s in w.spans}) for w in worker.windows
    ]
    assert max(len(w.spans) for w in worker.windows) <= 6
    assert np.mean(shards_per_window) > 3


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=6), min_size=1, max_size=12),
    world_size=st.integers(1, 5),
    num_workers=st.integers(0, 3),
    window=st.integers(1, 5),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
)
def test_a_plan_over_blocks_serves_the_ids_a_plan_over_shards_serves(
    blocks: list[list[int]],
    world_size: int,
    num_workers: int,
    window: int,
    seed: int,
    epoch: int,
) -> None:
    """Blocks are contiguous id ranges in shard order: the same ids, exactly split."""
    shard_sizes = [sum(b) for b in blocks]
    block_sizes = [n for b in blocks for n in b]
    total = sum(shard_sizes)
    served = {}
    for unit, sizes in (("shard", shard_sizes), ("block", block_sizes)):
        config = PlanConfig(seed=seed, shuffle_window=window, shuffle_unit=unit)
        ids = []
        for rank in range(world_size):
            plan = plan_epoch(
                sizes,
                config=config,
                epoch=epoch,
                world_size=world_size,
                rank=rank,
                num_workers=num_workers,
            )
            got = plan.sample_ids()
            assert len(got) == plan.samples_per_rank == (plan.num_carried + total) // world_size
            ids.append(got)
        union = np.concatenate(ids)
        carried = plan.num_carried
        assert len(np.unique(union)) >= len(union) - carried
        served[unit] = (len(union), set(union.tolist()) | set(plan.leftover_ids.tolist()))
    assert served["shard"][0] == served["block"][0]
    assert served["shard"][1] == served["block"][1] == set(range(total))
