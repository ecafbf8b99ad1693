"""One of two ranks that end their group with all-gathers in flight (tests/test_distributed.py).

Usage: python tests/end_group_rank.py INIT_FILE RANK

Each rank is pinned to one CPU and holds the group, as a DDP model does (so the group's gloo
threads outlive ``destroy_process_group``), then calls `end_process_group` and exits. Without
`end_process_group` keeping its barrier's work, most such pairs lost a rank to SIGABRT at exit.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from shardloader import end_process_group

if __name__ == "__main__":
    init_file, rank = sys.argv[1], int(sys.argv[2])
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[rank % len(cpus)]})  # before the group's threads start
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group = dist.group.WORLD
    for _ in range(20):
        dist.all_gather([torch.zeros(8), torch.zeros(8)], torch.ones(8), async_op=True)
    end_process_group()
