"""Medians over repeats, ratios to the fastest peer and to the tokenizer-alone bound, the table."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from tools.bench.convert import (
    PEERS,
    TARGET_SIZE_RATIO,
    TARGET_TEXT_RATIO,
    TARGET_TOKEN_RATIO,
    ZSTD_PEERS,
)
from tools.bench.harness import (
    ROOT,
    Corpus,
    busy_note,
    fmt_rate,
    format_columns,
    read_measurements,
    target_line,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    """One run of one system on one task.

    Args:
        system: Which system (``TEXT_SYSTEMS`` or ``TOKEN_SYSTEMS``).
        task: ``"text"`` or ``"tokens"``.
        repeat: Repeat index, from 0.
        ok: Whether the job finished and wrote every document.
        job_s: Wall time of the job, from after imports to complete output.
        process_s: Wall time of the whole subprocess.
        output_bytes: Bytes under the output folder.
        num_samples: Samples the system reports it wrote.
        num_tokens: Tokens the system reports (EOS included where it adds one), if it reports any.
        error: What went wrong, when not ok.
        note: Something odd that did not fail the run.
        other_cpu_share: Share of the machine's CPU time (all cores, over the job's wall time)
            that processes other than the job used meanwhile: a few percent is background noise,
            more means something else competed for the cores.
    """

    system: str
    task: str
    repeat: int
    ok: bool
    job_s: float = 0.0
    process_s: float = 0.0
    output_bytes: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    error: str = ""
    note: str = ""
    other_cpu_share: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """Median and range of one (system, task) over its repeats.

    Ratios come twice: from median times, and from best (shortest) times, which are the better
    estimate when other work shares the cores (see ``other_cpu_share`` in the measurements).
    """

    system: str
    task: str
    num_ok: int
    num_failed: int
    job_s: list[float]
    mb_per_s: tuple[float, float, float]  # median, min, max
    docs_per_s: tuple[float, float, float]
    tokens_per_s: tuple[float, float, float] | None
    process_mb_per_s: float  # median, over the whole subprocess: interpreter start and imports too
    output_mb: float
    ratio_to_fastest_peer: float | None
    ratio_to_bound: float | None
    best_ratio_to_fastest_peer: float | None
    best_ratio_to_bound: float | None
    errors: list[str]
    output_vs_zstd_peer: float | None = None  # text: output / the smallest zstd peer's output


def _rates(numerator: float, times: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of ``numerator / time``."""
    return (numerator / statistics.median(times), numerator / max(times), numerator / min(times))


def summarize(
    measurements: list[Measurement], corpus: Corpus, corpus_tokens: int | None
) -> list[Summary]:
    """Median rates per (system, task) and the ratios the targets are stated in.

    The headline rate is MB/s of input for text and tokens/s for tokens; shardloader's rows are
    compared with the fastest peer on the same task, token rows with the ``bound`` job.
    """
    groups: dict[tuple[str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.system, m.task), []).append(m)

    def times(key: tuple[str, str]) -> list[float]:
        return [m.job_s for m in groups.get(key, []) if m.ok]

    def headline(key: tuple[str, str], best: bool = False) -> float:
        numerator = corpus.input_bytes / 1e6 if key[1] == "text" else corpus_tokens or 0
        return _rates(numerator, times(key))[2 if best else 0] if times(key) and numerator else 0.0

    def ratios(system: str, task: str, best: bool) -> tuple[float | None, float | None]:
        own = headline((system, task), best)
        peer = max((headline((p, task), best) for p in PEERS), default=0.0)
        bound = headline(("bound", task), best)
        to_peer = own / peer if system.startswith("shardloader") and own and peer else None
        return to_peer, (own / bound if task != "text" and own and bound else None)

    summaries = []
    for (system, task), runs in groups.items():
        key, good = (system, task), [m for m in runs if m.ok]
        to_peer, to_bound = ratios(system, task, best=False)
        best_to_peer, best_to_bound = ratios(system, task, best=True)
        with_tokens = task != "text" and bool(corpus_tokens) and bool(good)
        process_s = statistics.median([m.process_s for m in good]) if good else 0.0
        summaries.append(
            Summary(
                system=system,
                task=task,
                num_ok=len(good),
                num_failed=len(runs) - len(good),
                job_s=times(key),
                mb_per_s=_rates(corpus.input_bytes / 1e6, times(key)) if good else (0.0,) * 3,
                docs_per_s=_rates(corpus.num_docs, times(key)) if good else (0.0,) * 3,
                tokens_per_s=_rates(corpus_tokens or 0, times(key)) if with_tokens else None,
                process_mb_per_s=corpus.input_bytes / 1e6 / process_s if process_s else 0.0,
                output_mb=statistics.median([m.output_bytes for m in good]) / 1e6 if good else 0.0,
                ratio_to_fastest_peer=to_peer,
                ratio_to_bound=to_bound,
                best_ratio_to_fastest_peer=best_to_peer,
                best_ratio_to_bound=best_to_bound,
                errors=[m.error for m in runs if m.error],
            )
        )
    return _with_size_ratios(summaries)


