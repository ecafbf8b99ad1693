"""Listing inputs: files, directories and glob patterns expanded into :class:`InputFile` entries."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shardloader.storage.urls import _protocol_url, is_url, normalize, relpath, url_to_fs

log = logging.getLogger("shardloader.storage")  # the package's log lines, under one name

_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input file found by :func:`list_files`.

    Attributes:
        url: Full URL (or absolute local path) of the file.
        num_bytes: Size of the file as stored (compressed size for compressed files).
        root: The directory the user named (or the file's own directory), for relative names.
    """

    url: str
    num_bytes: int
    root: str


def _is_hidden(path: str, root: str) -> bool:
    rel = relpath(path, root) if path != root else ""
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_files(patterns: Iterable[str], **storage_options: Any) -> list[InputFile]:
    """Expand files, directories (recursively) and glob patterns into a list of input files.

    Files come out in the order the patterns were given, each pattern's matches sorted by path.
    Inside a directory, names starting with ``.`` or ``_`` are ignored (and the count logged),
    as pyarrow does; files named explicitly are always taken.

    Raises:
        FileNotFoundError: A path or pattern matched nothing.
    """
    found: list[InputFile] = []
    for pattern in patterns:
        url = normalize(pattern)
        fs, path = url_to_fs(url, **storage_options)
        fs.invalidate_cache(path)  # listings cached earlier may predate files written since
        if any(c in path for c in _GLOB_CHARS):
            matches = fs.glob(path, detail=True)
            root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
            root = root if root.endswith(("/", os.sep)) else posixpath.dirname(root)
            entries = {p: info for p, info in matches.items() if info.get("type") != "directory"}
            if not entries:
                raise FileNotFoundError(f"{pattern}: the pattern matches no file")
        elif not fs.exists(path):
            raise FileNotFoundError(f"{pattern}: no such file or directory")
        elif fs.isdir(path):
            root = path
            all_entries = fs.find(path, detail=True)
            entries = {p: i for p, i in all_entries.items() if not _is_hidden(p, path)}
            if len(entries) < len(all_entries):
                log.info(
                    "%s: ignored %d hidden files (names starting with . or _)",
                    pattern,
                    len(all_entries) - len(entries),
                )
            if not entries:
                raise FileNotFoundError(f"{pattern}: the directory holds no file")
        else:
            root = posixpath.dirname(path) if is_url(url) else os.path.dirname(path)
            entries = {path: fs.info(path)}
        root_url = _protocol_url(fs, root.rstrip("/") or "/")
        for p in sorted(entries):
            found.append(
                InputFile(_protocol_url(fs, p), int(entries[p].get("size") or 0), root_url)
            )
    return found
