"""ShardLoader: saving the position without storage, cursors on the wire, and its length."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest

from shardloader import PackConfig, ShardDataset, ShardLoader, StreamConfig
from shardloader.loader import _CursorCollate
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
    _, wire, (worker, stages) = collate([s for _, s in samples])
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
