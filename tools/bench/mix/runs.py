"""The parent side: launch the ranks of a run at once, and every run of one config."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    BENCH_DIR,
    ROOT,
    cpu_marks,
    log_tail,
    other_cpu_share,
)
from tools.bench.mix import (
    GLOBAL_BATCH,
    MIX_DIR,
    MODULE,
    SEED,
    WORLD_SIZES,
    MixConfig,
)
from tools.bench.mix.metrics import (
    batch_deviation,
    compare_resumed,
    pass_accounting,
    prefix_deviation,
)
from tools.bench.splits import job_env


def run_dir_of(name: str) -> Path:
    """Where the run called ``name`` keeps its specs, results and saved states."""
    return MIX_DIR / "runs" / name


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for Mosaic's own torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    """What the ranks of one run served.

    Args:
        ranks: Each rank's batches of ids (empty when it failed).
        job_s: Each rank's time from building the dataset to its last batch.
        error: Why the run failed ("" when it did not).
        other_cpu_share: Share of the machine's CPU that other processes used meanwhile.
    """

    ranks: list[list[list[str]]]
    job_s: list[float]
    error: str = ""
    other_cpu_share: float = 0.0

    @property
    def batches(self) -> list[list[str]]:
        """The global batches: the ranks' batches ``s`` side by side, while every rank has one."""
        return [sum(step, []) for step in zip(*self.ranks, strict=False)]


