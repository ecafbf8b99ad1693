"""ShardDataset and ShardLoader in one process (ranks given explicitly) and with real workers."""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shardloader import (
    PackConfig,
    ResumeError,
    ShardDataset,
    ShardLoader,
    StreamConfig,
    TextTokenizer,
    merge_states,
    read_manifest,
)
from shardloader.world import WorldInfo
from tests.conftest import ROOT
from tests.streaming import NUM_SAMPLES, SHARD_SIZES, ids_of, source_docs


@pytest.fixture(params=["shard", "block"])
def stream(request: pytest.FixtureRequest) -> tuple[Path, StreamConfig]:
    """A dataset and the config to read it with: shards as units, or blocks (many per shard)."""
    if request.param == "shard":
        return request.getfixturevalue("dataset_dir"), StreamConfig()
    path = request.getfixturevalue("blocks_dir")
    blocks = read_manifest(str(path)).shards.block_table()
    assert blocks.num_blocks > 10 * len(SHARD_SIZES)  # not a vacuous pass: many blocks per shard
    return path, StreamConfig(shuffle_unit="block", shuffle_window=6)


def read_ids(
    dataset: ShardDataset, *, num_workers: int = 0, batch_size: int = 8, **kwargs: Any
) -> list[int]:
    loader = ShardLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=ids_of, **kwargs
    )
    return [i for batch in loader for i in batch]


@pytest.mark.parametrize("unit", ["shard", "block"])
@pytest.mark.parametrize("fixture", ["dataset_dir", "tar_dir", "blocks_dir"])
def test_one_process_reads_every_sample_once_with_its_content(
    fixture: str, unit: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(fixture)
    docs = source_docs()
    config = StreamConfig(seed=3, shuffle_unit=unit)
    samples = list(ShardDataset(str(path), config=config))
    assert sorted(s["sample_id"] for s in samples) == list(range(NUM_SAMPLES))
    for sample in samples:
        doc = docs[sample["sample_id"]]
        assert sample["id"] == doc["id"]
        assert sample["text"] == doc["text"]
        assert sample["score"] == doc["score"]
        assert sample["lang"] == doc["lang"]
        assert set(sample) == {"id", "sample_id", "text", "score", "lang"}


def test_tokenized_samples_are_the_tokenizer_output(token_dir: Path, tokenizer_dir: Path) -> None:
    tokenizer = TextTokenizer(str(tokenizer_dir))
    docs = source_docs()
    samples = list(ShardDataset(str(token_dir)))
    assert len(samples) == NUM_SAMPLES
    for sample in samples[:50]:
        expected = tokenizer.encode_batch([docs[sample["sample_id"]]["text"]])[0]
        assert sample["input_ids"].dtype == np.uint16
        assert sample["input_ids"].tolist() == expected.tolist()
        assert expected[-1] == tokenizer.eos_id


def test_order_depends_on_seed_and_epoch_only(dataset_dir: Path) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        dataset = ShardDataset(str(dataset_dir), config=StreamConfig(seed=seed))
        dataset.set_epoch(epoch)
        return [s["sample_id"] for s in dataset]

    first = order(0, 0)
    assert order(0, 0) == first
    assert order(0, 1) != first
    assert order(1, 0) != first
    assert sorted(order(0, 1)) == sorted(first) == list(range(NUM_SAMPLES))
    unshuffled = ShardDataset(str(dataset_dir), config=StreamConfig(shuffle=False))
    assert [s["sample_id"] for s in unshuffled] == list(range(NUM_SAMPLES))
    # The shuffle mixes shards: few consecutive samples come from the same shard.
    bounds = np.cumsum(SHARD_SIZES)
    shard = np.searchsorted(bounds, first, side="right")
    assert (shard[1:] == shard[:-1]).mean() < 0.6


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_ranks_split_exactly_with_workers(
    stream: tuple[Path, StreamConfig], world_size: int, num_workers: int
) -> None:
    path, config = stream
    per_rank = []
    for rank in range(world_size):
        dataset = ShardDataset(str(path), config=config, rank=rank, world_size=world_size)
        per_rank.append(read_ids(dataset, num_workers=num_workers, batch_size=7))
        assert len(dataset) == len(per_rank[-1])
    counts = {len(ids) for ids in per_rank}
    assert counts == {NUM_SAMPLES // world_size}
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union))
    assert NUM_SAMPLES - len(union) == NUM_SAMPLES % world_size


