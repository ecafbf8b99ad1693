"""Train a tiny Llama with Lightning (DDP) on token shards: exact per rank, resumable.

Needs ``pip install shardloader[lightning]``. Make token shards first (examples/quickstart.sh
steps 1, 2 and 4), then on 2 CPU processes:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 examples/lightning_datamodule.py \\
        demo-output/token-shards --output-dir demo-output/lightning-run --max-steps 60

Run it again with ``--resume`` (and a larger ``--max-steps``) to continue from the last
checkpoint: `ShardDataModule` saves every rank's data position in Lightning's checkpoint, as of
the last trained batch, and each rank goes on with the very next batch it would have trained.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaConfig, LlamaForCausalLM

from shardloader import PackConfig, ShardDataset, StreamConfig, end_process_group
from shardloader.integrations.lightning import ShardDataModule
from shardloader.pack import IGNORE_INDEX
from shardloader.pack_attention import model_inputs


class TinyLlama(L.LightningModule):
    """A causal LM on packed rows (documents kept apart by their position ids)."""

    def __init__(self, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(  # built from a config: nothing is downloaded
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=64,
                intermediate_size=176,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=seq_len,
                tie_word_embeddings=True,
            )
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs = model_inputs(batch)  # input_ids, position_ids, use_cache=False
        labels = inputs.pop("labels")
        logits = self.model(**inputs).logits
        summed = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        loss = summed / max(tokens, 1)  # a rank out of data trains an empty batch: loss 0
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shards", help="tokenized shards (shardloader convert --tokenizer)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2, help="processes (torchrun's count)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args()

    dataset = ShardDataset(
        args.shards,
        config=StreamConfig(seed=0, shuffle=True),
        pack=PackConfig(seq_len=args.seq_len),
    )
    data = ShardDataModule(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    vocab_size = int((dataset.manifest.tokenizer or {})["vocab_size"])
    trainer = L.Trainer(
        accelerator="auto",
        devices=args.devices,
        strategy="ddp",
        max_steps=args.max_steps,  # an epoch ends when the data does
        use_distributed_sampler=False,  # each rank already reads its own share
        default_root_dir=args.output_dir,
        callbacks=[
            ModelCheckpoint(
                dirpath=f"{args.output_dir}/checkpoints", every_n_train_steps=30, save_last=True
            )
        ],
        log_every_n_steps=10,
    )
    model = TinyLlama(vocab_size, args.seq_len)
    trainer.fit(model, datamodule=data, ckpt_path="last" if args.resume else None)
    end_process_group()  # a barrier, then the group goes (README: SIGABRT at exit)


if __name__ == "__main__":
    main()
