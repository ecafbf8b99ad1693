"""ShardReader: plan order across slices, one window's shards held at a time, prefetch ahead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardloader import read_manifest
from shardloader.manifest import iter_shard_urls
from shardloader.plan import PlanConfig, Span, Window, WorkerPlan, plan_epoch
from shardloader.reader import ShardReader
from tests.streaming import SHARD_SIZES, source_docs


class _Pin:
    def __init__(self, fetcher: _LocalFetcher, url: str) -> None:
        self.path, self._fetcher, self._url = url, fetcher, url

    def release(self) -> None:
        self._fetcher.pinned.remove(self._url)


class _LocalFetcher:
    """Local shards, recording what is pinned, opened and prefetched."""

    def __init__(self) -> None:
        self.pinned: list[str] = []
        self.opened: list[str] = []
        self.prefetched: list[str] = []
        self.most_pinned = 0
        self.events: list[tuple[str, str]] = []

    def open(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = "",
        hash_whole: bool = True,
    ) -> _Pin:
        self.pinned.append(url)
        self.opened.append(url)
        self.events.append(("open", url))
        self.most_pinned = max(self.most_pinned, len(self.pinned))
        return _Pin(self, url)

    def open_decoded(
        self,
        url: str,
        *,
        num_bytes: int,
        checksum: str,
        algorithm: str = "",
        decode: Any,
        hash_whole: bool = True,
    ) -> tuple[_Pin, Any]:
        pin = self.open(url, num_bytes=num_bytes, checksum=checksum, algorithm=algorithm)
        return pin, decode(pin.path)

    def prefetch(self, url: str, *, num_bytes: int, checksum: str, algorithm: str = "") -> None:
        self.prefetched.append(url)
        self.events.append(("prefetch", url))


def _reader(dataset_dir: Path, fetcher: _LocalFetcher, **kwargs: object) -> ShardReader:
    manifest = read_manifest(str(dataset_dir))
    urls = [url for _, url in iter_shard_urls(str(dataset_dir), manifest)]
    return ShardReader(manifest, urls, fetcher=fetcher, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [1, 3])
def test_samples_come_in_plan_order_with_their_content(
    dataset_dir: Path, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shardloader.reader.SLICE", 7)  # windows cut into many slices
    plan = plan_epoch(
        list(SHARD_SIZES),
        config=PlanConfig(seed=2, shuffle_window=window),
        epoch=0,
        world_size=1,
        rank=0,
        num_workers=2,
    ).workers[1]
    fetcher = _LocalFetcher()
    samples = list(_reader(dataset_dir, fetcher).iter_samples(plan))
    docs = source_docs()
    assert [s["sample_id"] for s in samples] == plan.sample_ids().tolist()
    assert [s["text"] for s in samples] == [docs[s["sample_id"]]["text"] for s in samples]
    assert 1 < fetcher.most_pinned <= window or window == 1
    assert fetcher.pinned == []  # every shard released at the end
    assert len(fetcher.opened) == len(set(fetcher.opened))  # each shard decoded once


def test_explicit_ids_mark_padding_and_the_next_window_is_prefetched(dataset_dir: Path) -> None:
    first = np.concatenate([[0], np.cumsum(SHARD_SIZES)]).astype(np.int64)
    ids = np.array([301, 5, 302], dtype=np.int64)  # shards 1, 0, 1, out of order
    windows = (
        Window(ids=ids, padded=np.array([False, True, False])),
        Window(spans=(Span(6, 0, 3),)),
    )
    plan = WorkerPlan(0, 0, 0, windows, first)
    fetcher = _LocalFetcher()
    reader = _reader(dataset_dir, fetcher, mark_padding=True, prefetch_windows=1)
    samples = list(reader.iter_samples(plan))
    assert [(s["sample_id"], s["is_padding"]) for s in samples] == [
        (301, False),
        (5, True),
        (302, False),
        (first[6], False),
        (first[6] + 1, False),
        (first[6] + 2, False),
    ]
    shard6 = fetcher.opened[-1]
    assert "shard-00006" in shard6
    # Asked for while the first window was read (before shard 0 of that window was opened).
    assert fetcher.events.index(("prefetch", shard6)) < fetcher.events.index(("open", shard6))
    assert fetcher.events.index(("prefetch", shard6)) < fetcher.events.index(
        ("open", fetcher.opened[1])
    )
    assert reader.stage_seconds["decode"] > 0


def test_the_reader_imports_neither_torch_nor_tokenizers() -> None:
    # `convert`'s pool workers start without torch, and the reader runs where `tokenizers` has
    # no wheel (free-threaded CPython 3.13t; README, Benchmarks).
    import subprocess
    import sys

    code = (
        "import sys, shardloader\n"
        "from shardloader.reader import ShardReader\n"
        "from shardloader.fetch import ShardFetcher\n"
        "print(sorted({'torch', 'tokenizers', 'transformers'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6])
def test_rows_become_dicts_keyed_by_name_for_any_field_count(width: int) -> None:
    from shardloader.reader import _dicts

    names = ["id", "sample_id", "text", "url", "score", "lang"][:width]
    columns = [[f"{name}-{row}" for row in range(5)] for name in names]
    dicts = _dicts(names, columns)
    assert dicts == [{n: f"{n}-{row}" for n in names} for row in range(5)]
    assert [list(d) for d in dicts] == [names] * 5  # the field order is kept
    if width > 1:
        with pytest.raises(ValueError, match="shorter|longer"):
            _dicts(names, [*columns[:-1], columns[-1][:4]])  # a short column is refused
