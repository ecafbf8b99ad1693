"""`ShardLoader`: a torch ``DataLoader`` that knows which samples the training loop consumed.

Each DataLoader worker reads ahead (``prefetch_factor`` batches), so the position of a worker's
dataset copy is not what training has seen. `ShardLoader` wraps ``collate_fn`` so that every
batch leaves its worker together with that worker's cursor, taken right after the batch's last
sample was read (`ShardDataset.cursor`); the main process records a cursor only when it hands
the batch to the loop. `state_dict` is therefore exact with any ``num_workers``,
``prefetch_factor``, ``pin_memory`` or ``persistent_workers``, and costs a tuple of ints per
batch. When an epoch ends the loader moves its dataset to the next epoch (so ``set_epoch`` is
optional) and the state to the start of that epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch.utils.data import default_collate, default_convert

from shardloader.dataset import ShardDataset
from shardloader.errors import ConfigError
from shardloader.pack import PackConfig, PackedRow, collate_rows
from shardloader.resume import Cursor, next_epoch_state, state_from_cursors
from shardloader.state import LoaderState, merge_states

log = logging.getLogger(__name__)

# A cursor crosses from a worker as a plain tuple (no class reference pickled per batch).
WireCursor = tuple[int, int, int, int, int, int, bool, int]

# Tensors up to this size leave a worker by value (pickled numpy arrays through the pipe), bigger
# ones through torch's shared memory.
WIRE_MAX_BYTES = 16 << 20


class _Wire:
    """A CPU tensor on its way from a worker, as a numpy array that pickles by value.

    torch sends a tensor from a worker as shared memory plus a file descriptor, and the main
    process fetches each descriptor over a socket: about 0.3 ms per tensor, which made token
    batches of 64 documents 2x slower with 2 workers than with none. Copying a batch of a few
    hundred KB through the pipe costs less. ``pin_memory`` is what the DataLoader's pinning
    thread calls, so pinned batches are made in that thread as before. int64 arrays travel in
    the narrowest integer type that holds their values (token ids, labels and positions fit in 16
    or 32 bits) and are widened on arrival: a quarter of the bytes to copy.
    """

    __slots__ = ("array", "dtype")

    def __init__(self, array: np.ndarray) -> None:
        self.dtype = array.dtype
        if array.dtype == np.int64 and array.size:
            low, high = int(array.min()), int(array.max())
            for narrow in (np.int16, np.int32):
                info = np.iinfo(narrow)
                if info.min <= low and high <= info.max:
                    array = array.astype(narrow)
                    break
        self.array = array

    def unwire(self) -> torch.Tensor:
        array = self.array
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        return torch.from_numpy(array)

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        return self.unwire().pin_memory()


def _map_batch(data: Any, leaf: Callable[[Any], Any]) -> Any:
    """``data`` with ``leaf`` applied to everything inside its dicts, lists and tuples."""
    if type(data) is dict:
        return {key: _map_batch(value, leaf) for key, value in data.items()}
    if type(data) in (list, tuple):
        return type(data)(_map_batch(value, leaf) for value in data)
    return leaf(data)


def _wire_leaf(data: Any) -> Any:
    if (
        isinstance(data, torch.Tensor)
        and data.device.type == "cpu"
        and data.layout == torch.strided
        and not data.requires_grad
        and data.dtype in _NUMPY_DTYPES
        and data.element_size() * data.numel() <= WIRE_MAX_BYTES
    ):
        return _Wire(data.numpy())
    return data


def _to_wire(data: Any) -> Any:
    """``data`` with every small CPU tensor (in dicts, lists and tuples) as a `_Wire`."""
    return _map_batch(data, _wire_leaf)


def _from_wire(data: Any) -> Any:
    """Undo `_to_wire` (what the pinning thread has not already turned into tensors)."""
    return _map_batch(data, lambda leaf: leaf.unwire() if isinstance(leaf, _Wire) else leaf)


_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    }
)  # (torch's uint16/32/64 convert to numpy only in recent releases: they keep torch's path)


@dataclass(frozen=True)
class LoaderMark:
    """What a `ShardLoader`'s training loop had consumed at one moment of an epoch (`mark`).

    A few tuples. Training loops that fetch ahead of the step they run (Lightning fetches one
    batch ahead) take a mark before each fetch and save `ShardLoader.state_dict` ``at`` the mark
    of the last batch they trained.

    Attributes:
        epoch: The epoch being read.
        cursors: The latest cursor of each worker share that delivered a batch.
        last_share: The share whose batch came last.
    """

    epoch: int
    cursors: tuple[Cursor, ...]
    last_share: int | None


class _CursorCollate:
    """Collates as the user asked, then attaches the worker's cursor and stage counters."""

    def __init__(self, collate: Callable[[Any], Any], dataset: ShardDataset) -> None:
        self.collate = collate
        self.dataset = dataset

    def __call__(self, samples: Any) -> tuple[Any, WireCursor, tuple[int, dict[str, float]]]:
        started = time.perf_counter()
        batch = self.collate(samples)
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        assert isinstance(dataset, ShardDataset)
        dataset.count_stage("collate", time.perf_counter() - started)
        worker = info.id if info is not None else -1
        if info is not None:
            batch = _to_wire(batch)
        return batch, (*dataset.cursor(),), (worker, dataset.stage_seconds())


