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

Run it (on 2 cores: about 5 minutes; ``--quick``: sizes / 5, one repeat, only world size 1's
state resumed, no ``hf-first``: about 1.5 minutes)::

    .venv-bench/bin/python -m tools.bench.mix [--quick] [--configs mosaic-random,hf-all]

Results go to ``.bench/results-mix.json`` (``--quick``: ``results-mix-quick.json``), the rank
processes' logs to ``.bench/logs/mix-*.log``.

The package: ``data`` (the sources and each system's copy), ``ranks`` (one rank process: each
system's loader, its state), ``runs`` (launching the ranks of a run; every run of a config),
``metrics`` (deviation, pass accounting, resume comparison: pure), ``report`` (the table),
``__main__`` (the command line).
"""

from __future__ import annotations

import dataclasses

from tools.bench.harness import BENCH_DIR

MODULE = "tools.bench.mix"
MIX_DIR = BENCH_DIR / "mix"
NAMES = ("a", "b", "c")
WEIGHTS = (0.5, 0.3, 0.2)
SIZES = (6000, 2000, 500)
QUICK_DIVISOR = 5  # --quick: every source a fifth of its size
QUICK_SKIPS = ("hf-first",)  # --quick: the same code as hf-all
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
