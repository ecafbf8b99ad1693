"""Where conversion jobs run: in this process, on a local process pool, or on a Ray cluster.

Every executor runs the same jobs (module-level functions called as ``fn(*args, report)``, where
``report(docs, input_bytes)`` feeds the progress bar) and hands back a `Pending` per job; the
scheduler (`shardloader.convert_pool`) decides what to submit and when. The jobs write their own
shards and completion records into the output, so which executor ran a task leaves no trace in
the output: a conversion begun on Ray resumes locally and the other way round.

- `InlineExecutor`: one process; jobs run as they are submitted.
- `PoolExecutor`: ``multiprocessing`` workers (``fork`` where safe); progress flows through a
  queue while jobs run.
- `RayExecutor`: one Ray task per job (``num_cpus=1``), joining ``ray_address`` or starting a
  local instance; progress is counted as each job finishes (from its record). Needs
  ``pip install shardloader[ray]``.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shardloader.errors import ConfigError, ShardloaderError

POLL_S = 0.01  # how often a waiting parent looks at its jobs between progress messages

Report = Callable[[int, int], None]


class Pending(Protocol):
    """A submitted job."""

    def ready(self) -> bool:
        """Whether the job has ended (done or failed)."""

    def get(self) -> Any:
        """The job's result; raises the job's error."""


class _Done:
    def __init__(self, fn: Callable[..., Any], args: Sequence[Any], report: Report) -> None:
        self._result = fn(*args, report)

    def ready(self) -> bool:
        return True

    def get(self) -> Any:
        return self._result


class InlineExecutor:
    """Runs each job in this process when it is submitted.

    Args:
        report: Receives the jobs' progress.
        dataset: The in-memory dataset that dataset tasks read (`dataset_job`).
    """

    live_progress = True
    num_workers = 1

    def __init__(self, report: Report, dataset: Any = None) -> None:
        global _dataset
        self._report = report
        _dataset = dataset

    def submit(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Run ``fn(*args, report)`` now."""
        return _Done(fn, args, self._report)

    def wait(self, pending: Sequence[Pending], timeout_s: float) -> None:
        """Nothing to wait for: every job has ended."""

    def close(self) -> None:
        """Forget the dataset."""
        global _dataset
        _dataset = None


_progress_queue: Any = None
_dataset: Any = None  # a forked worker's inherited `datasets` object (dataset conversions)


def _init_worker(progress_queue: Any, lock_fd: int | None, dataset: Any = None) -> None:
    global _progress_queue, _dataset
    _progress_queue = progress_queue
    _dataset = dataset
    if lock_fd is not None:  # forked: drop our copy, so the lock dies with the parent
        os.close(lock_fd)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


def _worker_report(docs: int, nbytes: int) -> None:
    _progress_queue.put((docs, nbytes))


def _pool_call(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    try:
        return fn(*args, _worker_report)
    except Exception as err:
        # The pool sends the error to the parent pickled; one that does not come back out of
        # pickle would hang the pool's result thread, so it travels as its message instead.
        # copy.copy rebuilds it the way unpickling does (``__reduce_ex__``), without bytes.
        try:
            pickle.dumps(err)
            copy.copy(err)
        except Exception:
            raise ShardloaderError(f"{type(err).__name__}: {err}") from None
        raise


def dataset_job(task: Any, config: Any, fingerprint: str, report: Report) -> dict[str, Any]:
    """Run a `shardloader.convert_hf.DatasetTask` on the dataset this process holds."""
    from shardloader.convert_hf import run_dataset_task

    return run_dataset_task(task, config, fingerprint, _dataset, report)


class PoolExecutor:
    """Runs jobs on ``num_proc`` worker processes.

    Args:
        num_proc: Worker processes.
        start_method: ``fork`` or ``spawn``.
        report: Receives the workers' progress (`wait` drains their queue into it).
        lock_fd: The output lock's descriptor: forked workers close their copy.
        dataset: Inherited by forked workers (dataset tasks).
    """

    live_progress = True

    def __init__(
        self,
        num_proc: int,
        start_method: str,
        report: Report,
        lock_fd: int | None = None,
        dataset: Any = None,
    ) -> None:
        ctx = mp.get_context(start_method)
        self._queue = ctx.Queue()
        self._report = report
        inherited = lock_fd if start_method == "fork" else None
        self.num_workers = num_proc
        self._pool = ctx.Pool(
            num_proc, initializer=_init_worker, initargs=(self._queue, inherited, dataset)
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Queue ``fn(*args, report)`` on the pool."""
        return self._pool.apply_async(_pool_call, (fn, args))

    def wait(self, pending: Sequence[Pending], timeout_s: float) -> None:
        """Pass on progress for up to ``timeout_s``, returning as soon as a job of ``pending`` ends.

        Progress and results come by different pipes, so the queue is read in short slices
        (``POLL_S``) between looks at the jobs: a job that ends without a progress message
        after it (the last one, say) used to cost the whole timeout, 0.2 s of a 2 s conversion.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            with contextlib.suppress(queue_mod.Empty):
                self._report(*self._queue.get(timeout=max(0.0, min(POLL_S, left))))
            while True:
                try:
                    self._report(*self._queue.get_nowait())
                except queue_mod.Empty:
                    break
            if left <= POLL_S or any(p.ready() for p in pending):
                return

    def close(self) -> None:
        """Stop the workers (jobs still running are ended)."""
        self.wait([], 0)
        self._pool.terminate()
        self._pool.join()


def _ray_call(fn: Callable[..., Any], args: Sequence[Any]) -> Any:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return fn(*args, lambda docs, nbytes: None)


class _RayPending:
    def __init__(self, ref: Any) -> None:
        self.ref = ref
        self._ready = False

    def ready(self) -> bool:
        if not self._ready:
            import ray

            done, _ = ray.wait([self.ref], timeout=0)
            self._ready = bool(done)
        return self._ready

    def get(self) -> Any:
        import ray

        try:
            return ray.get(self.ref)
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None  # our error, with its location first
            raise


class RayExecutor:
    """Runs each job as a Ray task.

    Args:
        address: The cluster (``"auto"``: the running one); ``None``: ``RAY_ADDRESS`` or a new
            local instance. A Ray session that is already up in this process is used as it is.

    Raises:
        ConfigError: Ray is not installed.
    """

    live_progress = False

    def __init__(self, address: str | None) -> None:
        try:
            import ray
        except ImportError as err:
            raise ConfigError(
                "executor='ray' needs Ray: pip install 'shardloader[ray]' (or run with the "
                "local executor)"
            ) from err
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_call)
        self.num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Start ``fn(*args)`` as a Ray task."""
        return _RayPending(self._remote.remote(fn, args))

    def wait(self, pending: Sequence[Pending], timeout_s: float) -> None:
        """Wait until one of ``pending`` ends, at most ``timeout_s``."""
        refs = [p.ref for p in pending if isinstance(p, _RayPending)]
        if refs:
            self._ray.wait(refs, num_returns=1, timeout=timeout_s)

    def close(self) -> None:
        """Shut down the Ray instance if this executor started it."""
        if self._started:
            self._ray.shutdown()
