"""Run conversion tasks on a process pool and show their progress.

Tasks run in worker processes (``fork`` where that is safe, else ``spawn``), each reporting
(documents, input bytes) through a queue to a progress bar, or to a log line every 10 s when
stderr is no terminal. The first task that fails stops the pool. One process, or one task, runs
in this process without a pool.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from shardloader.convert_config import ConvertConfig
from shardloader.convert_hf import DatasetTask, run_dataset_task
from shardloader.convert_plan import Task
from shardloader.convert_task import run_task
from shardloader.sources import kind_of

# The conversion logs under one name, as it did as one module ("shardloader.convert: ...").
log = logging.getLogger("shardloader.convert")

MiB = 1 << 20

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


def _pool_task(task: Task | DatasetTask, config: ConvertConfig, fingerprint: str) -> dict[str, Any]:
    return _run_one(task, config, fingerprint, _dataset, _worker_report)


def _run_one(
    task: Task | DatasetTask,
    config: ConvertConfig,
    fingerprint: str,
    dataset: Any,
    report: Callable[[int, int], None],
) -> dict[str, Any]:
    if isinstance(task, DatasetTask):
        return run_dataset_task(task, config, fingerprint, dataset, report)
    return run_task(task, config, fingerprint, report)


class _Progress:
    def __init__(self, total_bytes: int | None, enabled: bool | None) -> None:
        self._bar: Any = None
        self._docs = 0
        self._bytes = 0
        self._last_log = time.monotonic()
        self._start = time.monotonic()
        self._total = total_bytes
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert"
            )

    def update(self, docs: int, nbytes: int) -> None:
        self._docs += docs
        self._bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix(docs=self._docs, refresh=False)
        elif time.monotonic() - self._last_log >= 10:
            self._last_log = time.monotonic()
            rate = self._bytes / max(time.monotonic() - self._start, 1e-9) / MiB
            log.info(
                "converted %d documents, %.1f MB (%.1f MB/s)", self._docs, self._bytes / 1e6, rate
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def pool_start_method() -> str:
    """How worker processes start: ``fork`` where that is safe, else ``spawn``.

    A forked worker starts at once with the parent's imports; a spawned one imports shardloader,
    pyarrow and (with ``--tokenizer``) tokenizers again, about 0.5 s per worker, which was a
    quarter of converting 300 MB on 2 cores. Forking is safe on Linux while this process runs no
    other Python thread (no fsspec event loop from listing ``s3://`` inputs, no progress-bar
    monitor); the check runs before the progress bar starts.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def run_tasks(
    tasks: Sequence[Task] | Sequence[DatasetTask],
    config: ConvertConfig,
    fingerprint: str,
    num_proc: int,
    *,
    start_method: str,
    lock_fd: int | None = None,
    dataset: Any = None,
) -> list[dict[str, Any]]:
    """Run ``tasks`` on ``num_proc`` processes; returns their completion records in task order.

    Args:
        tasks: The tasks to run.
        config: The conversion settings.
        fingerprint: The plan's fingerprint, stored in each record.
        num_proc: Worker processes; with one (or one task) the tasks run in this process.
        start_method: ``fork`` or ``spawn`` (`pool_start_method`, asked before any thread starts).
        lock_fd: The output lock's descriptor: forked workers close their copy of it.
        dataset: The `datasets` object that `DatasetTask`s read; forked workers inherit it,
            so without ``fork`` its tasks run in this process.
    """
    files = [f for t in tasks for f in t.files]
    # Progress counts text bytes read; the stored size is their total only for plain files.
    plain = all(kind_of(f.url)[1] == "none" and kind_of(f.url)[0] != "parquet" for f in files)
    total = sum(f.num_bytes for f in files) if plain and files else None
    progress = _Progress(total, config.progress)
    if dataset is not None and start_method != "fork" and num_proc > 1:
        log.info("workers cannot inherit the dataset without fork: its tasks run in this process")
        num_proc = 1
    try:
        if num_proc <= 1 or len(tasks) <= 1:
            return [_run_one(t, config, fingerprint, dataset, progress.update) for t in tasks]
        ctx = mp.get_context(start_method)
        q = ctx.Queue()
        inherited = lock_fd if start_method == "fork" else None
        pool = ctx.Pool(
            min(num_proc, len(tasks)), initializer=_init_worker, initargs=(q, inherited, dataset)
        )
        try:
            pending = [pool.apply_async(_pool_task, (t, config, fingerprint)) for t in tasks]
            while not all(r.ready() for r in pending):
                with contextlib.suppress(queue_mod.Empty):
                    progress.update(*q.get(timeout=0.2))
                for r in pending:  # fail fast: the first task error stops the pool
                    if r.ready() and not r.successful():
                        r.get()
            while True:
                try:
                    progress.update(*q.get_nowait())
                except queue_mod.Empty:
                    break
            records = [r.get() for r in pending]
            pool.close()
            return records
        finally:
            pool.terminate()
            pool.join()
    finally:
        progress.close()
