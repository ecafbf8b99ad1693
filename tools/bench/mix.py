"""Mixing benchmark: weighted mixes of three sources in shardloader, Mosaic Streaming and HF.

Three sources of uneven sizes (``SIZES``: 6,000 / 2,000 / 500 short JSONL documents; ids
``a-00042`` are unique per source and name their source) are mixed with weights 0.5 / 0.3 / 0.2.
Each system reads its own copy, written by its own writer (``tools.bench.peers_stream``: shardloader
``convert`` to Arrow, Mosaic ``MDSWriter``, Parquet for HF; cached under ``.bench/stream/mix-*``):

- **mosaic**: ``StreamingDataset(streams=[Stream(remote, local, proportion=w), ...],
  batching_method="random" | "stratified", batch_size=b, shuffle=True)`` with its
  ``StreamingDataLoader``; its epoch is the sum of the source sizes (the default ``epoch_size``).
- **hf**: each source ``load_dataset("parquet", streaming=True).shuffle(seed, buffer_size=1000)``,
  then ``interleave_datasets(probabilities=w, seed, stopping_strategy=...)`` (``all_exhausted``,
  and ``first_exhausted``, which ends when the smallest source runs out) and
  ``split_dataset_by_node`` on 2 ranks, through a torch ``DataLoader``; state is the dataset's
  ``state_dict`` (per rank).
- **shardloader**: ``ShardDataset(Mixture([Source(path, weight, name), ...], total=...))`` with
  ``ShardLoader``.

A run serves ``N = sum(SIZES) / B`` global batches of ``B = GLOBAL_BATCH`` (50) samples, so
``w_i * B`` is whole for every source: at world size 1 one process with ``batch_size`` 50, at
world size 2 two rank processes at once with ``batch_size`` 25 (``RANK`` / ``WORLD_SIZE`` in the
environment, or the rank passed explicitly; Mosaic starts ``torch.distributed`` (gloo) itself
when ``WORLD_SIZE`` > 1, so it gets ``MASTER_ADDR`` / ``MASTER_PORT`` too). Global batch ``s`` is
the ranks' batches ``s`` side by side. ``num_workers`` is 0 everywhere: HF's dataset
``state_dict`` does not see DataLoader workers. Every process is fresh, in ``.venv-bench``, and
records the ids of every batch. Measured per system and world size:

- **batch dev**: ``max |count_i - w_i * len(batch)|`` over global batches and sources, in samples.
- **prefix dev**: the same over every prefix of whole global batches (cumulative counts).
- **rank-batch dev**: the same over each rank's own batches (against ``w_i * b``).
- **lost / repeated** per source: a serving that brings a sample to ``n`` servings is *repeated*
  when, after its global batch, another sample of the source has been served fewer than
  ``n - 1`` times (a repeat before the pass was complete); *lost* counts, at the end of the run,
  the missing servings of samples served fewer than ``floor(served_i / size_i)`` times (passes
  the source should have completed).
- **resume**: each run saves its state after ``k = N // 3`` global batches (HF
  ``first_exhausted``: a third of its shorter run) and goes on; a fresh process (or two) loads
  it and serves the rest, which is compared with the uninterrupted run's batches from ``k`` on:
  ``yes`` (batch for batch, in order, on every rank), ``yes (same batches)`` (each global batch
  holds the same samples), ``yes (same samples)`` (the rest as a whole does), or ``no`` with the
  first differing batch and how many servings differ. Same topology: each rank loads its own
  state. Other world size (1 -> 2 and 2 -> 1): every rank loads rank 0's state, the way to do it
  when a system's state is global (Mosaic, shardloader); HF's is per rank, so 1 -> 2 is an
  attempt and 2 -> 1 ``not supported``.
- **samples/s**: the whole run (world size 1) in a fresh process, timed from building the dataset
  to the last batch (imports before the clock): median of ``--repeats`` processes [min-max].
  World size 2's rate (global samples over the slower rank's time) is only in the JSON: on 2
  cores its ranks share the CPU, and Mosaic's includes its gloo rendezvous. For shardloader also
  a pass over one source holding all ``sum(SIZES)`` documents, and the mix's rate over it
  (**mix overhead**).

Run it (on 2 cores: about 6 minutes, ``--quick`` (sizes / 5, one repeat) about 1.5)::

    .venv-bench/bin/python -m tools.bench.mix [--quick] [--configs mosaic-random,hf-all]

Results go to ``.bench/results-mix.json`` (``--quick``: ``results-mix-quick.json``), the rank
processes' logs to ``.bench/logs/mix-*.log``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.bench.harness import (
    BENCH_DIR,
    ROOT,
    Corpus,
    default_python,
    fmt_rate,
    log_tail,
    markdown_table,
    versions,
    write_results,
)
from tools.bench.splits import job_env

MODULE = "tools.bench.mix"
MIX_DIR = BENCH_DIR / "mix"
NAMES = ("a", "b", "c")
WEIGHTS = (0.5, 0.3, 0.2)
SIZES = (6000, 2000, 500)
QUICK_DIVISOR = 5  # --quick: every source a fifth of its size
GLOBAL_BATCH = 50  # w_i * 50 is whole for every weight
WORLD_SIZES = (1, 2)
SEED = 0
SHUFFLE_BUFFER = 1000  # HF's per-source shuffle buffer (its default)
MOSAIC_PREDOWNLOAD = 2048
TIMEOUT_S = 300
VERSIONS = ("shardloader", "mosaicml-streaming", "datasets", "torch", "pyarrow")


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """One way of mixing: a system and its variant.

    Args:
        name: Short name for ``--configs``.
        system: ``mosaic``, ``hf`` or ``shardloader``.
        variant: Mosaic's ``batching_method``, HF's ``stopping_strategy``, or shardloader's
            ``total`` (``fixed``: the run's length in samples).
        state: ``global`` (one state resumes any world size) or ``rank`` (one state per rank).
    """

    name: str
    system: str
    variant: str
    state: str


CONFIGS = (
    MixConfig("mosaic-random", "mosaic", "random", "global"),
    MixConfig("mosaic-stratified", "mosaic", "stratified", "global"),
    MixConfig("hf-all", "hf", "all_exhausted", "rank"),
    MixConfig("hf-first", "hf", "first_exhausted", "rank"),
    MixConfig("shardloader", "shardloader", "fixed", "global"),
)


# --------------------------------------------------------------------------------------------
# The data: one JSONL corpus per source, each system's copy written by peers_stream's writers


def write_source(name: str, size: int) -> Corpus:
    """``size`` short documents with ids ``<name>-00000``..., once (reused by later runs)."""
    path = MIX_DIR / f"mix-{name}-{size}"
    part = path / "part-00000.jsonl"
    if not part.exists():
        path.mkdir(parents=True, exist_ok=True)
        staging = part.with_suffix(".tmp")
        with staging.open("w") as out:
            for index in range(size):
                words = " ".join(
                    f"w{(index * 7919 + k * 104729) % 5000}" for k in range(5 + index % 60)
                )
                out.write(json.dumps({"id": f"{name}-{index:05d}", "text": words}) + "\n")
        staging.rename(part)
    return Corpus(path=path, files=(part,), num_docs=size, input_bytes=part.stat().st_size)


def write_union(sources: Sequence[Corpus]) -> Corpus:
    """One source holding every document of ``sources``: what the mix overhead compares with."""
    total = sum(s.num_docs for s in sources)
    path = MIX_DIR / f"mix-all-{total}"
    part = path / "part-00000.jsonl"
    if not part.exists():
        path.mkdir(parents=True, exist_ok=True)
        staging = part.with_suffix(".tmp")
        with staging.open("wb") as out:
            for source in sources:
                out.write(source.files[0].read_bytes())
        staging.rename(part)
    return Corpus(path=path, files=(part,), num_docs=total, input_bytes=part.stat().st_size)


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


# --------------------------------------------------------------------------------------------
# One rank (subprocess: `python -m tools.bench.mix rank SPEC.json`)


def collate_ids(samples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """A batch as ``{"id": [ids]}`` (a dict, so that Mosaic's loader counts its samples)."""
    return {"id": [sample["id"] for sample in samples]}


class RankRun:
    """One system's loader on one rank, with the system's own way to save and load its state."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.system = spec["system"]
        self.dataset: Any = None
        self.loader: Any = None
        getattr(self, f"_build_{self.system}")()

    def _build_mosaic(self) -> None:
        from streaming import Stream, StreamingDataLoader, StreamingDataset

        spec = self.spec
        streams = [
            Stream(
                remote=s["paths"]["mosaic"],
                local=os.path.join(spec["cache_dir"], s["name"]),
                proportion=s["weight"],
            )
            for s in spec["sources"]
        ]
        self.dataset = StreamingDataset(
            streams=streams,
            shuffle=True,
            shuffle_seed=spec["seed"],
            batch_size=spec["batch_size"],
            batching_method=spec["variant"],
            predownload=MOSAIC_PREDOWNLOAD,
        )
        self.loader = StreamingDataLoader(
            self.dataset, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def _build_hf(self) -> None:
        import datasets
        from datasets import interleave_datasets
        from datasets.distributed import split_dataset_by_node
        from torch.utils.data import DataLoader

        from tools.bench.peers_stream import make_dataset

        spec = self.spec
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see peers_stream.readers
        parts = [
            make_dataset(
                {
                    "system": "hf",
                    "url": s["paths"]["hf"],
                    "files": s["files"]["hf"],
                    "source": "local",
                    "seed": spec["seed"],
                    "shuffle_buffer": SHUFFLE_BUFFER,
                }
            )
            for s in spec["sources"]
        ]
        mixed = interleave_datasets(
            parts,
            probabilities=[s["weight"] for s in spec["sources"]],
            seed=spec["seed"],
            stopping_strategy=spec["variant"],
        )
        if spec["world_size"] > 1:
            mixed = split_dataset_by_node(mixed, rank=spec["rank"], world_size=spec["world_size"])
        self.dataset = mixed
        self.loader = DataLoader(
            mixed, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def _build_shardloader(self) -> None:
        from shardloader import Mixture, ShardDataset, ShardLoader, Source, StreamConfig

        spec = self.spec
        if spec.get("union"):  # one source of every document: what mixing costs on top
            self.dataset = ShardDataset(spec["union"], config=StreamConfig(seed=spec["seed"]))
        else:
            mixture = Mixture(
                [
                    # max_repetitions None: with a total, a source repeats as often as needed
                    Source(s["paths"]["shardloader"], weight=s["weight"], name=s["name"])
                    for s in spec["sources"]
                ],
                unit="samples",
                total=spec["total"],
            )
            self.dataset = ShardDataset(
                mixture,
                config=StreamConfig(seed=spec["seed"]),
                rank=spec["rank"],
                world_size=spec["world_size"],
            )
        self.loader = ShardLoader(
            self.dataset, batch_size=spec["batch_size"], num_workers=0, collate_fn=collate_ids
        )

    def state_dict(self) -> Any:
        """The system's state after the batches served so far."""
        return self.dataset.state_dict() if self.system == "hf" else self.loader.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Continue from ``state``."""
        if self.system == "hf":
            self.dataset.load_state_dict(state)
        else:
            self.loader.load_state_dict(state)


def _import_system(system: str) -> None:
    """Import the system before the clock starts."""
    if system == "mosaic":
        import streaming  # noqa: F401
    elif system == "hf":
        import datasets  # noqa: F401
    else:
        import shardloader.loader  # noqa: F401


def run_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve up to ``num_batches`` batches on this rank; save the state after ``save_after``."""
    import torch

    torch.set_num_threads(1)
    _import_system(spec["system"])
    started = time.perf_counter()
    run = RankRun(spec)
    if spec.get("state_in"):
        run.load_state_dict(json.loads(Path(spec["state_in"]).read_text()))
    batches: list[list[str]] = []
    state = None
    for batch in run.loader:
        batches.append(batch["id"])
        if len(batches) == spec.get("save_after"):
            state = run.state_dict()
        if len(batches) == spec["num_batches"]:
            break
    job_s = time.perf_counter() - started
    if state is not None:
        Path(spec["state_out"]).write_text(json.dumps(state))
    return {"batches": batches, "job_s": job_s}


# --------------------------------------------------------------------------------------------
# The parent: launch the ranks of one run at once


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
    """

    ranks: list[list[list[str]]]
    job_s: list[float]
    error: str = ""

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
    results = [run_dir / f"rank{r}.json" for r in range(world_size)]
    if any(codes) or not all(p.exists() for p in results):
        failed = next((r for r, code in enumerate(codes) if code), 0)
        last_line = log_tail(log_dir / f"mix-{name}-r{failed}.log", lines=1)
        return RunResult(
            ranks=[], job_s=[], error=f"rank {failed} exit {codes[failed]}: {last_line}"
        )
    loaded = [json.loads(p.read_text()) for p in results]
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return RunResult(ranks=[r["batches"] for r in loaded], job_s=[r["job_s"] for r in loaded])


# --------------------------------------------------------------------------------------------
# Metrics of the served ids (pure)


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


def compare_resumed(reference: list[list[str]], resumed: list[list[str]], k: int) -> str:
    """How the resumed batches match the uninterrupted run's from batch ``k`` on.

    ``yes``: batch for batch, in order (on every rank); ``yes (same batches)``: each global
    batch holds the same samples; ``yes (same samples)``: the rest as a whole does; else ``no``
    with the first differing batch and how many of the rest's servings the resumed run misses.
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
    return f"no: from batch {first}, {differing} of {served} servings differ" + (
        f"; {len(resumed)} batches, not {len(rest)}" if len(resumed) != len(rest) else ""
    )


# --------------------------------------------------------------------------------------------
# One config: its runs and measurements


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
                out[key] = compare_resumed(reference, result.batches, k)
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
        out["worlds"][world_size] = describe_run(plan, runs[world_size])
        print(
            f"  {config.name} world {world_size}: {time.perf_counter() - started:.1f} s"
            + (f" FAILED {runs[world_size].error[-300:]}" if runs[world_size].error else ""),
            flush=True,
        )
    rates = [rate(runs[1])] if not runs[1].error else []
    for repeat in range(1, plan.repeats):
        base = base_spec(plan, config, 1) | {"save_after": None}
        timed = launch(
            base,
            name=f"{config.name}-w1-r{repeat}",
            world_size=1,
            python=plan.python,
            timeout_s=plan.timeout_s,
        )
        if not timed.error:
            rates.append(rate(timed))
    out["worlds"][1]["samples_per_s"] = spread(rates)
    out["worlds"][2]["samples_per_s"] = spread([rate(runs[2])] if not runs[2].error else [])
    started = time.perf_counter()
    out["resume"] = resume_checks(plan, config, runs)
    print(f"  {config.name} resumes: {time.perf_counter() - started:.1f} s", flush=True)
    return out


def measure_union(plan: Plan) -> list[float]:
    """shardloader over one source of every document: samples/s of ``repeats`` passes."""
    rates = []
    for repeat in range(plan.repeats):
        base = {
            "system": "shardloader",
            "union": str(plan.union),
            "batch_size": GLOBAL_BATCH,
            "num_batches": plan.num_batches,
            "seed": SEED,
        }
        result = launch(
            base,
            name=f"shardloader-union-r{repeat}",
            world_size=1,
            python=plan.python,
            timeout_s=plan.timeout_s,
        )
        if result.error:
            print(f"  shardloader one source: FAILED {result.error[-300:]}", flush=True)
        else:
            rates.append(rate(result))
    return spread(rates)


# --------------------------------------------------------------------------------------------
# The report


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
            run = result["worlds"][world_size]
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
    print("\nservings per source (world 1): served (passes)")
    for result in report["results"]:
        run = result["worlds"][1]
        if "passes" in run:
            served = ", ".join(
                f"{n} {p['served']} ({p['passes']:.2f})" for n, p in run["passes"].items()
            )
            print(f"  {result['config']['name']}: {served}")
    overhead = report.get("mix_overhead")
    if overhead:
        print(
            f"\nshardloader mix overhead: mix {overhead['mix'][0]:.0f} samples/s, one source of "
            f"the same {report['total']} documents {overhead['one_source'][0]:.0f} samples/s: "
            f"{overhead['ratio']:.2f}x"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sources a fifth the size, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes at world 1 (3)")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS))
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
    chosen = [c for c in CONFIGS if c.name in args.configs.split(",")]
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
        repeats=args.repeats or (1 if args.quick else 3),
        python=args.python,
        timeout_s=args.timeout,
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
    if mix is not None and "error" not in mix["worlds"][1]:
        one_source = measure_union(plan)
        mix_rate = mix["worlds"][1]["samples_per_s"]
        report["mix_overhead"] = {
            "mix": mix_rate,
            "one_source": one_source,
            "ratio": mix_rate[0] / one_source[0] if one_source[0] else 0.0,
        }
    report["total_s"] = time.perf_counter() - started
    print_report(report)
    out = args.out or BENCH_DIR / ("results-mix-quick.json" if args.quick else "results-mix.json")
    write_results(out, report)
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
