"""Atomic training checkpoints: model and optimizer via torch.distributed.checkpoint, and the rest.

Layout under ``OUTPUT/checkpoints/``::

    step-00000040/             a complete checkpoint
        .metadata, __R_0.distcp    model and optimizer (DCP: each rank writes its part; loading
                                   reshards, so a run may resume on another world size)
        trainer.pt                 step, scheduler, every rank's RNG, the loader state of all
                                   ranks (`ShardLoader.state_dict(gather=True)`), the config
    step-00000050.partial/     a save in progress, or one killed half-way: never loaded

A save is a collective. Every rank writes into ``step-N.partial``; after a barrier rank 0 writes
``trainer.pt`` (temporary name, then ``os.replace``) and renames the directory to ``step-N``,
which is atomic on a POSIX filesystem. So a checkpoint is complete exactly when its name has no
suffix, and a ``kill -9`` at any moment leaves either the previous checkpoint or the new one.
Multi-node runs need ``OUTPUT`` on a filesystem every node sees.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardloader.errors import ResumeError

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.pt"
STATE_KIND = "shardloader.trainer_state"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is not started: so do we."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    found = []
    base = Path(root)
    if not base.is_dir():
        return []
    for path in base.iterdir():
        match = _NAME.match(path.name)
        if match and (path / TRAINER_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of ``step`` atomically; a collective, call it on every rank.

    Args:
        root: The checkpoints directory.
        step: The optimizer steps taken.
        model: The (DDP- or FSDP-wrapped) model.
        optimizer: Its optimizer.
        trainer_state: Everything else, the same on every rank (rank 0 writes it).
        keep: Complete checkpoints to keep; older ones are deleted (0 keeps all).

    Returns:
        The checkpoint's directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    base = Path(root)
    final = base / f"step-{step:08d}"
    partial = base / f"step-{step:08d}.partial"
    rank = dist.get_rank() if _distributed() else 0
    if rank == 0:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    _barrier()
    if rank == 0:
        state = {"kind": STATE_KIND, "version": STATE_VERSION, **trainer_state}
        tmp = partial / (TRAINER_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, partial / TRAINER_FILE)
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(base)
        _prune(base, keep)
    _barrier()
    return final


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer in place from a checkpoint; return its trainer state.

    A collective: call it on every rank, with the model already wrapped (DDP or FSDP2).

    Raises:
        ResumeError: ``path`` is not a complete checkpoint of this kind.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    where = Path(path)
    state = read_trainer_state(where)
    states: tuple[Any, Any] = get_state_dict(model, optimizer)
    model_state, optim_state = states
    both = {"model": model_state, "optim": optim_state}
    try:
        with _single_process_quiet():
            dcp.load(both, checkpoint_id=str(where))
    except Exception as err:  # DCP reports a missing key or shape as a bare exception
        raise ResumeError(
            f"{where}: cannot load the model and optimizer ({err}); "
            "resume with the model settings the checkpoint was written with"
        ) from err
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    return state


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory, checked for kind and version."""
    file = path / TRAINER_FILE
    if not file.is_file():
        raise ResumeError(f"{path}: not a complete checkpoint (no {TRAINER_FILE})")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise ResumeError(f"{file}: not a shardloader trainer state")
    if state.get("version") != STATE_VERSION:
        raise ResumeError(
            f"{file}: trainer state version {state.get('version')}, this shardloader reads "
            f"{STATE_VERSION}; resume with the shardloader that wrote it"
        )
    return state


def _prune(base: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale partial saves."""
    for path in base.glob("step-*.partial"):
        shutil.rmtree(path, ignore_errors=True)
    if keep > 0:
        for _, path in list_checkpoints(base)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (a crash after it does not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
