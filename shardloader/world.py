"""Where this process stands: its rank and world size, and its DataLoader worker, if any.

The one module that reads the environment. Rank and world size come, in this order, from what
the user passed, from ``torch.distributed`` when a process group is initialized, from the
``RANK`` / ``WORLD_SIZE`` variables that ``torchrun`` sets, and otherwise default to a single
process. They are resolved when iteration starts, never when a dataset is built, so a dataset
may be made before ``init_process_group``. `launch_env` gives a training script what its
launcher said (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), before any process group exists.

DataLoader workers have no process group of their own: a forked worker inherits its parent's,
while a spawned one does not. A dataset therefore keeps its rank in a `WorldSource`, which
resolves the world in the rank's own process when it is pickled for a spawned worker
(`in_spawning_process`) and hands it over.
"""

from __future__ import annotations

import multiprocessing.context
import os
from dataclasses import dataclass

from shardloader.errors import ConfigError


@dataclass(frozen=True, slots=True)
class WorldInfo:
    """A rank and its DataLoader worker.

    Attributes:
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
        worker_id: This DataLoader worker's index, 0 in the main process.
        num_workers: DataLoader workers of the rank; 0 when reading in the main process.
    """

    rank: int = 0
    world_size: int = 1
    worker_id: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank {self.rank} and world_size {self.world_size} do not fit; "
                "expected world_size >= 1 and 0 <= rank < world_size"
            )
        if self.num_workers < 0 or not 0 <= self.worker_id < max(self.num_workers, 1):
            raise ConfigError(
                f"worker_id {self.worker_id} and num_workers {self.num_workers} do not fit"
            )


def detect_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Resolve ``(rank, world_size)``: explicit values, then torch.distributed, then the env.

    Raises:
        ConfigError: Only one of ``rank`` / ``world_size`` was given, or they do not fit.
    """
    if (rank is None) != (world_size is None):
        raise ConfigError("pass both rank and world_size, or neither (to detect them)")
    if rank is None or world_size is None:
        rank, world_size = _from_distributed() or _from_env() or (0, 1)
    WorldInfo(rank=rank, world_size=world_size)
    return rank, world_size


def detect_world(rank: int | None = None, world_size: int | None = None) -> WorldInfo:
    """The full `WorldInfo` of this process, DataLoader worker included."""
    import torch.utils.data

    rank, world_size = detect_rank(rank, world_size)
    info = torch.utils.data.get_worker_info()
    if info is None:
        return WorldInfo(rank=rank, world_size=world_size)
    return WorldInfo(
        rank=rank, world_size=world_size, worker_id=info.id, num_workers=info.num_workers
    )


class WorldSource:
    """Where a dataset's rank comes from: what the user passed, else detected when iterating.

    Pickled for a spawned DataLoader worker (which has no process group), it resolves rank and
    world size in the rank's own process and hands them over; a forked worker inherits the
    process group, so it detects them itself.

    Args:
        rank: The rank the user passed, or ``None`` to detect it; pass with ``world_size``.
        world_size: The world size the user passed, or ``None``.

    Raises:
        ConfigError: Only one of ``rank`` and ``world_size`` was passed.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None) -> None:
        if (rank is None) != (world_size is None):
            raise ConfigError("pass both rank and world_size to the dataset, or neither")
        self._rank, self._world_size = rank, world_size
        self._handed: tuple[int, int] | None = None  # resolved by the spawning rank

    def world(self) -> WorldInfo:
        """This process's rank and worker, as iteration would see them now."""
        if self._handed is not None:
            return detect_world(*self._handed)
        return detect_world(self._rank, self._world_size)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        if in_spawning_process() and self._rank is None and self._handed is None:
            state["_handed"] = detect_rank()  # a spawned worker has no process group
        return state


@dataclass(frozen=True, slots=True)
class LaunchEnv:
    """What the launcher (``torchrun``) told this process; a single process without one.

    Attributes:
        rank: ``RANK`` (default 0).
        world_size: ``WORLD_SIZE`` (default 1).
        local_rank: ``LOCAL_RANK``, the rank on this node, which picks its GPU (default 0).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_env() -> LaunchEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, each defaulting to a single process.

    Raises:
        ConfigError: One of them is set but not an integer.
    """
    return LaunchEnv(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
    )


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError as err:
        raise ConfigError(f"{name}={text!r} in the environment is not an integer") from err


def in_spawning_process() -> bool:
    """Whether this process is pickling an object for a child it is starting (spawn)."""
    return multiprocessing.context.get_spawning_popen() is not None


def _from_distributed() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _from_env() -> tuple[int, int] | None:
    rank, world_size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world_size is None:
        return None
    try:
        return int(rank), int(world_size)
    except ValueError as err:
        raise ConfigError(
            f"RANK={rank!r} and WORLD_SIZE={world_size!r} in the environment are not integers"
        ) from err


def end_process_group(*, succeeded: bool = True) -> None:
    """Leave the ``torch.distributed`` process group at the end of a run; nothing if none is up.

    Call it last, on every rank (Hugging Face's Trainer and Lightning leave the group to the
    script). After a successful run every rank first waits at a barrier, whose work is then kept
    for the rest of the process. Why: a gloo worker thread drops its reference to a finished
    collective a moment after the caller's ``wait`` returns, and the barrier holds the
    collectives still in flight when it was queued (an all-gather of the last step, with Python
    tensors). If the interpreter is finalizing when that thread drops the last reference, freeing
    those tensors needs the GIL, and the rank dies with SIGABRT ("terminate called without an
    active exception") after training went well (pytorch/pytorch#179291). A barrier alone only
    moved the race to its own work; kept alive, no collective's tensors are freed by that thread
    any more. The cost is one small object until the process ends. After an error
    (``succeeded=False``) there is no barrier: the other ranks may never reach it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        work = dist.barrier(async_op=True)
        if work is not None:
            work.wait()
            _keep_until_exit(work)
    dist.destroy_process_group()


def _keep_until_exit(obj: object) -> None:
    """Never free ``obj``: one reference more than Python will ever drop (not even at exit)."""
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
