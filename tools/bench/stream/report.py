"""Medians over repeats, ratios to the fastest peer and to the bound, the tables and verdicts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from tools.bench.harness import (
    busy_note,
    fmt_rate,
    format_columns,
    read_measurements,
    target_line,
)
from tools.bench.stream import (
    BOUNDS,
    CHECKSUM_TASKS,
    NO_VERIFY,
    PEERS,
    SOURCES,
    SYSTEMS,
    TARGET_FIRST_BATCH_S,
    TARGET_LOCAL_RATIO,
    TARGET_MEMMAP_RATIO,
    TARGET_S3_RATIO,
    TASKS,
    bound_for,
)
from tools.bench.stream.passes import Measurement


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Median and range of one (size, task, source, num_workers, system) over its repeats."""

    size: str
    task: str
    source: str
    num_workers: int
    system: str
    num_ok: int
    num_failed: int
    job_s: list[float]
    samples_per_s: tuple[float, float, float]  # median, min, max
    text_mb_per_s: tuple[float, float, float] | None
    tokens_per_s: tuple[float, float, float] | None
    stored_mb_per_s: tuple[float, float, float]
    first_batch_s: float
    peak_rss_mb: float
    workers_peak_rss_mb: float
    rss_import_mb: float
    import_rss_anon_mb: float
    import_rss_file_mb: float
    end_rss_anon_mb: float
    end_rss_file_mb: float
    ratio_to_fastest_peer: float | None
    ratio_to_bound: float | None
    best_ratio_to_fastest_peer: float | None
    best_ratio_to_bound: float | None
    errors: list[str]
    notes: list[str]


