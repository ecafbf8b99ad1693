"""What both framework rank scripts share (``tests/hf_trainer_run.py``,
``tests/lightning_run.py``): the tiny model, and the command line (train once, or resume from
each checkpoint in turn)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shardloader.world import end_process_group

VOCAB = 600  # the test tokenizer's vocabulary
SEQ_LEN = 64  # packed row length


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama of hidden size 32, initialized from seed 0 (the same on every rank)."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


Run = Callable[[argparse.Namespace, str, "str | None"], None]


def rank_main(run: Run) -> None:
    """``DATA OUT TAG --max-steps N [--save-steps N] [--resume CKPT ...] [--workers N]``.

    Without ``--resume``, ``run(args, TAG, None)``; else ``run(args, TAG-<checkpoint stem>,
    checkpoint)`` for each checkpoint, one after the other in this process.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("tag")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", action="append", default=[])
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    succeeded = False
    try:
        if not args.resume:
            run(args, args.tag, None)
        for checkpoint in args.resume:
            run(args, f"{args.tag}-{Path(checkpoint).stem}", checkpoint)
        succeeded = True
    finally:
        end_process_group(succeeded=succeeded)  # the frameworks leave it to the script
