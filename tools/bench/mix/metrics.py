"""Metrics of the served ids: mix deviation, pass accounting, resume comparison (pure)."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any


def source_of(sample_id: str) -> str:
    """The source a sample id names (``a-00042`` -> ``a``)."""
    return sample_id.split("-", 1)[0]


def batch_deviation(batches: Sequence[Sequence[str]], weights: dict[str, float]) -> float:
    """Worst ``|count_i - w_i * len(batch)|`` over batches and sources, in samples."""
    worst = 0.0
    for batch in batches:
        counts = collections.Counter(source_of(i) for i in batch)
        for name, weight in weights.items():
            worst = max(worst, abs(counts[name] - weight * len(batch)))
    return worst


def prefix_deviation(batches: Sequence[Sequence[str]], weights: dict[str, float]) -> float:
    """Worst ``|served_i - w_i * served|`` over every prefix of whole batches, in samples."""
    worst = 0.0
    served: collections.Counter[str] = collections.Counter()
    total = 0
    for batch in batches:
        served.update(source_of(i) for i in batch)
        total += len(batch)
        for name, weight in weights.items():
            worst = max(worst, abs(served[name] - weight * total))
    return worst


def pass_accounting(batches: Sequence[Sequence[str]], sizes: dict[str, int]) -> dict[str, Any]:
    """Per source: servings, passes, servings repeated before the pass was complete, and lost.

    A serving that brings its sample to ``n`` servings is *repeated* when, after its global
    batch, some sample of the source has been served fewer than ``n - 1`` times: a repeat before
    the pass was complete (a global batch is consumed at once, so the order inside it does not
    count). *Lost* sums, at the end, ``floor(served / size) - count`` over the samples served
    fewer times than the passes the source should have completed (ids ``<name>-00000``...).
    """
    counts: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in sizes}
    # per source: how many of its samples have been served exactly c times, and the least c
    histogram = {name: collections.Counter({0: size}) for name, size in sizes.items()}
    least = dict.fromkeys(sizes, 0)
    repeated = dict.fromkeys(sizes, 0)
    for batch in batches:
        servings = []
        for sample_id in batch:
            name = source_of(sample_id)
            count = counts[name][sample_id] + 1
            counts[name][sample_id] = count
            histogram[name][count - 1] -= 1
            histogram[name][count] += 1
            servings.append((name, count))
        for name in {name for name, _ in servings}:
            while histogram[name][least[name]] == 0:
                least[name] += 1
        for name, count in servings:
            repeated[name] += count - 1 > least[name]
    out: dict[str, Any] = {}
    for name, size in sizes.items():
        served = sum(counts[name].values())
        passes = served // size
        seen = counts[name]
        lost = sum(max(0, passes - seen[f"{name}-{i:05d}"]) for i in range(size))
        out[name] = {
            "served": served,
            "passes": served / size,
            "distinct": len(seen),
            "repeated": repeated[name],
            "lost": lost,
        }
    return out


def count_differing(expected: list[list[str]], got: list[list[str]]) -> int:
    """Servings of ``expected`` that ``got`` lacks (as multisets; as many as it has extra when
    both serve the same number)."""
    want = collections.Counter(i for batch in expected for i in batch)
    have = collections.Counter(i for batch in got for i in batch)
    return sum((want - have).values())


def compare_resumed(
    reference: list[list[str]], resumed: list[list[str]], k: int, sizes: dict[str, int]
) -> str:
    """How the resumed batches match the uninterrupted run's from batch ``k`` on.

    ``yes``: batch for batch, in order (on every rank); ``yes (same batches)``: each global
    batch holds the same samples; ``yes (same samples)``: the rest as a whole does; else ``no``
    with the first differing batch, how many of the rest's servings the resumed run misses, and
    how many more servings the interrupted run (the first ``k`` batches, then the resumed ones)
    loses and repeats than the uninterrupted one (`pass_accounting`).
    """
    rest = reference[k:]
    if resumed == rest:
        return "yes"
    if [sorted(b) for b in rest] == [sorted(b) for b in resumed]:
        return "yes (same batches)"
    differing = count_differing(rest, resumed)
    if not differing and len(rest) == len(resumed):
        return "yes (same samples)"
    first = next(
        (k + i for i, (a, b) in enumerate(zip(rest, resumed, strict=False)) if a != b),
        k + min(len(rest), len(resumed)),
    )
    served = sum(len(b) for b in rest)
    before = pass_accounting(reference, sizes)
    after = pass_accounting(reference[:k] + resumed, sizes)
    lost, repeated = (
        sum(after[name][field] - before[name][field] for name in sizes)
        for field in ("lost", "repeated")
    )
    return (
        f"no: from batch {first}, {differing} of {served} servings differ; "
        f"{lost:+} lost, {repeated:+} repeated"
        + (f"; {len(resumed)} batches, not {len(rest)}" if len(resumed) != len(rest) else "")
    )