def _per_s(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max), or zeros without values."""
    return (statistics.median(values), min(values), max(values)) if values else (0.0, 0.0, 0.0)


def _median(runs: list[Measurement], field: str) -> float:
    """Median of one field over runs, 0 without runs."""
    return statistics.median([getattr(m, field) for m in runs]) if runs else 0.0


Key = tuple[str, str, str, int, str]  # (size, task, source, num_workers, system)


def _headline(m: Measurement) -> float:
    """Bytes of text (text), tokens (tokens, packed) or stored bytes (raw-get) per second."""
    if m.system == "raw-get":
        return m.stored_bytes / m.job_s
    return (m.text_bytes if m.task == "text" else m.num_tokens) / m.job_s


def _rate(
    groups: dict[Key, list[Measurement]], key: Key, best: bool, stored: bool = False
) -> float:
    """Median (or best) headline rate, or stored bytes per second, of a configuration."""
    good = [m for m in groups.get(key, []) if m.ok and m.job_s > 0]
    if not good:
        return 0.0
    values = [m.stored_bytes / m.job_s if stored else _headline(m) for m in good]
    return max(values) if best else statistics.median(values)


def _ratios(
    groups: dict[Key, list[Measurement]], key: Key, best: bool
) -> tuple[float | None, float | None]:
    """(to the fastest peer, to the bound) of one configuration; ``None`` where not defined."""
    size, task, source, workers, system = key
    if system in BOUNDS:
        return None, None
    own = _rate(groups, key, best)
    peer = max(_rate(groups, (size, task, source, workers, p), best) for p in PEERS)
    to_peer = own / peer if own and peer else None
    bound = _rate(groups, (size, task, source, 0, bound_for(task, source)), best)
    if source == "s3":  # stored bytes per second, as the raw GET counts them
        own = _rate(groups, key, best, stored=True)
    to_bound = own / bound if own and bound else None
    return to_peer, to_bound


def summarize(measurements: list[Measurement]) -> list[Summary]:
    """Medians per configuration, and the ratios the targets are stated in."""
    groups: dict[Key, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.key, []).append(m)

    summaries = []
    for key, runs in groups.items():
        size, task, source, workers, system = key
        good = [m for m in runs if m.ok and m.job_s > 0]
        to_peer, to_bound = _ratios(groups, key, best=False)
        best_to_peer, best_to_bound = _ratios(groups, key, best=True)

        summaries.append(
            Summary(
                size=size,
                task=task,
                source=source,
                num_workers=workers,
                system=system,
                num_ok=len(good),
                num_failed=len(runs) - len(good),
                job_s=[m.job_s for m in good],
                samples_per_s=_per_s([m.num_samples / m.job_s for m in good]),
                text_mb_per_s=_per_s([m.text_bytes / 1e6 / m.job_s for m in good])
                if task == "text" and system != "raw-get"
                else None,
                tokens_per_s=_per_s([m.num_tokens / m.job_s for m in good])
                if task in ("tokens", "packed") and system != "raw-get"
                else None,
                stored_mb_per_s=_per_s([m.stored_bytes / 1e6 / m.job_s for m in good]),
                first_batch_s=_median(good, "first_batch_s"),
                peak_rss_mb=_median(good, "peak_rss_mb"),
                workers_peak_rss_mb=_median(good, "workers_peak_rss_mb"),
                rss_import_mb=_median(good, "rss_import_mb"),
                import_rss_anon_mb=_median(good, "import_rss_anon_mb"),
                import_rss_file_mb=_median(good, "import_rss_file_mb"),
                end_rss_anon_mb=_median(good, "end_rss_anon_mb"),
                end_rss_file_mb=_median(good, "end_rss_file_mb"),
                ratio_to_fastest_peer=to_peer,
                ratio_to_bound=to_bound,
                best_ratio_to_fastest_peer=best_to_peer,
                best_ratio_to_bound=best_to_bound,
                errors=[m.error for m in runs if m.error],
                notes=sorted({m.note for m in runs if m.note}),
            )
        )
    order = {s: i for i, s in enumerate((SYSTEMS[0], NO_VERIFY, *SYSTEMS[1:], *BOUNDS))}
    summaries.sort(
        key=lambda s: (
            s.size != "main",
            TASKS.index(s.task),
            SOURCES.index(s.source),
            s.num_workers,
            order.get(s.system, 99),
        )
    )
    return summaries


def format_table(summaries: list[Summary]) -> str:
    """The throughput table (main corpus size), one row per configuration."""
    header = (
        "task",
        "source",
        "w",
        "system",
        "ksamples/s",
        "text MB/s",
        "Mtokens/s",
        "stored MB/s",
        "1st batch s",
        "RSS MB",
        "worker RSS",
        "vs peer",
        "vs bound",
    )
    rows: list[Sequence[str]] = []
    previous = None
    for s in summaries:
        if s.size != "main":
            continue
        group = (s.task, s.source, s.num_workers)
        if previous is not None and group != previous:
            rows.append([""] * len(header))
        previous = group
        head = [s.task, s.source, str(s.num_workers), s.system]
        if s.num_ok == 0:
            rows.append([*head, "FAILED", *[""] * 8])
            continue
        rows.append(
            [
                *head,
                fmt_rate(s.samples_per_s, 1e3, 2) if s.system != "raw-get" else "-",
                fmt_rate(s.text_mb_per_s),
                fmt_rate(s.tokens_per_s, 1e6, 2),
                fmt_rate(s.stored_mb_per_s),
                f"{s.first_batch_s:.2f}" if s.system != "raw-get" else "-",
                f"{s.peak_rss_mb:.0f}",
                f"{s.workers_peak_rss_mb:.0f}" if s.num_workers else "-",
                f"{s.ratio_to_fastest_peer:.2f}x" if s.ratio_to_fastest_peer else "",
                f"{s.ratio_to_bound:.2f}" if s.ratio_to_bound else "",
            ]
        )
    return format_columns(header, rows)


def format_rss_table(summaries: list[Summary], sizes_mb: dict[str, float]) -> str:
    """Peak RSS and time to first batch at both corpus sizes (text, ``num_workers=0``)."""
    by_key = {(s.size, s.task, s.source, s.num_workers, s.system): s for s in summaries}
    main_mb, large_mb = sizes_mb["main"], sizes_mb["large"]
    header = (
        "source",
        "system",
        f"peak RSS MB @{main_mb:g}MB",
        f"@{large_mb:g}MB",
        "growth",
        "after imports: anon/file",
        "at end: anon/file",
        f"1st batch s @{main_mb:g}MB",
        f"@{large_mb:g}MB",
    )
    rows: list[Sequence[str]] = []
    for source, system in itertools.product(SOURCES, SYSTEMS):
        small = by_key.get(("main", "text", source, 0, system))
        large = by_key.get(("large", "text", source, 0, system))
        if large is None:
            continue
        if not large.num_ok:
            rows.append([source, system, "-", "FAILED", *[""] * 5])
            continue
        has_small = small is not None and small.num_ok > 0
        rows.append(
            [
                source,
                system,
                f"{small.peak_rss_mb:.0f}" if small and has_small else "-",
                f"{large.peak_rss_mb:.0f}",
                f"{large.peak_rss_mb - small.peak_rss_mb:+.0f}" if small and has_small else "-",
                f"{large.import_rss_anon_mb:.0f}/{large.import_rss_file_mb:.0f}",
                f"{large.end_rss_anon_mb:.0f}/{large.end_rss_file_mb:.0f}",
                f"{small.first_batch_s:.2f}" if small and has_small else "-",
                f"{large.first_batch_s:.2f}",
            ]
        )
    return format_columns(header, rows)


# The bounds with a target, as the verdicts name them (``decode`` is a floor, with none).
BOUND_TARGETS = {
    "memmap": ("the memmap bound", TARGET_MEMMAP_RATIO),
    "raw-get": ("raw GET throughput", TARGET_S3_RATIO),
}


def format_verdicts(summaries: list[Summary]) -> list[str]:
    """One line per target and configuration of shardloader."""
    lines = []
    for s in summaries:
        if s.system != "shardloader" or s.size != "main" or not s.num_ok:
            continue
        where = f"{s.task} {s.source} w{s.num_workers}"
        if s.source == "local" and s.ratio_to_fastest_peer and s.best_ratio_to_fastest_peer:
            median, best = s.ratio_to_fastest_peer, s.best_ratio_to_fastest_peer
            lines.append(
                target_line(
                    f"shardloader {where}",
                    median,
                    best,
                    s.num_ok,
                    TARGET_LOCAL_RATIO,
                    versus="the fastest peer",
                    percent=False,
                )
            )
        bound_target = BOUND_TARGETS.get(bound_for(s.task, s.source))
        if s.ratio_to_bound and s.best_ratio_to_bound and bound_target:
            bound, target = bound_target
            median, best = s.ratio_to_bound, s.best_ratio_to_bound
            lines.append(
                target_line(
                    f"shardloader {where}",
                    median,
                    best,
                    s.num_ok,
                    target,
                    versus=f"of {bound}",
                    percent=True,
                )
            )
        if s.source == "local":
            fast = "meets" if s.first_batch_s <= TARGET_FIRST_BATCH_S else "MISSES"
            lines.append(
                f"shardloader {where}: first batch in {s.first_batch_s:.2f} s; {fast} the "
                f"{TARGET_FIRST_BATCH_S:g} s target"
            )
    return lines


def checksum_cost(summaries: list[Summary]) -> list[dict[str, float | int | str]]:
    """What ``verify_local=True`` (the default) costs shardloader over ``verify_local=False``.

    One row per local text or tokens configuration (main size) where both ran: first batch and
    full-pass rate (k samples/s for text, M tokens/s for tokens) of each, and their ratio.
    """
    by_key = {(s.size, s.task, s.source, s.num_workers, s.system): s for s in summaries}
    rows: list[dict[str, float | int | str]] = []
    for s in summaries:
        if s.system != "shardloader" or s.size != "main" or s.source != "local":
            continue
        off = by_key.get(("main", s.task, "local", s.num_workers, NO_VERIFY))
        if s.task not in CHECKSUM_TASKS or off is None or not (s.num_ok and off.num_ok):
            continue
        text = s.task == "text"
        rate_on = (s.samples_per_s[0] / 1e3) if text else (s.tokens_per_s or (0.0,))[0] / 1e6
        rate_off = (off.samples_per_s[0] / 1e3) if text else (off.tokens_per_s or (0.0,))[0] / 1e6
        rows.append(
            {
                "task": s.task,
                "num_workers": s.num_workers,
                "unit": "k samples/s" if text else "M tokens/s",
                "first_batch_s": s.first_batch_s,
                "first_batch_s_no_verify": off.first_batch_s,
                "rate": rate_on,
                "rate_no_verify": rate_off,
                "rate_ratio": rate_on / rate_off if rate_off else 0.0,
            }
        )
    return rows


def format_checksum_cost(rows: list[dict[str, float | int | str]]) -> str:
    """The local checksum cost table: verify_local on (default) against off."""
    header = (
        "task",
        "w",
        "1st batch s: verify",
        "no verify",
        "full pass: verify",
        "no verify",
        "verify / no verify",
    )
    body: list[Sequence[str]] = [
        [
            str(r["task"]),
            str(r["num_workers"]),
            f"{r['first_batch_s']:.2f}",
            f"{r['first_batch_s_no_verify']:.2f}",
            f"{r['rate']:.2f} {r['unit']}",
            f"{r['rate_no_verify']:.2f} {r['unit']}",
            f"{r['rate_ratio']:.2f}x",
        ]
        for r in rows
    ]
    return format_columns(header, body)


def print_report(measurements: list[Measurement], sizes_mb: dict[str, float]) -> list[Summary]:
    """Print the tables, the verdicts, the notes and a warning if other work used the cores."""
    summaries = summarize(measurements)
    print()
    print(format_table(summaries))
    if any(s.size == "large" for s in summaries):
        print()
        print("Peak RSS and first batch at two corpus sizes (text, num_workers=0):")
        print(format_rss_table(summaries, sizes_mb))
    if cost := checksum_cost(summaries):
        print()
        print("Local checksum cost (shardloader, StreamConfig.verify_local True vs False):")
        print(format_checksum_cost(cost))
    print()
    for line in format_verdicts(summaries):
        print(line)
    for s in summaries:
        where = f"{s.size} {s.task} {s.source} w{s.num_workers} {s.system}"
        for error in sorted(set(s.errors)):
            print(f"FAILED: {where}: {error[:400]}")
        for note in s.notes:
            print(f"note: {where}: {note}")
    shares = [m.other_cpu_share for m in measurements]
    if busy := busy_note(shares, "passes", "compare best-of-N ratios (in the JSON)"):
        print(busy)
    return summaries


def report_from_json(path: Path) -> int:
    """Re-print the tables and verdicts of an earlier run's results file."""
    report = json.loads(path.read_text())
    measurements = read_measurements(report, Measurement)
    print(f"{path}: {report['description']}")
    print_report(measurements, report["sizes_mb"])
    return 0
