"""What a training run records: per-step metrics, ``metrics.jsonl``, ``samples/``, the progress bar.

Every ``log_every`` steps rank 0 logs loss, learning rate, global trained tokens/s, the
data-wait fraction and how busy the loader's workers were, and appends the same record to
``OUT/metrics.jsonl``; the row of a step after which an eval ran (``--eval-data``) also holds
``eval_loss`` and ``eval_tokens``; with ``log_samples`` each rank appends the sample ids of each
step to ``OUT/samples/rank-RRRR.jsonl``. `RunLog` keeps the totals a `TrainResult` reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shardloader.train.config import TrainConfig

log = logging.getLogger("shardloader.train")  # the run's progress, under one name

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"


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
    # A mixture's realized and target tokens per source since the run began (all ranks).
    mix: dict[str, dict[str, float]] | None = None
    # --eval-data: the eval loss after this step and the trained tokens it averages over.
    eval_loss: float | None = None
    eval_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens of all ranks per second of step time."""
        return self.tokens / self.step_s if self.step_s > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        """Time blocked on the loader over step time (mean over ranks)."""
        return self.data_wait_s / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A metrics.jsonl record (``eval_loss`` and ``eval_tokens`` only after an eval)."""
        record = {
            **dataclasses.asdict(self),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "data_wait_fraction": round(self.data_wait_fraction, 5),
        }
        if self.eval_loss is None:
            del record["eval_loss"], record["eval_tokens"]
        return record


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
    eval_loss: float | None = None  # the last eval of the run (--eval-data)

    @property
    def tokens_per_s(self) -> float:
        """Trained tokens of all ranks per second of the run."""
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


class RunLog:
    """The records of one run: history and totals, and the files and bar they go to.

    Made with the trainer (the first ``loader_busy`` interval starts then); `open` it for the
    loop and `close` it after.

    Args:
        config: The run.
        output: The run's output directory.
        rank: This process's rank (rank 0 writes metrics.jsonl and shows the bar).
        stage_seconds: The loader's busy seconds per stage so far (`ShardLoader.stage_seconds`).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        output: Path,
        rank: int,
        stage_seconds: Callable[[], dict[str, float]],
    ) -> None:
        self.config, self.output, self.rank = config, output, rank
        self._stage_seconds = stage_seconds
        self._stages_at: tuple[float, dict[str, float]] = (time.perf_counter(), {})
        self.history: list[StepMetrics] = []
        self.tokens = 0
        self._wait = self._total = self._steady_wait = self._steady_total = 0.0
        self._started = 0.0
        self._samples_file: IO[str] | None = None
        self._metrics_file: IO[str] | None = None
        self._last_row: tuple[int, int] | None = None  # (step, offset) of the last row written
        self._bar: Any = None

    def open(self, start_step: int) -> RunLog:
        """Open the files (appending) and the bar; the run's clock starts."""
        if self.config.log_samples:
            (self.output / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
            name = f"rank-{self.rank:04d}.jsonl"
            self._samples_file = open(self.output / SAMPLES_DIR / name, "a")  # noqa: SIM115
        if self.rank == 0:
            self._metrics_file = open(self.output / METRICS_FILE, "a")  # noqa: SIM115
        self._bar = _progress_bar(self.config, self.rank, start_step)
        self._started = time.perf_counter()
        return self

    def close(self) -> None:
        """Close the files and the bar."""
        for thing in (self._samples_file, self._metrics_file, self._bar):
            if thing is not None:
                thing.close()
        self._samples_file = self._metrics_file = self._bar = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, metrics: StepMetrics, batches: Sequence[dict[str, Any]]) -> None:
        """Count a step, write its sample ids (``batches``: this rank's), report it if due."""
        self.history.append(metrics)
        self.tokens += metrics.tokens
        self._wait += metrics.data_wait_s
        self._total += metrics.step_s
        if len(self.history) > 1:
            self._steady_wait += metrics.data_wait_s
            self._steady_total += metrics.step_s
        if self._samples_file is not None:
            ids = list(dict.fromkeys(i for b in batches for i in b["sample_ids"].tolist()))
            self._samples_file.write(json.dumps({"step": metrics.step, "sample_ids": ids}) + "\n")
            self._samples_file.flush()
        if metrics.step % self.config.log_every == 0:
            self._report(metrics)

    def record_eval(self, metrics: StepMetrics, loss: float, tokens: int) -> None:
        """Add an eval's result to the step it followed, in its metrics.jsonl row and the log.

        The step's row, already written, is rewritten with the eval fields (it is the file's
        last line); a step that was not due for a row gets one.
        """
        metrics.eval_loss, metrics.eval_tokens = loss, tokens
        if self.rank != 0 or self._metrics_file is None:
            return
        if self._last_row is not None and self._last_row[0] == metrics.step:
            self._metrics_file.truncate(self._last_row[1])
            self._write_row(metrics)
        else:
            self._report(metrics)
        log.info("step %d | eval loss %.4f | %d eval tokens", metrics.step, loss, tokens)

    def result(self, steps: int, checkpoint: str | None) -> TrainResult:
        """The run so far, as a `TrainResult`."""
        return TrainResult(
            steps=steps,
            tokens=self.tokens,
            elapsed_s=time.perf_counter() - self._started,
            final_loss=self.history[-1].loss if self.history else float("nan"),
            data_wait_fraction=self._wait / self._total if self._total else 0.0,
            steady_data_wait_fraction=(
                self._steady_wait / self._steady_total if self._steady_total else 0.0
            ),
            checkpoint=checkpoint,
            history=self.history,
            eval_loss=next(
                (m.eval_loss for m in reversed(self.history) if m.eval_loss is not None), None
            ),
        )

    def _report(self, m: StepMetrics) -> None:
        if self.rank != 0 or self._metrics_file is None:
            return
        now, stages = time.perf_counter(), self._stage_seconds()
        capacity = (now - self._stages_at[0]) * max(self.config.num_workers, 1)
        m.loader_busy = {
            name: round((seconds - self._stages_at[1].get(name, 0.0)) / capacity, 4)
            for name, seconds in stages.items()
        }
        self._stages_at = (now, stages)
        self._write_row(m)
        line = (
            f"step {m.step}{'/' + str(self.config.max_steps) if self.config.max_steps else ''}"
            f" | epoch {m.epoch} | loss {m.loss:.4f} | lr {m.lr:.2e} | "
            f"{m.tokens_per_s / 1e3:.1f}k tok/s | data wait {m.data_wait_fraction:.1%} | "
            f"workers busy {sum(m.loader_busy.values()):.0%}"
        )
        if m.mix:
            total = sum(v["tokens"] for v in m.mix.values()) or 1
            target = sum(v["target"] for v in m.mix.values()) or 1
            line += " | mix " + " ".join(
                f"{name} {v['tokens'] / total:.1%} (target {v['target'] / target:.1%})"
                for name, v in m.mix.items()
            )
        if self._bar is not None:
            self._bar.set_postfix_str(line.split(" | ", 1)[1])
            self._bar.update(m.step - self._bar.n)
        else:
            log.info("%s", line)

    def _write_row(self, m: StepMetrics) -> None:
        assert self._metrics_file is not None
        self._metrics_file.flush()
        self._last_row = (m.step, self._metrics_file.tell())
        self._metrics_file.write(json.dumps(m.to_dict()) + "\n")
        self._metrics_file.flush()


def _progress_bar(config: TrainConfig, rank: int, start: int) -> Any:
    if rank != 0 or config.progress == "off":
        return None
    if config.progress == "auto" and not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.max_steps, initial=start, unit="step", dynamic_ncols=True)
