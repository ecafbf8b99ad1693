"""Eval loss on held-out shards (``--eval-data``), every ``--eval-every`` steps and at the end.

The eval loss is the mean next-token cross-entropy over the *trained* tokens of the eval set
(labels other than -100: for chat shards the assistant tokens only, as the packer masks them),
summed over every rank's batches and divided by the global count of those tokens (one
all-reduce), so it does not depend on how rows fall to ranks.

Each rank reads its own split of the eval set with the training run's packing, unshuffled, one
pass of epoch 0 of the plan (`shardloader.plan`, policy ``drop``): the ranks read equal numbers
of documents, so the last ``N % world_size`` documents in manifest order (fewer than the number
of ranks) are left out, and counted in the log. The ranks step in lockstep (a rank whose split
has ended feeds empty batches, as in training) because an FSDP forward is a collective; one small
all-reduce per batch says when every rank is done. ``--eval-max-batches`` bounds the pass.

An eval changes nothing the run resumes from: the model runs in ``eval()`` mode under
``torch.no_grad()`` and goes back to ``train()``, the rows are read in this process with a
dataset of its own (the training loader's position is untouched) and torch's generators are
restored afterwards, so a resumed run gives the same training and eval losses as an
uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardloader.dataset import ShardDataset, StreamConfig
from shardloader.errors import ConfigError
from shardloader.mix_dataset import MixDataset
from shardloader.pack import IGNORE_INDEX, collate_rows, empty_batch
from shardloader.plan import plan_epoch
from shardloader.tokenizer import tokenizer_fingerprint
from shardloader.train.config import TrainConfig
from shardloader.train.model import forward_loss_sum

log = logging.getLogger("shardloader.train")


def _tokenizer_of(dataset: ShardDataset | MixDataset) -> str | None:
    """The fingerprint of the tokenizer a dataset's rows are made with (``None``: unknown)."""
    manifest = dataset.manifests()[0] if isinstance(dataset, MixDataset) else dataset.manifest
    recorded = (manifest.tokenizer or {}).get("fingerprint")
    if recorded:
        return str(recorded)
    if dataset.tokenizer is not None:  # text shards, tokenized while packing
        return tokenizer_fingerprint(dataset.tokenizer)
    return None


class Evaluator:
    """Computes the eval loss of a model on one rank's split of the eval shards.

    Args:
        config: The run (``eval_data``, ``eval_max_batches``, packing, batch size, tokenizer).
        train_data: The training dataset, whose tokenizer the eval set must share.
        rank: This rank.
        world_size: The number of ranks.
        device: Where the model runs.
        autocast: The autocast dtype of training, or ``None``.

    Raises:
        ConfigError: The eval set is empty, or was tokenized with another tokenizer than the
            training data (both fingerprints named).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        train_data: ShardDataset | MixDataset,
        rank: int,
        world_size: int,
        device: torch.device,
        autocast: torch.dtype | None,
    ) -> None:
        from shardloader.train.loop import check_not_empty  # the loop imports this module

        assert config.eval_data is not None
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device, self.autocast = device, autocast
        self.source = config.eval_data
        # packed as training packs (pack_mode "auto" resolved from the training data)
        self.pack = train_data.pack or config.pack_config()
        self.dataset = ShardDataset(
            self.source,
            config=StreamConfig(shuffle=False, policy="drop", cache_dir=config.cache_dir),
            pack=self.pack,
            tokenizer=train_data.tokenizer,
            rank=rank,
            world_size=world_size,
        )
        manifest = self.dataset.manifest  # checks tokenized shards against --tokenizer
        check_not_empty(manifest, self.source)
        if not manifest.tokenized and self.dataset.tokenizer is None:
            raise ConfigError(
                f"{self.source}: text shards for eval; pass --tokenizer (or convert with "
                "--tokenizer)"
            )
        theirs, ours = _tokenizer_of(self.dataset), _tokenizer_of(train_data)
        if theirs != ours:
            raise ConfigError(
                f"{self.source}: eval shards are tokenized with the tokenizer of fingerprint "
                f"{theirs}, the training data {config.source} with {ours}; convert the eval set "
                "with the training data's tokenizer"
            )
        plan = plan_epoch(
            self.dataset.resume_spec().shard_sizes,
            config=self.dataset.resume_spec().config,
            epoch=0,
            world_size=world_size,
            rank=rank,
            num_workers=0,
        )
        self.num_left_out = plan.num_dropped
        if rank == 0 and plan.num_dropped:
            log.info(
                "%s: eval reads %d of %d documents (%d per rank; the last %d do not divide "
                "among %d ranks)",
                self.source,
                manifest.num_samples - plan.num_dropped,
                manifest.num_samples,
                plan.samples_per_rank,
                plan.num_dropped,
                world_size,
            )

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        """This rank's split, packed into batches of ``batch_size`` rows."""
        rows: list[Any] = []
        for row in self.dataset:
            rows.append(row)
            if len(rows) == self.config.batch_size:
                yield collate_rows(rows, self.pack)
                rows = []
        if rows:
            yield collate_rows(rows, self.pack)

    def evaluate(self, model: nn.Module) -> tuple[float, int]:
        """One pass over the eval split; a collective, call it on every rank.

        Returns:
            The eval loss (mean cross-entropy per trained token, all ranks) and that token count.

        Raises:
            ConfigError: The eval set holds no trained token (all labels masked).
        """
        config = self.config
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = model.training
        batches = self._batches()
        loss_sum, tokens, taken = 0.0, 0, 0
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model.eval()
                while config.eval_max_batches is None or taken < config.eval_max_batches:
                    batch = next(batches, None)
                    if not self._any_rank(batch is not None):
                        break
                    taken += 1
                    if batch is not None:
                        tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                    summed = forward_loss_sum(
                        model,
                        batch or empty_batch(self.pack, config.batch_size),
                        device=self.device,
                        autocast=self.autocast,
                        attn_implementation=config.attn_implementation,
                    )
                    loss_sum += float(summed)
        finally:
            batches.close()  # stops the dataset's reading when the pass was cut short
            model.train(was_training)
        total_loss, total_tokens = self._sum([loss_sum, float(tokens)])
        if total_tokens == 0:
            raise ConfigError(
                f"{self.source}: the eval set gave no trained token in {taken} batches per "
                "rank (every label is masked); use an eval set with trained tokens"
            )
        return total_loss / total_tokens, int(total_tokens)

    def _any_rank(self, has_batch: bool) -> bool:
        return self._sum([float(has_batch)])[0] > 0

    def _sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def close(self) -> None:
        """Stop the eval dataset's background fetches."""
        self.dataset.close()