class _RowCollate:
    """`shardloader.pack.collate_rows` with the dataset's packing settings."""

    def __init__(self, config: PackConfig) -> None:
        self.config = config

    def __call__(self, rows: list[PackedRow]) -> dict[str, Any]:
        return collate_rows(rows, self.config)


class ShardLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` over a `ShardDataset` with an exact ``state_dict`` / ``load_state_dict``.

    Takes every ``DataLoader`` argument (``batch_size``, ``num_workers``, ``collate_fn``,
    ``pin_memory``, ``prefetch_factor``, ``persistent_workers``, ``timeout``, ``drop_last``...).
    Batches are what ``collate_fn`` makes, unchanged.

    Args:
        dataset: The dataset to load.
        **kwargs: Passed to ``torch.utils.data.DataLoader``.
    """

    def __new__(cls, dataset: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``ShardLoader(MixDataset, batch_size=N)`` reads a mixture: it makes a `MixLoader`."""
        from shardloader.mix_dataset import MixDataset, MixLoader

        if isinstance(dataset, MixDataset):
            return MixLoader(dataset, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, dataset: ShardDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, ShardDataset):
            raise ConfigError(f"ShardLoader needs a ShardDataset, got {type(dataset).__name__}")
        collate = kwargs.pop("collate_fn", None)
        if collate is None and dataset.pack is not None:
            collate = _RowCollate(dataset.pack)
        if collate is None:
            collate = default_convert if kwargs.get("batch_size", 1) is None else default_collate
        super().__init__(dataset, collate_fn=_CursorCollate(collate, dataset), **kwargs)
        self._cursors: dict[int, Cursor] = {}  # the latest per share, of the epoch being read
        self._last_worker: int | None = None  # the share whose batch came last
        self._epoch_done: int | None = None
        # Stage counters: the latest of each live process (worker id, or -1 for this one), and
        # the sum of the processes that ended (workers of earlier epochs).
        self._stages: dict[int, dict[str, float]] = {}
        self._stages_ended: dict[str, float] = {}

    @property
    def shard_dataset(self) -> ShardDataset:
        """The dataset, typed."""
        dataset = self.dataset
        assert isinstance(dataset, ShardDataset)
        return dataset

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.shard_dataset
        if self._epoch_done is not None and dataset.epoch == self._epoch_done:
            dataset.set_epoch(self._epoch_done + 1)
        self._epoch_done = None
        self._cursors, self._last_worker = {}, None
        if self.num_workers > 0 and not (self.persistent_workers and self._iterator is not None):
            self._end_workers()  # new worker processes count from zero
        epoch = dataset.epoch
        # Read the manifest here, in this process, so that saving the position never touches
        # storage (workers read their own copy; the main process may never have).
        dataset.resume_spec()
        for batch, wire, (worker, stages) in super().__iter__():
            self._stages[worker] = stages
            cursor = Cursor._make(wire)
            if cursor.epoch == epoch:
                old = self._cursors.get(cursor.share)
                if old is None or cursor.position >= old.position:
                    self._cursors[cursor.share] = cursor
                self._last_worker = cursor.share
            yield _from_wire(batch) if worker >= 0 else batch
        self._epoch_done = epoch

    def _end_workers(self) -> None:
        for stages in self._stages.values():
            for name, seconds in stages.items():
                self._stages_ended[name] = self._stages_ended.get(name, 0.0) + seconds
        self._stages = {}

    def stage_seconds(self) -> dict[str, float]:
        """Seconds the loader's processes spent per stage, summed over its workers.

        ``fetch_wait`` (blocked on downloads or the cache), ``decode`` (decompressing shards,
        building samples), ``pack`` (transform, tokenizing, packing), ``collate``. Counted
        since each process started, as of its latest batch to reach the loop; cheap enough to
        log every step. Divided by wall time and ``max(num_workers, 1)`` they tell how busy the
        workers are and with what (`shardloader profile` measures the same on demand).
        """
        total = dict.fromkeys(("fetch_wait", "decode", "pack", "collate"), 0.0)
        total.update(self._stages_ended)
        for stages in self._stages.values():
            for name, seconds in stages.items():
                total[name] = total.get(name, 0.0) + seconds
        return total

    def mark(self) -> LoaderMark:
        """What the loop has consumed so far, for `state_dict` ``at=`` later (cheap)."""
        return LoaderMark(
            epoch=self.shard_dataset.epoch,
            cursors=tuple(self._cursors.values()),
            last_share=self._last_worker,
        )

    def state_dict(self, *, gather: bool = False, at: LoaderMark | None = None) -> dict[str, Any]:
        """The position of the training loop: what it consumed, not what workers read ahead.

        Args:
            gather: Collect every rank's position (a collective over torch.distributed: call it
                on all ranks). Needed only to resume on another world size or worker count;
                without it the state resumes exactly on the same topology.
            at: The position of an earlier `mark` of the epoch being read, for loops that
                fetch batches ahead of the step they train.

        Returns:
            A JSON-friendly dict (`shardloader.state.LoaderState`).

        Raises:
            ConfigError: ``at`` is from another epoch, or the epoch has ended since.
        """
        if at is not None and (self._epoch_finished() or at.epoch != self.shard_dataset.epoch):
            raise ConfigError(
                f"the mark is from epoch {at.epoch}, but the loader is "
                f"{'past the end of' if self._epoch_finished() else 'in'} epoch "
                f"{self.shard_dataset.epoch}; take the state without a mark at an epoch's end"
            )
        state = self._state(at=at)
        if gather:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # A rank whose epoch has ended while others still read says so in the terms of
                # that epoch (all of it consumed), so that the ranks' states merge.
                done = self._epoch_finished()
                held = self._state(hold_epoch=True).to_dict() if done else state.to_dict()
                states: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(states, (done, held, state.to_dict()))
                if all(d for d, _, _ in states):
                    state = merge_states([s for _, _, s in states])
                else:
                    state = merge_states([h for _, h, _ in states])
            else:
                state = replace(state, complete=True)
        return state.to_dict()

    def _epoch_finished(self) -> bool:
        return self._epoch_done is not None and self.shard_dataset.epoch == self._epoch_done

    def _state(self, *, hold_epoch: bool = False, at: LoaderMark | None = None) -> LoaderState:
        dataset = self.shard_dataset
        if self._epoch_finished() and not hold_epoch:
            assert self._epoch_done is not None
            world = dataset.world()
            return next_epoch_state(
                dataset.resume_spec(),
                dataset.loaded_state,
                done=self._epoch_done,
                rank=world.rank,
                world_size=world.world_size,
                num_workers=self.num_workers,
            )
        epoch = dataset.epoch
        anchor = dataset.anchor(epoch)  # from the manifest read when iteration started
        if at is not None:
            return state_from_cursors(anchor, at.cursors, last_share=at.last_share)
        return state_from_cursors(anchor, self._cursors.values(), last_share=self._last_worker)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict` output (or `shardloader.merge_states` of all ranks).

        Call before iterating; persistent workers are restarted so they see the new position.

        Raises:
            ResumeError: The state is from another dataset or config, or malformed.
        """
        self.shard_dataset.load_state_dict(state)
        self._cursors, self._last_worker = {}, None
        self._epoch_done = None
        if self.num_workers > 0:
            self._end_workers()
        self._iterator = None  # persistent workers hold the old position: start fresh ones
