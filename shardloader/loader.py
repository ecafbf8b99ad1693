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
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.ma  # noqa: F401  (see below)
import numpy.random  # noqa: F401
import torch
import torch.utils.data
from torch.utils.data import default_collate, default_convert

# numpy.ma (numpy's unique imports it at first use), numpy.random and the fetch and format modules
# are imported at a first batch; importing them here, before the DataLoader forks its workers,
# saves each worker 20 ms of imports at its first batch.
import shardloader.fetch  # noqa: F401
import shardloader.formats.tar  # noqa: F401
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

# Batches a worker sends at once (`ShardLoader`'s ``transfer_batches``).
TRANSFER_BATCHES = 8

# The kernel buffer of the pipe that carries every worker's batches to the main process (Linux's
# default is 64 KiB; `_widen_result_pipe`). 2 workers, 300 MB corpus, medians of 5: tokens
# 0.57 -> 0.45 s an epoch, text 0.85 -> 0.75 s, packed rows 0.68 -> 0.65 s; at 512 KiB text
# was slower than at 64 KiB (0.87 s).
RESULT_PIPE_BYTES = 256 << 10
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ names it on Linux only)


def _widen_result_pipe(iterator: Any) -> Any:
    """Give the pipe of a multi-process DataLoader iterator `RESULT_PIPE_BYTES` of buffer.

    A worker writes its pickled batches into one pipe that all workers share; at 64 KiB the
    writer waits for the main process to read each 64 KiB, so the two take turns instead of
    overlapping. Linux only; elsewhere, or if torch's iterator changes, nothing is done.
    """
    reader = getattr(getattr(iterator, "_worker_result_queue", None), "_reader", None)
    if reader is None or not sys.platform.startswith("linux"):
        return iterator
    import fcntl

    try:
        fcntl.fcntl(reader.fileno(), _F_SETPIPE_SZ, RESULT_PIPE_BYTES)
    except (OSError, ValueError):  # above /proc/sys/fs/pipe-max-size, or a closed pipe
        log.debug("could not widen the DataLoader's result pipe", exc_info=True)
    return iterator


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
        self.array = _narrow(array)

    def unwire(self) -> torch.Tensor:
        return torch.from_numpy(self.array.astype(self.dtype, copy=False))

    def pin_memory(self, device: Any = None) -> torch.Tensor:
        return self.unwire().pin_memory()


def _narrow(array: np.ndarray) -> np.ndarray:
    """An int64 array in the narrowest integer type that holds its values (others unchanged).

    uint16 comes before int32: ids of vocabularies up to 65,536 (GPT-2's 50,257) take two bytes,
    not four.
    """
    if array.dtype == np.int64 and array.size:
        low, high = int(array.min()), int(array.max())
        for narrow in (np.int16, np.uint16, np.int32):
            info = np.iinfo(narrow)
            if info.min <= low and high <= info.max:
                return array.astype(narrow)
    return array


class _OnArrival:
    """A batch on its way from a worker that becomes the batch on arrival (`unwire`).

    The main process unwires it (`_from_wire`); with ``pin_memory=True`` the DataLoader's
    pinning thread meets it first and calls `pin_memory`, so it is unwired and pinned there.
    """

    __slots__ = ()

    def unwire(self) -> Any:
        raise NotImplementedError

    def pin_memory(self, device: Any = None) -> Any:
        from torch.utils.data._utils.pin_memory import pin_memory

        return pin_memory(self.unwire(), device)


