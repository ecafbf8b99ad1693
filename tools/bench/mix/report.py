"""The results table and notes."""

from __future__ import annotations

from typing import Any

from tools.bench.harness import (
    busy_note,
    fmt_rate,
    markdown_table,
)
from tools.bench.mix import (
    WORLD_SIZES,
)

BATCHING = {
    "random": "random",
    "stratified": "stratified",
    "all_exhausted": "interleave, all_exhausted",
    "first_exhausted": "interleave, first_exhausted",
    "fixed": "Mixture, total=N",
}


def _lost_repeated(passes: dict[str, Any]) -> str:
    """``a 0/0, b 0/12, ...``: lost / repeated servings per source."""
    return ", ".join(f"{name} {p['lost']}/{p['repeated']}" for name, p in passes.items())


def table_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per config and world size."""
    rows = []
    for result in results:
        config = result["config"]
        for world_size in WORLD_SIZES:
            run = result["worlds"][str(world_size)]
            other = next(w for w in WORLD_SIZES if w != world_size)
            label = [config["system"], BATCHING[config["variant"]], str(world_size)]
            if "error" in run:
                rows.append([*label, "FAILED", "", "", "", "", "", "", run["error"][-80:]])
                continue
            rows.append(
                [
                    *label,
                    str(run["num_batches"]),
                    f"{run['batch_dev']:g}",
                    f"{run['rank_batch_dev']:g}",
                    f"{run['prefix_dev']:g}",
                    _lost_repeated(run["passes"]),
                    result["resume"][f"{world_size}->{world_size}"],
                    f"{world_size}->{other}: " + result["resume"][f"{world_size}->{other}"],
                    fmt_rate(run["samples_per_s"], digits=0) if world_size == 1 else "-",
                ]
            )
    return rows


HEADER = (
    "system",
    "batching",
    "world",
    "global batches",
    "worst batch dev",
    "worst rank-batch dev",
    "worst prefix dev",
    "lost/repeated per source",
    "resume, same topology",
    "resume, other world size",
    "samples/s",
)


def print_report(report: dict[str, Any]) -> None:
    """The table, the served counts, and shardloader's mix overhead."""
    print(f"\n{report['description']}\n")
    print(markdown_table(HEADER, table_rows(report["results"])))
    print(
        "\ndev: |count - weight x size| of a source in a global batch, in its rank's share of one"
        " (rank-batch) or in a prefix of the run, in samples; lost/repeated: servings missing"
        " from passes the source should have completed / servings repeated before its pass was"
        " complete; resume: the state saved after "
        f"{report['save_after']} batches, continued in fresh processes"
    )
    for result in report["results"]:
        run = result["worlds"]["1"]
        if result["config"]["variant"] == "first_exhausted" and "num_batches" in run:
            print(
                f"{result['config']['name']}: first_exhausted ends the run when the smallest"
                f" source runs out, after {run['num_batches']} of the others'"
                f" {report['total'] // report['global_batch']} batches"
            )
    print("\nservings per source (world 1): served (passes)")
    for result in report["results"]:
        run = result["worlds"]["1"]
        if "passes" in run:
            served = ", ".join(
                f"{n} {p['served']} ({p['passes']:.2f})" for n, p in run["passes"].items()
            )
            print(f"  {result['config']['name']}: {served}")
    overhead = report.get("mix_overhead")
    if overhead:
        print(
            f"\nshardloader mix overhead: mix {fmt_rate(overhead['mix'], digits=0)} samples/s, "
            f"one source of the same {report['total']} documents "
            f"{fmt_rate(overhead['one_source'], digits=0)} samples/s: {overhead['ratio']:.2f}x "
            f"(best-of-N: {overhead['best_ratio']:.2f}x)"
        )
    shares = [s for r in report["results"] for s in r["worlds"]["1"].get("other_cpu_shares", [])]
    shares += overhead.get("one_source_other_cpu_shares", []) if overhead else []
    note = busy_note(shares, "timed passes", "compare the best-of-N rates (the max in [])")
    if note:
        print(note)
