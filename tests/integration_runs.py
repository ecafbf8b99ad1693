"""The harness of the framework integration tests: a small packed dataset, torchrun launches of
the per-framework rank scripts, and the checks of their per-rank logs of trained sample ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardloader import ConvertConfig, convert
from tests.conftest import ROOT, make_docs, run_torchrun, write_jsonl

NUM_DOCS = 90
SHARDS = (40, 7, 43)
MAX_STEPS = 45  # about 2.5 epochs of packed rows (2 x 64 tokens per batch and rank)
SAVE_STEPS = 6


def make_small_tokens(root: Path, tokenizer: Path) -> Path:
    """90 tokenized documents in 3 uneven shards (about 4,400 tokens)."""
    docs = make_docs(NUM_DOCS, seed=5)
    start = 0
    for index, size in enumerate(SHARDS):
        write_jsonl(root / "corpus" / f"part-{index}.jsonl", docs[start : start + size])
        start += size
    out = root / "data"
    config = ConvertConfig(output=str(out), task_bytes=1, num_proc=1, tokenizer=str(tokenizer))
    convert([str(root / "corpus")], config)
    return out


def run_ranks(script: str, *args: str) -> None:
    """``torchrun --nproc_per_node=2 tests/SCRIPT ARGS``; fails on a non-zero exit."""
    run_torchrun(ROOT / "tests" / script, 2, *args)


def read_log(out: Path, tag: str, rank: int) -> list[dict[str, Any]]:
    lines = (out / f"{tag}-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def epoch_ids(log: list[dict[str, Any]], epoch: int) -> list[int]:
    """The documents of one epoch in the order they were first trained."""
    seen: dict[int, None] = {}
    for record in log:
        if record["epoch"] == epoch:
            seen.update(dict.fromkeys(record["ids"]))
    return list(seen)


def check_full_run(full: list[list[dict[str, Any]]]) -> list[int]:
    """(a) exact shares per epoch, (c) a new order each epoch; returns the steps to resume at.

    Those are a mid-epoch checkpoint and the first one taken while a rank that ran out of packed
    rows was training empty batches.
    """
    assert [[r["step"] for r in log] for log in full] == [list(range(1, MAX_STEPS + 1))] * 2
    assert {r["epoch"] for log in full for r in log} == {0, 1, 2}, "two whole epochs, then more"
    for epoch in (0, 1):
        shares = [epoch_ids(log, epoch) for log in full]
        assert len(shares[0]) == len(shares[1]) == NUM_DOCS // 2
        assert set(shares[0]).isdisjoint(shares[1])
        assert set(shares[0]) | set(shares[1]) == set(range(NUM_DOCS))
    for log in full:
        assert epoch_ids(log, 0) != epoch_ids(log, 1)
        assert epoch_ids(log, 1)[:10] != epoch_ids(log, 2)[:10]
    saves = range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)
    idle = [s for s in saves if any(not log[s - 1]["ids"] for log in full)]
    assert idle, "no checkpoint was taken while a rank was idle"
    return sorted({2 * SAVE_STEPS, idle[0]})


def check_resumed(full: list[dict[str, Any]], resumed: list[dict[str, Any]], step: int) -> None:
    """(b) the resumed run trains exactly what the uninterrupted one did after ``step``."""
    assert resumed[0]["step"] == step + 1  # nothing skipped by the framework, nothing re-read
    assert resumed == [r for r in full if r["step"] > step]


def run_full_then_resume(
    script: str, data: str, out: Path, checkpoint: Callable[[int], Path]
) -> list[Path]:
    """Train, checked by `check_full_run`; resume from the checkpoints it picks, checked too.

    The full run trains ``MAX_STEPS`` with a checkpoint every ``SAVE_STEPS``; each resumed run
    (``checkpoint(step)``, logged as ``resumed-<its stem>``, with a DataLoader worker) is checked
    against it by `check_resumed`. Returns the checkpoints resumed from.
    """
    flags = ("--max-steps", str(MAX_STEPS))
    run_ranks(script, data, str(out), "full", *flags, "--save-steps", str(SAVE_STEPS))
    full = [read_log(out, "full", rank) for rank in (0, 1)]
    steps = check_full_run(full)
    checkpoints = [checkpoint(step) for step in steps]
    resumes = [arg for c in checkpoints for arg in ("--resume", str(c))]
    run_ranks(script, data, str(out), "resumed", *flags, "--workers", "1", *resumes)
    for step, path in zip(steps, checkpoints, strict=True):
        for rank in (0, 1):
            check_resumed(full[rank], read_log(out, f"resumed-{path.stem}", rank), step)
    return checkpoints