def launch(
    base: dict[str, Any],
    *,
    name: str,
    world_size: int,
    python: str,
    timeout_s: float,
    states: Sequence[Path] = (),
) -> RunResult:
    """Run ``world_size`` rank processes of ``base`` at once; their batches and times.

    Each rank saves its state (if ``base["save_after"]``) to ``runs/NAME/state-r<rank>.json``
    and, with ``states``, first loads ``states[rank]``.
    """
    run_dir = run_dir_of(name)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log_dir = BENCH_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    marks, started = cpu_marks(), time.perf_counter()
    procs = []
    for rank in range(world_size):
        spec = {
            **base,
            "rank": rank,
            "world_size": world_size,
            "cache_dir": str(run_dir / "cache"),  # one node: the ranks share Mosaic's cache
            "result": str(run_dir / f"rank{rank}.json"),
        }
        spec["state_out"] = str(run_dir / f"state-r{rank}.json")
        if states:
            spec["state_in"] = str(states[rank])
        spec_path = run_dir / f"spec{rank}.json"
        spec_path.write_text(json.dumps(spec))
        env = job_env(base["system"])
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        log = (log_dir / f"mix-{name}-r{rank}.log").open("w")
        command = [python, "-m", MODULE, "rank", str(spec_path)]
        procs.append((subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=ROOT), log))
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
        log.close()
    other = other_cpu_share(marks, time.perf_counter() - started)
    results = [run_dir / f"rank{r}.json" for r in range(world_size)]
    if any(codes) or not all(p.exists() for p in results):
        failed = next((r for r, code in enumerate(codes) if code), 0)
        last_line = log_tail(log_dir / f"mix-{name}-r{failed}.log", lines=1)
        return RunResult(
            ranks=[], job_s=[], error=f"rank {failed} exit {codes[failed]}: {last_line}"
        )
    loaded = [json.loads(p.read_text()) for p in results]
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return RunResult(
        ranks=[r["batches"] for r in loaded],
        job_s=[r["job_s"] for r in loaded],
        other_cpu_share=other,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """What every run of this invocation shares."""

    sources: list[dict[str, Any]]
    union: Path | None  # one shardloader source of every document (None without shardloader)
    num_batches: int
    save_after: int
    repeats: int
    python: str
    timeout_s: float
    resume_from: tuple[int, ...]  # the world sizes whose saved state is resumed

    @property
    def total(self) -> int:
        """Samples in a run."""
        return sum(s["size"] for s in self.sources)


def save_point(plan: Plan, config: MixConfig) -> int:
    """After how many global batches a run saves its state: a third of the way.

    HF's ``first_exhausted`` ends when a source runs out: after about ``min(size_i / w_i)``
    samples, not after ``plan.num_batches``.
    """
    if config.variant == "first_exhausted":
        samples = min(s["size"] / s["weight"] for s in plan.sources)
        return int(samples // GLOBAL_BATCH) // 3
    return plan.save_after


def base_spec(plan: Plan, config: MixConfig, world_size: int) -> dict[str, Any]:
    """The spec of a rank of ``config`` at ``world_size``, save for rank and folders."""
    return {
        "system": config.system,
        "variant": config.variant,
        "sources": plan.sources,
        "batch_size": GLOBAL_BATCH // world_size,
        "num_batches": plan.num_batches,
        "save_after": save_point(plan, config),
        "seed": SEED,
        "total": plan.total,  # shardloader: as long as the others' runs; small sources repeat
    }


def rate(result: RunResult) -> float:
    """Global samples per second of a run: its samples over the slower rank's time."""
    served = sum(len(b) for b in result.batches)
    return served / max(result.job_s) if result.job_s else 0.0


def spread(rates: Sequence[float]) -> list[float]:
    """(median, min, max) of rates."""
    ordered = sorted(rates)
    return [ordered[len(ordered) // 2], ordered[0], ordered[-1]] if ordered else [0.0] * 3


def resume_checks(plan: Plan, config: MixConfig, runs: dict[int, RunResult]) -> dict[str, str]:
    """Resume each world size's saved state on every world size: ``"1->2"``: verdict."""
    out: dict[str, str] = {}
    k = save_point(plan, config)
    for saved in WORLD_SIZES:
        for world_size in WORLD_SIZES:
            key = f"{saved}->{world_size}"
            same = world_size == saved
            if saved not in plan.resume_from:
                out[key] = "not run (--quick)"
                continue
            if runs[saved].error:
                out[key] = "-"
                continue
            if not same and config.state == "rank" and world_size < saved:
                out[key] = "not supported: one state per rank, no way to merge them"
                continue
            # the same topology: each rank its own state; else rank 0's for every rank (a
            # global state; for HF's per-rank state this is an attempt, not a documented way)
            saved_dir = run_dir_of(f"{config.name}-w{saved}")
            states = [saved_dir / f"state-r{r if same else 0}.json" for r in range(world_size)]
            if not all(p.exists() for p in states):
                out[key] = "no state was saved"
                continue
            base = base_spec(plan, config, world_size)
            base.update(num_batches=plan.num_batches - k, save_after=None)
            result = launch(
                base,
                name=f"{config.name}-resume{saved}to{world_size}",
                world_size=world_size,
                python=plan.python,
                timeout_s=plan.timeout_s,
                states=states,
            )
            reference = runs[saved].batches
            if result.error:
                out[key] = f"failed: {result.error[-300:]}"
            else:
                sizes = {s["name"]: s["size"] for s in plan.sources}
                out[key] = compare_resumed(reference, result.batches, k, sizes)
    return out


def describe_run(plan: Plan, result: RunResult) -> dict[str, Any]:
    """The measurements of one uninterrupted run."""
    if result.error:
        return {"error": result.error}
    weights = {s["name"]: s["weight"] for s in plan.sources}
    sizes = {s["name"]: s["size"] for s in plan.sources}
    batches = result.batches
    return {
        "num_batches": len(batches),
        "rank_batches": [len(r) for r in result.ranks],
        "num_samples": sum(len(b) for b in batches),
        "batch_dev": batch_deviation(batches, weights),
        "rank_batch_dev": max(batch_deviation(r, weights) for r in result.ranks),
        "prefix_dev": prefix_deviation(batches, weights),
        "passes": pass_accounting(batches, sizes),
        "job_s": result.job_s,
    }


def measure_config(plan: Plan, config: MixConfig) -> dict[str, Any]:
    """Every run of one config: world sizes 1 and 2, timing repeats, resumes."""
    runs: dict[int, RunResult] = {}
    out: dict[str, Any] = {"config": dataclasses.asdict(config), "worlds": {}}
    for world_size in WORLD_SIZES:
        started = time.perf_counter()
        runs[world_size] = launch(
            base_spec(plan, config, world_size),
            name=f"{config.name}-w{world_size}",
            world_size=world_size,
            python=plan.python,
            timeout_s=plan.timeout_s,
        )
        out["worlds"][str(world_size)] = describe_run(plan, runs[world_size])
        print(
            f"  {config.name} world {world_size}: {time.perf_counter() - started:.1f} s"
            + (f" FAILED {runs[world_size].error[-300:]}" if runs[world_size].error else ""),
            flush=True,
        )
    base = base_spec(plan, config, 1) | {"save_after": None}
    first = [] if runs[1].error else [runs[1]]
    out["worlds"]["1"].update(timed_passes(plan, base, config.name, first))
    out["worlds"]["2"]["samples_per_s"] = spread([rate(runs[2])] if not runs[2].error else [])
    started = time.perf_counter()
    out["resume"] = resume_checks(plan, config, runs)
    print(f"  {config.name} resumes: {time.perf_counter() - started:.1f} s", flush=True)
    return out


def timed_passes(
    plan: Plan, base: dict[str, Any], name: str, first: list[RunResult]
) -> dict[str, list[float]]:
    """samples/s (median, min, max) of ``first`` and more passes of ``base`` at world size 1, up
    to ``plan.repeats``, and the share of CPU other processes took during each."""
    timed = list(first)
    for repeat in range(len(first), plan.repeats):
        result = launch(
            base,
            name=f"{name}-w1-r{repeat}",
            world_size=1,
            python=plan.python,
            timeout_s=plan.timeout_s,
        )
        if result.error:
            print(f"  {name} timed pass {repeat}: FAILED {result.error[-300:]}", flush=True)
        else:
            timed.append(result)
    return {
        "samples_per_s": spread([rate(t) for t in timed]),
        "other_cpu_shares": [t.other_cpu_share for t in timed],
    }


def measure_union(plan: Plan) -> dict[str, list[float]]:
    """shardloader over one source of every document: samples/s of ``repeats`` passes."""
    base = {
        "system": "shardloader",
        "union": str(plan.union),
        "batch_size": GLOBAL_BATCH,
        "num_batches": plan.num_batches,
        "seed": SEED,
    }
    return timed_passes(plan, base, "shardloader-union", [])
