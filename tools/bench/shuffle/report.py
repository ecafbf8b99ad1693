"""Markdown tables of the measurements, and the versions they were taken with."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _q(metrics: dict[str, float | int]) -> list[str]:
    return [
        f"{metrics['same_shard']:.3f}",
        f"{metrics['spearman_abs']:.3f}",
        f"{metrics['distinct_shards_per_1000']:.1f}",
        f"{metrics['mosaic_entropy_bits']:.2f}",
    ]


def _holds(row: dict[str, Any]) -> str:
    """What one worker holds: the setting, then the largest window measured (samples)."""
    if row["held_max_samples"] is None:
        return row["holds"]
    return f"{row['holds']} (max {row['held_max_samples']:,})"


def format_quality(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_quality` rows, loop order and worker 0 side by side."""
    header = [
        "corpus",
        "W",
        "system",
        "worker holds (samples)",
        "same shard",
        "abs(rho)",
        "shards/1000",
        "gap entropy",
        "worker 0: same shard",
        "abs(rho)",
        "shards/1000",
        "gap entropy",
    ]
    body = [
        [
            r["corpus"],
            str(r["world_size"]),
            r["system"],
            _holds(r),
            *_q(r["loop"]),
            *_q(r["worker0"]),
        ]
        for r in rows
    ]
    return _table(header, body)


def format_determinism(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_determinism` rows."""
    header = ["system", "same seed+epoch: same order", "epoch 0 vs 1: positions changed"]
    body = [
        [r["system"], "yes" if r["reproducible"] else "**no**", f"{r['epochs_differ']:.1%}"]
        for r in rows
    ]
    return _table(header, body)


def format_cost(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `run_cost` rows."""
    header = [
        "system",
        "time s",
        "peak MB",
        "same shard",
        "abs(rho)",
        "shards/1000",
        "gap entropy",
    ]
    body = [
        [
            r["system"],
            f"{r['order_s']:.2f}",
            f"{r['peak_bytes'] / 1e6:.1f}",
            *(_q(r["loop"]) if "loop" in r else ["", "", "", ""]),
        ]
        for r in rows
    ]
    return _table(header, body)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("numpy", "torch", "mosaicml-streaming", "webdataset", "shardloader")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out
