"""One rank of a Lightning DDP run on a `ShardDataModule` (tests/test_integration_lightning.py).

Usage: torchrun --nproc_per_node=2 tests/lightning_run.py DATA OUT TAG --max-steps M
       [--save-steps K] [--resume CKPT]... [--workers W]

Trains a tiny Llama (hidden 32, 2 layers) on packed rows and writes, per rank, one JSON line per
trained batch to OUT/TAG-rank{R}.jsonl: the step, the data epoch and the batch's sample ids. Each
``--resume`` is a run of its own in this process, logged to OUT/TAG-CKPT_STEM-rank{R}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from shardloader import PackConfig, ShardDataset, StreamConfig
from shardloader.integrations.lightning import ShardDataModule
from shardloader.pack import IGNORE_INDEX
from shardloader.train.model import forward_loss_sum
from tests.integration_rank import SEQ_LEN, rank_main, tiny_llama


class TinyLM(L.LightningModule):
    def __init__(self, log_path: Path) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.log_path = log_path

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        datamodule: Any = self.trainer.datamodule
        record = {
            "step": self.global_step + 1,
            "epoch": datamodule.dataset.epoch,
            "ids": [int(i) for i in batch["sample_ids"]],
        }
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        summed = forward_loss_sum(
            self.model, batch, device=self.device, autocast=None, attn_implementation="sdpa"
        )
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return summed / max(tokens, 1)  # an idle rank's empty batch: 0, not 0 / 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def run(args: argparse.Namespace, tag: str, resume: str | None) -> None:
    dataset = ShardDataset(
        args.data, config=StreamConfig(seed=3, shuffle=True), pack=PackConfig(seq_len=SEQ_LEN)
    )
    data = ShardDataModule(
        dataset,
        batch_size=2,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    callbacks = []
    if args.save_steps:
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(Path(args.out) / "ckpt"),
                filename="{step}",
                every_n_train_steps=args.save_steps,
                save_top_k=-1,
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.max_steps,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.save_steps),
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    module = TinyLM(Path(args.out) / f"{tag}-rank{os.environ['RANK']}.jsonl")
    trainer.fit(module, datamodule=data, ckpt_path=resume)


if __name__ == "__main__":
    rank_main(run)