def test_pad_policy_fills_ranks_with_marked_repeats(stream: tuple[Path, StreamConfig]) -> None:
    path, config = stream
    config = dataclasses.replace(config, policy="pad")
    samples = []
    for rank in range(4):
        ranked = list(ShardDataset(str(path), config=config, rank=rank, world_size=4))
        assert len(ranked) == -(-NUM_SAMPLES // 4)
        samples += ranked
    real = [s["sample_id"] for s in samples if not s["is_padding"]]
    padding = [s["sample_id"] for s in samples if s["is_padding"]]
    assert sorted(real) == list(range(NUM_SAMPLES))
    assert len(padding) == 4 * -(-NUM_SAMPLES // 4) - NUM_SAMPLES


def test_drop_policy_serves_every_sample_once_per_epoch_over_epochs(
    stream: tuple[Path, StreamConfig],
) -> None:
    path, config = stream
    world_size, epochs = 4, 3
    seen: collections.Counter[int] = collections.Counter()
    loaders = [
        ShardLoader(
            ShardDataset(str(path), config=config, rank=r, world_size=world_size),
            batch_size=10,
            collate_fn=ids_of,
        )
        for r in range(world_size)
    ]
    for _ in range(epochs):  # no set_epoch: the loader moves to the next epoch itself
        counts = set()
        for loader in loaders:
            ids = [i for batch in loader for i in batch]
            counts.add(len(ids))
            seen.update(ids)
        assert len(counts) == 1
    leftover = loaders[0].state_dict()["carry_in"]
    assert len(leftover) == (epochs * NUM_SAMPLES) % world_size
    assert loaders[0].state_dict()["epoch"] == epochs
    for sample_id in range(NUM_SAMPLES):
        assert seen[sample_id] + leftover.count(sample_id) == epochs


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_reaches_persistent_workers(dataset_dir: Path, context: str) -> None:
    dataset = ShardDataset(str(dataset_dir), config=StreamConfig(seed=5))
    loader = ShardLoader(
        dataset,
        batch_size=16,
        num_workers=2,
        collate_fn=ids_of,
        persistent_workers=True,
        multiprocessing_context=context,
    )
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append([i for batch in loader for i in batch])
    assert orders[0] == orders[2]
    assert orders[0] != orders[1]
    assert sorted(orders[1]) == sorted(orders[0]) == list(range(NUM_SAMPLES))


def test_transform_runs_in_workers(dataset_dir: Path) -> None:
    dataset = ShardDataset(str(dataset_dir), transform=_text_length)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    docs = source_docs()
    got = dict(iter(loader))
    assert got == {i: len(d["text"]) for i, d in enumerate(docs)}


def _text_length(sample: dict[str, Any]) -> tuple[int, int]:
    return sample["sample_id"], len(sample["text"])


def run_with_break(
    dataset_dir: Path,
    *,
    stop_after: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    config: StreamConfig | None = None,
    **kwargs: Any,
) -> tuple[list[list[int]], dict[str, Any]]:
    dataset = ShardDataset(str(dataset_dir), config=config, rank=rank, world_size=world_size)
    loader = ShardLoader(
        dataset, batch_size=6, num_workers=num_workers, collate_fn=ids_of, **kwargs
    )
    batches: list[list[int]] = []
    state: dict[str, Any] = loader.state_dict()
    for batch in loader:
        if len(batches) == stop_after:
            break
        batches.append(batch)
        state = loader.state_dict()
    return batches, json.loads(json.dumps(state))


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("stop_after", [0, 1, 5, 23])
def test_resume_gives_the_same_remaining_batches(
    stream: tuple[Path, StreamConfig], num_workers: int, stop_after: int
) -> None:
    dataset_dir, config = stream
    full, _ = run_with_break(dataset_dir, stop_after=-1, num_workers=num_workers, config=config)
    head, state = (
        run_with_break(
            dataset_dir,
            stop_after=stop_after,
            num_workers=num_workers,
            config=config,
            prefetch_factor=4,
        )
        if num_workers
        else run_with_break(dataset_dir, stop_after=stop_after, num_workers=0, config=config)
    )
    assert head == full[:stop_after]
    dataset = ShardDataset(str(dataset_dir), config=config)
    loader = ShardLoader(dataset, batch_size=6, num_workers=num_workers, collate_fn=ids_of)
    loader.load_state_dict(state)
    assert list(loader) == full[stop_after:]


def test_resume_twice_and_across_the_epoch_end(dataset_dir: Path) -> None:
    full, _ = run_with_break(dataset_dir, stop_after=-1, num_workers=2)
    dataset = ShardDataset(str(dataset_dir))
    loader = ShardLoader(dataset, batch_size=6, num_workers=2, collate_fn=ids_of)
    _, state = run_with_break(dataset_dir, stop_after=10, num_workers=2)
    loader.load_state_dict(state)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 30:
            state = loader.state_dict()
            break
    again = ShardLoader(
        ShardDataset(str(dataset_dir)), batch_size=6, num_workers=2, collate_fn=ids_of
    )
    again.load_state_dict(state)
    rest = list(again)
    assert full[10:] == got + rest
    # The epoch ended: the state now points at the next epoch's start.
    after = again.state_dict()
    assert after["epoch"] == 1
    assert not any(map(any, after["consumed"]))
    second = ShardLoader(ShardDataset(str(dataset_dir)), batch_size=6, collate_fn=ids_of)
    second.load_state_dict(after)
    reference = ShardDataset(str(dataset_dir))
    reference.set_epoch(1)
    assert [i for b in second for i in b] == read_ids(reference, batch_size=6)


def test_resume_in_a_fresh_process(dataset_dir: Path, tmp_path: Path) -> None:
    full, _ = run_with_break(dataset_dir, stop_after=-1, num_workers=2)
    _, state = run_with_break(dataset_dir, stop_after=7, num_workers=2, prefetch_factor=8)
    (tmp_path / "state.json").write_text(json.dumps(state))
    code = f"""
import json, sys
from shardloader import ShardDataset, ShardLoader
from tests.streaming import ids_of
loader = ShardLoader(ShardDataset({str(dataset_dir)!r}), batch_size=6, num_workers=2,
                     collate_fn=ids_of)
loader.load_state_dict(json.load(open({str(tmp_path / "state.json")!r})))
print(json.dumps(list(loader)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == full[7:]


@pytest.mark.parametrize(("old", "new"), [((2, 2), (3, 1)), ((3, 1), (2, 3)), ((4, 3), (1, 0))])
def test_elastic_resume_loses_and_repeats_nothing(
    stream: tuple[Path, StreamConfig], old: tuple[int, int], new: tuple[int, int]
) -> None:
    dataset_dir, config = stream
    old_world, old_workers = old
    consumed: list[int] = []
    states = []
    for rank in range(old_world):
        batches, state = run_with_break(
            dataset_dir,
            stop_after=9,
            num_workers=old_workers,
            rank=rank,
            world_size=old_world,
            config=config,
        )
        consumed += [i for b in batches for i in b]
        states.append(state)
    partial = ShardDataset(str(dataset_dir), config=config, rank=0, world_size=new[0])
    partial.load_state_dict(states[0])
    with pytest.raises(ResumeError, match="merge the states of all ranks"):
        list(partial)
    merged = merge_states(states).to_dict()
    new_world, new_workers = new
    rest = []
    for rank in range(new_world):
        loader = ShardLoader(
            ShardDataset(str(dataset_dir), config=config, rank=rank, world_size=new_world),
            batch_size=5,
            num_workers=new_workers,
            collate_fn=ids_of,
        )
        loader.load_state_dict(merged)
        rest.append([i for b in loader for i in b])
    assert len({len(r) for r in rest}) == 1
    served = consumed + [i for r in rest for i in r]
    assert len(served) == len(set(served))
    # Left out: what no division by the old and the new world size could place.
    assert NUM_SAMPLES - len(served) <= (old_world - 1) + (new_world - 1)


def test_state_from_another_dataset_or_config_is_refused(dataset_dir: Path, tar_dir: Path) -> None:
    _, state = run_with_break(dataset_dir, stop_after=3, num_workers=0)
    other = ShardDataset(str(tar_dir))  # same documents, other shard bytes
    with pytest.raises(ResumeError, match="saved for dataset"):
        other.load_state_dict(state)
    reseeded = ShardDataset(str(dataset_dir), config=StreamConfig(seed=9))
    with pytest.raises(ResumeError, match="seed, shuffle"):
        reseeded.load_state_dict(state)
    with pytest.raises(ResumeError, match="not a shardloader loader state"):
        reseeded.load_state_dict({"epoch": 3})
    # A state of whole-shard units does not resume over blocks, nor the other way round; the
    # default ("auto": blocks, as this manifest records their sizes) takes the state's unit.
    assert state["config"]["shuffle_unit"] == "block"
    sharded = ShardDataset(str(dataset_dir), config=StreamConfig(shuffle_unit="shard"))
    with pytest.raises(ResumeError, match="shuffle_unit='block'"):
        sharded.load_state_dict(state)
    _, shard_state = run_with_break(
        dataset_dir, stop_after=3, num_workers=0, config=StreamConfig(shuffle_unit="shard")
    )
    blocked = ShardDataset(str(dataset_dir), config=StreamConfig(shuffle_unit="block"))
    with pytest.raises(ResumeError, match="shuffle_unit='shard'"):
        blocked.load_state_dict(shard_state)
    adopting = ShardDataset(str(dataset_dir))
    adopting.load_state_dict(shard_state)
    assert adopting.resume_spec().config.shuffle_unit == "shard"


def test_stateful_dataloader_from_torchdata_resumes_exactly(dataset_dir: Path) -> None:
    from torchdata import stateful_dataloader as stateful  # the dev extra installs it

    def make() -> Any:
        return stateful.StatefulDataLoader(
            ShardDataset(str(dataset_dir)), batch_size=6, num_workers=2, collate_fn=ids_of
        )

    full = list(make())
    loader = make()
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == 11:
            break
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


def _init_worker(worker_id: int) -> None:
    torch.manual_seed(worker_id)


@pytest.mark.parametrize("drop_last", [False, True])
def test_plain_dataloader_with_every_knob_splits_exactly(
    dataset_dir: Path, drop_last: bool
) -> None:
    per_rank = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            ShardDataset(str(dataset_dir), rank=rank, world_size=2),
            batch_size=8,
            num_workers=2,
            collate_fn=ids_of,
            pin_memory=False,
            prefetch_factor=3,
            persistent_workers=True,
            timeout=60,
            worker_init_fn=_init_worker,
            drop_last=drop_last,
        )
        per_rank.append([i for batch in loader for i in batch])
        again = [i for batch in loader for i in batch]  # persistent workers, second pass
        assert again == per_rank[-1]
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union))
    if drop_last:  # each worker drops its last partial batch: fewer than 2 x 8 per rank
        assert all(NUM_SAMPLES // 2 - 16 < len(ids) <= NUM_SAMPLES // 2 for ids in per_rank)
    else:
        assert [len(ids) for ids in per_rank] == [NUM_SAMPLES // 2] * 2


def test_default_collate_batches_tokens_and_ids(token_dir: Path) -> None:
    loader = ShardLoader(
        ShardDataset(str(token_dir), transform=_first_tokens), batch_size=16, num_workers=1
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (16, 2)
    assert batch["sample_id"].dtype == torch.int64
    assert len(batch["id"]) == 16


def _first_tokens(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "input_ids": sample["input_ids"][:2].astype(np.int64)}


@pytest.mark.parametrize("num_workers", [1, 2])
def test_packed_ranks_that_consumed_unequal_counts_resume_exactly_from_a_merged_state(
    token_dir: Path, num_workers: int
) -> None:
    # Rows hold different numbers of documents, so after the same number of batches the ranks
    # have consumed different counts. The merged (all-rank) state must still resume each rank
    # exactly on the same topology, not split the rest anew.
    pack = PackConfig(seq_len=64)

    def make(rank: int) -> ShardLoader:
        dataset = ShardDataset(str(token_dir), pack=pack, rank=rank, world_size=2)
        return ShardLoader(dataset, batch_size=4, num_workers=num_workers)

    states, full = [], []
    for rank in range(2):
        full.append([b["sample_ids"].tolist() for b in make(rank)])
        loader = make(rank)
        for _, _ in zip(range(5), loader, strict=False):
            pass
        states.append(loader.state_dict())
    merged = merge_states(states).to_dict()
    assert len({tuple(row) for row in merged["consumed"]}) == 2  # unequal: not vacuous
    for rank in range(2):
        resumed = make(rank)
        resumed.load_state_dict(json.loads(json.dumps(merged)))
        assert [b["sample_ids"].tolist() for b in resumed] == full[rank][5:]


@pytest.mark.parametrize("mode", ["concat", "bfd"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_packed_rows_resume_exactly_to_the_token(
    token_dir: Path, mode: str, num_workers: int
) -> None:
    pack = PackConfig(seq_len=64, mode=mode, buffer_size=32)

    def make() -> ShardLoader:
        dataset = ShardDataset(str(token_dir), pack=pack)
        return ShardLoader(dataset, batch_size=4, num_workers=num_workers)

    full = [b["input_ids"] for b in make()]
    assert all(b.shape[1] == 64 for b in full)
    loader = make()
    head = []
    for batch in loader:
        head.append(batch["input_ids"])
        if len(head) == 9:
            state = json.loads(json.dumps(loader.state_dict()))
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(head) + len(rest) == len(full)
    for got, want in zip(head + rest, full, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ResumeError, match="packing"):
        ShardDataset(str(token_dir), pack=PackConfig(seq_len=32)).load_state_dict(state)


def test_packing_text_shards_matches_tokenized_shards(
    dataset_dir: Path, token_dir: Path, tokenizer_dir: Path
) -> None:
    pack = PackConfig(seq_len=128)
    from_text = ShardLoader(
        ShardDataset(str(dataset_dir), pack=pack, tokenizer=str(tokenizer_dir)), batch_size=8
    )
    from_tokens = ShardLoader(ShardDataset(str(token_dir), pack=pack), batch_size=8)
    for a, b in zip(from_text, from_tokens, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["position_ids"], b["position_ids"])


@pytest.mark.parametrize(("num_workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_stage_counters_grow_and_survive_worker_restarts(
    token_dir: Path, num_workers: int, persistent: bool
) -> None:
    dataset = ShardDataset(str(token_dir), pack=PackConfig(seq_len=64))
    loader = ShardLoader(
        dataset, batch_size=4, num_workers=num_workers, persistent_workers=persistent
    )
    assert set(loader.stage_seconds().values()) == {0.0}
    batches = sum(1 for _ in loader)
    first = loader.stage_seconds()
    assert batches > 0
    assert first["decode"] > 0
    assert first["pack"] > 0
    assert first["collate"] > 0
    assert sum(1 for _ in loader) > 0  # the next epoch: new workers unless persistent
    second = loader.stage_seconds()
    assert all(second[name] >= first[name] for name in first)
    assert second["decode"] > first["decode"]  # the second epoch decoded its shards again


def test_reading_never_imports_pandas(dataset_dir: Path, token_dir: Path, tmp_path: Path) -> None:
    """pyarrow's ``to_numpy`` can take its pandas path, which imports pandas where it is
    installed: 0.13 s in every DataLoader worker's first batch. A stand-in ``pandas`` that
    leaves a mark when imported must stay unmarked through text, token and packed reads."""
    fake = tmp_path / "fake" / "pandas"
    fake.mkdir(parents=True)
    mark = tmp_path / "imported"
    fake.joinpath("__init__.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nraise ImportError('stand-in pandas')\n"
    )
    code = f"""
import sys
sys.path.insert(0, {str(fake.parent)!r})
from shardloader import PackConfig, ShardDataset, ShardLoader
text = sum(1 for _ in ShardDataset({str(dataset_dir)!r}))
tokens = sum(1 for _ in ShardDataset({str(token_dir)!r}))
packed = ShardDataset({str(token_dir)!r}, pack=PackConfig(seq_len=64))
rows = sum(b["input_ids"].shape[0] for b in ShardLoader(packed, batch_size=4, num_workers=1))
print(text, tokens, rows > 0)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split() == [str(NUM_SAMPLES), str(NUM_SAMPLES), "True"], out.stdout
    assert not mark.exists(), "reading shards imported pandas"


def _mixed_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors of every kind a collate might make, from the samples' ids."""
    ids = torch.tensor([s["sample_id"] for s in samples], dtype=torch.int64)
    return {
        "small": ids,  # int64 that fits in 16 bits
        "big": ids * (1 << 40) - 7,  # int64 that needs all 64
        "negative": -ids - 100,
        "float": ids.to(torch.float32) / 3,
        "half": ids.to(torch.float16),
        "bf16": ids.to(torch.bfloat16),  # numpy has no bfloat16: goes as a tensor
        "flags": ids % 2 == 0,
        "empty": torch.zeros(0, dtype=torch.int64),
        "nested": [ids[:1], (ids.to(torch.int32), "text")],
        "view": torch.arange(100)[10:20:3],
        "count": len(samples),
    }


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_worker_batches_arrive_as_the_collate_made_them(dataset_dir: Path) -> None:
    """Workers send small tensors by value (narrowed int64): dtypes and values must survive."""

    dataset = ShardDataset(str(dataset_dir), config=StreamConfig(seed=1))
    loader = ShardLoader(dataset, batch_size=16, num_workers=2, collate_fn=_mixed_batch)
    seen = []
    for batch in loader:
        ids = batch["small"].tolist()
        seen += ids
        _assert_same(batch, _mixed_batch([{"sample_id": i} for i in ids]))
    assert sorted(seen) == list(range(NUM_SAMPLES))


def test_pinning_thread_turns_wired_arrays_into_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """With pin_memory=True the DataLoader's pinning thread meets the wire format first."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from shardloader.loader import _to_wire

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    batch = {"input_ids": torch.arange(6, dtype=torch.int64).view(2, 3), "n": 2}
    pinned = pin_memory(_to_wire(batch))
    _assert_same(pinned, batch)


@pytest.fixture(scope="module")
def token_blocks_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The token dataset in record batches of about 2 KB (many blocks per shard)."""
    from tests.streaming import make_dataset

    root = tmp_path_factory.mktemp("stream-tok-blocks")
    return make_dataset(root, tokenizer=str(tokenizer_dir), batch_bytes=2000)


@pytest.fixture(scope="module")
def token_tar_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    from tests.streaming import make_dataset

    root = tmp_path_factory.mktemp("stream-tok-tar")
    return make_dataset(root, tokenizer=str(tokenizer_dir), fmt="tar")


def _same(sample: dict[str, Any]) -> dict[str, Any]:
    return sample  # a transform: the dataset then packs sample by sample


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    ("seq_len", "unit"), [(64, "block"), (1000, "block"), (64, "shard"), (64, "tar")]
)
def test_packing_runs_of_token_documents_gives_the_rows_of_packing_samples(
    token_blocks_dir: Path, token_tar_dir: Path, seq_len: int, unit: str, drop_last: bool
) -> None:
    # ShardDataset packs token shards from runs of flat arrays (no dict per sample) unless a
    # transform or tokenizer needs samples: both must give the same rows, cursors included.
    pack = PackConfig(seq_len=seq_len, drop_last=drop_last)
    root = token_tar_dir if unit == "tar" else token_blocks_dir
    config = StreamConfig(seed=3, shuffle_unit="auto" if unit == "tar" else unit)

    def rows(transform: Any) -> list[tuple[Any, ...]]:
        dataset = ShardDataset(
            str(root),
            pack=pack,
            config=config,
            world_size=2,
            rank=1,
            transform=transform,
        )
        assert dataset._packs_runs() is (transform is None)
        return [
            (r.input_ids.tolist(), r.segment_lengths.tolist(), r.sample_ids.tolist(), r.cursor)
            for r in dataset
        ]

    fast, slow = rows(None), rows(_same)
    assert len(fast) > 10
    assert fast == slow


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shardloader-decode")]


@pytest.mark.parametrize("threads", [0, 3])
def test_decode_threads_change_who_decodes_not_what_is_read(blocks_dir: Path, threads: int) -> None:
    def read(decode_threads: int) -> list[tuple[int, str]]:
        config = StreamConfig(seed=5, shuffle_unit="block", decode_threads=decode_threads)
        dataset = ShardDataset(str(blocks_dir), config=config, world_size=2, rank=0)
        return [(s["sample_id"], s["text"]) for s in dataset]

    default = read(1)
    assert len(default) > 100
    assert read(threads) == default
    assert _decode_threads() == []  # the pool ends with the epoch

    # Stopping mid-epoch stops the decode threads and unpins every shard.
    config = StreamConfig(seed=5, shuffle_unit="block", decode_threads=threads or 1)
    dataset = ShardDataset(str(blocks_dir), config=config)
    samples = iter(dataset)
    assert next(samples)["sample_id"] >= 0
    samples.close()  # type: ignore[attr-defined]
    assert _decode_threads() == []


@pytest.mark.parametrize(("cpus", "workers", "want"), [(4, 0, 2), (4, 2, 2), (2, 2, 0), (1, 0, 0)])
def test_workers_on_every_core_decode_blocks_without_threads(
    blocks_dir: Path, monkeypatch: pytest.MonkeyPatch, cpus: int, workers: int, want: int
) -> None:
    # Decode threads only compete with DataLoader workers that already fill the cores.
    import shardloader.reader as reader

    monkeypatch.setattr(reader.os, "cpu_count", lambda: cpus)
    dataset = ShardDataset(str(blocks_dir), config=StreamConfig(shuffle_unit="block"))
    monkeypatch.setattr(dataset, "world", lambda: WorldInfo(worker_id=0, num_workers=workers))
    samples = iter(dataset)
    next(samples)
    assert dataset._reader is not None
    assert dataset._reader._decode_threads == want
    samples.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_iterator_held_until_the_interpreter_exits_closes_quietly(
    dataset_dir: Path, num_workers: int
) -> None:
    # A script that keeps `it` in a global: it is closed while module globals are torn down.
    code = f"""
from shardloader import ShardDataset, ShardLoader
loader = ShardLoader(ShardDataset({str(dataset_dir)!r}), batch_size=6,
                     num_workers={num_workers}, collate_fn=len)
it = iter(loader)
print(next(it))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6"
    assert "Exception ignored" not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
