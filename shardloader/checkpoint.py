"""Atomic, verified training checkpoints: model and optimizer via torch.distributed.checkpoint.

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
check at load takes 0.5 s, and the save, hashing included, 1.5 s.

Trust model: a checkpoint directory is data, never code. Nothing in it is unpickled without an
allow-list: DCP's ``.metadata`` goes through a ``pickle.Unpickler`` whose ``find_class`` admits
only DCP's metadata classes, ``torch.Size``, dtypes and layouts; ``trainer.pt`` and every tensor
and non-tensor value in the ``.distcp`` files are read with ``torch.load(weights_only=True)``.
Rank-local metadata files, file names that leave the directory, files not listed in
``checksums.json``, links and other non-regular files are refused. So whoever can write into
``OUTPUT/checkpoints`` cannot run code on the training nodes through it. They can still change
the weights, the optimizer and the trainer state (the checksums sit beside the files: they catch
damage, not forgery), so keep ``OUTPUT`` writable only by those you would let change the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import stat
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
CHECKSUMS_FILE = "checksums.json"
METADATA_FILE = ".metadata"  # DCP's name for the global metadata
STATE_KIND = "shardloader.trainer_state"
STATE_VERSION = 1
CHECKSUMS_KIND = "shardloader.checkpoint_checksums"
CHECKSUMS_VERSION = 1
MAX_CHECKSUMS_BYTES = 16 << 20  # ~100 bytes a file: room for 100,000 files
_NAME = re.compile(r"^step-(\d{8})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointDamagedError(ResumeError):
    """A checkpoint's files are not the bytes its save recorded (missing, truncated, changed)."""


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
    rank, world_size = _rank_and_size()
    if rank == 0:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_quiet():
        metadata = dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=str(partial)
        )
    # Each rank hashes a share of the data files (DCP fsynced them), rank 0 writes the list.
    names = sorted({info.relative_path for info in metadata.storage_data.values()})
    shares = _all_gather({name: _describe_file(partial / name) for name in names[rank::world_size]})
    if rank == 0:
        state = {"kind": STATE_KIND, "version": STATE_VERSION, **trainer_state}
        _write_durably(partial / TRAINER_FILE, lambda f: torch.save(state, f))
        files = {name: entry for share in shares for name, entry in share.items()}
        for path in sorted(partial.iterdir()):  # .metadata, trainer.pt, and anything DCP adds
            if path.name not in files:
                files[path.name] = _describe_file(path)
        listing = {"kind": CHECKSUMS_KIND, "version": CHECKSUMS_VERSION, "files": files}
        text = json.dumps(listing, indent=1, sort_keys=True).encode()
        _write_durably(partial / CHECKSUMS_FILE, lambda f: f.write(text))
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(base)
        _prune(base, keep)
    _barrier()
    return final


