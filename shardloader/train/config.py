"""`TrainConfig`: the settings of a training run, each a flag of ``python -m shardloader.train``.

The help of each flag lives in its field's `shardloader.options.option`; `add_options` and
`config_from_args` turn the class into an argument parser and back. `lr_at` is the
learning-rate schedule the settings describe (warmup, then cosine).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from shardloader.errors import ConfigError
from shardloader.options import option, parse_size
from shardloader.pack import PackConfig
from shardloader.train.model import PRESETS

LORA_ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head

_CHOICES = {
    "parallel": ("ddp", "fsdp"),
    "dtype": ("auto", "bf16", "fp32"),
    "device": ("auto", "cpu", "cuda"),
    "progress": ("auto", "on", "off"),
    "shuffle_unit": ("auto", "shard", "block"),
}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run; every field is also a flag of ``python -m shardloader.train``.

    Raises:
        ConfigError: A value is out of range.
    """

    data: str = option(
        "",
        help="the shards: a directory or URL with _manifest.json (s3://...); or give --mix",
        positional=True,
    )
    mix: str | None = option(
        None, "a mixture file (YAML or JSON, unit: tokens) to train on instead of DATA"
    )
    output_dir: str = option(help="checkpoints, metrics.jsonl and samples/ go here")
    model: str = option("tiny", f"a preset ({', '.join(PRESETS)}) or a local model directory")
    tokenizer: str | None = option(None, "local tokenizer (needed for text shards)")
    seq_len: int = option(512, "tokens per packed row")
    batch_size: int = option(8, "rows per rank per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int | None = option(None, "stop after this many steps (default: run --epochs)")
    epochs: int = option(1, "passes over the data when --max-steps is not given")
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "the cosine ends at lr * min_lr_ratio")
    warmup_steps: int = option(10, "linear warmup steps")
    schedule_steps: int | None = option(
        None, "length of the cosine (default: max_steps, or estimated from the token count)"
    )
    weight_decay: float = option(0.1, "AdamW weight decay (not on biases and norms)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = option(0, "model init and data order")
    shuffle: bool = option(True, "shuffle shards and samples (seed + epoch)")
    shuffle_window: int | None = option(
        None,
        "units a worker mixes, and holds, at most at once (default: 4 shards, or the blocks "
        "that fit shuffle_bytes)",
    )
    shuffle_unit: str = option(
        "auto",
        "what the plan permutes: block (Arrow record batches, Parquet row groups), shard, or "
        "auto (block for local shards whose manifest records their blocks' sizes)",
    )
    shuffle_bytes: int | None = option(
        None,
        "bound on what a worker holds decoded (default: 64MiB in block mode; 0: none)",
        parse=parse_size,
    )
    pack_mode: str = option(
        "auto",
        "packing: auto (bfd for chat data, so a conversation stays whole in one row; concat "
        "otherwise), concat, bfd or pad (shardloader.PackConfig)",
    )
    long_docs: str = option(
        "auto",
        "bfd and pad: documents longer than seq_len are split, truncated or dropped; auto splits "
        "text and truncates conversations (counted in the log)",
    )
    cache_dir: str | None = option(None, "node-local cache of remote shards (StreamConfig)")
    num_workers: int = option(2, "DataLoader workers per rank")
    prefetch_factor: int = option(4, "batches each worker reads ahead")
    parallel: str = option("ddp", "ddp, or fsdp (FSDP2 fully_shard per decoder layer)")
    dtype: str = option("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    device: str = option("auto", "auto, cpu or cuda")
    attn_implementation: str = option("sdpa", "sdpa, eager or flash_attention_2")
    checkpoint_every: int = option(0, "save every this many steps (0: only at the end)")
    keep_checkpoints: int = option(2, "complete checkpoints to keep (0: all)")
    save_model: bool = option(True, "at the end, write OUT/model/ (from_pretrained reads it)")
    resume: bool = option(False, "continue from the newest checkpoint in output_dir")
    log_every: int = option(1, "log and record metrics every this many steps")
    log_samples: bool = option(False, "each rank writes the sample ids of each step")
    deterministic: bool = option(False, "deterministic kernels (exact resume; slower)")
    progress: str = option("auto", "progress bar on rank 0: auto (on a terminal), on or off")
    lora_rank: int = option(
        0, "LoRA rank: train low-rank adapters only (0: full fine-tuning; needs peft)"
    )
    lora_alpha: float = option(16.0, "LoRA scale: adapter updates are scaled by alpha / rank")
    lora_dropout: float = option(0.0, "dropout on the adapters' input (training only)")
    lora_targets: tuple[str, ...] = option(
        (LORA_ALL_LINEAR,),
        f"modules that get adapters: {LORA_ALL_LINEAR} (every linear layer but the output "
        "head) or names such as q_proj,k_proj,v_proj,o_proj",
    )
    merge_lora: bool = option(
        False, "at the end, also write OUT/model/: the base with the adapter merged in"
    )
    eval_data: str | None = option(
        None, "held-out shards (same tokenizer) to report eval loss on, each rank its split"
    )
    eval_every: int = option(0, "eval every this many steps (0: only at the end of the run)")
    eval_max_batches: int | None = option(None, "bound each eval to this many batches per rank")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("TrainConfig needs output_dir")
        if bool(self.data) == bool(self.mix):
            raise ConfigError("TrainConfig needs either data (the shards) or mix (a mixture file)")
        if self.mix and self.pack_mode not in ("auto", "concat"):
            raise ConfigError(
                f"a mixture packs documents end to end (pack_mode 'concat'), not {self.pack_mode!r}"
            )
        positive = ("seq_len", "batch_size", "grad_accum", "epochs", "log_every", "shuffle_window")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.pack_config()  # validates the mode
        self._check_lora()
        self._check_eval()

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if self.merge_lora and not self.lora_rank:
            raise ConfigError("merge_lora needs LoRA: set lora_rank (e.g. --lora-rank 8)")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.lora_targets
        if not targets or (LORA_ALL_LINEAR in targets and len(targets) > 1):
            raise ConfigError(
                f"lora_targets must be {LORA_ALL_LINEAR} alone or a list of module names, "
                f"got {','.join(targets) or 'nothing'}"
            )

    def _check_eval(self) -> None:
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ConfigError(f"eval_max_batches must be >= 1, got {self.eval_max_batches}")
        if not self.eval_data and (self.eval_every or self.eval_max_batches is not None):
            raise ConfigError("eval_every and eval_max_batches need eval_data (--eval-data)")

    @property
    def source(self) -> str:
        """What the run reads, for messages: the data, or the mixture file."""
        return self.mix or self.data

    def pack_config(self, *, chat: bool = False) -> PackConfig:
        """How the run packs documents into rows.

        Args:
            chat: The data holds conversations (`is_chat_data`): ``pack_mode="auto"`` packs
                them with ``bfd``, whole, instead of ``concat``. Mixtures always concatenate.
        """
        mode = self.pack_mode
        if mode == "auto":
            mode = "bfd" if chat and not self.mix else "concat"
        return PackConfig(seq_len=self.seq_len, mode=mode, long_docs=self.long_docs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in checkpoints)."""
        return dataclasses.asdict(self)


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
