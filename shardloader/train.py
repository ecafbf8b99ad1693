"""Fine-tune a causal LM on shards: ``torchrun ... -m shardloader.train DATA --output-dir OUT``.

The loop, per optimizer step: take ``grad_accum`` packed batches from the `ShardLoader` (timing
how long it blocks: the *data wait*), agree with the other ranks on the number of trained tokens
(one all-reduce of three numbers), run forward and backward on each batch with the loss summed
over tokens and divided by the global token count (so every token weighs the same whatever rank
or batch holds it), clip, step AdamW and the warmup + cosine schedule. Ranks read the same
number of documents but pack them into different numbers of rows, so a rank whose epoch has
ended takes empty batches (all labels ignored: zero gradient) until every rank's has; no
document is dropped to keep ranks in step.

Checkpoints (`shardloader.checkpoint`) hold model, optimizer, schedule, RNG and the loader state
of all ranks; ``--resume`` continues from the newest one exactly on the same topology, and
without losing or repeating a document on another world size. Every ``log_every`` steps rank 0
logs loss, learning rate, global trained tokens/s and the data-wait fraction, and appends them
to ``metrics.jsonl``; ``--log-samples`` makes each rank write the sample ids of each step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardloader.checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from shardloader.dataset import ShardDataset, StreamConfig
from shardloader.errors import ConfigError, ShardloaderError
from shardloader.loader import ShardLoader
from shardloader.pack import IGNORE_INDEX, PackConfig
from shardloader.pack_attention import model_inputs
from shardloader.train_model import (
    PRESETS,
    build_model,
    count_parameters,
    export_model,
    parallelize,
)

log = logging.getLogger("shardloader.train")  # also when run as __main__

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run; every field is also a flag of ``python -m shardloader.train``.

    Raises:
        ConfigError: A value is out of range.
    """

    data: str = _opt("", "the shards: a directory or URL with _manifest.json (s3://...)")
    output_dir: str = _opt("", "checkpoints, metrics.jsonl and samples/ go here")
    model: str = _opt("tiny", f"a preset ({', '.join(PRESETS)}) or a local model directory")
    tokenizer: str | None = _opt(None, "local tokenizer (needed for text shards)")
    seq_len: int = _opt(512, "tokens per packed row")
    batch_size: int = _opt(8, "rows per rank per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int | None = _opt(None, "stop after this many steps (default: run --epochs)")
    epochs: int = _opt(1, "passes over the data when --max-steps is not given")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr_ratio: float = _opt(0.1, "the cosine ends at lr * min_lr_ratio")
    warmup_steps: int = _opt(10, "linear warmup steps")
    schedule_steps: int | None = _opt(
        None, "length of the cosine (default: max_steps, or estimated from the token count)"
    )
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on biases and norms)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = _opt(0, "model init and data order")
    shuffle: bool = _opt(True, "shuffle shards and samples (seed + epoch)")
    pack_mode: str = _opt("concat", "packing: concat, bfd or pad (shardloader.PackConfig)")
    cache_dir: str | None = _opt(None, "node-local cache of remote shards (StreamConfig)")
    num_workers: int = _opt(2, "DataLoader workers per rank")
    prefetch_factor: int = _opt(4, "batches each worker reads ahead")
    parallel: str = _opt("ddp", "ddp, or fsdp (FSDP2 fully_shard per decoder layer)")
    dtype: str = _opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    device: str = _opt("auto", "auto, cpu or cuda")
    attn_implementation: str = _opt("sdpa", "sdpa, eager or flash_attention_2")
    checkpoint_every: int = _opt(0, "save every this many steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "complete checkpoints to keep (0: all)")
    save_model: bool = _opt(True, "at the end, write OUT/model/ (from_pretrained reads it)")
    resume: bool = _opt(False, "continue from the newest checkpoint in output_dir")
    log_every: int = _opt(1, "log and record metrics every this many steps")
    log_samples: bool = _opt(False, "each rank writes the sample ids of each step")
    deterministic: bool = _opt(False, "deterministic kernels (exact resume; slower)")
    progress: str = _opt("auto", "progress bar on rank 0: auto (on a terminal), on or off")

    def __post_init__(self) -> None:
        if not self.data or not self.output_dir:
            raise ConfigError("TrainConfig needs data (the shards) and output_dir")
        positive = ("seq_len", "batch_size", "grad_accum", "epochs", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        choices = {
            "parallel": ("ddp", "fsdp"),
            "dtype": ("auto", "bf16", "fp32"),
            "device": ("auto", "cpu", "cuda"),
            "progress": ("auto", "on", "off"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        PackConfig(seq_len=self.seq_len, mode=self.pack_mode)  # validates the mode

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


@dataclass
class _Runtime:
    rank: int
    world_size: int
    device: torch.device
    autocast: torch.dtype | None


@dataclass
class StepMetrics:
    """What one optimizer step did (global figures, the same on every rank)."""

    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_s: float
    data_wait_s: float
    # Rank 0's loader since the previous record: seconds per stage over the workers' capacity
    # (wall time x max(num_workers, 1)); see ShardLoader.stage_seconds.
    loader_busy: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens of all ranks per second of step time."""
        return self.tokens / self.step_s if self.step_s > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        """Time blocked on the loader over step time (mean over ranks)."""
        return self.data_wait_s / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A metrics.jsonl record."""
        return {
            **dataclasses.asdict(self),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "data_wait_fraction": round(self.data_wait_fraction, 5),
        }


@dataclass
class TrainResult:
    """A finished run, as rank 0 saw it."""

    steps: int
    tokens: int
    elapsed_s: float
    final_loss: float
    data_wait_fraction: float
    steady_data_wait_fraction: float  # without the run's first step (DataLoader start-up)
    checkpoint: str | None
    history: list[StepMetrics] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens of all ranks per second of the run."""
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _start_runtime(config: TrainConfig) -> _Runtime:
    """Join the process group torchrun describes (if any) and pick device and precision."""
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    bf16 = config.dtype == "bf16" or (config.dtype == "auto" and cuda)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    return _Runtime(rank, world_size, device, torch.bfloat16 if bf16 else None)


def _vocab_size(dataset: ShardDataset, config: TrainConfig) -> int:
    info = dataset.manifest.tokenizer
    if info and info.get("vocab_size"):
        return int(info["vocab_size"])
    if config.tokenizer is None:
        raise ConfigError(
            f"{config.data}: text shards; pass --tokenizer (or convert with --tokenizer)"
        )
    return int(dataset.tokenizer.info.vocab_size)


def _schedule_steps(dataset: ShardDataset, config: TrainConfig, world_size: int) -> int:
    if config.schedule_steps is not None:
        return config.schedule_steps
    if config.max_steps is not None:
        return config.max_steps
    tokens = sum(dataset.manifest.shards.column("num_tokens"))
    if tokens == 0:
        raise ConfigError(
            f"{config.data}: text shards hold no token count; pass --max-steps or "
            "--schedule-steps (or convert with --tokenizer)"
        )
    per_step = config.seq_len * config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * tokens / per_step))


def _make_loader(config: TrainConfig, runtime: _Runtime) -> ShardLoader:
    dataset = ShardDataset(
        config.data,
        config=StreamConfig(seed=config.seed, shuffle=config.shuffle, cache_dir=config.cache_dir),
        pack=PackConfig(seq_len=config.seq_len, mode=config.pack_mode),
        tokenizer=config.tokenizer,
    )
    workers = config.num_workers
    return ShardLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        prefetch_factor=config.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
    )


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = any(p.is_cuda for p in decay)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None
    )


def _empty_batch(config: TrainConfig) -> dict[str, Any]:
    """A batch that trains nothing: for a rank whose epoch ended before the others'."""
    shape = (config.batch_size, config.seq_len)
    positions = torch.arange(config.seq_len).expand(shape).contiguous()
    return {
        "input_ids": torch.zeros(shape, dtype=torch.int64),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
        "position_ids": positions,
        "cu_seqlens": torch.arange(0, config.batch_size * config.seq_len + 1, config.seq_len).to(
            torch.int32
        ),
        "max_seqlen": config.seq_len,
        "sample_ids": torch.zeros(0, dtype=torch.int64),
    }


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _forward_sum(
    model: nn.Module, batch: dict[str, Any], runtime: _Runtime, attn: str
) -> torch.Tensor:
    """Sum of the next-token losses of a batch (documents kept apart by ``position_ids``)."""
    inputs = model_inputs(_to_device(batch, runtime.device), attn_implementation=attn)
    labels = inputs.pop("labels")
    autocast = (
        torch.autocast(runtime.device.type, dtype=runtime.autocast)
        if runtime.autocast is not None
        else nullcontext()
    )
    with autocast:
        logits = model(**inputs).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _no_sync(model: nn.Module, last: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if last:
        return nullcontext()
    wrapped: Any = model
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _ResyncFSDP(wrapped)
    return nullcontext()


class _ResyncFSDP:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)


def _all_reduce(values: list[float], runtime: _Runtime) -> list[float]:
    if runtime.world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class _Trainer:
    """The state of a run between steps."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.runtime = _start_runtime(config)
        self.loader = _make_loader(config, self.runtime)
        dataset = self.loader.shard_dataset
        self.schedule_steps = _schedule_steps(dataset, config, self.runtime.world_size)
        model = build_model(
            config.model,
            vocab_size=_vocab_size(dataset, config),
            max_positions=config.seq_len,
            seed=config.seed,
            attn_implementation=config.attn_implementation,
        )
        self.num_parameters = count_parameters(model)
        self.model = parallelize(
            model.to(self.runtime.device), parallel=config.parallel, device=self.runtime.device
        )
        self.optimizer = _make_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_at(
                step,
                lr=1.0,
                warmup_steps=self.config.warmup_steps,
                total_steps=self.schedule_steps,
                min_ratio=self.config.min_lr_ratio,
            ),
        )
        self.step = 0
        self.epochs_done = 0
        self._it: Iterator[Any] | None = None
        self._saved_step = -1  # the step of the newest checkpoint this run wrote or loaded
        self._stages_at: tuple[float, dict[str, float]] = (time.perf_counter(), {})
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / CHECKPOINTS_DIR

    # --- checkpoints ----------------------------------------------------------------------

    def save(self) -> Path:
        rng = [torch.get_rng_state()]
        if torch.cuda.is_available():
            rng.append(torch.cuda.get_rng_state())
        rngs: list[Any] = [rng]
        if self.runtime.world_size > 1:
            rngs = [None] * self.runtime.world_size
            dist.all_gather_object(rngs, rng)
        state = {
            "step": self.step,
            "epochs_done": self.epochs_done,
            "schedule_steps": self.schedule_steps,
            "scheduler": self.scheduler.state_dict(),
            "loader": json.dumps(self.loader.state_dict(gather=True)),
            "rng": rngs,
            "world_size": self.runtime.world_size,
            "config": json.dumps(self.config.to_dict()),
        }
        path = save_checkpoint(
            self.checkpoints,
            self.step,
            self.model,
            self.optimizer,
            state,
            keep=self.config.keep_checkpoints,
        )
        self._saved_step = self.step
        log.info("step %d: checkpoint %s", self.step, path)
        return path

    def restore(self) -> Path | None:
        found = resume_checkpoint(self.checkpoints, self.model, self.optimizer)
        if found is None:
            log.info("%s: no checkpoint yet, starting from step 0", self.checkpoints)
            return None
        path, state = found
        self.step = self._saved_step = int(state["step"])
        self.epochs_done = int(state["epochs_done"])
        self.schedule_steps = int(state["schedule_steps"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(json.loads(state["loader"]))
        if int(state["world_size"]) == self.runtime.world_size:
            rng = state["rng"][self.runtime.rank]
            torch.set_rng_state(rng[0])
            if len(rng) > 1 and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng[1])
        self._truncate_logs()
        log.info("resumed from %s (step %d)", path, self.step)
        return path

    def _truncate_logs(self) -> None:
        """Drop records of steps after the checkpoint: they are trained again."""
        if self.runtime.rank == 0:
            files = [self.output / METRICS_FILE, *(self.output / SAMPLES_DIR).glob("*.jsonl")]
            for file in files:
                if file.is_file():
                    lines = file.read_text().splitlines(keepends=True)
                    kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
                    file.write_text("".join(kept))
        if self.runtime.world_size > 1:
            dist.barrier()

    # --- the loop -------------------------------------------------------------------------

    def _next_micro(self) -> list[dict[str, Any] | None]:
        """This step's micro-batches (``None`` once this rank's epoch has ended)."""
        if self._it is None:
            self._it = iter(self.loader)
        return [next(self._it, None) for _ in range(self.config.grad_accum)]

    def run(self) -> TrainResult:
        config, runtime = self.config, self.runtime
        history: list[StepMetrics] = []
        samples_file = None
        if config.log_samples:
            (self.output / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
            samples_file = open(  # noqa: SIM115 - closed in finally
                self.output / SAMPLES_DIR / f"rank-{runtime.rank:04d}.jsonl", "a"
            )
        metrics_file = open(self.output / METRICS_FILE, "a") if runtime.rank == 0 else None  # noqa: SIM115
        bar = _progress(config, runtime, self.step, config.max_steps)
        started, trained_tokens = time.perf_counter(), 0
        wait_total = step_total = steady_wait = steady_total = 0.0
        last_saved = None
        try:
            while self._more():
                tick = time.perf_counter()
                micro = self._next_micro()
                wait = time.perf_counter() - tick
                present = [m for m in micro if m is not None]
                local_tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in present)
                total_tokens, ranks_with_data = _all_reduce(
                    [float(local_tokens), float(bool(present))], runtime
                )
                if ranks_with_data == 0:  # every rank finished the epoch
                    self._it = None  # the next iter() moves the loader to the next epoch
                    self.epochs_done += 1
                    continue
                loss_sum = self._step(micro, total_tokens)
                loss_total, wait_sum = _all_reduce([loss_sum, wait], runtime)
                elapsed = time.perf_counter() - tick
                self.step += 1
                metrics = StepMetrics(
                    step=self.step,
                    epoch=self.loader.shard_dataset.epoch,
                    loss=loss_total / max(total_tokens, 1.0),
                    lr=float(self.scheduler.get_last_lr()[0]),
                    grad_norm=self._last_grad_norm,
                    tokens=int(total_tokens),
                    step_s=elapsed,
                    data_wait_s=wait_sum / runtime.world_size,
                )
                self.scheduler.step()
                history.append(metrics)
                trained_tokens += metrics.tokens
                wait_total += metrics.data_wait_s
                step_total += elapsed
                if len(history) > 1:
                    steady_wait += metrics.data_wait_s
                    steady_total += elapsed
                if samples_file is not None:
                    ids = list(dict.fromkeys(i for m in present for i in m["sample_ids"].tolist()))
                    samples_file.write(json.dumps({"step": self.step, "sample_ids": ids}) + "\n")
                    samples_file.flush()
                if self.step % config.log_every == 0:
                    self._report(metrics, metrics_file, bar)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    last_saved = self.save()
            if self.step != self._saved_step:
                last_saved = self.save()
        finally:
            if samples_file is not None:
                samples_file.close()
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - started
        return TrainResult(
            steps=self.step,
            tokens=trained_tokens,
            elapsed_s=elapsed,
            final_loss=history[-1].loss if history else float("nan"),
            data_wait_fraction=wait_total / step_total if step_total else 0.0,
            steady_data_wait_fraction=steady_wait / steady_total if steady_total else 0.0,
            checkpoint=str(last_saved or latest_checkpoint(self.checkpoints) or "") or None,
            history=history,
        )

    def _more(self) -> bool:
        if self.config.max_steps is not None:
            return self.step < self.config.max_steps
        return self.epochs_done < self.config.epochs

    def _step(self, micro: list[dict[str, Any] | None], total_tokens: float) -> float:
        """Forward and backward over the micro-batches, then one optimizer step."""
        config, runtime = self.config, self.runtime
        # DDP and FSDP average gradients over ranks; scaling by world_size / global tokens
        # makes the result the gradient of the mean loss over all trained tokens.
        scale = runtime.world_size / max(total_tokens, 1.0)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with ExitStack() as stack:
                stack.enter_context(_no_sync(self.model, last))
                summed = _forward_sum(
                    self.model, batch or _empty_batch(config), runtime, config.attn_implementation
                )
                (summed * scale).backward()
            loss_sum += float(summed.detach())
        if config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            full = getattr(norm, "full_tensor", None)
            self._last_grad_norm = float(full() if full is not None else norm)
        else:
            self._last_grad_norm = float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    _last_grad_norm: float = float("nan")

    def _report(self, m: StepMetrics, metrics_file: Any, bar: Any) -> None:
        if self.runtime.rank != 0:
            return
        now, stages = time.perf_counter(), self.loader.stage_seconds()
        capacity = (now - self._stages_at[0]) * max(self.config.num_workers, 1)
        m.loader_busy = {
            name: round((seconds - self._stages_at[1].get(name, 0.0)) / capacity, 4)
            for name, seconds in stages.items()
        }
        self._stages_at = (now, stages)
        metrics_file.write(json.dumps(m.to_dict()) + "\n")
        metrics_file.flush()
        line = (
            f"step {m.step}{'/' + str(self.config.max_steps) if self.config.max_steps else ''}"
            f" | epoch {m.epoch} | loss {m.loss:.4f} | lr {m.lr:.2e} | "
            f"{m.tokens_per_s / 1e3:.1f}k tok/s | data wait {m.data_wait_fraction:.1%} | "
            f"workers busy {sum(m.loader_busy.values()):.0%}"
        )
        if bar is not None:
            bar.set_postfix_str(line.split(" | ", 1)[1])
            bar.update(m.step - bar.n)
        else:
            log.info("%s", line)


def _progress(config: TrainConfig, runtime: _Runtime, start: int, total: int | None) -> Any:
    if runtime.rank != 0 or config.progress == "off":
        return None
    if config.progress == "auto" and not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; under torchrun, call it on every rank.

    Returns:
        What the run did, with per-step metrics.

    Raises:
        ConfigError: A bad setting, named.
        ResumeError: ``resume`` found a checkpoint that does not fit this run.
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(config)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(config: TrainConfig) -> TrainResult:
    trainer = _Trainer(config)
    runtime = trainer.runtime
    if runtime.rank == 0:
        trainer.output.mkdir(parents=True, exist_ok=True)
        log.info(
            "%s: %.2fM parameters, %s on %d rank(s), %s, seq_len %d x %d rows x %d accum",
            config.model,
            trainer.num_parameters / 1e6,
            config.parallel,
            runtime.world_size,
            "bf16 autocast" if runtime.autocast else "fp32",
            config.seq_len,
            config.batch_size,
            config.grad_accum,
        )
    if runtime.world_size > 1:
        dist.barrier()
    if config.resume:
        trainer.restore()
    try:
        result = trainer.run()
        if config.save_model:
            export_model(trainer.model, str(trainer.output / MODEL_DIR), rank=runtime.rank)
            if runtime.rank == 0:
                log.info("model written to %s", trainer.output / MODEL_DIR)
    finally:
        trainer.loader.shard_dataset.close()
    if runtime.rank == 0:
        log.info(
            "done: %d steps, %d tokens in %.1f s (%.1fk tok/s), final loss %.4f, "
            "data wait %.1f%% of step time (%.1f%% after the first step, which includes the "
            "DataLoader's start-up), checkpoint %s",
            result.steps,
            result.tokens,
            result.elapsed_s,
            result.tokens_per_s / 1e3,
            result.final_loss,
            100 * result.data_wait_fraction,
            100 * result.steady_data_wait_fraction,
            result.checkpoint,
        )
    return result


# --- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field (``data`` is positional)."""
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        if f.name == "data":
            parser.add_argument("data", help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        required = f.name == "output_dir"
        parser.add_argument(
            flag,
            type=kind,
            default=None if required else f.default,
            required=required,
            help=f"{help_text} (default {f.default})" if not required else help_text,
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of parsed ``add_arguments`` flags."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shardloader.train``: train on every rank torchrun starts; the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m shardloader.train", description=__doc__.split("\n", 1)[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # `shardloader train` configured logging for every rank already
    )
    try:
        train(config_from_args(args))
    except ShardloaderError as err:
        print(f"error: [rank {rank}] {err}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