def _write_durably(path: Path, write: Any) -> None:
    """Write ``path`` under a temporary name, fsync it, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _describe_file(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a regular file; links and devices are refused."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise CheckpointDamagedError(f"{path}: not a regular file; refusing to read it")
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            digest = hashlib.file_digest(f, "sha256")  # a 256 KiB buffer
            size = f.tell()
    except FileNotFoundError as err:
        raise CheckpointDamagedError(f"{path}: missing") from err
    except OSError as err:
        raise CheckpointDamagedError(f"{path}: cannot be read ({err})") from err
    return {"bytes": size, "sha256": digest.hexdigest()}


# --- checking ------------------------------------------------------------------------------------


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
        files = _read_checksums(where)
        names = sorted(files)
        for name in names[rank::world_size]:
            found = _describe_file(where / name)
            if found != files[name]:
                problem = (
                    f"{where / name}: {found['bytes']} bytes with sha256 {found['sha256'][:12]}…, "
                    f"{CHECKSUMS_FILE} recorded {files[name]['bytes']} bytes with sha256 "
                    f"{files[name]['sha256'][:12]}…"
                )
                break
    except CheckpointDamagedError as err:
        problem = str(err)
    problems = [p for p in _all_gather(problem) if p is not None]
    if problems:
        raise CheckpointDamagedError(problems[0])
    return names


def _read_checksums(where: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` of a checkpoint's ``checksums.json``, checked for shape and safe names."""
    file = where / CHECKSUMS_FILE
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode):
            raise CheckpointDamagedError(f"{file}: not a regular file; refusing to read it")
        with open(os.open(file, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
            raw = f.read(MAX_CHECKSUMS_BYTES + 1)
    except FileNotFoundError as err:
        raise CheckpointDamagedError(
            f"{file}: missing (damaged, or written by a shardloader without checksums)"
        ) from err
    except OSError as err:
        raise CheckpointDamagedError(f"{file}: cannot be read ({err})") from err
    if len(raw) > MAX_CHECKSUMS_BYTES:
        raise CheckpointDamagedError(f"{file}: larger than {MAX_CHECKSUMS_BYTES} bytes")
    try:
        listing = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamagedError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(listing, dict) or listing.get("kind") != CHECKSUMS_KIND:
        raise CheckpointDamagedError(f"{file}: not a shardloader checksum list")
    if listing.get("version") != CHECKSUMS_VERSION:
        raise ResumeError(
            f"{file}: checksum list version {listing.get('version')}, this shardloader reads "
            f"{CHECKSUMS_VERSION}; resume with the shardloader that wrote it"
        )
    files = listing.get("files")
    if not isinstance(files, dict) or TRAINER_FILE not in files or METADATA_FILE not in files:
        raise CheckpointDamagedError(f"{file}: lists no {TRAINER_FILE} or no {METADATA_FILE}")
    for name, entry in files.items():
        if not _is_plain_name(name) or name == CHECKSUMS_FILE:
            raise CheckpointDamagedError(f"{file}: lists {name!r}, not a file of this checkpoint")
        if not (
            isinstance(entry, dict)
            and set(entry) == {"bytes", "sha256"}
            and type(entry["bytes"]) is int
            and isinstance(entry["sha256"], str)
            and _HEX64.match(entry["sha256"])
        ):
            raise CheckpointDamagedError(f"{file}: malformed entry for {name!r}")
    return files


def _is_plain_name(name: Any) -> bool:
    """A file name inside the directory: no separator, not ``.`` or ``..``, printable."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


# --- loading -------------------------------------------------------------------------------------


def resume_checkpoint(
    root: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest intact checkpoint under ``root``; a collective, call it on every rank.

    Damaged checkpoints (see `verify_checkpoint`) are skipped with a warning that names them.

    Returns:
        The checkpoint loaded and its trainer state, or ``None`` when ``root`` holds none.

    Raises:
        ResumeError: Every checkpoint is damaged, or the newest intact one does not fit this run
            (another model or shardloader): that stops, it never falls back.
    """
    damaged: list[str] = []
    for _, path in reversed(_step_dirs(root)):
        try:
            state = load_checkpoint(path, model, optimizer)
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
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer in place from a checkpoint; return its trainer state.

    A collective: call it on every rank, with the model already wrapped (DDP or FSDP2). Every
    file is checked against ``checksums.json`` before anything is read, and nothing is unpickled
    except through an allow-list (see the module docstring).

    Raises:
        CheckpointDamagedError: A file of ``path`` is missing or changed; nothing was loaded.
        ResumeError: ``path`` is intact but not a checkpoint this run can load.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    where = Path(path)
    if not where.is_dir():
        raise ResumeError(f"{where}: no such checkpoint directory")
    names = verify_checkpoint(where)
    state = read_trainer_state(where)
    states: tuple[Any, Any] = get_state_dict(model, optimizer)
    model_state, optim_state = states
    both = {"model": model_state, "optim": optim_state}
    reader = _restricted_reader(where, names)
    try:
        with _single_process_quiet():
            dcp.load(both, storage_reader=reader, planner=_restricted_planner(reader))
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
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    return state


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint directory, checked for kind and version."""
    file = path / TRAINER_FILE
    if not file.is_file():
        raise ResumeError(f"{path}: not a complete checkpoint (no {TRAINER_FILE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports a short file as a bare OSError without the path
        raise ResumeError(
            f"{file}: refused to unpickle ({_reason(err)}); do not resume from this checkpoint, "
            "it was changed by someone or written by another program"
        ) from err
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise ResumeError(f"{file}: not a shardloader trainer state")
    if state.get("version") != STATE_VERSION:
        raise ResumeError(
            f"{file}: trainer state version {state.get('version')}, this shardloader reads "
            f"{STATE_VERSION}; resume with the shardloader that wrote it"
        )
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: every global it may name is listed.

    Torch's own weights-only unpickler knows only pickle protocol 2; DCP writes protocol 4
    (frames, ``STACK_GLOBAL``, ``MEMOIZE``), so we restrict ``find_class`` instead, the standard
    way. Each allowed global is a plain data class, an enum, ``torch.Size``, a dtype or a layout.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _metadata_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not DCP metadata")
        return allowed[module, name]

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id is not DCP metadata")


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """What DCP's ``.metadata`` pickle may name: its data classes, and what they hold."""
    from torch.distributed.checkpoint import filesystem, metadata

    classes = [
        metadata.Metadata,
        metadata.MetadataIndex,
        metadata.StorageMeta,
        metadata.TensorStorageMetadata,
        metadata.BytesStorageMetadata,
        metadata.ChunkStorageMetadata,
        metadata.TensorProperties,
        metadata._MEM_FORMAT_ENCODING,
        filesystem._StorageInfo,
        type(Path()),  # StorageMeta.checkpoint_id
        torch.Size,
    ]
    found: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c for c in classes}
    found["torch.serialization", "_get_layout"] = torch.serialization._get_layout
    found.update({("torch", k): v for k, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return found


def _restricted_reader(where: Path, names: list[str]) -> Any:
    """A DCP reader that unpickles ``.metadata`` with `_MetadataUnpickler`.

    It reads only the files `verify_checkpoint` checked.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    checked = set(names)

    class RestrictedReader(FileSystemReader):
        refusal: ResumeError | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            try:
                return self._read_metadata(kwargs.get("rank"))
            except ResumeError as err:
                self.refusal = self.refusal or err  # DCP wraps it: keep ours for the message
                raise

        def _read_metadata(self, rank: int | None) -> Metadata:
            file = where / METADATA_FILE
            if rank is not None:  # DCP's fallback to __R.metadata: we never write those
                raise ResumeError(f"{file}: unreadable, and rank-local metadata is not used")
            try:
                with open(file, "rb") as f:
                    found = _MetadataUnpickler(f).load()
            except Exception as err:
                raise ResumeError(
                    f"{file}: refused to unpickle ({type(err).__name__}: {err}); it names "
                    "something other than DCP metadata: do not resume from this checkpoint, "
                    "it was changed by someone or written by another program"
                ) from err
            if not isinstance(found, Metadata):
                raise ResumeError(f"{file}: holds a {type(found).__name__}, not DCP metadata")
            for info in found.storage_data.values():
                if info.relative_path not in checked or info.transform_descriptors:
                    raise ResumeError(
                        f"{file}: names {info.relative_path!r} with transforms "
                        f"{info.transform_descriptors}, not a checked file of this checkpoint"
                    )
            meta = found.storage_meta if found.storage_meta is not None else StorageMeta()
            meta.load_id = self.load_id
            found.storage_meta = meta
            return found

    return RestrictedReader(where)


def _restricted_planner(reader: Any) -> Any:
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.planner import ReadItem

    class RestrictedPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            # As DCP's own, whose torch.load(weights_only=False) runs a pickle from the file.
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as err:
                file = reader.path / reader.storage_data[read_item.storage_index].relative_path
                reader.refusal = reader.refusal or ResumeError(
                    f"{file}: refused to unpickle {fqn} ({_reason(err)}); do not "
                    "resume from this checkpoint, it was changed by someone or written by "
                    "another program"
                )
                raise reader.refusal from err
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return RestrictedPlanner()


def _reason(err: BaseException) -> str:
    """The line of a weights-only refusal that says why (not torch's advice to load unsafely)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    return f"{type(err).__name__}: {why}"


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
