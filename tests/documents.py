"""Reading one raw corpus file into documents, for the tests of ``shardloader.sources``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from shardloader.sources import BadRecords, Document, RecordSpec, read_documents
from shardloader.storage import InputFile


def source(path: Path) -> InputFile:
    """``path`` as an input file (size 0 where nothing exists), in its own folder."""
    size = path.stat().st_size if path.exists() else 0
    return InputFile(str(path), size, str(path.parent))


def read(
    path: Path, *, skip: bool = False, spec: RecordSpec | None = None, **kw: Any
) -> tuple[list[Document], BadRecords, Counter[str]]:
    """Every document of ``path``, the bad records (raised, or counted with ``skip``), the stats.

    ``kw`` goes to ``read_documents`` (e.g. ``max_record_bytes``).
    """
    bad = BadRecords("skip" if skip else "raise")
    stats: Counter[str] = Counter()
    docs = list(read_documents(source(path), spec=spec or RecordSpec(), bad=bad, stats=stats, **kw))
    return docs, bad, stats
