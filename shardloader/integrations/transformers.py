"""`ShardTrainer`: Hugging Face ``transformers.Trainer`` on a `ShardDataset`, exact under torchrun.

The one way to use it: pass the dataset as ``train_dataset``, set ``max_steps``, and resume with
``resume_from_checkpoint`` as usual::

    from transformers import TrainingArguments
    from shardloader import PackConfig, ShardDataset
    from shardloader.integrations.transformers import ShardTrainer

    dataset = ShardDataset("tokens/", pack=PackConfig(seq_len=2048))
    args = TrainingArguments(output_dir="out", max_steps=1000, save_steps=100,
                             per_device_train_batch_size=8)
    trainer = ShardTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=True)  # or a checkpoint folder, or None

What a plain ``Trainer`` does with an ``IterableDataset``, and what `ShardTrainer` does instead
(checked against transformers 5.25 and accelerate 1.16):

- ``accelerator.prepare`` rebuilds the DataLoader as accelerate's own ``DataLoaderShard`` (our
  loader's class and its ``state_dict`` are lost) around an ``IterableDatasetShard`` that hands
  each rank every ``world_size``-th batch of what it reads, or, by default, reads on rank 0 and
  dispatches batches (``dispatch_batches``). Our dataset already reads each rank's own share, so
  either way samples are lost or read ``world_size`` times. `ShardTrainer.get_train_dataloader`
  returns a `ShardLoader` (batch size, workers and prefetch from ``TrainingArguments``), wrapped
  in a `shardloader.integrations.stream.LoopStream`, and never passes it to accelerate; the
  Trainer moves each batch to the device itself (``_prepare_inputs``).
- Resuming mid-epoch, ``Trainer`` skips batches by reading them again (``skip_first_batches``).
  `ShardTrainer` writes the loader's position, gathered from every rank, as ``shardloader_state
  .json`` into each checkpoint folder (a callback on save; rank 0 writes it) and loads it on
  resume; `get_resumed_dataloader` skips nothing. The step count, LR schedule, optimizer and
  RNG come back from the checkpoint as usual.
- Epochs: the stream has no length, so ``max_steps`` is required (`ShardTrainer` says so) and an
  epoch ends when every rank's data does; the loader then moves its dataset to the next epoch,
  reshuffled. The Trainer's own epoch counter is not the data's epoch and is not passed on.
- Packed batches (``PackConfig``) are turned into the model's inputs in `training_step`
  (`shardloader.pack_attention.model_inputs` for the model's attention: documents do not see
  each other); bookkeeping keys (``sample_ids``, ``cursor``...) are dropped there, so a subclass
  that wants them reads them before calling ``super().training_step``. Ranks that run out of
  packed rows first train empty batches until all have, so DDP stays in step.

Unpacked datasets need a ``data_collator`` that makes model inputs from sample dicts.
Hyperparameter search (``trial``) and ``torch_compile`` of the loader are not covered.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from shardloader.dataset import ShardDataset
from shardloader.errors import ConfigError, ResumeError
from shardloader.integrations.stream import LoopStream
from shardloader.loader import ShardLoader
from shardloader.mix_dataset import MixDataset
from shardloader.pack_attention import model_inputs

log = logging.getLogger(__name__)

STATE_FILE = "shardloader_state.json"  # in each checkpoint folder, beside trainer_state.json

# Keys of a packed batch that are bookkeeping, not model inputs.
PACKED_KEYS = frozenset({"cu_seqlens", "max_seqlen", "sample_ids", "sample_rows", "cursor"})


class _SaveLoaderState(TrainerCallback):
    """Writes the loader's position into every checkpoint folder the Trainer saves."""

    def __init__(self, trainer: ShardTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stream = self.trainer.stream
        if stream is None:
            return
        position = stream.loader_state()  # a collective: every rank gets here
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{STATE_FILE}.partial"
        partial.write_text(json.dumps(position), encoding="utf-8")
        os.replace(partial, folder / STATE_FILE)


class ShardTrainer(Trainer):
    """A ``transformers.Trainer`` whose ``train_dataset`` is a `ShardDataset` (or a mixture).

    Takes every ``Trainer`` argument. ``data_collator``, if given, becomes the loader's
    ``collate_fn``; without it packed datasets collate rows (`shardloader.pack.collate_rows`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(Trainer.__init__).bind(None, *args, **kwargs).arguments
        self._collate = bound.get("data_collator")
        dataset = bound.get("train_dataset")
        if dataset is not None and not isinstance(dataset, ShardDataset | MixDataset):
            raise ConfigError(
                f"ShardTrainer trains on a ShardDataset, got {type(dataset).__name__}; "
                "use transformers.Trainer for other datasets"
            )
        _check_max_steps(bound.get("args"))
        super().__init__(*args, **kwargs)
        self.stream: LoopStream | None = None  # made by get_train_dataloader
        self._resume_dir: str | None = None
        self.add_callback(_SaveLoaderState(self))

    @property
    def loader(self) -> ShardLoader | None:
        """The loader of the current ``train`` call (``None`` before it starts)."""
        return None if self.stream is None else self.stream.loader

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; also restores the data position saved in the checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        self._resume_dir = (
            resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        )
        self.stream = None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_train_dataloader(self) -> LoopStream:  # type: ignore[override]
        """A `ShardLoader` over ``train_dataset``, never handed to accelerate (module docstring)."""
        dataset = self.train_dataset
        if not isinstance(dataset, ShardDataset | MixDataset):
            raise ConfigError("ShardTrainer needs train_dataset, a ShardDataset")
        args = self.args
        _check_max_steps(args)
        packed = getattr(dataset, "pack", None) is not None
        if packed and args.world_size > 1 and not args.average_tokens_across_devices:
            raise ConfigError(
                "a rank out of packed rows trains empty batches, whose loss is 0 / 0 unless "
                "tokens are counted over all ranks; keep average_tokens_across_devices=True"
            )
        if self.stream is not None:
            return self.stream
        options: dict[str, Any] = {
            "batch_size": self._train_batch_size,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory and args.device.type == "cuda",
            "drop_last": args.dataloader_drop_last,
        }
        if args.dataloader_num_workers > 0:
            options["persistent_workers"] = args.dataloader_persistent_workers
            options["multiprocessing_context"] = args.dataloader_multiprocessing_context
            if args.dataloader_prefetch_factor is not None:
                options["prefetch_factor"] = args.dataloader_prefetch_factor
        if self._collate is not None:
            options["collate_fn"] = self._collate
        loader = ShardLoader(dataset, **options)  # type: ignore[arg-type]  # (a MixLoader for a mixture)
        if self._resume_dir is not None:
            loader.load_state_dict(read_loader_state(self._resume_dir))
            log.info("data position restored from %s", self._resume_dir)
        self.stream = LoopStream(loader, batch_size=self._train_batch_size, device=args.device)
        return self.stream

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """Skips nothing: the loader already continues from the checkpoint's position."""
        return dataloader

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """``Trainer.training_step`` on the model's inputs of a packed batch (module docstring)."""
        if "cu_seqlens" in inputs:
            config = getattr(self.model, "config", None)
            attention = getattr(config, "_attn_implementation", None) or "sdpa"
            inputs = model_inputs(inputs, attn_implementation=attention)
        return super().training_step(model, inputs, num_items_in_batch)


def _check_max_steps(args: Any) -> None:
    if args is None or not (args.max_steps or 0) > 0:
        raise ConfigError(
            "ShardTrainer streams its data: set TrainingArguments(max_steps=...); an epoch "
            "ends when the data does and the next one starts, reshuffled"
        )


def read_loader_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The loader position `ShardTrainer` saved in a checkpoint folder.

    Raises:
        ResumeError: The folder holds no position (not saved by `ShardTrainer`), or not JSON.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ResumeError(
            f"{path}: no data position in this checkpoint (it was not saved by ShardTrainer); "
            "resume from a ShardTrainer checkpoint, or start without resume_from_checkpoint"
        ) from err
    try:
        state = json.loads(text)
    except ValueError as err:
        raise ResumeError(f"{path}: not valid JSON ({err}); the checkpoint is damaged") from err
    if not isinstance(state, dict):
        raise ResumeError(f"{path}: expected a JSON object, got {type(state).__name__}")
    return state
