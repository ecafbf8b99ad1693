"""The trust boundary of a checkpoint: read its files without running code that is in them.

Trust model: a checkpoint directory is data, never code. Nothing in it is unpickled without an
allow-list: DCP's ``.metadata`` goes through a ``pickle.Unpickler`` whose ``find_class`` admits
only DCP's metadata classes, ``torch.Size``, dtypes and layouts; ``trainer.pt`` and every tensor
and non-tensor value in the ``.distcp`` files are read with ``torch.load(weights_only=True)``.
Rank-local metadata files, file names that leave the directory, files not listed in
``checksums.json``, links and other non-regular files are refused. So whoever can write into
``OUTPUT/checkpoints`` cannot run code on the training nodes through it. They can still change
the weights, the optimizer and the trainer state (the checksums sit beside the files: they catch
damage, not forgery), so keep ``OUTPUT`` writable only by those you would let change the model.

``checksums.json`` (written last by a save, read first by a load) holds the size and sha256 of
every other file of the checkpoint::

    {"kind": "shardloader.checkpoint_checksums", "version": 1,
     "files": {".metadata": {"bytes": 1234, "sha256": "9f2c…"}, "__0_0.distcp": {...}, ...}}

A file that differs from its entry makes the checkpoint *damaged* (`CheckpointDamagedError`);
anything refused after the check passed is a `ResumeError` naming the file. Measured on the
(shared, 2-core) development machine: sha256 hashes 940 MB/s (blake2b 450, md5 350), so checking
a 403 MB checkpoint takes 0.5 s in one process.

`shardloader.train.checkpoint` saves, lists, prunes and loads checkpoints through this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import stat
from pathlib import Path
from typing import Any

import torch

from shardloader.errors import CheckpointDamagedError, ResumeError

TRAINER_FILE = "trainer.pt"
CHECKSUMS_FILE = "checksums.json"
METADATA_FILE = ".metadata"  # DCP's name for the global metadata
STATE_KIND = "shardloader.trainer_state"
STATE_VERSION = 1
CHECKSUMS_KIND = "shardloader.checkpoint_checksums"
CHECKSUMS_VERSION = 1
MAX_CHECKSUMS_BYTES = 16 << 20  # ~100 bytes a file: room for 100,000 files
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- checksums.json ------------------------------------------------------------------------------


def describe_file(path: Path) -> dict[str, Any]:
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


def encode_checksums(files: dict[str, dict[str, Any]]) -> bytes:
    """The text of ``checksums.json`` for ``files`` (name -> `describe_file` entry)."""
    listing = {"kind": CHECKSUMS_KIND, "version": CHECKSUMS_VERSION, "files": files}
    return json.dumps(listing, indent=1, sort_keys=True).encode()


def read_checksums(where: Path) -> dict[str, dict[str, Any]]:
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
    _check_version(listing, CHECKSUMS_VERSION, file, "checksum list")
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


def check_files(where: Path, files: dict[str, dict[str, Any]]) -> None:
    """Hash each of ``files`` (name -> recorded entry) under ``where`` and compare.

    Raises:
        CheckpointDamagedError: The first file that is missing, not a regular file, or differs
            from its recorded size or sha256.
    """
    for name, recorded in files.items():
        found = describe_file(where / name)
        if found != recorded:
            raise CheckpointDamagedError(
                f"{where / name}: {found['bytes']} bytes with sha256 {found['sha256'][:12]}…, "
                f"{CHECKSUMS_FILE} recorded {recorded['bytes']} bytes with sha256 "
                f"{recorded['sha256'][:12]}…"
            )


def _is_plain_name(name: Any) -> bool:
    """A file name inside the directory: no separator, not ``.`` or ``..``, printable."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
    )


# --- trainer.pt ----------------------------------------------------------------------------------


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
    _check_version(state, STATE_VERSION, file, "trainer state")
    return state


def _check_version(doc: dict[str, Any], version: int, file: Path, what: str) -> None:
    """Refuse ``doc`` (``what``, read from ``file``) unless it holds this library's ``version``.

    Raises:
        ResumeError: Another version wrote it.
    """
    if doc.get("version") != version:
        raise ResumeError(
            f"{file}: {what} version {doc.get('version')}, this shardloader reads "
            f"{version}; resume with the shardloader that wrote it"
        )


# --- DCP's .metadata and .distcp -----------------------------------------------------------------


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


def restricted_reader(where: Path, names: list[str]) -> Any:
    """A DCP reader that unpickles ``.metadata`` with `_MetadataUnpickler`.

    It reads only the files ``names`` (those `check_files` checked). A refusal is kept in its
    ``refusal`` attribute, since DCP wraps the errors its reader raises.
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


def restricted_planner(reader: Any) -> Any:
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.planner import ReadItem

    class RestrictedPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            # Replaces DCP's load_bytes, which unpickles the value with weights_only=False.
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
