"""The training loop: `train` runs (or resumes) a run on every rank torchrun starts.

Per optimizer step: take ``grad_accum`` packed batches from the `ShardLoader` (timing how long
it blocks: the *data wait*), agree with the other ranks on the number of trained tokens (one
all-reduce of two numbers), run forward and backward on each batch with the loss summed over
tokens and divided by the global token count (so every token weighs the same whatever rank or
batch holds it), clip, step AdamW and the warmup + cosine schedule (`lr_at`). Ranks read the
same number of documents but pack them into different numbers of rows, so a rank whose epoch
has ended takes empty batches (`shardloader.pack.empty_batch`: all labels ignored, zero
gradient) until every rank's has; no document is dropped to keep ranks in step.

An empty dataset (no samples, or tokenized shards without tokens) is refused before the model is
built, and a pass over the data that gives no batch on any rank stops the run with an error
rather than looping for ever.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardloader.dataset import ShardDataset, StreamConfig
from shardloader.errors import ConfigError, ShardloaderError
from shardloader.loader import ShardLoader
from shardloader.manifest import Manifest
from shardloader.mix_config import Mixture
from shardloader.mix_dataset import MixDataset, MixLoader
from shardloader.options import add_options, config_from_args
from shardloader.pack import IGNORE_INDEX, empty_batch
from shardloader.train.checkpoint import (
    CHECKPOINTS_DIR,
    apply_trainer_state,
    latest_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    trainer_state,
    truncate_logs,
)
from shardloader.train.config import TrainConfig, lr_at
from shardloader.train.evaluation import Evaluator
from shardloader.train.lora import (
    apply_lora,
    base_identity,
    check_resume,
    count_trainable,
    export_lora,
    local_base,
    require_peft,
)
from shardloader.train.metrics import RunLog, StepMetrics, TrainResult
from shardloader.train.model import (
    build_model,
    count_parameters,
    export_model,
    forward_loss_sum,
    no_sync,
    parallelize,
)
from shardloader.world import end_process_group, launch_env

log = logging.getLogger("shardloader.train")  # also when run as __main__

MODEL_DIR = "model"


@dataclass
class _Runtime:
    rank: int
    world_size: int
    device: torch.device
    autocast: torch.dtype | None


def _start_runtime(config: TrainConfig) -> _Runtime:
    """Join the process group torchrun describes (if any) and pick device and precision."""
    cuda = torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no GPU")
    launched = launch_env()
    device = torch.device("cuda", launched.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if launched.world_size > 1 and not dist.is_initialized():
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


def check_not_empty(manifest: Manifest, data: str) -> None:
    """Refuse a dataset without samples, or tokenized shards without tokens: nothing to train.

    Raises:
        ConfigError: Naming ``data``.
    """
    if manifest.num_samples == 0:
        raise ConfigError(
            f"{data}: the dataset holds no samples ({len(manifest.shards)} shards); "
            "convert a corpus with at least one document"
        )
    if manifest.tokenized and manifest.num_tokens == 0:
        raise ConfigError(
            f"{data}: the dataset holds {manifest.num_samples} samples but no tokens; "
            "convert a corpus with non-empty documents"
        )


def _vocab_size(dataset: ShardDataset | MixDataset, config: TrainConfig) -> int:
    if isinstance(dataset, MixDataset):  # token mixtures: tokenized sources, one tokenizer
        return int((dataset.manifests()[0].tokenizer or {})["vocab_size"])
    info = dataset.manifest.tokenizer
    if info and info.get("vocab_size"):
        return int(info["vocab_size"])
    if config.tokenizer is None:
        raise ConfigError(
            f"{config.data}: text shards; pass --tokenizer (or convert with --tokenizer)"
        )
    return int(dataset.tokenizer.info.vocab_size)


def _schedule_steps(
    dataset: ShardDataset | MixDataset, config: TrainConfig, world_size: int
) -> int:
    if config.schedule_steps is not None:
        return config.schedule_steps
    if config.max_steps is not None:
        return config.max_steps
    if isinstance(dataset, MixDataset):
        tokens = dataset.spec().total  # an epoch of the mixture, in tokens
    else:
        tokens = sum(dataset.manifest.shards.column("num_tokens"))
    if tokens == 0:
        raise ConfigError(
            f"{config.data}: text shards hold no token count; pass --max-steps or "
            "--schedule-steps (or convert with --tokenizer)"
        )
    per_step = config.seq_len * config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * tokens / per_step))


def _make_loader(config: TrainConfig, runtime: _Runtime) -> ShardLoader | MixLoader:
    stream = StreamConfig(
        seed=config.seed,
        shuffle=config.shuffle,
        shuffle_window=config.shuffle_window,
        shuffle_unit=config.shuffle_unit,
        shuffle_bytes=config.shuffle_bytes,
        cache_dir=config.cache_dir,
    )
    dataset: ShardDataset | MixDataset
    if config.mix:
        mixture = Mixture.from_file(config.mix)
        if mixture.unit != "tokens":
            raise ConfigError(
                f"{config.mix}: training reads packed rows, so the mixture is counted in "
                "tokens: set unit: tokens"
            )
        dataset = MixDataset(
            mixture, config=stream, pack=config.pack_config(), tokenizer=config.tokenizer
        )
    else:
        chat = False
        if config.pack_mode == "auto":  # bfd keeps conversations whole: peek at the manifest
            chat = ShardDataset(config.data, config=stream).manifest.conversations
        dataset = ShardDataset(
            config.data,
            config=stream,
            pack=config.pack_config(chat=chat),
            tokenizer=config.tokenizer,
        )
    workers = config.num_workers
    return ShardLoader(  # a MixLoader for a MixDataset
        dataset,  # type: ignore[arg-type]
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
        if config.lora_rank:
            require_peft()  # before anything starts
        self.runtime = _start_runtime(config)
        self.loader = _make_loader(config, self.runtime)
        dataset = self.dataset
        self.pack = dataset.pack or config.pack_config()  # pack_mode "auto" resolved
        if isinstance(dataset, MixDataset):
            dataset.spec()  # reads and checks every source (empty ones are refused)
        else:
            check_not_empty(dataset.manifest, config.data)
        self.evaluator = (
            Evaluator(
                config,
                train_data=dataset,
                rank=self.runtime.rank,
                world_size=self.runtime.world_size,
                device=self.runtime.device,
                autocast=self.runtime.autocast,
            )
            if config.eval_data
            else None
        )
        self.schedule_steps = _schedule_steps(dataset, config, self.runtime.world_size)
        self.vocab_size = _vocab_size(dataset, config)
        self._it: Iterator[Any] | None = None
        if not config.resume:
            # Start the loader before the model exists: its workers fork from a small process
            # and read their first batches while the model is built and moved to the device.
            # (A resumed run starts it once the checkpoint has set its position.)
            self._it = iter(self.loader)
        try:
            self._make_model()
        except BaseException:
            # The loader's (persistent) workers end with their iterator.
            self._it = self.loader._iterator = None
            raise
        self.step = 0
        self.epochs_done = 0
        self.saved_step = -1  # the step of the newest checkpoint this run wrote or loaded
        self._pass_may_be_empty = False  # the first pass after a resume may start at its end
        self._pass_start_step = 0
        self._last_grad_norm = float("nan")
        self.output = Path(config.output_dir)
        self.checkpoints = self.output / CHECKPOINTS_DIR
        self.records = RunLog(
            config,
            output=self.output,
            rank=self.runtime.rank,
            stage_seconds=self.loader.stage_seconds,
        )

    def _make_model(self) -> None:
        """The model on its device (wrapped for the parallel mode), its optimizer and schedule."""
        config = self.config
        model = self.build_local_model()
        self.num_parameters = count_parameters(model)
        self.num_trainable = count_trainable(model)
        self.base_identity = self._base_identity() if config.lora_rank else None
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

    def build_local_model(self) -> nn.Module:
        """The model on this process's CPU before wrapping: the base, with adapters for LoRA."""
        config = self.config
        model = build_model(
            config.model,
            vocab_size=self.vocab_size,
            max_positions=config.seq_len,
            seed=config.seed,
            attn_implementation=config.attn_implementation,
        )
        return apply_lora(model, config) if config.lora_rank else model

    def _base_identity(self) -> dict[str, Any]:
        """`base_identity` of the base model, computed by rank 0 (it may hash gigabytes)."""
        config = self.config
        found: list[Any] = [None]
        if self.runtime.rank == 0:
            found[0] = base_identity(
                config.model,
                seed=config.seed,
                vocab_size=self.vocab_size,
                max_positions=config.seq_len,
            )
        if self.runtime.world_size > 1:
            dist.broadcast_object_list(found, src=0)  # between our own ranks: trusted
        return dict(found[0])

    @property
    def dataset(self) -> ShardDataset | MixDataset:
        """The loader's dataset (one dataset, or a mixture)."""
        if isinstance(self.loader, MixLoader):
            return self.loader.mix_dataset
        return self.loader.shard_dataset

    def _epoch(self) -> int:
        if isinstance(self.loader, MixLoader):
            return self.loader.counters().epoch
        return self.loader.shard_dataset.epoch

    # --- checkpoints (trainer.pt's contents: shardloader.train.checkpoint) ------------------

    def save(self) -> Path:
        path = save_checkpoint(
            self.checkpoints,
            self.step,
            self.model,
            self.optimizer,
            trainer_state(self),
            keep=self.config.keep_checkpoints,
            trainable_only=bool(self.config.lora_rank),
        )
        self.saved_step = self.step
        log.info("step %d: checkpoint %s", self.step, path)
        return path

    def restore(self) -> Path | None:
        # The newest intact checkpoint: a damaged one is named in a warning and skipped.
        found = resume_checkpoint(
            self.checkpoints,
            self.model,
            self.optimizer,
            trainable_only=bool(self.config.lora_rank),
            check=lambda where, state: check_resume(where, state, self.config, self.base_identity),
        )
        if found is None:
            log.info("%s: no checkpoint yet, starting from step 0", self.checkpoints)
            return None
        path, state = found
        apply_trainer_state(self, state)
        truncate_logs(self.output, self.step, self.runtime)
        self._pass_may_be_empty = True
        self._pass_start_step = self.step
        log.info("resumed from %s (step %d)", path, self.step)
        return path

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        last_saved = None
        with self.records.open(self.step) as records:
            while self._more():
                taken = self._take_step()
                if taken is None:  # every rank finished the epoch
                    continue
                records.record(*taken)
                if self._eval_due():
                    self._evaluate(records, taken[0])
                every = self.config.checkpoint_every
                if every and self.step % every == 0:
                    last_saved = self.save()
            history = records.history
            if self.evaluator and history and history[-1].eval_loss is None:
                self._evaluate(records, history[-1])  # the end of an epochs run
            if self.step != self.saved_step:
                last_saved = self.save()
        checkpoint = last_saved or latest_checkpoint(self.checkpoints)
        return records.result(self.step, str(checkpoint) if checkpoint else None)

    def _eval_due(self) -> bool:
        """An eval follows this step: every ``eval_every`` steps, and after the last one."""
        if self.evaluator is None:
            return False
        every = self.config.eval_every
        return bool(every and self.step % every == 0) or self.step == self.config.max_steps

    def _evaluate(self, records: RunLog, metrics: StepMetrics) -> None:
        assert self.evaluator is not None
        loss, tokens = self.evaluator.evaluate(self.model)
        records.record_eval(metrics, loss, tokens)

    def _more(self) -> bool:
        if self.config.max_steps is not None:
            return self.step < self.config.max_steps
        return self.epochs_done < self.config.epochs

    def _next_micro(self) -> list[dict[str, Any] | None]:
        """This step's micro-batches (``None`` once this rank's epoch has ended)."""
        if self._it is None:
            self._it = iter(self.loader)
        return [next(self._it, None) for _ in range(self.config.grad_accum)]

    def _take_step(self) -> tuple[StepMetrics, list[dict[str, Any]]] | None:
        """One optimizer step and its metrics, with this rank's batches; ``None`` at epoch end."""
        runtime = self.runtime
        tick = time.perf_counter()
        micro = self._next_micro()
        wait = time.perf_counter() - tick
        present = [m for m in micro if m is not None]
        local_tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in present)
        total_tokens, ranks_with_data = _all_reduce(
            [float(local_tokens), float(bool(present))], runtime
        )
        if ranks_with_data == 0:
            self._end_epoch()
            return None
        loss_sum = self._step(micro, total_tokens)
        loss_total, wait_sum = _all_reduce([loss_sum, wait], runtime)
        elapsed = time.perf_counter() - tick
        self.step += 1
        metrics = StepMetrics(
            step=self.step,
            epoch=self._epoch(),
            loss=loss_total / max(total_tokens, 1.0),
            lr=float(self.scheduler.get_last_lr()[0]),
            grad_norm=self._last_grad_norm,
            tokens=int(total_tokens),
            step_s=elapsed,
            data_wait_s=wait_sum / runtime.world_size,
        )
        if isinstance(self.loader, MixLoader):  # realized against target, all ranks together
            metrics.mix = {
                row["source"]: {
                    "tokens": row["tokens"],
                    "target": round(row["target"], 1),
                    "samples": row["samples"],
                }
                for row in self.loader.mix_counters()
            }
        self.scheduler.step()
        return metrics, present

    def _end_epoch(self) -> None:
        """Every rank's epoch has ended: the next iter() moves the loader to the next one.

        Raises:
            ConfigError: A whole pass gave no batch on any rank (nothing in the data to train),
                which would otherwise loop for ever under ``max_steps``.
        """
        if self.step == self._pass_start_step and not self._pass_may_be_empty:
            raise ConfigError(
                f"{self.config.source}: a pass over the data gave no batch on any of the "
                f"{self.runtime.world_size} ranks; "
                "train on a dataset with at least one non-empty document per rank"
            )
        self._it = None
        self.epochs_done += 1
        self._pass_may_be_empty = False
        self._pass_start_step = self.step

    def _step(self, micro: list[dict[str, Any] | None], total_tokens: float) -> float:
        """Forward and backward over the micro-batches, then one optimizer step."""
        config, runtime = self.config, self.runtime
        # DDP and FSDP average gradients over ranks; scaling by world_size / global tokens
        # makes the result the gradient of the mean loss over all trained tokens.
        scale = runtime.world_size / max(total_tokens, 1.0)
        loss_sum = 0.0
        for i, batch in enumerate(micro):
            with no_sync(self.model, last=i == len(micro) - 1):
                summed = forward_loss_sum(
                    self.model,
                    batch or empty_batch(self.pack, config.batch_size),
                    device=runtime.device,
                    autocast=runtime.autocast,
                    attn_implementation=config.attn_implementation,
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


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; under torchrun, call it on every rank.

    Returns:
        What the run did, with per-step metrics.

    Raises:
        ConfigError: A bad setting, named; or a dataset with nothing to train.
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
        _log_start(trainer)
    if runtime.world_size > 1:
        dist.barrier()
    try:
        if config.resume:
            trainer.restore()
        result = trainer.run()
        if config.save_model and config.lora_rank:
            export_lora(
                trainer.model,
                trainer.output,
                rank=runtime.rank,
                rebuild=trainer.build_local_model,
                base_directory=local_base(config.model),
                merge=config.merge_lora,
                model_dir=MODEL_DIR,
            )
        elif config.save_model:
            export_model(trainer.model, str(trainer.output / MODEL_DIR), rank=runtime.rank)
            if runtime.rank == 0:
                log.info("model written to %s", trainer.output / MODEL_DIR)
    finally:
        trainer.dataset.close()
        if trainer.evaluator is not None:
            trainer.evaluator.close()
    if runtime.rank == 0:
        _log_done(result)
    return result


def _log_start(trainer: _Trainer) -> None:
    config, runtime = trainer.config, trainer.runtime
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
    if config.lora_rank:
        log.info(
            "LoRA rank %d, alpha %g on %s: %.3fM trainable parameters (%.2f%%), base frozen",
            config.lora_rank,
            config.lora_alpha,
            ",".join(config.lora_targets),
            trainer.num_trainable / 1e6,
            100 * trainer.num_trainable / max(trainer.num_parameters, 1),
        )


def _log_done(result: TrainResult) -> None:
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
    if result.eval_loss is not None:
        log.info("final eval loss %.4f", result.eval_loss)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shardloader.train``: train on every rank torchrun starts; the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m shardloader.train",
        description="Fine-tune a causal LM on shards: "
        "``torchrun ... -m shardloader.train DATA --output-dir OUT``.",
    )
    add_options(parser, TrainConfig)
    args = parser.parse_args(argv)
    rank = 0
    done = False
    try:
        rank = launch_env().rank
        _configure_logging(rank)
        train(config_from_args(TrainConfig, args))
        done = True
    except ShardloaderError as err:
        print(f"error: [rank {rank}] {err}", file=sys.stderr)
        return 1
    finally:
        end_process_group(succeeded=done)
    return 0


def _configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # `shardloader train` configured logging for every rank already
    )
