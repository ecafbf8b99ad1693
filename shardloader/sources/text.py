"""Plain-text files: each whole file is one document, named by its path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from shardloader.sources.records import Document, FileContext
from shardloader.sources.streams import iter_chunks


def read_text_file(f: IO[bytes], file: FileContext) -> Iterator[Document]:
    """Yield the text file ``f`` as one document with id ``file.name``, unless it is bad.

    A file over ``file.max_record_bytes`` is measured to its end but never held; one that is not
    UTF-8 or is empty is reported to ``file.bad``.
    """
    url, name, bad, stats = file.url, file.name, file.bad, file.stats
    codec, max_record_bytes = file.codec, file.max_record_bytes
    chunks: list[bytes] = []
    size = 0
    for chunk in iter_chunks(f, codec, url):
        size += len(chunk)
        if size <= max_record_bytes:
            chunks.append(chunk)
        else:
            chunks.clear()  # measured to its end, never held
    stats["records"] += 1
    stats["bytes"] += size
    if size > max_record_bytes:
        bad.report_too_large(url, size, max_record_bytes)
        return
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad.report(
            "bad_utf8",
            f"{url}:{line}",
            f"invalid UTF-8 at byte {err.start} of the file "
            f"({err.object[err.start : err.start + 4]!r}"
            f": {err.reason}), so not a UTF-8 text file",
        )
        return
    if not text:
        bad.report("empty_text", url, "the file is empty")
        return
    yield Document(name, text, None, url)