class _WireRows(_OnArrival):
    """A batch of packed rows (and ``extra`` arrays) on its way from a worker, collated on arrival.

    `collate_rows` makes three ``[B, L]`` int64 arrays out of the rows' tokens (``input_ids``,
    ``labels``, ``position_ids``); a worker that made them would ship three times the tokens
    and narrow each array again. The rows themselves travel instead, in a few flat arrays (the
    tokens in their upstream dtype), and the main process (or the DataLoader's pinning thread)
    runs `collate_rows` on them: the same batch, for a third of the bytes and none of the
    worker's collate. 2 workers, ``[8 x 2048]`` rows of a 61 M-token corpus, one batch per
    transfer: 1.43-1.55 -> 1.28-1.32 s an epoch.
    """

    __slots__ = (
        "config",
        "counts",
        "cursors",
        "dtype",
        "extra",
        "masked",
        "masks",
        "parts",
        "tokens",
    )

    def __init__(
        self,
        rows: list[PackedRow],
        config: PackConfig,
        extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        if not rows:
            raise ConfigError("collate_rows needs at least one row")
        self.config = config
        self.extra = {key: _Wire(value) for key, value in (extra or {}).items()}
        self.dtype = np.result_type(*(row.input_ids for row in rows))
        self.tokens = _narrow(np.concatenate([row.input_ids for row in rows]))
        # Per row: its tokens, document pieces and sample ids (as many as pieces when the
        # packer made the row).
        self.counts = [(len(r.input_ids), len(r.segment_lengths), len(r.sample_ids)) for r in rows]
        self.parts = _narrow(
            np.concatenate([a for r in rows for a in (r.segment_lengths, r.sample_ids)])
        )
        self.masked = [r.loss_mask is not None for r in rows]
        masks = [r.loss_mask for r in rows if r.loss_mask is not None]
        self.masks = np.concatenate(masks) if masks else None
        self.cursors = [r.cursor for r in rows]

    def rows(self) -> list[PackedRow]:
        """The rows, as the worker had them (views into the flat arrays)."""
        tokens = self.tokens.astype(self.dtype, copy=False)
        parts = self.parts.astype(np.int64, copy=False)
        rows: list[PackedRow] = []
        token_at = part_at = mask_at = 0
        for (num_tokens, num_pieces, num_ids), masked, cursor in zip(
            self.counts, self.masked, self.cursors, strict=True
        ):
            mask = None
            if masked:
                assert self.masks is not None
                mask = self.masks[mask_at : mask_at + num_tokens]
                mask_at += num_tokens
            segments = parts[part_at : part_at + num_pieces]
            ids = parts[part_at + num_pieces : part_at + num_pieces + num_ids]
            part_at += num_pieces + num_ids
            rows.append(
                PackedRow(tokens[token_at : token_at + num_tokens], segments, ids, mask, cursor)
            )
            token_at += num_tokens
        return rows

    def unwire(self) -> dict[str, Any]:
        batch = collate_rows(self.rows(), self.config)
        batch.update((key, value.unwire()) for key, value in self.extra.items())
        return batch


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


class _Wired(_OnArrival):
    """A batch whose small tensors travel as `_Wire` arrays (`_to_wire`).

    Only such batches are walked again on arrival: a batch of 64 texts holds no tensor, and
    walking its strings cost the main process 0.07 s an epoch (300 MB of text, 2 workers).
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def unwire(self) -> Any:
        return _map_batch(
            self.data, lambda leaf: leaf.unwire() if isinstance(leaf, _Wire) else leaf
        )


def _to_wire(data: Any) -> Any:
    """``data`` with every small CPU tensor (in dicts, lists and tuples) as a `_Wire`.

    Wrapped in a `_Wired` so that the main process undoes it; ``data`` itself where it holds
    no such tensor (nothing to undo).
    """
    wired = False

    def leaf(value: Any) -> Any:
        nonlocal wired
        out = _wire_leaf(value)
        wired = wired or out is not value
        return out

    mapped = _map_batch(data, leaf)
    return _Wired(mapped) if wired else data


def _from_wire(data: Any) -> Any:
    """Undo `_to_wire` (what the pinning thread has not already turned into tensors)."""
    if isinstance(data, _OnArrival):
        return data.unwire()
    return data


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
    """Collates as the user asked, then attaches the worker's cursor and stage counters.

    Called with the samples of several batches (``batch_size`` set: a worker sends a group of
    batches at once), it splits them into batches of ``batch_size`` and gives each batch the
    cursor right after its last sample, as if each had been fetched alone; ``drop_last`` drops
    a short last batch, as the DataLoader would.
    """

    def __init__(
        self,
        collate: Callable[[Any], Any],
        dataset: ShardDataset,
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.collate = collate
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __call__(
        self, samples: Any
    ) -> tuple[list[tuple[Any, WireCursor]], tuple[int, dict[str, float]]]:
        started = time.perf_counter()
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        assert isinstance(dataset, ShardDataset)
        end = dataset.cursor()
        size = self.batch_size or len(samples)
        batches: list[tuple[Any, WireCursor]] = []
        for begin in range(0, len(samples), size):
            part = samples[begin : begin + size]
            if self.drop_last and len(part) < size:
                break
            stop = begin + len(part)
            cursor = end if stop == len(samples) else _cursor_before(end, samples, stop)
            batches.append((self._collate(part, info is not None), (*cursor,)))
        dataset.count_stage("collate", time.perf_counter() - started)
        worker = info.id if info is not None else -1
        return batches, (worker, dataset.stage_seconds())

    def _collate(self, samples: Any, in_worker: bool) -> Any:
        if in_worker and isinstance(self.collate, _RowCollate):
            return _WireRows(samples, self.collate.config)  # collated in the main process
        batch = self.collate(samples)
        return _to_wire(batch) if in_worker else batch


class _TransferSampler(torch.utils.data.Sampler[list[None]]):
    """What a worker fetches per request: one batch, then ``transfer`` batches per request.

    The first batch is not kept waiting for a group; an iterable dataset ignores the indices.
    """

    def __init__(self, batch_size: int, transfer: int, num_workers: int) -> None:
        self.batch_size, self.transfer, self.num_workers = batch_size, transfer, num_workers

    def __iter__(self) -> Iterator[list[None]]:
        for _ in range(self.num_workers):
            yield [None] * self.batch_size
        group = [None] * (self.batch_size * self.transfer)
        while True:
            yield group


Group = tuple[list[tuple[Any, WireCursor]], tuple[int, dict[str, float]]]


def _in_batch_order(
    groups: Iterator[Group], num_workers: int
) -> Iterator[tuple[Any, WireCursor, int, dict[str, float]]]:
    """The batches of the workers' groups in the order a DataLoader gives single batches.

    A DataLoader asks its workers in turn, so batch ``j`` of every worker comes before batch
    ``j + 1`` of any, and worker 0's before worker 1's (a worker whose share ended is skipped).
    A round of requests gives each worker's group of the same batches ``j`` (`_TransferSampler`),
    so the batches of a round are given out by ``j``, then by worker. A round ends when every
    worker has sent its group, or when a worker sends its next one (a worker that ran out sends
    none). Exact resume relies on this order: it is the one states record.
    """
    round_: dict[int, tuple[list[tuple[Any, WireCursor]], dict[str, float]]] = {}

    def flush() -> Iterator[tuple[Any, WireCursor, int, dict[str, float]]]:
        longest = max(len(batches) for batches, _ in round_.values())
        for j in range(longest):
            for worker in sorted(round_):
                batches, stages = round_[worker]
                if j < len(batches):
                    yield (*batches[j], worker, stages)
        round_.clear()

    for batches, (worker, stages) in groups:
        if worker in round_:
            yield from flush()
        round_[worker] = (batches, stages)
        if len(round_) == num_workers:
            yield from flush()
    if round_:
        yield from flush()


def _cursor_before(end: Cursor, samples: Any, stop: int) -> Cursor:
    """The cursor right after ``samples[stop - 1]``, given ``end``, the one after them all.

    A sample moves the position by one; a packed row carries the cursor after it.
    """
    last = samples[stop - 1]
    if isinstance(last, PackedRow):
        position, skip = last.cursor
        return end._replace(position=position, skip=skip, finished=False)
    return end._replace(position=end.position - (len(samples) - stop), finished=False)


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

    With workers, each worker sends ``transfer_batches`` batches at once (after a first batch
    of its own), and they come out in the order a DataLoader gives single batches: a batch
    crossing from a worker costs the main process about 0.1 ms however small it is, which made
    small batches (``[8 x 2048]`` packed rows) run slower with 2 workers than with none.
    Packed batches of the default collate cross as their rows and are collated on arrival.

    Args:
        dataset: The dataset to load.
        transfer_batches: Batches a worker sends at once (1: one per request, as a plain
            DataLoader). Up to ``prefetch_factor * num_workers`` groups are in flight.
        **kwargs: Passed to ``torch.utils.data.DataLoader``.
    """

    def __new__(cls, dataset: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``ShardLoader(MixDataset, batch_size=N)`` reads a mixture: it makes a `MixLoader`.

        A dataset can only be a `MixDataset` once its module is imported: a plain loader does not
        import it (9 ms of a first batch).
        """
        mix = sys.modules.get("shardloader.mix_dataset")
        if mix is not None and isinstance(dataset, mix.MixDataset):
            return mix.MixLoader(dataset, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self, dataset: ShardDataset, *, transfer_batches: int = TRANSFER_BATCHES, **kwargs: Any
    ) -> None:
        if not isinstance(dataset, ShardDataset):
            raise ConfigError(f"ShardLoader needs a ShardDataset, got {type(dataset).__name__}")
        if transfer_batches < 1:
            raise ConfigError(f"transfer_batches must be >= 1, got {transfer_batches}")
        collate = kwargs.pop("collate_fn", None)
        if collate is None and dataset.pack is not None:
            collate = _RowCollate(dataset.pack)
        if collate is None:
            collate = default_convert if kwargs.get("batch_size", 1) is None else default_collate
        batch_size = kwargs.get("batch_size", 1)
        self._transfer = transfer_batches
        if kwargs.get("num_workers", 0) > 0 and batch_size is not None and transfer_batches > 1:
            cursor_collate = _CursorCollate(
                collate, dataset, batch_size=batch_size, drop_last=kwargs.get("drop_last", False)
            )
        else:
            self._transfer = 1
            cursor_collate = _CursorCollate(collate, dataset)
        super().__init__(dataset, collate_fn=cursor_collate, **kwargs)
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
        """Start the epoch now, as a DataLoader does: workers start and fetch ahead at ``iter()``.

        So ``it = iter(loader)`` before building the model reads the first batches meanwhile.
        """
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
        groups = super().__iter__()
        batches = (
            _in_batch_order(groups, self.num_workers)
            if self._transfer > 1
            else ((batch, wire, worker, stages) for [(batch, wire)], (worker, stages) in groups)
        )
        return self._deliver(batches, epoch)

    def _deliver(
        self, batches: Iterator[tuple[Any, WireCursor, int, dict[str, float]]], epoch: int
    ) -> Iterator[Any]:
        """The epoch's batches, each recorded (cursor, stage counters) as it is handed out."""
        for batch, wire, worker, stages in batches:
            self._stages[worker] = stages
            cursor = Cursor._make(wire)
            if cursor.epoch == epoch:
                old = self._cursors.get(cursor.share)
                if old is None or cursor.position >= old.position:
                    self._cursors[cursor.share] = cursor
                self._last_worker = cursor.share
            if worker >= 0:
                started = time.perf_counter()
                batch = _from_wire(batch)
                spent = time.perf_counter() - started  # collating wired rows, widening
                self._stages_ended["collate"] = self._stages_ended.get("collate", 0.0) + spent
            yield batch
        self._epoch_done = epoch

    @property
    def _index_sampler(self) -> Any:
        # A worker fetches the samples of `transfer_batches` batches per request; the collate
        # splits them (the short last batch included: drop_last is applied there).
        if self._transfer > 1:
            assert self.batch_size is not None  # (no groups without batches)
            return _TransferSampler(self.batch_size, self._transfer, self.num_workers)
        return super()._index_sampler

    def _get_iterator(self) -> Any:
        if self._transfer == 1 or not self.drop_last:
            return _widen_result_pipe(super()._get_iterator())
        # The fetcher would drop a short group whole: the collate drops the short last batch.
        object.__setattr__(self, "drop_last", False)  # (DataLoader refuses a plain set)
        try:
            return _widen_result_pipe(super()._get_iterator())
        finally:
            object.__setattr__(self, "drop_last", True)

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
