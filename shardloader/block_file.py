"""The block table in a binary file beside the manifest, for datasets of millions of blocks.

In JSON a block costs about 60 bytes and a microsecond or two to parse and check; 19.6 M blocks
make a 1.2 GB manifest. Past `BLOCK_FILE_MIN_BLOCKS` blocks, `shardloader.manifest.manifest_files`
writes the table to ``manifest.blocks`` instead, and the manifest's ``blocks`` entry names it:

    "blocks": {"file": "manifest.blocks", "num_bytes": N, "sha256": "...", "num_shards": S,
               "num_blocks": B, "columns": ["count", "samples", "offset", "length", ...]}

The file is the columns one after the other, little-endian, no header: ``count`` (int64, one per
shard), then per block ``samples``, ``offset``, ``length`` and, if listed, ``decoded`` (int64
each) and ``digest`` (32 ASCII hex bytes; 32 zero bytes where unknown). Its size follows from
the entry, and its sha256 is checked before anything in it is used; the columns are then checked
as the JSON ones are (`shardloader.blocks.parse_block_columns`). It is read with
``np.frombuffer`` (never pickle): reading and checking 1.6 M blocks takes a fraction of the JSON
path's time (``python -m tools.bench.manifest --blocks 16 --block-file``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardloader.blocks import DIGEST_HEX, BlockColumns
from shardloader.errors import ManifestError

BLOCK_FILE_NAME = "manifest.blocks"
BLOCK_FILE_MIN_BLOCKS = 1 << 20  # below this the JSON lists are small enough
_INT = np.dtype("<i8")
_DIGEST = np.dtype(f"S{DIGEST_HEX}")
_REQUIRED = ("count", "samples", "offset", "length")
_KEYS = {"file", "num_bytes", "sha256", "num_shards", "num_blocks", "columns"}
_LAYOUTS = [[*_REQUIRED, *more] for more in ([], ["decoded"], ["digest"], ["decoded", "digest"])]


def encode_block_file(
    columns: BlockColumns, name: str = BLOCK_FILE_NAME
) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes for ``columns``, and the manifest entry that names it."""
    names = list(_REQUIRED)
    parts = [columns.counts, columns.samples, columns.offset, columns.length]
    if columns.decoded is not None:
        names.append("decoded")
        parts.append(columns.decoded)
    data = b"".join(np.ascontiguousarray(p, dtype=_INT).tobytes() for p in parts)
    if columns.digest is not None:
        names.append("digest")
        data += np.char.encode(columns.digest, "ascii").astype(_DIGEST).tobytes()
    entry = {
        "file": name,
        "num_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "num_shards": len(columns.counts),
        "num_blocks": len(columns.samples),
        "columns": names,
    }
    return data, entry


def is_block_file_entry(value: Any) -> bool:
    """Whether a manifest's ``blocks`` entry names a block file (not the JSON lists)."""
    return isinstance(value, Mapping) and "file" in value


def decode_block_file(data: bytes, entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The columns of a block file, as numpy arrays keyed like the JSON ``blocks`` object.

    Raises:
        ManifestError: The entry is malformed, or the file's size or sha256 differ from it.
    """
    check_block_file_entry(entry, where)
    url = f"{where}: block file {entry['file']}"
    if len(data) != entry["num_bytes"]:
        raise ManifestError(
            f"{url}: {len(data)} bytes, the manifest says {entry['num_bytes']}; the file is "
            "truncated or replaced: reconvert or restore it"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ManifestError(
            f"{url}: sha256 {digest[:12]}… does not match the manifest's "
            f"{str(entry['sha256'])[:12]}…; reconvert or restore it"
        )
    out: dict[str, Any] = {}
    pos = 0
    for name in entry["columns"]:
        n = entry["num_shards"] if name == "count" else entry["num_blocks"]
        dtype = _DIGEST if name == "digest" else _INT
        out[name] = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        pos += n * dtype.itemsize
    return out


def check_block_file_entry(entry: Mapping[str, Any], where: str) -> None:
    """Refuse a block-file entry that is not as `encode_block_file` writes it.

    Raises:
        ManifestError: Unknown or missing keys, a bad file name, counts or column list, or a
            size that does not follow from them.
    """
    from shardloader.manifest import check_relative_path  # (manifest imports this module)

    columns: list[Any] = entry["columns"] if isinstance(entry.get("columns"), list) else []
    ok = set(entry) == _KEYS and columns in _LAYOUTS
    ok = ok and all(
        type(entry[k]) is int and 0 <= entry[k] < 1 << 50
        for k in ("num_bytes", "num_shards", "num_blocks")
    )
    ok = ok and isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64
    if ok:
        blocks, digests = entry["num_blocks"], "digest" in columns
        ints = entry["num_shards"] + blocks * (len(columns) - 1 - digests)
        ok = entry["num_bytes"] == ints * _INT.itemsize + digests * blocks * _DIGEST.itemsize
    if not ok:
        raise ManifestError(
            f"{where}: shard column 'blocks' names a block file but its entry {dict(entry)!r:.200}"
            " is malformed; the manifest is corrupt or tampered with: reconvert or restore it"
        )
    if not isinstance(entry["file"], str) or "/" in entry["file"]:
        raise ManifestError(
            f"{where}: block file {entry['file']!r:.80} is not a file name beside the manifest"
        )
    check_relative_path(entry["file"], where)
