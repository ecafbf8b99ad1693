"""`ShardDataModule`: a Lightning ``LightningDataModule`` over a `ShardDataset`, exact under DDP.

The one way to use it (``pip install shardloader[lightning]``)::

    import lightning as L
    from shardloader import PackConfig, ShardDataset
    from shardloader.integrations.lightning import ShardDataModule

    data = ShardDataModule(ShardDataset("tokens/", pack=PackConfig(seq_len=2048)), batch_size=8)
    trainer = L.Trainer(max_steps=1000, use_distributed_sampler=False, strategy="ddp")
    trainer.fit(module, datamodule=data, ckpt_path="last")  # or a path, or None

Every rank reads its own share (the dataset plans it; ``use_distributed_sampler=False`` keeps
Lightning from looking for a sampler). What Lightning 2.6 would do with the bare `ShardLoader`,
and what the data module does instead:

- Lightning's fit loop saves the ``state_dict()`` of loaders that have one, but checkpoints are
  written by rank 0: on resume every rank would load rank 0's position. It also fetches one batch
  ahead of the step it trains (``_PrefetchDataFetcher``: for a loader without a length it needs
  to know which batch is the last), so the loader's position at a checkpoint includes a batch
  that was not trained. The data module hands Lightning a
  `shardloader.integrations.stream.LoopStream` instead, which has no ``state_dict`` under that
  name; its own `state_dict` (which Lightning calls on every rank when it saves) gathers every
  rank's position after the last *trained* batch (counted in `on_before_batch_transfer`), and
  `load_state_dict` restores it into a fresh loader before the first batch.
- Epochs: an epoch ends when every rank's data does; the loader then moves the dataset to the
  next epoch (reshuffled). Lightning's ``set_epoch`` finds no sampler and is not needed.
- Packed rows differ in number per rank: ranks that run out first get empty batches (every label
  ignored) until all have, so DDP stays in step. A ``training_step`` must then not divide by a
  zero token count (the example sums the loss and divides by ``max(tokens, 1)``).

Lightning's checkpoint is its own format (``torch.save``); the data position inside it holds only
JSON types, under the data module's class name. Only the training loader is handled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L

from shardloader.dataset import ShardDataset
from shardloader.errors import ConfigError
from shardloader.integrations.stream import LoopStream
from shardloader.loader import ShardLoader
from shardloader.mix_dataset import MixDataset

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Trains on a `ShardDataset` (or a mixture) with its position saved in Lightning checkpoints.

    Args:
        dataset: The training data.
        batch_size: Rows (or samples) per batch and rank.
        **loader_options: Passed to `ShardLoader` (``num_workers``, ``collate_fn``...).
    """

    def __init__(
        self, dataset: ShardDataset | MixDataset, *, batch_size: int, **loader_options: Any
    ) -> None:
        super().__init__()
        if not isinstance(dataset, ShardDataset | MixDataset):
            raise ConfigError(f"ShardDataModule needs a ShardDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.loader_options = loader_options
        self.stream: LoopStream | None = None  # made by train_dataloader
        self._pending: dict[str, Any] | None = None  # a position to load into the next loader

    def train_dataloader(self) -> LoopStream:
        """A `ShardLoader` as a `LoopStream`, continuing from a loaded checkpoint."""
        loader = ShardLoader(self.dataset, batch_size=self.batch_size, **self.loader_options)  # type: ignore[arg-type]
        if self._pending is not None:
            loader.load_state_dict(self._pending)
            self._pending = None
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else "cpu"
        self.stream = LoopStream(loader, batch_size=self.batch_size, device=device, ahead=True)
        return self.stream

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count each training batch as it goes to the step (Lightning calls it right before)."""
        trainer = self.trainer
        if self.stream is not None and trainer is not None and trainer.training:
            self.stream.batch_trained()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position after the trained batches (Lightning calls it on every rank)."""
        if self.stream is None:
            return {} if self._pending is None else {"loader": self._pending}
        return {"loader": self.stream.loader_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Keep the saved position for the loader `train_dataloader` makes next."""
        loader = state_dict.get("loader")
        if loader is not None:
            self._pending = dict(loader)