def _with_size_ratios(summaries: list[Summary]) -> list[Summary]:
    """Text rows of shardloader with their output over the smallest zstd peer output."""
    peer_outputs = [
        s.output_mb for s in summaries if s.task == "text" and s.system in ZSTD_PEERS and s.num_ok
    ]
    smallest = min((mb for mb in peer_outputs if mb), default=0.0)
    return [
        dataclasses.replace(s, output_vs_zstd_peer=s.output_mb / smallest)
        if s.task == "text" and s.system.startswith("shardloader") and s.num_ok and smallest
        else s
        for s in summaries
    ]


def format_table(summaries: list[Summary]) -> str:
    """The results table, one row per (system, task)."""
    header = (
        "system",
        "task",
        "MB/s",
        "MB/s w/ startup",
        "Mtokens/s",
        "kdocs/s",
        "output MB",
        "output vs zstd peer",
        "vs fastest peer",
        "vs bound",
    )
    rows: list[tuple[str, ...]] = []
    for s in summaries:
        if s.num_ok == 0:
            rows.append((s.system, s.task, "FAILED", "", "", "", "", "", "", s.errors[0][:60]))
            continue
        rows.append(
            (
                s.system,
                s.task,
                fmt_rate(s.mb_per_s),
                f"{s.process_mb_per_s:.1f}",
                fmt_rate(s.tokens_per_s, 1e6, 2),
                fmt_rate(s.docs_per_s, 1e3, 2),
                f"{s.output_mb:.1f}" if s.output_mb else "-",
                f"{s.output_vs_zstd_peer - 1:+.1%}" if s.output_vs_zstd_peer else "",
                f"{s.ratio_to_fastest_peer:.2f}x" if s.ratio_to_fastest_peer else "",
                f"{s.ratio_to_bound:.2f}" if s.ratio_to_bound else "",
            )
        )
    return format_columns(header, rows)


def format_verdicts(summaries: list[Summary]) -> list[str]:
    """One line per target: the measured ratios (median, best) and whether they meet it."""
    lines = []
    for s in summaries:
        if not s.system.startswith("shardloader"):
            continue
        if s.task == "text" and s.ratio_to_fastest_peer and s.best_ratio_to_fastest_peer:
            median, best = s.ratio_to_fastest_peer, s.best_ratio_to_fastest_peer
            lines.append(
                target_line(
                    f"{s.system} text",
                    median,
                    best,
                    s.num_ok,
                    TARGET_TEXT_RATIO,
                    versus="the fastest peer",
                    percent=False,
                )
            )
        if s.task == "text" and s.output_vs_zstd_peer:
            ok = s.output_vs_zstd_peer <= TARGET_SIZE_RATIO
            lines.append(
                f"{s.system} text output: {s.output_vs_zstd_peer - 1:+.1%} against the smallest "
                f"zstd peer (target at most {TARGET_SIZE_RATIO - 1:+.0%}): "
                f"{'met' if ok else 'NOT met'}"
            )
        if s.task != "text" and s.ratio_to_bound and s.best_ratio_to_bound:
            median, best = s.ratio_to_bound, s.best_ratio_to_bound
            lines.append(
                target_line(
                    f"{s.system} {s.task}",
                    median,
                    best,
                    s.num_ok,
                    TARGET_TOKEN_RATIO,
                    versus="of the tokenizer alone",
                    percent=True,
                )
            )
    return lines


def print_report(
    measurements: list[Measurement], corpus: Corpus, corpus_tokens: int | None
) -> list[Summary]:
    """Print the table, the verdicts and a warning if other work competed for the cores."""
    summaries = summarize(measurements, corpus, corpus_tokens)
    print()
    print(format_table(summaries))
    print()
    for line in format_verdicts(summaries):
        print(line)
    shares = [m.other_cpu_share for m in measurements]
    if note := busy_note(shares, "jobs", "best-of-N is the better estimate"):
        print(note)
    return summaries


def report_from_json(path: Path) -> int:
    """Re-print the table and verdicts of an earlier run's results file."""
    report = json.loads(path.read_text())
    info = report["corpus"]
    corpus = Corpus(
        path=ROOT / info["path"],
        files=(),
        num_docs=info["num_docs"],
        input_bytes=info["input_bytes"],
    )
    measurements = read_measurements(report, Measurement)
    print(
        f"{path}: {info['num_docs']:,} docs, {info['input_bytes'] / 1e6:.1f} MB of JSONL; "
        f"{report['num_proc']} processes each, {report['repeats']} repeat(s)"
    )
    plain = [m for m in measurements if m.task != "chat"]
    if plain:
        print_report(plain, corpus, info.get("num_tokens"))
    if chat := report.get("chat"):
        chat_corpus = Corpus(
            path=ROOT / chat["corpus"]["path"],
            files=(),
            num_docs=chat["corpus"]["num_docs"],
            input_bytes=chat["corpus"]["input_bytes"],
        )
        print("\nchat: conversion with chat rendering vs the tokenizer alone")
        chat_runs = [m for m in measurements if m.task == "chat"]
        print_report(chat_runs, chat_corpus, chat["corpus"]["num_tokens"])
    return 0
