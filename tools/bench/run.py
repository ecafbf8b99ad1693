"""One command for every benchmark: the same corpus, one sitting, one results file and a plot.

Usage::

    python3 tools/bench.py [--mb 300] [--stream-mb MB] [--repeats 3] [--quick]
                          [--parts convert,stream,pack,splits]

Sets up ``.venv-bench`` (``tools/bench_setup.sh``: pinned peers beside the CPU torch), then runs,
one after the other on this machine, each part's own benchmark with that interpreter:

- ``convert``: ``tools.bench.convert`` (text, and text + tokenize; MB/s, output bytes),
- ``stream``: ``tools.bench.stream`` (shuffled reads of text, token ids and packed [8 x 2048]
  rows, local and loopback S3, 0 and 2 workers; samples/s, tokens/s, first batch, peak RSS;
  bounds: memmap of token ids and raw S3 GET),
- ``pack``: ``tools.bench.pack`` (packed [8 x 2048] batches; tokens/s, utilization),
- ``splits``: ``tools.bench.splits`` (2 and 3 ranks x 2 workers over 7 uneven shards: lost,
  duplicated, per-rank counts) when present.

Each part writes its own ``.bench/results-<part>.json``; this script gathers them into
``.bench/results.json``, prints shardloader's ratio to the fastest peer and to the bound for every
measurement, and draws ``docs/bench.png`` (throughput per system and task, log scale). The corpus
is generated deterministically by ``tools/make_corpus.py`` (long-tailed document lengths) and a
byte-level BPE is trained on it offline, both cached under ``.bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.bench.harness import BENCH_DIR, ROOT
from tools.bench.stream import bound_for

LAUNCHER = ROOT / "tools" / "bench.py"
VENV_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
PARTS = ("convert", "stream", "pack", "splits")


def run_part(part: str, args: argparse.Namespace) -> Path | None:
    """Run one part's benchmark; returns its results file (``None`` if the part is absent)."""
    out = BENCH_DIR / f"results-{part}{_suffix(args)}.json"
    python = str(args.python)
    common = ["--repeats", str(args.repeats)] if args.repeats else []
    stream_mb = args.stream_mb if args.stream_mb is not None else args.mb
    commands = {  # each part runs as `python -m MODULE ARGS` from the repository root
        "convert": ["tools.bench.convert", "--mb", str(args.mb), *common],
        # One corpus for every part; the stream part's second size (peak RSS growth) is left
        # out at full size: a second, bigger corpus would double its time.
        "stream": ["tools.bench.stream", "--mb", str(stream_mb), "--large-mb", "0", *common],
        "pack": ["tools.bench.pack", "--mb", str(min(args.mb, 40.0))],
        "splits": ["tools.bench.splits"],
    }
    module, *options = commands[part]
    if args.quick and part in ("convert", "stream"):
        options = ["--quick"]
    command = [python, "-m", module, *options, "--out", str(out)]
    path = ROOT / module.replace(".", "/")
    if not (path.with_suffix(".py").exists() or (path / "__main__.py").exists()):
        print(f"== {part}: {module} is not in this checkout, skipped", flush=True)
        return None
    print(f"== {part}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, check=False)
    print(f"== {part}: exit {result.returncode} after {time.perf_counter() - started:.0f} s")
    return out if result.returncode == 0 and out.exists() else None


def _suffix(args: argparse.Namespace) -> str:
    """``--quick`` results go beside the full run's, never over them."""
    return "-quick" if args.quick else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measurement of shardloader: its figure, the best peer's, the bound's."""
    rows: list[dict[str, Any]] = []
    convert = results.get("convert")
    if convert:
        for s in convert["summaries"]:
            if s["system"].startswith("shardloader") and s.get("best_ratio_to_fastest_peer"):
                rows.append(
                    {
                        "part": "convert",
                        "what": f"{s['task']}, {s['system']}",
                        "unit": "MB/s",
                        "value": _median(s["mb_per_s"]),
                        "vs_peer": s.get("ratio_to_fastest_peer"),
                        "vs_bound": s.get("ratio_to_bound"),
                    }
                )
    stream = results.get("stream")
    if stream:
        for s in stream["summaries"]:
            if s["system"] != "shardloader" or s["size"] != "main":
                continue
            unit, key = (
                ("k samples/s", "samples_per_s")
                if s["task"] == "text"
                else ("M tokens/s", "tokens_per_s")
            )
            scale = 1e3 if s["task"] == "text" else 1e6
            rows.append(
                {
                    "part": "stream",
                    "what": f"{s['task']}, {s['source']}, {s['num_workers']} workers",
                    "unit": unit,
                    "value": _median(s[key]) / scale,
                    "vs_peer": s.get("ratio_to_fastest_peer"),
                    "vs_bound": s.get("ratio_to_bound"),
                }
            )
    splits = results.get("splits")
    if splits:
        for world_size in sorted({r["world_size"] for r in splits["rows"]}):
            rows_w = [r for r in splits["rows"] if r["world_size"] == world_size]
            exact = [
                r["system"]
                for r in rows_w
                if r.get("equal")  # a failed run has no counts: not exact
                and not r.get("duplicated")
                and (not r.get("lost") or r.get("lost_served_next_epoch"))
            ]
            rows.append(
                {
                    "part": "splits",
                    "what": f"{world_size} ranks x 2 workers: exact",
                    "unit": "",
                    "value": None,
                    "text": ", ".join(exact) or "none",
                    "vs_peer": None,
                    "vs_bound": None,
                }
            )
    pack = results.get("pack")
    if pack:
        table = pack["datasets"]["corpus"]
        ours = table["shardloader concat"]["batch_tps"] / 1e6
        peer = table["DataCollatorWithFlattening"]["batch_tps"] / 1e6
        rows.append(
            {
                "part": "pack",
                "what": "in memory, [8 x 2048] (vs HF flattening)",
                "unit": "M tokens/s",
                "value": ours,
                "vs_peer": ours / peer if peer else None,
                "vs_bound": None,
            }
        )
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The table: shardloader's figure and its ratios."""
    header = ("part", "measurement", "shardloader", "vs best peer", "vs bound")
    print("\n{:<8} {:<34} {:>16} {:>13} {:>9}".format(*header))
    for row in rows:
        peer = f"{row['vs_peer']:.2f}x" if row["vs_peer"] else "-"
        bound = f"{row['vs_bound']:.0%}" if row["vs_bound"] else "-"
        figure = row["text"] if row.get("text") else f"{row['value']:.1f} {row['unit']}"
        print(f"{row['part']:<8} {row['what']:<34} {figure:>16} {peer:>13} {bound:>9}")


STREAM_SYSTEMS = ("shardloader", "mosaic", "litdata", "webdataset", "hf")
STREAM_NAMES = {
    "shardloader": "shardloader",
    "mosaic": "Mosaic",
    "litdata": "LitData",
    "webdataset": "WebDataset",
    "hf": "HF",
}


def _fmt_range(values: list[float] | None, scale: float = 1.0) -> str:
    """``median [min-max]`` of a (median, min, max) triple."""
    if not values or not values[0]:
        return "-"
    median, low, high = (v / scale for v in values)
    return f"{median:.1f} [{low:.1f}-{high:.1f}]"


def markdown(results: dict[str, Any]) -> str:
    """The README's tables, from a results file: the summary, streaming and conversion."""
    lines = [
        "| part | measurement | shardloader | vs best peer | vs bound |",
        "|---|---|---|---|---|",
    ]
    for row in summary_rows(results):
        figure = row["text"] if row.get("text") else f"{row['value']:.1f} {row['unit']}"
        peer = f"{row['vs_peer']:.2f}x" if row["vs_peer"] else "-"
        bound = f"{row['vs_bound']:.0%}" if row["vs_bound"] else "-"
        lines.append(f"| {row['part']} | {row['what']} | {figure} | {peer} | {bound} |")
    stream = results.get("stream")
    if stream:
        lines += ["", _stream_markdown(stream)]
    convert = results.get("convert")
    if convert:
        lines += ["", _convert_markdown(convert)]
    return "\n".join(lines) + "\n"


def _stream_markdown(stream: dict[str, Any]) -> str:
    by_key = {
        (s["task"], s["source"], s["num_workers"], s["system"]): s
        for s in stream["summaries"]
        if s["size"] == "main"
    }
    names = " | ".join(STREAM_NAMES[p] for p in STREAM_SYSTEMS[1:])
    lines = [
        f"| task | source | workers | shardloader | vs best peer | {names} | bound | vs bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen = sorted(
        {k[:3] for k in by_key},
        key=lambda k: (("text", "tokens", "packed").index(k[0]), k[1] != "local", k[2]),
    )
    for task, source, workers in seen:
        unit, key, scale = (
            ("k samples/s", "samples_per_s", 1e3)
            if task == "text"
            else ("M tokens/s", "tokens_per_s", 1e6)
        )
        ours = by_key.get((task, source, workers, "shardloader"))
        if ours is None or not ours["num_ok"]:
            continue
        cells = []
        for peer in STREAM_SYSTEMS[1:]:
            s = by_key.get((task, source, workers, peer))
            cells.append(f"{s[key][0] / scale:.1f}" if s and s["num_ok"] and s[key] else "-")
        bound_name = bound_for(task, source)
        bound = by_key.get((task, source, 0, bound_name))
        if bound and bound["num_ok"]:
            if bound_name == "decode":
                bound_text = f"decode {bound['samples_per_s'][0] / 1e3:.1f}"
            elif bound_name == "memmap":
                bound_text = f"memmap {bound['tokens_per_s'][0] / 1e6:.1f}"
            else:
                bound_text = f"GET {bound['stored_mb_per_s'][0]:.0f} MB/s"
        else:
            bound_text = "-"
        to_peer = ours["ratio_to_fastest_peer"]
        to_bound = ours["ratio_to_bound"]
        lines.append(
            f"| {task}, {unit} | {source} | {workers} | {_fmt_range(ours[key], scale)} | "
            f"{f'{to_peer:.2f}x' if to_peer else '-'} | {' | '.join(cells)} | {bound_text} | "
            f"{f'{to_bound:.0%}' if to_bound else '-'} |"
        )
    lines += [
        "",
        *_per_system_table("first batch s", seen, by_key, lambda s, w: f"{s['first_batch_s']:.2f}"),
    ]
    if stream.get("local_checksum_cost"):
        lines += ["", *_checksum_cost_table(stream["local_checksum_cost"])]
    lines += [
        "",
        *_per_system_table(
            "peak RSS MB (main / workers)",
            seen,
            by_key,
            lambda s, w: (
                f"{s['peak_rss_mb']:.0f}" + (f" / {s['workers_peak_rss_mb']:.0f}" if w else "")
            ),
        ),
    ]
    return "\n".join(lines)


def _checksum_cost_table(rows: list[dict[str, Any]]) -> list[str]:
    """shardloader from local disk with ``verify_local`` on (the default) and off."""
    lines = [
        "| local checksum cost: task | workers | first batch s: verify_local=True | False "
        "| full pass: True | False | True / False |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['num_workers']} | {r['first_batch_s']:.2f} | "
            f"{r['first_batch_s_no_verify']:.2f} | {r['rate']:.2f} {r['unit']} | "
            f"{r['rate_no_verify']:.2f} {r['unit']} | {r['rate_ratio']:.2f}x |"
        )
    return lines


def _per_system_table(
    title: str,
    seen: list[tuple[str, str, int]],
    by_key: dict[tuple[str, str, int, str], dict[str, Any]],
    cell: Callable[[dict[str, Any], int], str],
) -> list[str]:
    """One row per (task, source, workers) that shardloader ran, one ``cell`` per system."""
    names = " | ".join(STREAM_NAMES[p] for p in STREAM_SYSTEMS[1:])
    lines = [f"| task | source | workers | {title}: shardloader | {names} |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for task, source, workers in seen:
        row = [by_key.get((task, source, workers, p)) for p in STREAM_SYSTEMS]
        if row[0] is None:
            continue
        cells = [cell(s, workers) if s and s["num_ok"] else "-" for s in row]
        lines.append(f"| {task} | {source} | {workers} | {' | '.join(cells)} |")
    return lines


def _convert_markdown(convert: dict[str, Any]) -> str:
    lines = [
        "| system | task | MB/s | MB/s w/ startup | M tokens/s | output MB | output vs zstd peer "
        "| vs fastest peer | vs bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in convert["summaries"]:
        if not s["num_ok"]:
            continue
        tokens = _fmt_range(s["tokens_per_s"], 1e6) if s.get("tokens_per_s") else "-"
        peer = s.get("ratio_to_fastest_peer")
        bound = s.get("ratio_to_bound")
        output = f"{s['output_mb']:.1f}" if s.get("output_mb") else "-"
        size = s.get("output_vs_zstd_peer")
        lines.append(
            f"| {s['system']} | {s['task']} | {_fmt_range(s['mb_per_s'])} | "
            f"{s['process_mb_per_s']:.1f} | {tokens} | {output} | "
            f"{f'{size - 1:+.1%}' if size else '-'} | "
            f"{f'{peer:.2f}x' if peer else '-'} | {f'{bound:.0%}' if bound else '-'} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput per system and task (log scale), one panel per part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if results.get("convert"):
        series: dict[str, float] = {}
        for s in results["convert"]["summaries"]:
            if s["mb_per_s"]:
                series[f"{s['system']}\n{s['task']}"] = _median(s["mb_per_s"])
        panels.append(("convert (MB/s of input)", series))
    if results.get("stream"):
        for task, key, unit in (
            ("text", "samples_per_s", "samples/s"),
            ("tokens", "tokens_per_s", "tokens/s"),
            ("packed", "tokens_per_s", "tokens/s in [8 x 2048] rows"),
        ):
            series = {}
            for s in results["stream"]["summaries"]:
                if s["task"] == task and s["size"] == "main" and s[key]:
                    series[f"{s['system']}\n{s['source']} w{s['num_workers']}"] = _median(s[key])
            if series:
                panels.append((f"stream {task} ({unit})", series))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], panels, strict=True):
        names = list(series)
        colors = ["tab:blue" if n.startswith("shardloader") else "tab:gray" for n in names]
        ax.bar(range(len(names)), [series[n] for n in names], color=colors)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mb", type=float, default=300.0, help="convert corpus size in MB (300)")
    parser.add_argument(
        "--stream-mb",
        type=float,
        default=None,
        help="stream corpus size in MB (default: --mb, the same corpus as convert)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (3)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="smoke test of every part")
    parser.add_argument("--python", type=Path, default=VENV_PYTHON, help="benchmark interpreter")
    parser.add_argument("--skip-setup", action="store_true", help="do not run bench_setup.sh")
    parser.add_argument(
        "--report-only", action="store_true", help="gather existing results; run nothing"
    )
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    if not (args.skip_setup or args.report_only):
        subprocess.run(["bash", "tools/bench_setup.sh"], cwd=ROOT, check=True)
    if Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve() and VENV_PYTHON.exists():
        # Go on in the benchmark venv, which has matplotlib for the plot.
        argv = [str(VENV_PYTHON), str(LAUNCHER), *sys.argv[1:], "--skip-setup"]
        os.execv(argv[0], argv)
    BENCH_DIR.mkdir(exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    for part in parts:
        out = BENCH_DIR / f"results-{part}{_suffix(args)}.json"
        if not args.report_only:
            run_part(part, args)
        if out.exists():
            results[part] = json.loads(out.read_text())
    suffix = _suffix(args)
    (BENCH_DIR / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    print_summary(summary_rows(results))
    tables = BENCH_DIR / f"results{suffix}.md"
    tables.write_text(markdown(results))
    print(f"wrote {tables.relative_to(ROOT)} (the README's tables)")
    try:
        plot(results, ROOT / "docs" / f"bench{suffix}.png")
    except ImportError:
        print("matplotlib is missing: run tools/bench_setup.sh for the plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
