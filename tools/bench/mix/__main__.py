"""``python -m tools.bench.mix``: prepare the sources, run every config, report."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    BENCH_DIR,
    default_python,
    versions,
    write_results,
)
from tools.bench.mix import (
    CONFIGS,
    GLOBAL_BATCH,
    NAMES,
    QUICK_DIVISOR,
    QUICK_SKIPS,
    SIZES,
    TIMEOUT_S,
    VERSIONS,
    WEIGHTS,
    WORLD_SIZES,
)
from tools.bench.mix.data import prepare_sources
from tools.bench.mix.ranks import run_rank
from tools.bench.mix.report import print_report
from tools.bench.mix.runs import Plan, measure_config, measure_union


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sources a fifth the size, 1 repeat, resume only world 1's state",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed passes at world 1 (5)")
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of {','.join(c.name for c in CONFIGS)} (all; --quick: "
        f"all but {QUICK_SKIPS})",
    )
    parser.add_argument("--python", default=default_python(), help="interpreter of the ranks")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--from-json", type=Path, help="re-print an earlier results file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (and ``rank SPEC``, the subprocess side)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rank"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(spec["result"]).write_text(json.dumps(run_rank(spec)))
        return 0
    args = parse_args(argv)
    if args.from_json:
        print_report(json.loads(args.from_json.read_text()))
        return 0
    names = args.configs.split(",") if args.configs else [c.name for c in CONFIGS]
    if args.quick and not args.configs:
        names = [n for n in names if n not in QUICK_SKIPS]
    chosen = [c for c in CONFIGS if c.name in names]
    if not chosen:
        raise SystemExit(f"no config in {args.configs!r}; choose from {[c.name for c in CONFIGS]}")
    started = time.perf_counter()
    sizes = [s // QUICK_DIVISOR for s in SIZES] if args.quick else list(SIZES)
    systems = sorted({c.system for c in chosen})
    sources, union = prepare_sources(sizes, systems, args.python)
    num_batches = sum(sizes) // GLOBAL_BATCH
    plan = Plan(
        sources=sources,
        union=union,
        num_batches=num_batches,
        save_after=num_batches // 3,
        repeats=args.repeats or (1 if args.quick else 5),
        python=args.python,
        timeout_s=args.timeout,
        resume_from=(1,) if args.quick else WORLD_SIZES,
    )
    found = versions(args.python, VERSIONS)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    results = [measure_config(plan, config) for config in chosen]
    report: dict[str, Any] = {
        "description": (
            f"sources {dict(zip(NAMES, sizes, strict=True))} docs, weights "
            f"{dict(zip(NAMES, WEIGHTS, strict=True))}; {num_batches} global batches of "
            f"{GLOBAL_BATCH} (world 2: 2 x {GLOBAL_BATCH // 2}); resume after "
            f"{plan.save_after}; num_workers 0; {plan.repeats} timed pass(es) at world 1; "
            f"{os.cpu_count()} CPUs"
        ),
        "total": plan.total,
        "sizes": dict(zip(NAMES, sizes, strict=True)),
        "weights": dict(zip(NAMES, WEIGHTS, strict=True)),
        "global_batch": GLOBAL_BATCH,
        "save_after": plan.save_after,
        "versions": found,
        "results": results,
    }
    mix = next((r for r in results if r["config"]["system"] == "shardloader"), None)
    if mix is not None and "error" not in mix["worlds"]["1"]:
        single = measure_union(plan)
        mix_rate, one_source = mix["worlds"]["1"]["samples_per_s"], single["samples_per_s"]
        report["mix_overhead"] = {
            "mix": mix_rate,
            "one_source": one_source,
            "one_source_other_cpu_shares": single["other_cpu_shares"],
            "ratio": mix_rate[0] / one_source[0] if one_source[0] else 0.0,
            "best_ratio": mix_rate[2] / one_source[2] if one_source[2] else 0.0,
        }
    report["total_s"] = time.perf_counter() - started
    print_report(report)
    out = args.out or BENCH_DIR / ("results-mix-quick.json" if args.quick else "results-mix.json")
    write_results(out, report)
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
