"""The sources: one JSONL corpus each, and each system's copy of it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    Corpus,
)
from tools.bench.mix import (
    MIX_DIR,
    NAMES,
    WEIGHTS,
)


def _jsonl_corpus(name: str, lines: Callable[[], Iterator[bytes]]) -> Corpus:
    """``MIX_DIR/<name>/part-00000.jsonl`` of ``lines()``, written once (reused by later runs)."""
    part = MIX_DIR / name / "part-00000.jsonl"
    if not part.exists():
        part.parent.mkdir(parents=True, exist_ok=True)
        staging = part.with_suffix(".tmp")
        with staging.open("wb") as out:
            out.writelines(lines())
        staging.rename(part)
    with part.open("rb") as f:
        num_docs = sum(1 for _ in f)
    return Corpus(
        path=part.parent, files=(part,), num_docs=num_docs, input_bytes=part.stat().st_size
    )


def write_source(name: str, size: int) -> Corpus:
    """``size`` short documents (5 to 64 words) with ids ``<name>-00000``..."""

    def lines() -> Iterator[bytes]:
        for index in range(size):
            words = " ".join(
                f"w{(index * 7919 + k * 104729) % 5000}" for k in range(5 + index % 60)
            )
            yield (json.dumps({"id": f"{name}-{index:05d}", "text": words}) + "\n").encode()

    return _jsonl_corpus(f"mix-{name}-{size}", lines)


def write_union(sources: Sequence[Corpus]) -> Corpus:
    """One source holding every document of ``sources``: what the mix overhead compares with."""
    total = sum(s.num_docs for s in sources)
    return _jsonl_corpus(f"mix-all-{total}", lambda: (s.files[0].read_bytes() for s in sources))


def prepare_sources(
    sizes: Sequence[int], systems: Sequence[str], python: str
) -> tuple[list[dict[str, Any]], Path | None]:
    """Each source in each system's format, and (with shardloader) the union as one source."""
    from tools.bench.stream.prepare import prepare_all, warm_page_cache

    corpora = [write_source(name, size) for name, size in zip(NAMES, sizes, strict=True)]
    sources: list[dict[str, Any]] = []
    for corpus, name, weight in zip(corpora, NAMES, WEIGHTS, strict=True):
        needed = [(system, "text") for system in systems]
        prepared = prepare_all(corpus, needed, tokenizer=None, python=python, num_proc=1)
        warm_page_cache(prepared)
        sources.append(
            {
                "name": name,
                "weight": weight,
                "size": corpus.num_docs,
                "paths": {s: str(prepared[(s, "text")].path) for s in systems},
                "files": {s: list(prepared[(s, "text")].files) for s in systems},
            }
        )
    if "shardloader" not in systems:
        return sources, None
    union = prepare_all(
        write_union(corpora), [("shardloader", "text")], tokenizer=None, python=python, num_proc=1
    )
    warm_page_cache(union)
    return sources, union[("shardloader", "text")].path
