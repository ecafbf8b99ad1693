"""One big JSONL file cut into slices of whole lines, so its parts convert on all cores.

Where slices are cut depends only on the file and ``slice_bytes``, never on timing or the number
of processes, so the output is the same for any ``num_proc``. Three ways, by what the file allows:

- ``bytes``: an uncompressed file. Slice ``k`` covers stored bytes ``[k * S, (k + 1) * S)``.
- ``frames``: a zstd file of several independent frames, each declaring its content size (as
  ``zstd`` and most writers that compress chunk by chunk do). Consecutive frames are grouped
  until they hold ``S`` bytes of text; each slice decompresses only its own frames (plus the rest
  of its last line from the next ones).
- ``stream``: a single-stream ``.gz`` or ``.zst`` cannot be entered in the middle. One reader
  (`iter_stream_slices`) decompresses it in order and hands out each slice's whole lines, cut at
  every ``S`` bytes of decompressed text, with its first line number.

The rule that makes slices of whole lines without reading across them first: a line belongs to
the slice in which the byte before it lies (the first line: slice 0). So slice ``k > 0`` starts
after the first newline at or after its start, and ends after the first newline at or after its
end, reading into the next slice's bytes for the end of its last line. A line longer than a slice
belongs to one slice; slices it covers whole own nothing.

Line numbers: slice ``k``'s first line is ``2 +`` the newlines before its start (``1`` for slice
0), so ids made from ``file:line`` and every error name the file's own line.
`count_newlines` counts a slice's newlines; the conversion counts all slices on the pool first.

Cost (2 cores, page cache): counting newlines runs at about 2 GB/s on plain text and at zstd's
decompression speed (about 1 GB/s) on frames; walking a zstd file's block headers to find its
frames (`zstd_frames`) reads 3 bytes per 128 KiB block.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from shardloader import storage
from shardloader.sources.files import kind_of
from shardloader.sources.records import DamagedFileError
from shardloader.sources.streams import count_newlines_in, iter_chunks
from shardloader.storage import InputFile

SPLITS = ("bytes", "frames", "stream")
# A compressed file whose text size is not declared is split when its stored size times this
# is over slice_bytes: text JSONL compresses about 4x with zstd or gzip.
ASSUMED_RATIO = 4

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50


class _Limited:
    """Reads at most ``limit`` bytes of ``f`` from where it stands."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f, self._left = f, limit

    def read(self, size: int = -1) -> bytes:
        n = self._left if size < 0 else min(size, self._left)
        data = self._f.read(n) if n > 0 else b""
        self._left -= len(data)
        return data


def zstd_frames(f: IO[bytes], file_size: int) -> list[tuple[int, int]] | None:
    """The frames of a zstd file as (stored offset, content size); ``None`` if not splittable.

    Walks frame and block headers (no decompression). ``None`` when a frame does not declare its
    content size, when the file is not well-formed zstd (the reader then reports it), or when it
    has a single frame. Skippable frames count as frames of no content.
    """
    frames: list[tuple[int, int]] = []
    pos = 0
    while pos < file_size:
        f.seek(pos)
        head = f.read(18)
        if len(head) < 8:
            return None
        (magic,) = struct.unpack_from("<I", head)
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            frames.append((pos, 0))
            pos += 8 + struct.unpack_from("<I", head, 4)[0]
            continue
        if magic != _ZSTD_MAGIC:
            return None
        descriptor = head[4]
        fcs_flag, single, checksum, dict_flag = (
            descriptor >> 6,
            (descriptor >> 5) & 1,
            (descriptor >> 2) & 1,
            descriptor & 3,
        )
        fcs_size = (0, 2, 4, 8)[fcs_flag] if fcs_flag or not single else 1
        if fcs_flag == 0 and not single:
            return None  # no content size declared
        header = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
        raw = head[header : header + fcs_size]
        if len(raw) < fcs_size:
            return None
        size = int.from_bytes(raw, "little") + (256 if fcs_size == 2 else 0)
        frames.append((pos, size))
        pos += header + fcs_size
        while True:  # blocks: a 3-byte header each
            f.seek(pos)
            block = f.read(3)
            if len(block) < 3:
                return None
            value = int.from_bytes(block, "little")
            kind, length = (value >> 1) & 3, value >> 3
            pos += 3 + (1 if kind == 1 else length)
            if value & 1:
                break
        pos += 4 * checksum
    if pos != file_size or sum(1 for _, size in frames if size) < 2:
        return None
    return frames


