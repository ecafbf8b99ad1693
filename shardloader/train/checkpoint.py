"""What a training checkpoint holds besides model and optimizer, and how a resume puts it back.

`shardloader.checkpoint` writes and reads checkpoints atomically; this module decides the
trainer state in its ``trainer.pt``: the step, the finished epochs, the schedule's length and
state, the loader state of all ranks (`ShardLoader.state_dict(gather=True)`, as JSON), every
rank's RNG states, the world size and the config. On resume the RNGs come back only on the
same world size (another one re-deals the data anyway), and the records of steps after the
checkpoint are cut from ``metrics.jsonl`` and ``samples/``, since those steps are trained again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from shardloader.train.metrics import METRICS_FILE, SAMPLES_DIR

if TYPE_CHECKING:
    from shardloader.train.loop import _Runtime, _Trainer

CHECKPOINTS_DIR = "checkpoints"


def trainer_state(trainer: _Trainer) -> dict[str, Any]:
    """The trainer state to save; a collective (every rank's RNG is gathered)."""
    return {
        "step": trainer.step,
        "epochs_done": trainer.epochs_done,
        "schedule_steps": trainer.schedule_steps,
        "scheduler": trainer.scheduler.state_dict(),
        "loader": json.dumps(trainer.loader.state_dict(gather=True)),
        "rng": _gather_rng_states(trainer.runtime.world_size),
        "world_size": trainer.runtime.world_size,
        "config": json.dumps(trainer.config.to_dict()),
    }


def apply_trainer_state(trainer: _Trainer, state: dict[str, Any]) -> None:
    """Put a loaded trainer state back into ``trainer`` (model and optimizer are loaded)."""
    trainer.step = trainer.saved_step = int(state["step"])
    trainer.epochs_done = int(state["epochs_done"])
    trainer.schedule_steps = int(state["schedule_steps"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.loader.load_state_dict(json.loads(state["loader"]))
    if int(state["world_size"]) == trainer.runtime.world_size:
        rng = state["rng"][trainer.runtime.rank]
        torch.set_rng_state(rng[0])
        if len(rng) > 1 and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[1])


def _gather_rng_states(world_size: int) -> list[Any]:
    """Every rank's ``[cpu_state, cuda_state?]``, in rank order."""
    rng = [torch.get_rng_state()]
    if torch.cuda.is_available():
        rng.append(torch.cuda.get_rng_state())
    rngs: list[Any] = [rng]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng)
    return rngs


def truncate_logs(output: Path, step: int, runtime: _Runtime) -> None:
    """Drop records of steps after ``step`` (the checkpoint's): they are trained again."""
    if runtime.rank == 0:
        files = [output / METRICS_FILE, *(output / SAMPLES_DIR).glob("*.jsonl")]
        for file in files:
            if file.is_file():
                lines = file.read_text().splitlines(keepends=True)
                kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
                file.write_text("".join(kept))
    if runtime.world_size > 1:
        dist.barrier()
