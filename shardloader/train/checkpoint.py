"""Training checkpoints: save, list, prune and resume them atomically, with fallback past damage.

Layout under ``OUTPUT/checkpoints/``::

    step-00000040/             a complete checkpoint
        .metadata, __R_0.distcp    model and optimizer (DCP: each rank writes its part; loading
                                   reshards, so a run may resume on another world size)
        trainer.pt                 step, scheduler, every rank's RNG, the loader state of all
                                   ranks (`ShardLoader.state_dict(gather=True)`), the config
        checksums.json             size and sha256 of every other file, written last
    step-00000050.partial/     a save in progress, or one killed half-way: never loaded

A save is a collective. Every rank writes into ``step-N.partial`` and hashes its share of the
``.distcp`` files; rank 0 gathers the hashes, writes ``trainer.pt``, hashes it and ``.metadata``,
writes ``checksums.json`` (each file under a temporary name, fsynced, then ``os.replace``) and
renames the directory to ``step-N``, which is atomic on a POSIX filesystem. So a checkpoint is
complete exactly when its name has no suffix, and a ``kill -9`` at any moment leaves either the
previous checkpoint or the new one. Multi-node runs need ``OUTPUT`` on a filesystem every node sees.

Loading first checks every file against ``checksums.json`` (the ranks split the files, then share
what they found, so all agree). A checkpoint that fails this check is *damaged* (a missing,
truncated or changed file): `resume_checkpoint` warns, names it, and falls back to the newest
intact one. Any error after the check passed means the bytes are the ones that were saved but do
not fit this run (another model, another shardloader) and stops with a `ResumeError`: falling
back would silently train a different run. Measured on the (shared, 2-core) development machine
with a 403 MB checkpoint in one process: sha256 hashes 940 MB/s (blake2b 450, md5 350), so the
check at load takes 0.5 s, and the save, hashing included, 1.5 s. What a checkpoint may contain
and how it is read without running code from it (the trust model) is `shardloader.train.safe_load`.

Pruning after a save keeps the newest ``keep`` *intact* checkpoints: walking from the newest, it
checks each one (as a load would; the one just saved is known intact) until ``keep`` passed, then
removes every older one, and every damaged one older than the newest kept. A damaged checkpoint
newer than all intact ones stays (its files may be restored from a copy; a save of its step
replaces it). So a save with ``keep=2`` also hashes the previous checkpoint once: with the
403 MB checkpoint above, a save takes 1.7-2.0 s instead of 1.5 s.

The trainer state in ``trainer.pt``: the step, the finished epochs, the schedule's length and
state, the loader state of all ranks (as JSON), every rank's RNG states, the world size, the
config and, for LoRA, what identifies the base model. A LoRA checkpoint holds the adapters and
their optimizer state only (``trainable_only``): a few percent of a full one. On resume the RNGs
come back only on the same world size (another one re-deals the data anyway), and the records of
steps after the checkpoint are cut from ``metrics.jsonl`` and ``samples/``, since those steps are
trained again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from shardloader.errors import CheckpointDamagedError, ResumeError
from shardloader.train.metrics import METRICS_FILE, SAMPLES_DIR
from shardloader.train.safe_load import (
    CHECKSUMS_FILE,
    STATE_KIND,
    STATE_VERSION,
    TRAINER_FILE,
    check_files,
    describe_file,
    encode_checksums,
    read_checksums,
    read_trainer_state,
    restricted_planner,
    restricted_reader,
)

if TYPE_CHECKING:
    from shardloader.train.loop import _Runtime, _Trainer

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank_and_size() -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (in-memory between our own ranks: trusted)."""
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is not started: so do we."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _step_dirs(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every ``step-N`` directory under ``root``, complete or not, oldest first."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for path in base.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first."""
    return [(step, path) for step, path in _step_dirs(root) if (path / TRAINER_FILE).is_file()]


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# --- saving --------------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
    trainable_only: bool = False,
) -> Path:
    """Write a checkpoint of ``step`` atomically; a collective, call it on every rank.

    Args:
        root: The checkpoints directory.
        step: The optimizer steps taken.
        model: The (DDP- or FSDP-wrapped) model.
        optimizer: Its optimizer.
        trainer_state: Everything else, the same on every rank (rank 0 writes it).
        keep: Intact checkpoints to keep; older ones are deleted (0 keeps all).
        trainable_only: Save only the parameters that get gradients (LoRA adapters) and their
            optimizer state, not the frozen base.

    Returns:
        The checkpoint's directory.
    """
    import torch.distributed.checkpoint as dcp

    base = Path(root)
    final = base / f"step-{step:08d}"
    partial = base / f"step-{step:08d}.partial"
    rank, world_size = _rank_and_size()
    if rank == 0:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    model_state, optim_state, _ = _state_dicts(model, optimizer, trainable_only)
    with _single_process_quiet():
        metadata = dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=str(partial)
        )
    # Each rank hashes a share of the data files (DCP fsynced them), rank 0 writes the list.
    names = sorted({info.relative_path for info in metadata.storage_data.values()})
    shares = _all_gather({name: describe_file(partial / name) for name in names[rank::world_size]})
    if rank == 0:
        state = {"kind": STATE_KIND, "version": STATE_VERSION, **trainer_state}
        _write_durably(partial / TRAINER_FILE, lambda f: torch.save(state, f))
        files = {name: entry for share in shares for name, entry in share.items()}
        for path in sorted(partial.iterdir()):  # .metadata, trainer.pt, and anything DCP adds
            if path.name not in files:
                files[path.name] = describe_file(path)
        text = encode_checksums(files)
        _write_durably(partial / CHECKSUMS_FILE, lambda f: f.write(text))
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(base)
    _prune(base, keep, final)
    _barrier()
    return final


def _state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Model and optimizer state dicts as DCP saves and loads them, and the options used.

    With ``trainable_only`` the frozen parameters are left out: torch's ``ignore_frozen_params``
    still returns a tied weight (``lm_head.weight``, the frozen embedding) under its second
    name, so the model's state is also cut to the names of trainable parameters.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None
    states: tuple[Any, Any] = get_state_dict(model, optimizer, options=options)
    model_state, optim_state = states
    if trainable_only:
        inner: Any = getattr(model, "module", model)  # DDP's prefix is not in the state's names
        trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return model_state, optim_state, options


def _write_durably(path: Path, write: Any) -> None:
    """Write ``path`` under a temporary name, fsync it, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (a crash after it does not bring the old name back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(base: Path, keep: int, saved: Path) -> None:
    """Remove stale partial saves, and all but the newest ``keep`` intact checkpoints.

    A collective: the ranks check the candidates together (see `verify_checkpoint`), walking
    rank 0's listing; rank 0 removes. ``saved``, just written, counts as intact unchecked.
    Damaged checkpoints older than the newest kept are removed too; newer ones stay.
    """
    rank, _ = _rank_and_size()
    if rank == 0:
        for path in sorted(base.glob("step-*.partial")):
            shutil.rmtree(path, ignore_errors=True)
            log.info("%s: removed, a save that never finished", path)
    if keep <= 0:
        return
    kept: list[Path] = []
    for _, path in reversed(_all_gather(_step_dirs(base) if rank == 0 else None)[0]):
        if len(kept) == keep:
            why = f"older than the {keep} newest intact checkpoints (keep={keep})"
        else:
            damage = None if path == saved else _find_damage(path)
            if damage is None:
                kept.append(path)
                continue
            if not kept:  # newer than every intact one: left to be restored or saved again
                continue
            why = f"damaged ({damage}), older than the intact {kept[0]}"
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            log.info("%s: removed, %s", path, why)


def _find_damage(path: Path) -> str | None:
    """Why ``path`` cannot be loaded (a failed `verify_checkpoint`), or ``None``; a collective."""
    try:
        verify_checkpoint(path)
    except ResumeError as err:  # damaged, or a checksum list of another shardloader
        return str(err)
    return None


# --- checking and loading ------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Check every file of a checkpoint against its ``checksums.json``; a collective.

    The ranks split the files and share what they found, so every rank returns or raises alike.

    Returns:
        The names of the checked files (``.metadata``, the ``.distcp`` files, ``trainer.pt``).

    Raises:
        CheckpointDamagedError: A file is missing, not a regular file, or differs from its
            recorded size or sha256, or ``checksums.json`` itself is missing or malformed.
    """
    where = Path(path)
    rank, world_size = _rank_and_size()
    problem: str | None = None
    names: list[str] = []
    try:
        files = read_checksums(where)
        names = sorted(files)
        check_files(where, {name: files[name] for name in names[rank::world_size]})
    except CheckpointDamagedError as err:
        problem = str(err)
    problems = [p for p in _all_gather(problem) if p is not None]
    if problems:
        raise CheckpointDamagedError(problems[0])
    return names


def resume_checkpoint(
    root: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    trainable_only: bool = False,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest intact checkpoint under ``root``; a collective, call it on every rank.

    Damaged checkpoints (see `verify_checkpoint`) are skipped with a warning that names them.
    ``trainable_only`` and ``check`` are passed to `load_checkpoint`.

    Returns:
        The checkpoint loaded and its trainer state, or ``None`` when ``root`` holds none.

    Raises:
        ResumeError: Every checkpoint is damaged, or the newest intact one does not fit this run
            (another model or shardloader): that stops, it never falls back.
    """
    damaged: list[str] = []
    for _, path in reversed(_step_dirs(root)):
        try:
            state = load_checkpoint(
                path, model, optimizer, trainable_only=trainable_only, check=check
            )
        except CheckpointDamagedError as err:
            log.warning("%s; skipping the damaged checkpoint %s, trying an older one", err, path)
            damaged.append(str(err))
            continue
        if damaged:
            log.warning("resuming from %s, older than the damaged checkpoints after it", path)
        return path, state
    if damaged:
        raise ResumeError(
            f"{root}: no intact checkpoint, every one is damaged ({'; '.join(damaged)}); "
            "restore the files from a copy, or start again without --resume"
        )
    return None


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    trainable_only: bool = False,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load model and optimizer in place from a checkpoint; return its trainer state.

    A collective: call it on every rank, with the model already wrapped (DDP or FSDP2). Every
    file is checked against ``checksums.json`` before anything is read, and nothing is unpickled
    except through an allow-list (see `shardloader.train.safe_load`).

    Args:
        path: The checkpoint directory.
        model: The (wrapped) model, loaded in place.
        optimizer: Its optimizer, loaded in place.
        trainable_only: The checkpoint holds only the trainable parameters (LoRA adapters);
            the frozen ones are left as they are.
        check: Called with the directory and the trainer state before any weight is loaded;
            raises `ResumeError` to refuse the checkpoint (another base model).

    Raises:
        CheckpointDamagedError: A file of ``path`` is missing or changed; nothing was loaded.
        ResumeError: ``path`` is intact but not a checkpoint this run can load.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    where = Path(path)
    if not where.is_dir():
        raise ResumeError(f"{where}: no such checkpoint directory")
    names = verify_checkpoint(where)
    state = read_trainer_state(where)
    if check is not None:
        check(where, state)
    model_state, optim_state, options = _state_dicts(model, optimizer, trainable_only)
    both = {"model": model_state, "optim": optim_state}
    reader = restricted_reader(where, names)
    try:
        with _single_process_quiet():
            dcp.load(both, storage_reader=reader, planner=restricted_planner(reader))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        if reader.refusal is not None:
            raise reader.refusal from err
        cause: BaseException = err
        if isinstance(err, CheckpointException) and err.failures:
            cause = next(iter(err.failures.values()))[0]
        raise ResumeError(
            f"{where}: cannot load the model and optimizer ({type(cause).__name__}: {cause}); "
            "resume with the model settings the checkpoint was written with"
        ) from err
    set_state_dict(
        model,
        optimizer,
        model_state_dict=both["model"],
        optim_state_dict=both["optim"],
        options=options,
    )
    return state


# --- the trainer state (trainer.pt) --------------------------------------------------------------


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
        # LoRA: the base the adapters belong to (`shardloader.train.lora.base_identity`).
        "base_model": json.dumps(trainer.base_identity),
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