def plan_slices(source: InputFile, slice_bytes: int) -> tuple[str, list[tuple[int, int]]]:
    """How to cut ``source``: ``("", [])`` (whole), or a split and its stored byte ranges.

    ``bytes`` and ``frames`` list the slices' stored ``[start, end)`` ranges; ``stream`` lists
    none (the reader finds them). Only JSONL files larger than ``slice_bytes`` of text are cut.
    """
    kind, codec = kind_of(source.url)
    if kind != "jsonl" or source.num_bytes == 0:
        return "", []
    if codec == "none":
        if source.num_bytes <= slice_bytes:
            return "", []
        starts = range(0, source.num_bytes, slice_bytes)
        return "bytes", [(s, min(s + slice_bytes, source.num_bytes)) for s in starts]
    frames = None
    if codec == "zstd" and storage.is_local(source.url):  # a walk is many small reads
        with storage.open_read(source.url) as f:
            frames = zstd_frames(f, source.num_bytes)
    if frames is not None:
        text_bytes = sum(size for _, size in frames)
        if text_bytes <= slice_bytes:
            return "", []
        ranges: list[tuple[int, int]] = []
        start, held = 0, 0
        for (offset, size), (end, _) in zip(
            frames, [*frames[1:], (source.num_bytes, 0)], strict=True
        ):
            del offset
            held += size
            if held >= slice_bytes:
                ranges.append((start, end))
                start, held = end, 0
        if start < source.num_bytes:
            ranges.append((start, source.num_bytes))
        return "frames", ranges
    if source.num_bytes * ASSUMED_RATIO <= slice_bytes:
        return "", []
    return "stream", []


def _range_chunks(f: IO[bytes], codec: str, url: str, start: int, end: int) -> Iterator[bytes]:
    f.seek(start)
    limited = _Limited(f, end - start)
    yield from iter_chunks(limited, codec, url)  # type: ignore[arg-type]


def iter_slice_chunks(source: InputFile, start: int, end: int, *, first: bool) -> Iterator[bytes]:
    """The decompressed bytes of the lines that slice ``[start, end)`` owns (see the module).

    ``first`` says the slice is the file's first (it owns the line at ``start``).
    """
    _, codec = kind_of(source.url)
    with storage.open_read(source.url) as f:
        skip = not first
        for chunk in _range_chunks(f, codec, source.url, start, end):
            if skip:
                cut = chunk.find(b"\n")
                if cut < 0:
                    continue
                chunk, skip = chunk[cut + 1 :], False
            if chunk:
                yield chunk
        if skip or end >= source.num_bytes:
            return  # no newline in the slice (its bytes belong to a line begun before), or the end
        # The end of our last line, or (if we ended on a newline) the line starting at ``end``.
        for chunk in _range_chunks(f, codec, source.url, end, source.num_bytes):
            cut = chunk.find(b"\n")
            if cut >= 0:
                yield chunk[: cut + 1]
                return
            yield chunk


def count_newlines(source: InputFile, start: int, end: int) -> int:
    """Newlines in the decompressed bytes of the stored range ``[start, end)`` of ``source``."""
    _, codec = kind_of(source.url)
    with storage.open_read(source.url) as f:
        return sum(count_newlines_in(c) for c in _range_chunks(f, codec, source.url, start, end))


