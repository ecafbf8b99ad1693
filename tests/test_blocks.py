"""Block tables: what convert records, hostile tables refused by shard, old manifests, the plan."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardloader import ShardDataset, StreamConfig, read_manifest
from shardloader.errors import ManifestError, ShardError
from shardloader.formats import BlockRead, ReadSpec, get_format
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
        assert sum(n for n, *_ in entry) == shard.num_samples
        for index, (n, offset, length, decoded, digest) in enumerate(entry):
            # A range read of [offset, offset + length) is one decodable IPC message.
            message = pa.ipc.read_message(pa.BufferReader(data[offset : offset + length]))
            batch = pa.ipc.read_record_batch(message, reader.schema)
            assert batch.num_rows == n
            assert batch.equals(reader.get_batch(index))
            # Its digest is the sha256 of those bytes; decoded is the batch's payload bytes.
            assert digest == hashlib.sha256(data[offset : offset + length]).hexdigest()[:32]
            texts = batch.column("text").to_pylist()
            assert decoded == sum(len(t.encode()) for t in texts)


def test_plain_tar_manifests_record_blocks_of_whole_samples(tar_dir: Path) -> None:
    """(``.tar.zst`` has none: `tests.test_tar_blocks`.)"""
    manifest = read_manifest(str(tar_dir))
    assert manifest.shards.blocks is not None
    table = manifest.shards.block_table()
    per_shard = np.bincount(table.shard_index, weights=table.num_samples).astype(int)
    assert per_shard.tolist() == list(SHARD_SIZES)
    assert table.digest.all()
    assert table.decoded.all()


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


def test_a_blocks_column_of_the_wrong_length_is_refused(blocks_dir: Path, tmp_path: Path) -> None:
    for source, change, match in [
        (blocks_dir, lambda s: s["blocks"]["count"].pop(), "expected a list of 7"),
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


def window_bytes(window: Any, unit_bytes: np.ndarray, sizes: np.ndarray) -> int:
    """Decoded bytes a window holds: each span its share of its unit's, rounded up."""
    return sum(
        -(-int(unit_bytes[s.shard_index]) * (s.stop - s.start) // int(sizes[s.shard_index]))
        for s in window.spans
        if sizes[s.shard_index]
    )


@settings(max_examples=150, deadline=None)
@given(
    blocks=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=6), min_size=1, max_size=12),
    block_bytes=st.lists(st.integers(0, 900), min_size=72, max_size=72),
    budget=st.integers(1, 3000),
    world_size=st.integers(1, 5),
    num_workers=st.integers(0, 3),
    window=st.integers(1, 8),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
)
def test_blocks_spread_by_shard_in_byte_bounded_windows_keep_exact_splits(
    blocks: list[list[int]],
    block_bytes: list[int],
    budget: int,
    world_size: int,
    num_workers: int,
    window: int,
    seed: int,
    epoch: int,
) -> None:
    """The default block plan: each shard's blocks spread over the epoch, windows bounded in
    bytes. Every id is served as often as over whole shards, ranks get equal counts, and no
    window of two or more pieces passes the budget."""
    sizes = np.array([n for b in blocks for n in b], dtype=np.int64)
    groups = np.repeat(np.arange(len(blocks)), [len(b) for b in blocks])
    unit_bytes = np.array(block_bytes[: len(sizes)], dtype=np.int64)
    total = int(sizes.sum())
    config = PlanConfig(
        seed=seed, shuffle_window=window, shuffle_unit="block", shuffle_bytes=budget
    )
    shard_config = PlanConfig(seed=seed, shuffle_window=window)
    kwargs = {"epoch": epoch, "world_size": world_size, "num_workers": num_workers}
    ids, shard_ids = [], []
    for rank in range(world_size):
        plan = plan_epoch(
            sizes, config=config, rank=rank, unit_bytes=unit_bytes, unit_groups=groups, **kwargs
        )
        again = plan_epoch(
            sizes, config=config, rank=rank, unit_bytes=unit_bytes, unit_groups=groups, **kwargs
        )
        assert np.array_equal(plan.sample_ids(), again.sample_ids())  # deterministic
        assert len(plan.sample_ids()) == (plan.num_carried + total) // world_size
        ids.append(plan.sample_ids())
        for worker in plan.workers:
            for win in worker.windows:
                used = window_bytes(win, unit_bytes, sizes)
                assert len(win.spans) <= window
                assert used <= budget or len(win.spans) == 1
        whole = plan_epoch([sum(b) for b in blocks], config=shard_config, rank=rank, **kwargs)
        shard_ids.append(whole.sample_ids())
    union = np.concatenate(ids)
    served = set(union.tolist()) | set(plan.leftover_ids.tolist())
    assert served == set(range(total))
    assert len(np.unique(union)) >= len(union) - plan.num_carried
    assert len(union) == len(np.concatenate(shard_ids))


