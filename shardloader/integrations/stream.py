"""`LoopStream`: a `ShardLoader` as a training framework's loop iterates it (Trainer, Lightning).

The framework iterates the stream, not the loader, for three reasons:

- **Ranks step together.** With packing, ranks read the same documents per epoch but pack them
  into different numbers of rows, and DDP hangs when one rank steps without the others. Each
  batch then costs one all-reduce of one integer (does this rank have a batch?): a rank whose
  epoch has ended yields `shardloader.pack.empty_batch` (every label ignored: no loss, zero
  gradient) until every rank's has, then all stop together. Unpacked epochs have the same
  number of batches on every rank by construction and skip the all-reduce.
- **The position is what was trained.** Lightning fetches one batch ahead of the step it runs,
  so the loader has handed out one batch more than was trained when a checkpoint is taken. With
  ``ahead=True`` the framework calls `batch_trained` for each batch it trains, the stream takes a
  `shardloader.loader.LoaderMark` before each fetch, and `state_dict` is the position after the
  last trained batch.
- **Nothing for the framework to get wrong.** The stream has no ``__len__`` (the framework runs
  to ``max_steps`` and an epoch ends when the data does), no ``set_epoch`` (the loader moves to
  the next epoch itself; a framework's epoch counter restarts at 0 on resume) and no
  ``state_dict`` / ``load_state_dict`` under those names: Lightning saves the state of loaders
  that have them from rank 0 alone and would load rank 0's position into every rank. Use
  `loader_state` and `load_loader_state`, which gather and restore every rank's position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from shardloader.errors import ConfigError
from shardloader.loader import LoaderMark, ShardLoader
from shardloader.pack import PackConfig, empty_batch

log = logging.getLogger(__name__)


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


class LoopStream:
    """Iterates a `ShardLoader` (or a mixture's loader) for a framework's training loop.

    Args:
        loader: The loader to iterate.
        batch_size: Rows of the empty batch an idle rank yields (the loader's ``batch_size``).
        device: Where the all-reduce's integer lives (the rank's GPU under NCCL).
        ahead: The framework fetches one batch before it trains the previous one and calls
            `batch_trained` for each batch it trains.
    """

    def __init__(
        self,
        loader: Any,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        ahead: bool = False,
    ) -> None:
        if not hasattr(loader, "state_dict"):
            raise ConfigError(f"LoopStream needs a ShardLoader, got {type(loader).__name__}")
        self.loader = loader
        self.pack: PackConfig | None = getattr(loader.dataset, "pack", None)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.ahead = ahead
        self.empty_batches = 0  # yielded by this rank after its epochs ended, all epochs
        self._yielded = 0  # batches of this pass handed to the framework
        self._trained = 0  # of them, trained (counted only with ``ahead``)
        self._mark: LoaderMark | None = None  # the position before the latest fetch

    def __iter__(self) -> Iterator[Any]:
        loader = self.loader
        marks = isinstance(loader, ShardLoader)
        synced = self.pack is not None and _world_size() > 1
        self._yielded = self._trained = 0
        self._mark = None
        batches = iter(loader)
        more = True
        while True:
            mark = loader.mark() if more and marks else None
            batch = next(batches, None) if more else None
            more = batch is not None
            if synced:
                import torch.distributed as dist

                flag = torch.tensor([int(more)], dtype=torch.int64, device=self.device)
                dist.all_reduce(flag)
                if int(flag.item()) == 0:
                    return
                if batch is None:
                    assert self.pack is not None
                    self.empty_batches += 1
                    batch = empty_batch(self.pack, self.batch_size)
            elif batch is None:
                return
            self._mark = mark if more else None  # an ended epoch's state needs no mark
            self._yielded += 1
            yield batch

    def batch_trained(self) -> None:
        """Count one batch of this pass as trained (with ``ahead``, for each batch it trains)."""
        self._trained += 1

    def loader_state(self) -> dict[str, Any]:
        """Every rank's position after the batches trained so far (collective: all ranks call it).

        Raises:
            ConfigError: With ``ahead``, the trained count is not the fetched count or one less
                (the framework does not call `batch_trained` once per trained batch).
        """
        lag = self._yielded - self._trained if self.ahead else 0
        if lag not in (0, 1):
            raise ConfigError(
                f"{self._yielded} batches were fetched and {self._trained} trained in this pass; "
                "expected the same or one fetched ahead: call batch_trained() once per batch"
            )
        if lag == 1 and not isinstance(self.loader, ShardLoader):
            raise ConfigError(
                "a mixture's loader cannot say where it stood one batch ago; save its state where "
                "the framework has trained every batch it fetched (the end of an epoch)"
            )
        at = self._mark if lag == 1 else None  # None too once this rank's epoch has ended
        if at is not None:
            return dict(self.loader.state_dict(gather=True, at=at))
        return dict(self.loader.state_dict(gather=True))

    def load_loader_state(self, state: Mapping[str, Any]) -> None:
        """Continue from `loader_state` output (call before iterating)."""
        self.loader.load_state_dict(state)
