"""What an input file is: its kind and codec by name, and whether it is safe to open at all."""

from __future__ import annotations

import os
import stat

from shardloader import storage
from shardloader.errors import CorpusError

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_FILE_TYPES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(url: str) -> tuple[str, str]:
    """Return (kind, codec) for a file name: kind jsonl|parquet|text, codec none|gzip|zstd."""
    name = url.rsplit("/", 1)[-1].lower()
    codec = "none"
    if name.endswith(".gz"):
        codec, name = "gzip", name[:-3]
    elif name.endswith((".zst", ".zstd")):
        codec, name = "zstd", name.rsplit(".", 1)[0]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl", codec
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet", codec
    return "text", codec


def check_regular_file(url: str) -> None:
    """Refuse ``url`` unless it is a regular file (or a link to one), before anyone opens it.

    Opening a FIFO blocks until a writer appears and ``/dev/zero`` never ends, so both would
    hang a conversion or fill memory. A directory or a missing file passes: opening it says
    what is wrong. Remote inputs are checked by the type their filesystem reports.

    Raises:
        CorpusError: ``url`` is a FIFO, device or socket (or a link to one).
    """
    if storage.is_local(url):
        path = url.removeprefix("file://")
        try:
            mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a device
        except OSError:
            return  # missing, dangling or unreadable: opening it gives the precise error
        what = next((name for is_kind, name in _FILE_TYPES if is_kind(mode)), None)
        if what is not None and os.path.islink(path):
            what += f" (through the link to {os.path.realpath(path)})"
    else:
        kind = storage.file_type(url)
        what = None if kind in ("file", "directory", None) else f"of type {kind!r}"
    if what is not None:
        raise CorpusError(
            f"{url}: is {what}, not a regular file; reading it could hang or never end, so "
            "remove it from the input (or name the regular files to convert)"
        )