def test_a_shards_blocks_are_spread_over_the_epoch() -> None:
    """100 shards of 20 blocks: every tenth of the epoch holds about 2 blocks of each shard,
    and a shard's blocks are not read in their stored order."""
    sizes = np.full(2000, 10, dtype=np.int64)
    groups = np.repeat(np.arange(100), 20)
    plan = plan_epoch(
        sizes,
        config=PlanConfig(shuffle_unit="block", shuffle_window=1),
        epoch=0,
        world_size=1,
        rank=0,
        num_workers=0,
        unit_groups=groups,
    )
    order = [s.shard_index for w in plan.workers[0].windows for s in w.spans]
    assert sorted(order) == list(range(2000))
    for tenth in range(10):
        part = np.array(order[tenth * 200 : (tenth + 1) * 200]) // 20
        assert np.bincount(part, minlength=100).max() <= 3  # 2 expected; 20 if clumped
    in_shard_0 = [u for u in order if u < 20]
    assert in_shard_0 != sorted(in_shard_0)
    # Without groups (as before), the blocks are one uniform permutation: clumps happen.
    plain = plan_epoch(
        sizes,
        config=PlanConfig(shuffle_unit="block", shuffle_window=1),
        epoch=0,
        world_size=1,
        rank=0,
        num_workers=0,
    )
    order = [s.shard_index for w in plain.workers[0].windows for s in w.spans]
    worst = max(
        np.bincount(np.array(order[t * 200 : (t + 1) * 200]) // 20, minlength=100).max()
        for t in range(10)
    )
    assert worst > 3


def test_auto_reads_in_blocks_within_the_byte_budget(blocks_dir: Path, tmp_path: Path) -> None:
    """StreamConfig() picks blocks for a manifest that records their sizes, bounds windows by
    shuffle_bytes, and falls back to whole shards, 4 a window, for one that does not."""
    dataset = ShardDataset(str(blocks_dir))
    spec = dataset.resume_spec()
    table = read_manifest(str(blocks_dir)).shards.block_table()
    assert spec.config.shuffle_unit == "block"
    assert spec.config.shuffle_bytes == 64 << 20
    assert np.array_equal(spec.unit_bytes, table.decoded)
    budget = 3 * int(table.decoded.max())
    small = ShardDataset(str(blocks_dir), config=StreamConfig(shuffle_bytes=budget))
    plan = small.plan(0, 1, 0, 2)
    sizes = table.num_samples
    assert max(len(w.spans) for worker in plan.workers for w in worker.windows) >= 3
    for worker in plan.workers:
        for win in worker.windows:
            assert window_bytes(win, table.decoded, sizes) <= budget
    docs = source_docs()
    samples = list(small)
    assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
    assert all(s["text"] == docs[s["sample_id"]]["text"] for s in samples)
    old = edited_manifest(blocks_dir, tmp_path / "old", lambda s: s["blocks"].pop("decoded"))
    config = ShardDataset(str(old)).resume_spec().config
    assert (config.shuffle_unit, config.shuffle_window, config.shuffle_bytes) == ("shard", 4, None)


def test_a_bad_digest_column_is_refused(blocks_dir: Path, tmp_path: Path) -> None:
    for change in (
        lambda s: s["blocks"]["digest"].__setitem__(0, "XYZ" * 10 + "ab"),
        lambda s: s["blocks"]["digest"].__setitem__(0, 5),
        lambda s: s["blocks"]["digest"].pop(),
        lambda s: s["blocks"]["decoded"].__setitem__(0, -1),
    ):
        out = edited_manifest(blocks_dir, tmp_path / f"bad{id(change)}", change)
        with pytest.raises(ManifestError, match="blocks"):
            read_manifest(str(out))


def _block_reads(dataset: Path) -> list[BlockRead]:
    """Every block of ``dataset``, as reads for `read_verified_blocks`, shards interleaved."""
    manifest = read_manifest(str(dataset))
    table = manifest.shards.block_table()
    paths = [str(dataset / shard.path) for shard in manifest.shards]
    reads = [
        BlockRead(
            paths[int(shard)],
            ReadSpec.for_manifest(manifest, where=paths[int(shard)], num_samples=int(count)),
            int(batch),
            (int(offset), int(length)),
            str(digest),
        )
        for shard, batch, count, offset, length, digest in zip(
            table.shard_index,
            table.batch_index,
            table.num_samples,
            table.offset,
            table.length,
            table.digest,
            strict=True,
        )
    ]
    return reads[::2] + reads[1::2]  # not in file order: a group spans shards


def test_blocks_decoded_in_a_group_are_the_blocks_read_alone(blocks_dir: Path) -> None:
    arrow = get_format("arrow")
    reads = _block_reads(blocks_dir)
    assert len({r.path for r in reads}) > 1
    assert len(reads) > 8
    grouped = arrow.read_verified_blocks(reads)
    for read, columns in zip(reads, grouped, strict=True):
        alone = arrow.read_verified_block(
            read.path, read.spec, read.block_index, read.span, read.digest
        )
        rows = np.arange(alone.num_rows)
        assert columns.num_rows == read.spec.num_samples == alone.num_rows
        assert columns.take(rows) == alone.take(rows)
    assert arrow.read_verified_blocks([]) == []


def test_a_group_with_a_damaged_or_miscounted_block_is_refused(
    blocks_dir: Path, tmp_path: Path
) -> None:
    """The group fails as a whole (the reader then reads its blocks alone, naming the bad one)."""
    reads = _block_reads(blocks_dir)[:6]
    arrow = get_format("arrow")
    miscounted = [*reads[:3], reads[3]._replace(spec=replace(reads[3].spec, num_samples=1))]
    label = rf"{reads[3].spec.where} batch {reads[3].block_index}"
    with pytest.raises(
        ShardError, match=rf"{label}: shard holds \d+ samples but the manifest says 1"
    ):
        arrow.read_verified_blocks(miscounted)
    copy = tmp_path / "set"
    shutil.copytree(blocks_dir, copy)
    victim = reads[4]
    path = copy / Path(victim.path).name
    data = bytearray(path.read_bytes())
    data[victim.span[0] + victim.span[1] // 2] ^= 0x10
    path.write_bytes(bytes(data))
    moved = [r._replace(path=str(copy / Path(r.path).name)) for r in reads]
    with pytest.raises(
        ShardError, match=rf"{victim.spec.where} batch {victim.block_index}: .*digest"
    ):
        arrow.read_verified_blocks(moved)
    # Read through a dataset, the damaged block is named (decoded in groups on decode threads).
    with pytest.raises(ShardError, match=rf"{path} batch {victim.block_index}: .*block digest"):
        list(ShardDataset(str(copy), config=StreamConfig(shuffle_unit="block")))


def test_blocks_are_decoded_in_groups_by_default_in_the_same_order(
    blocks_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrow = type(get_format("arrow"))
    groups: list[int] = []
    original = arrow.read_verified_blocks

    def spy(self: Any, reads: Any) -> Any:
        groups.append(len(reads))
        return original(self, reads)

    monkeypatch.setattr(arrow, "read_verified_blocks", spy)
    config = StreamConfig(shuffle_unit="block", seed=5)
    grouped = [s["sample_id"] for s in ShardDataset(str(blocks_dir), config=config)]
    assert sum(groups) == len(read_manifest(str(blocks_dir)).shards.block_table().num_samples)
    assert max(groups) > 1
    alone = replace(config, decode_threads=0)  # each block decoded in this thread, alone
    groups.clear()
    assert [s["sample_id"] for s in ShardDataset(str(blocks_dir), config=alone)] == grouped
    assert groups == []
    unchecked = replace(config, verify_local=False)  # grouped too, the digests not checked
    assert [s["sample_id"] for s in ShardDataset(str(blocks_dir), config=unchecked)] == grouped
    assert sum(groups) == len(read_manifest(str(blocks_dir)).shards.block_table().num_samples)
    assert sorted(grouped) == list(range(NUM_SAMPLES))


def test_a_decoded_text_block_lets_its_arrow_table_go_once_its_columns_are_lists(
    blocks_dir: Path,
) -> None:
    """So the window's text is not held twice (Arrow buffers and Python strings)."""
    read = _block_reads(blocks_dir)[0]
    columns = get_format("arrow").read_verified_blocks([read])[0]
    rows = np.arange(columns.num_rows)
    first = columns.take(rows[::-1])
    assert columns._table is None  # type: ignore[attr-defined]
    assert columns.take(rows[::-1]) == first
    assert first["text"][-1] == columns.take(rows[:1])["text"][0]


def test_decoded_blocks_are_allocated_by_the_c_allocator(blocks_dir: Path) -> None:
    """Not by Arrow's default pool (mimalloc in the wheels), which keeps pages another thread
    freed: a text pass held 60 MB more at its peak with it."""
    arrow = get_format("arrow")
    reads = _block_reads(blocks_dir)
    system, default = pa.system_memory_pool(), pa.default_memory_pool()
    before, default_before = system.bytes_allocated(), default.bytes_allocated()
    grouped = arrow.read_verified_blocks(reads)
    first = reads[0]
    alone = [
        arrow.read_verified_block(
            first.path, first.spec, first.block_index, first.span, first.digest
        ),
        arrow.read_block(first.path, first.spec, first.block_index),
    ]
    manifest = read_manifest(str(blocks_dir))
    whole = arrow.read_columns(
        first.path, ReadSpec.for_shard(manifest, 0, str(blocks_dir / manifest.shards[0].path))
    )
    decoded = sum(int(e[3]) for entry in manifest.shards.blocks or [] for e in entry)
    held = system.bytes_allocated() - before
    assert held >= decoded  # every block's decompressed columns
    if default is not system and default.backend_name != "system":
        assert default.bytes_allocated() - default_before < decoded // 10
    del grouped, alone, whole
    assert system.bytes_allocated() - before < decoded // 10
