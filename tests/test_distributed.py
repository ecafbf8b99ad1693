"""Real ranks (gloo) and real DataLoader workers: exact sets of sample ids per rank.

Ranks are started by ``torch.multiprocessing.spawn`` (workers forked, and spawned) and by
``torchrun``; every rank writes the ids it read, and the tests check: equal counts per rank, no id
twice, and the union is the epoch less at most ``world_size - 1`` ids (the ``drop`` policy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing

from tests import dist_stream
from tests.conftest import ROOT, run_torchrun
from tests.streaming import NUM_SAMPLES

SCRIPT = ROOT / "tests" / "dist_stream.py"


def load_ranks(out: Path, tag: str, world_size: int) -> list[list[list[int]]]:
    return [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(world_size)]


def check_exact(per_rank: list[list[int]], world_size: int) -> None:
    counts = [len(ids) for ids in per_rank]
    assert counts == [NUM_SAMPLES // world_size] * world_size
    union = [i for ids in per_rank for i in ids]
    assert len(union) == len(set(union)), "a sample was read twice"
    assert set(union) <= set(range(NUM_SAMPLES))
    assert NUM_SAMPLES - len(union) == NUM_SAMPLES % world_size


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_spawned_ranks_split_exactly_for_every_worker_count(
    dataset_dir: Path, tmp_path: Path, world_size: int
) -> None:
    runs: list[Any] = [(f"w{k}", k, None) for k in range(4)]
    if world_size == 2:
        runs.append(("spawned-workers", 2, "spawn"))
    torch.multiprocessing.spawn(
        dist_stream.spawn_main,
        args=(world_size, str(tmp_path / "init"), str(dataset_dir), str(tmp_path), runs),
        nprocs=world_size,
        join=True,
    )
    for tag, _, _ in runs:
        batches = load_ranks(tmp_path, tag, world_size)
        check_exact([[i for b in rank for i in b] for rank in batches], world_size)
    # The worker count changes how a rank's share is split, not which samples it holds.
    shares = [
        [sorted(i for b in rank for i in b) for rank in load_ranks(tmp_path, tag, world_size)]
        for tag, _, _ in runs
    ]
    assert all(share == shares[0] for share in shares)


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.parametrize(
    ("unit", "fixture"),
    [("shard", "dataset_dir"), ("block", "blocks_dir"), ("block", "tar_blocks_dir")],
)
def test_torchrun_ranks_split_exactly_and_resume_on_the_same_and_other_world_size(
    unit: str, fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dataset_dir = request.getfixturevalue(fixture)
    data, out = str(dataset_dir), str(tmp_path)

    def torchrun(nproc: int, *args: str) -> None:
        run_torchrun(SCRIPT, nproc, *args, "--unit", unit)

    torchrun(2, data, out, "full", "--workers", "2")
    full = load_ranks(tmp_path, "full", 2)
    check_exact([[i for b in rank for i in b] for rank in full], 2)

    state = str(tmp_path / "state.json")
    torchrun(2, data, out, "head", "--workers", "2", "--stop-after", "20", "--save", state)
    head = load_ranks(tmp_path, "head", 2)
    assert head == [rank[:20] for rank in full]

    # Same topology: the rest is exactly the rest of the uninterrupted run, batch by batch.
    torchrun(2, data, out, "same", "--workers", "2", "--resume", state)
    assert load_ranks(tmp_path, "same", 2) == [rank[20:] for rank in full]

    # Elastic: 2 ranks x 2 workers -> 3 ranks x 1 worker finishes the epoch, nothing twice.
    torchrun(3, data, out, "grown", "--workers", "1", "--resume", state)
    grown = [[i for b in rank for i in b] for rank in load_ranks(tmp_path, "grown", 3)]
    assert len({len(r) for r in grown}) == 1
    served = [i for rank in head for b in rank for i in b] + [i for r in grown for i in r]
    assert len(served) == len(set(served))
    assert NUM_SAMPLES - len(served) <= (2 - 1) + (3 - 1)


def _end_group_rank(rank: int, init_file: str, out: str) -> None:
    """Both ranks reduce once; then rank 0 ends its group as after a failure, alone."""
    import time

    import torch
    import torch.distributed as dist

    from shardloader import end_process_group

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    total = torch.ones(1)
    dist.all_reduce(total)
    ended = Path(out, "rank0-ended")
    if rank == 0:
        end_process_group(succeeded=False)  # no barrier: rank 1 has not ended yet
        ended.write_text(str(dist.is_initialized()))
        end_process_group()  # no group any more: nothing to do
        return
    deadline = time.monotonic() + 30
    while not ended.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(out, "rank1-saw").write_text(str(ended.exists()))
    end_process_group(succeeded=False)


def test_end_process_group_waits_for_no_rank_after_a_failure(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        _end_group_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    assert (tmp_path / "rank0-ended").read_text() == "False"  # the group is gone
    assert (tmp_path / "rank1-saw").read_text() == "True"  # rank 0 ended before rank 1 did


@pytest.mark.slow
def test_ranks_that_end_their_group_with_collectives_in_flight_exit_cleanly(
    tmp_path: Path,
) -> None:
    # The race (pytorch/pytorch#179291) is timing-bound: 6 pairs, each of which lost a rank to
    # SIGABRT about 2 times in 3 before the fix.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in range(6):
        init = tmp_path / f"init-{attempt}"
        ranks = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "end_group_rank.py"), str(init), str(r)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in (0, 1)
        ]
        for rank in ranks:
            _, stderr = rank.communicate(timeout=120)
            assert rank.returncode == 0, (
                f"pair {attempt}: a rank exited with {rank.returncode}: {stderr[-2000:]}"
            )
