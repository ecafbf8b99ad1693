"""ShardLoader: saving the position without storage, cursors on the wire, and its length."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from shardloader import PackConfig, ShardDataset, ShardLoader, StreamConfig
from shardloader.errors import ConfigError
from shardloader.loader import RESULT_PIPE_BYTES, _CursorCollate, _WireRows
from shardloader.pack import PackedRow, collate_rows
from shardloader.resume import Cursor
from tests.streaming import NUM_SAMPLES, ids_of, serve_dataset


@pytest.mark.s3
def test_state_dict_needs_no_storage(dataset_dir: Path, tmp_path: Path) -> None:
    # The main process never reads shards with workers; saving the position must not read the
    # manifest either: with the server down it would block for the retries, then fail.
    with serve_dataset(dataset_dir) as server:

        def make() -> ShardLoader:
            config = StreamConfig(cache_dir=str(tmp_path / "cache"), retry_deadline_s=10)
            dataset = ShardDataset(
                "s3://data/set", config=config, storage_options=server.storage_options
            )
            return ShardLoader(dataset, batch_size=8, num_workers=2, collate_fn=ids_of)

        loader = make()
        head = []
        for batch in loader:
            head.append(batch)
            if len(head) == 5:
                break
        server.stop()
        try:
            state = json.loads(json.dumps(loader.state_dict()))
            before_end = loader.state_dict()
        finally:
            server.start_again()
        assert state == before_end
        assert sum(map(sum, state["consumed"])) == 40  # not vacuous: a position mid-epoch
        full = [i for b in make() for i in b]
        resumed = make()
        resumed.load_state_dict(state)
        rest = [i for b in resumed for i in b]
        assert [i for b in head for i in b] + rest == full
        assert len(full) == NUM_SAMPLES


def test_state_at_the_epoch_end_needs_no_storage(dataset_dir: Path, tmp_path: Path) -> None:
    # After an epoch the state is the next epoch's start (its carry-in is planned, not read).
    moved = tmp_path / "data"
    shutil.copytree(dataset_dir, moved)
    loader = ShardLoader(ShardDataset(str(moved)), batch_size=8, num_workers=2, collate_fn=ids_of)
    first = [i for b in loader for i in b]
    shutil.rmtree(moved)
    state = loader.state_dict()
    assert state["epoch"] == 1
    assert not any(map(any, state["consumed"]))
    assert len(first) == NUM_SAMPLES


def test_cursor_travels_as_a_plain_tuple(dataset_dir: Path) -> None:
    dataset = ShardDataset(str(dataset_dir))
    collate = _CursorCollate(ids_of, dataset)
    samples = list(zip(range(3), dataset, strict=False))
    [(_, wire)], (worker, stages) = collate([s for _, s in samples])
    assert type(wire) is tuple
    cursor = Cursor._make(wire)
    assert (cursor.epoch, cursor.share, cursor.num_workers, worker) == (0, 0, 0, -1)
    assert len(pickle.dumps(wire)) < 40  # eight small integers, no class reference
    assert stages["collate"] > 0


def test_len_without_packing_is_the_samples_per_rank_in_batches(dataset_dir: Path) -> None:
    dataset = ShardDataset(str(dataset_dir), rank=1, world_size=2)
    loader = ShardLoader(dataset, batch_size=8, collate_fn=ids_of)
    assert len(dataset) == NUM_SAMPLES // 2
    assert len(loader) == -(-(NUM_SAMPLES // 2) // 8)
    assert len(list(loader)) == len(loader)


@pytest.mark.parametrize("seq_len", [32, 256])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_packing_loader_has_no_length_and_torch_never_warns(
    token_dir: Path, seq_len: int, num_workers: int
) -> None:
    # Rows per epoch depend on the documents' lengths: a document count would be a wrong
    # schedule, and torch warns for every batch past it. So there is no length at all.
    dataset = ShardDataset(str(token_dir), pack=PackConfig(seq_len=seq_len))
    loader = ShardLoader(dataset, batch_size=1, num_workers=num_workers)
    with pytest.raises(TypeError, match="no length"):
        len(loader)
    with pytest.raises(TypeError, match="no length"):
        len(dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(loader)
    assert len(batches) != NUM_SAMPLES  # not vacuous: rows and documents differ


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_groups_keep_the_order_and_exact_resume(dataset_dir: Path, drop_last: bool) -> None:
    # Workers send 8 batches per transfer by default; the batches, their order and every
    # saved position must be those of one batch per transfer. Batches of 7 end each worker's
    # share on a short batch, inside a group.
    def make(transfer: int) -> ShardLoader:
        return ShardLoader(
            ShardDataset(str(dataset_dir), config=StreamConfig(seed=3)),
            batch_size=7,
            num_workers=3,
            collate_fn=ids_of,
            drop_last=drop_last,
            transfer_batches=transfer,
        )

    single = list(make(1))
    grouped = list(make(8))
    assert grouped == single
    seen = [i for b in grouped for i in b]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(b) == 7 for b in grouped)
        assert len(seen) < NUM_SAMPLES
    else:
        assert sorted(seen) == list(range(NUM_SAMPLES))
    for stop in (1, 2, 4, 13, 40, len(single) - 1):
        loader = make(8)
        head = []
        for batch in loader:
            head.append(batch)
            if len(head) == stop:
                break
        state = loader.state_dict()
        assert state == _state_after(make(1), stop)
        resumed = make(8)
        resumed.load_state_dict(state)
        assert head + list(resumed) == single, stop


def _state_after(loader: ShardLoader, stop: int) -> dict:
    for n, _ in enumerate(loader, 1):
        if n == stop:
            return loader.state_dict()
    raise AssertionError("the epoch is shorter than the stop")


def test_packed_rows_cross_as_rows_and_collate_in_the_main_process(token_dir: Path) -> None:
    # With workers, a packed batch travels as its rows and is collated on arrival: the
    # same tensors, keys and dtypes as collating in the worker (one worker: the same rows).
    def batches(num_workers: int, transfer: int) -> list[dict]:
        dataset = ShardDataset(str(token_dir), pack=PackConfig(seq_len=64))
        loader = ShardLoader(
            dataset, batch_size=3, num_workers=num_workers, transfer_batches=transfer
        )
        return list(loader)

    here = batches(0, 1)
    assert len(here) > 20
    for there in (batches(1, 1), batches(1, 8)):
        assert len(there) == len(here)
        for a, b in zip(here, there, strict=True):
            _assert_same_batch(a, b)


def test_wired_rows_collate_like_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loss masks, padding, ids that are not one per piece, and a wider upstream dtype.
    rng = np.random.default_rng(0)
    rows = []
    for k, count in enumerate((5, 8, 3, 8)):
        ids = rng.integers(0, 60000, count).astype(np.uint16 if k % 2 else np.int32)
        mask = rng.random(count) < 0.5 if k in (1, 2) else None
        segments = np.array([count - 1, 1] if count > 1 else [count], np.int64)
        rows.append(PackedRow(ids, segments, np.arange(k, k + 3, dtype=np.int64), mask, (k, 1)))
    for config in (PackConfig(seq_len=8), PackConfig(seq_len=8, mode="pad")):
        want = collate_rows(rows, config)
        got = pickle.loads(pickle.dumps(_WireRows(rows, config))).unwire()
        _assert_same_batch(want, got)
    # With pin_memory=True the DataLoader's pinning thread meets the wired rows first.
    from torch.utils.data._utils.pin_memory import pin_memory

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    _assert_same_batch(collate_rows(rows, config), pin_memory(_WireRows(rows, config)))


def _assert_same_batch(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype, key
            assert torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


def test_transfer_batches_must_be_positive(dataset_dir: Path) -> None:
    with pytest.raises(ConfigError, match="transfer_batches"):
        ShardLoader(ShardDataset(str(dataset_dir)), batch_size=2, transfer_batches=0)


def test_workers_send_through_a_widened_pipe_and_every_sample_arrives(dataset_dir: Path) -> None:
    # At Linux's default 64 KiB a worker waited for the main process to read each 64 KiB of its
    # batches (2 workers, tokens: 0.57 -> 0.45 s an epoch at 256 KiB).
    import fcntl

    loader = ShardLoader(
        ShardDataset(str(dataset_dir)), batch_size=5, num_workers=2, collate_fn=ids_of
    )
    iterator = loader._get_iterator()
    try:
        pipe = iterator._worker_result_queue._reader.fileno()
        assert fcntl.fcntl(pipe, 1032) == RESULT_PIPE_BYTES  # F_GETPIPE_SZ
    finally:
        del iterator
    ids = [i for batch in loader for i in batch]
    assert sorted(ids) == list(range(NUM_SAMPLES))


def test_batches_without_tensors_cross_as_they_are() -> None:
    # Only batches that hold wired tensors are walked again in the main process: a batch of
    # texts is not (walking its strings cost 0.07 s an epoch of 300 MB).
    from shardloader.loader import _from_wire, _to_wire, _Wired

    texts = {"text": ["a", "b"], "n": 2, "ids": [1, 2]}
    assert _to_wire(texts) is texts
    assert _from_wire(texts) is texts
    batch = {"input_ids": torch.arange(6).view(2, 3), "text": ["a", "b"]}
    wired = pickle.loads(pickle.dumps(_to_wire(batch)))  # as it crosses the pipe
    assert isinstance(wired, _Wired)
    back = _from_wire(wired)
    assert back["text"] == ["a", "b"]
    assert back["input_ids"].dtype == torch.int64
    assert torch.equal(back["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(
    ("low", "high", "wire_dtype"),
    [
        (-100, 32767, np.int16),  # labels with the ignore index
        (0, 50256, np.uint16),  # GPT-2's vocabulary: two bytes, not four
        (0, 65535, np.uint16),
        (-1, 40000, np.int32),
        (0, 65536, np.int32),
        (0, 2**31, np.int64),
    ],
)
def test_int64_tensors_cross_in_the_narrowest_type_and_arrive_as_they_were(
    low: int, high: int, wire_dtype: type
) -> None:
    from shardloader.loader import _from_wire, _to_wire

    values = torch.tensor([low, high, (low + high) // 2, high - 1], dtype=torch.int64)
    wired = _to_wire({"input_ids": values})
    assert wired.data["input_ids"].array.dtype == wire_dtype
    back = _from_wire(pickle.loads(pickle.dumps(wired)))["input_ids"]
    assert back.dtype == torch.int64
    assert torch.equal(back, values)


class _MarkFirstBatch:
    """A collate (run in the workers) that leaves a file behind once a batch is made."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, batch: list[dict]) -> list[int]:
        self.path.touch()
        return ids_of(batch)


def _wait_for(path: Path, seconds: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_iter_starts_the_workers_before_the_first_batch_is_asked_for(
    dataset_dir: Path, tmp_path: Path
) -> None:
    # As with a DataLoader, iter() starts the epoch: a training loop that calls it before
    # building its model has its first batches read meanwhile (first step's data wait with a
    # 'small' model: 0.04-0.05 s -> 0.002 s).
    mark = tmp_path / "made"
    loader = ShardLoader(
        ShardDataset(str(dataset_dir)),
        batch_size=5,
        num_workers=2,
        collate_fn=_MarkFirstBatch(mark),
    )
    it = iter(loader)
    assert _wait_for(mark), "no worker made a batch before the first next()"
    ids = [i for batch in it for i in batch]
    assert sorted(ids) == list(range(NUM_SAMPLES))
    # The next epoch starts at its own iter(), with the loader's state of the epoch before.
    mark.unlink()
    it = iter(loader)
    assert _wait_for(mark)
    assert loader.shard_dataset.epoch == 1
    assert sorted(i for batch in it for i in batch) == list(range(NUM_SAMPLES))