def _keep(pieces: list[bytes], num_bytes: int) -> list[bytes]:
    """The first ``num_bytes`` of ``pieces``."""
    kept: list[bytes] = []
    for piece in pieces:
        if num_bytes <= 0:
            break
        kept.append(piece[:num_bytes])
        num_bytes -= len(kept[-1])
    return kept


@dataclass(frozen=True)
class StreamSlice:
    """One slice cut by `iter_stream_slices`.

    Attributes:
        first_line: The file's line number of its first line.
        pieces: Its bytes, in pieces (whole lines joined).
        long_line: The length of its last line, left out of ``pieces`` as too long (0: none).
        damage: Where and what, if the file is damaged after these lines (the last slice).
    """

    first_line: int
    pieces: list[bytes]
    long_line: int = 0
    damage: tuple[str, str] | None = None


def iter_stream_slices(
    f: IO[bytes], codec: str, url: str, slice_bytes: int, max_line_bytes: int
) -> Iterator[StreamSlice]:
    """Cut a decompressed stream into slices of whole lines.

    A slice's bytes are its pieces joined; they are handed out unjoined, so that a caller that
    writes them somewhere copies them once. The cuts are those of ``bytes`` slices of the
    decompressed text: after the first newline at or after each multiple of ``slice_bytes``;
    slices that would own nothing are left out; a file of no text gives one empty slice.

    Memory stays within ``slice_bytes`` plus ``max_line_bytes`` plus a chunk: a slice's last
    line (the one that runs past its cut) longer than ``max_line_bytes`` is measured, not held.
    It is left out of the pieces and its length (newline excluded) comes as ``long_line``, for
    the converter to report as a record that is too large. A damaged file (truncated or corrupt
    compression) ends in a slice of the whole lines before the damage, which carries it.
    """
    pieces: list[bytes] = []
    first_line = 1
    target = slice_bytes  # the next cut: after the first newline at or after this position
    offset = 0  # decompressed position of ``view``'s start
    held_start = 0  # decompressed position of the first byte in ``pieces``
    line_start = 0  # decompressed position where the current line starts
    long_line = 0  # length so far of a last line too long to hold (0: none)
    emitted = 0

    def emit(end: int) -> StreamSlice:
        nonlocal first_line, pieces, held_start, target, long_line, emitted
        out = StreamSlice(first_line, pieces, long_line)
        first_line += sum(count_newlines_in(piece) for piece in pieces) + (1 if long_line else 0)
        pieces, held_start, long_line = [], end + 1, 0
        target = (end // slice_bytes + 1) * slice_bytes
        emitted += 1
        return out

    try:
        for chunk in iter_chunks(f, codec, url):
            view = chunk
            while view:
                if long_line:  # measuring the slice's last line to its newline
                    newline = view.find(b"\n")
                    if newline < 0:
                        long_line += len(view)
                        offset += len(view)
                        break
                    long_line += newline
                    yield emit(offset + newline)
                    offset += newline + 1
                    line_start = offset
                    view = view[newline + 1 :]
                    continue
                cut = (
                    view.find(b"\n", max(0, target - offset)) if offset + len(view) > target else -1
                )
                if cut < 0:
                    pieces.append(view)
                    last = view.rfind(b"\n")
                    if last >= 0:
                        line_start = offset + last + 1
                    offset += len(view)
                    if offset > target and offset - line_start > max_line_bytes:
                        pieces = _keep(pieces, line_start - held_start)
                        long_line = offset - line_start
                    break
                pieces.append(view[: cut + 1])
                yield emit(offset + cut)
                offset += cut + 1
                line_start = offset
                view = view[cut + 1 :]
    except DamagedFileError as err:  # keep the whole lines before it; the partial one is lost
        if not long_line:
            pieces = _keep(pieces, line_start - held_start)
        yield StreamSlice(first_line, pieces, 0, (err.where, err.what))
        return
    if pieces or long_line or not emitted:
        yield StreamSlice(first_line, pieces, long_line)
