"""Train a tiny Llama with Hugging Face ``Trainer`` on token shards: exact per rank, resumable.

Make token shards first (examples/quickstart.sh steps 1, 2 and 4: ``shardloader train-tokenizer``
then ``shardloader convert --tokenizer``), then on 2 CPU processes:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 examples/hf_trainer.py \\
        demo-output/token-shards --output-dir demo-output/hf-run --max-steps 60

Run it again with ``--resume`` (and a larger ``--max-steps``) to continue from the latest
checkpoint: the model, optimizer, schedule and the data position come back, so every rank goes
on with the very next batch it would have trained.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from shardloader import PackConfig, ShardDataset, StreamConfig, end_process_group
from shardloader.integrations.transformers import ShardTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shards", help="tokenized shards (shardloader convert --tokenizer)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args()

    dataset = ShardDataset(
        args.shards,
        config=StreamConfig(seed=0, shuffle=True),
        pack=PackConfig(seq_len=args.seq_len),  # documents packed end to end, kept apart
    )
    vocab_size = int((dataset.manifest.tokenizer or {})["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(  # tiny, built from a config: nothing is downloaded
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.seq_len,
            tie_word_embeddings=True,
        )
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,  # required: an epoch ends when the data does
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-3,
        warmup_steps=10,
        logging_steps=10,
        save_steps=30,
        dataloader_num_workers=args.workers,
        dataloader_persistent_workers=args.workers > 0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo",
        ddp_find_unused_parameters=False,
        report_to="none",
    )
    trainer = ShardTrainer(model=model, args=training, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    end_process_group()  # a barrier, then the group goes (README: SIGABRT at exit)


if __name__ == "__main__":
    main()
