"""One rank of a ``ShardTrainer`` run under torchrun (tests/test_integration_trainer.py).

Usage: torchrun --nproc_per_node=2 tests/hf_trainer_run.py DATA OUT TAG --max-steps M
       [--save-steps K] [--resume CHECKPOINT]... [--workers W]

Trains a tiny Llama (hidden 32, 2 layers) on packed rows and writes, per rank, one JSON line per
trained batch to OUT/TAG-rank{R}.jsonl: the step, the data epoch and the batch's sample ids.
Each ``--resume`` is a run of its own in this process (a fresh model and trainer), logged to
OUT/TAG-CHECKPOINT_NAME-rank{R}.jsonl: one launch for several resumes saves the start-up time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from shardloader import PackConfig, ShardDataset, StreamConfig
from shardloader.integrations.transformers import ShardTrainer
from tests.integration_rank import SEQ_LEN, rank_main, tiny_llama


class LoggingTrainer(ShardTrainer):
    """Writes the ids of every batch it trains, before `ShardTrainer` drops them."""

    log_path: Path

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        assert self.loader is not None
        record = {
            "step": self.state.global_step + 1,
            "epoch": self.loader.shard_dataset.epoch,
            "ids": [int(i) for i in inputs["sample_ids"]],
        }
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)


def run(args: argparse.Namespace, tag: str, resume: str | None) -> None:
    model = tiny_llama()
    dataset = ShardDataset(
        args.data, config=StreamConfig(seed=3, shuffle=True), pack=PackConfig(seq_len=SEQ_LEN)
    )
    training = TrainingArguments(
        output_dir=str(Path(args.out) / "run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        logging_steps=1000,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=args.workers,
        dataloader_persistent_workers=args.workers > 0,
        seed=0,
    )
    trainer = LoggingTrainer(model=model, args=training, train_dataset=dataset)
    trainer.log_path = Path(args.out) / f"{tag}-rank{os.environ['RANK']}.jsonl"
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    rank_main(run)
