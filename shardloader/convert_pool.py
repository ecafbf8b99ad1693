"""Run conversion tasks on an executor and show their progress.

Tasks run in worker processes (``fork`` where that is safe, else ``spawn``) or as Ray tasks
(`shardloader.convert_executor`), reporting (documents, input bytes) to a progress bar, or to a
log line every 10 s when stderr is no terminal. The first task that fails stops the run. One
process, or one job, runs in this process without a pool. A task of one big file runs as one job
per slice (`shardloader.convert_slice`); the scheduler here counts the newlines before each slice
on the executor first, reads a ``stream`` file's slices in this process, and joins the slice
records into the task record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from shardloader import storage
from shardloader.convert_config import ConvertConfig
from shardloader.convert_executor import (
    InlineExecutor,
    Pending,
    PoolExecutor,
    RayExecutor,
    Report,
    dataset_job,
)
from shardloader.convert_hf import DatasetTask
from shardloader.convert_plan import Task
from shardloader.convert_slice import SliceJob, finished_slices, join_slices, run_slice
from shardloader.convert_task import run_task
from shardloader.errors import ConfigError
from shardloader.sources import kind_of
from shardloader.sources.slices import StreamSlice, count_newlines, iter_stream_slices
from shardloader.storage import InputFile, OutputDir, writing

# The conversion logs under one name, as it did as one module ("shardloader.convert: ...").
log = logging.getLogger("shardloader.convert")

MiB = 1 << 20


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


def _task_job(task: Task, config: ConvertConfig, fingerprint: str, report: Report) -> Any:
    return run_task(task, config, fingerprint, report)


def _slice_job(job: SliceJob, config: ConvertConfig, fingerprint: str, report: Report) -> Any:
    return run_slice(job, config, fingerprint, report)


def _count_job(file: InputFile, start: int, end: int, report: Report) -> int:
    return count_newlines(file, start, end)


def _make_executor(
    config: ConvertConfig,
    num_proc: int,
    num_jobs: int,
    start_method: str,
    progress: _Progress,
    lock_fd: int | None,
    dataset: Any,
) -> InlineExecutor | PoolExecutor | RayExecutor:
    if config.executor == "ray":
        if dataset is not None:
            raise ConfigError(
                "executor='ray' converts files; a dataset in memory converts on the local "
                "executor (drop --executor ray, or save the dataset as files first)"
            )
        return RayExecutor(config.ray_address)
    if dataset is not None and start_method != "fork" and num_proc > 1:
        log.info("workers cannot inherit the dataset without fork: its tasks run in this process")
        num_proc = 1
    if num_proc <= 1 or num_jobs <= 1:
        return InlineExecutor(progress.update, dataset)
    return PoolExecutor(min(num_proc, num_jobs), start_method, progress.update, lock_fd, dataset)


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
    """Run ``tasks`` on ``num_proc`` processes (or Ray); returns the records of what ran now.

    A task of one sliced file runs as one job per slice not yet finished (first counting the
    newlines of its slices, for their line numbers; a ``stream`` task's slices come from one
    reader here, at most ``num_proc + 1`` held at a time); its task record is joined from the
    slice records once all are there. The returned records are those of the plain tasks and
    slices this run converted, in the order they ended.

    Args:
        tasks: The tasks to run.
        config: The conversion settings (``executor`` picks where jobs run).
        fingerprint: The plan's fingerprint, stored in each record.
        num_proc: Worker processes; with one (or one job) the jobs run in this process.
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
    out = OutputDir(config.output)
    num_jobs = sum(max(1, len(t.ranges)) if isinstance(t, Task) else 1 for t in tasks)
    if any(isinstance(t, Task) and t.split == "stream" for t in tasks):
        num_jobs = max(num_jobs, 2)
    executor = _make_executor(config, num_proc, num_jobs, start_method, progress, lock_fd, dataset)
    scheduler = _Scheduler(executor, config, fingerprint, out, progress)
    try:
        return scheduler.run(tasks)
    finally:
        executor.close()
        scheduler.cleanup()
        progress.close()
        out.close()


class _Scheduler:
    """Submits jobs, follows them, and joins slices into task records (see `run_tasks`)."""

    def __init__(
        self,
        executor: InlineExecutor | PoolExecutor | RayExecutor,
        config: ConvertConfig,
        fingerprint: str,
        out: OutputDir,
        progress: _Progress,
    ) -> None:
        self.executor, self.config, self.fingerprint = executor, config, fingerprint
        self.out, self.progress = out, progress
        self.max_stream_jobs = executor.num_workers + 1
        self.pending: list[tuple[tuple[Any, ...], Pending]] = []
        self.records: list[dict[str, Any]] = []
        self.counts: dict[int, dict[int, int]] = {}
        self.slices: dict[int, dict[int, dict[str, Any]]] = {}  # task -> slice -> record
        self.num_slices: dict[int, int] = {}  # known once a stream is read to its end
        self.tasks: dict[int, Task] = {}
        self.spill_dir: str | None = None
        self.own_spill_dir: str | None = None
        self.spills: list[str] = []

    def submit(self, key: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> None:
        self.pending.append((key, self.executor.submit(fn, *args)))

    def run(self, tasks: Sequence[Task] | Sequence[DatasetTask]) -> list[dict[str, Any]]:
        streams: list[tuple[Task, Iterator[tuple[int, StreamSlice]]]] = []
        plain: list[Task | DatasetTask] = []
        for task in tasks:
            if not isinstance(task, Task) or not task.split:
                plain.append(task)
                continue
            self.tasks[task.index] = task
            self.slices[task.index] = finished_slices(self.out, task.index, self.fingerprint)
            if task.split == "stream":
                streams.append((task, self._read_stream(task)))
                continue
            self.num_slices[task.index] = len(task.ranges)
            if len(self.slices[task.index]) == len(task.ranges):
                self._join(task.index)
                continue
            self.counts[task.index] = {}
            last = max(k for k in range(len(task.ranges)) if k not in self.slices[task.index])
            for k, (start, end) in enumerate(task.ranges[:last]):  # the lines before ``last``
                self.submit(("count", task.index, k), _count_job, task.files[0], start, end)
            self._submit_counted(task.index)
        for task in plain:
            if isinstance(task, DatasetTask):
                self.submit(("task",), dataset_job, task, self.config, self.fingerprint)
            else:
                self.submit(("task",), _task_job, task, self.config, self.fingerprint)
        while self.pending or streams:
            streams = [s for s in streams if self._feed(*s)]
            self._collect()
        return self.records

    def _read_stream(self, task: Task) -> Iterator[tuple[int, StreamSlice]]:
        source = task.files[0]
        count = 0
        with storage.open_read(source.url) as f:
            cut = iter_stream_slices(
                f,
                kind_of(source.url)[1],
                source.url,
                self.config.slice_bytes,
                self.config.max_record_bytes,
            )
            for k, piece in enumerate(cut):
                yield k, piece
                count = k + 1
        self.num_slices[task.index] = count  # known only now: the task can be joined

    def _feed(self, task: Task, reader: Iterator[tuple[int, StreamSlice]]) -> bool:
        """Hand out the stream's next slices while few are held; whether it has more."""
        while sum(1 for key, _ in self.pending if key[:2] == ("slice", task.index)) < (
            self.max_stream_jobs
        ):
            try:
                k, piece = next(reader)
            except StopIteration:
                self._join_if_done(task.index)
                return False
            if k in self.slices[task.index]:
                continue
            job = SliceJob(
                task.index,
                k,
                task.files[0],
                0,
                0,
                piece.first_line,
                long_line=piece.long_line,
                damage=piece.damage,
            )
            if isinstance(self.executor, PoolExecutor):
                job = replace(job, spill=self._spill(task.index, k, piece.pieces))
            else:
                job = replace(job, data=b"".join(piece.pieces))
            del piece
            self.submit(("slice", task.index, k), _slice_job, job, self.config, self.fingerprint)
        return True

    def _spill(self, task_index: int, slice_index: int, pieces: list[bytes]) -> str:
        """Write a stream slice into a file for a pool worker; returns its path.

        The file goes into ``_work/tmp`` of a local output, under a ``p<pid>-`` name that the
        next run removes if this one dies; for a remote output, into a temporary folder.
        """
        if self.spill_dir is None:
            if self.out.local:
                self.spill_dir = self.out.local_path(OutputDir.TMP_DIR)
                os.makedirs(self.spill_dir, exist_ok=True)
            else:
                self.spill_dir = self.own_spill_dir = tempfile.mkdtemp(prefix="shardloader-")
        path = os.path.join(
            self.spill_dir, f"p{os.getpid()}-stream-{task_index:05d}-{slice_index:05d}"
        )
        self.spills.append(path)
        with writing(path), open(path, "wb") as f:
            for piece in pieces:
                f.write(piece)
        return path

    def cleanup(self) -> None:
        """Remove the spill files that no job read (a run that failed)."""
        for path in self.spills:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.own_spill_dir is not None:
            shutil.rmtree(self.own_spill_dir, ignore_errors=True)

    def _submit_counted(self, task_index: int) -> None:
        """Submit a sliced task's slices once the newlines before each are counted."""
        task, counts = self.tasks[task_index], self.counts[task_index]
        before = 0
        for k, (start, end) in enumerate(task.ranges):
            if k not in self.slices[task_index] and not any(
                key == ("slice", task_index, k) for key, _ in self.pending
            ):
                job = SliceJob(
                    task_index, k, task.files[0], start, end, 1 if k == 0 else before + 2
                )
                self.submit(
                    ("slice", task_index, k), _slice_job, job, self.config, self.fingerprint
                )
            if k not in counts:
                return
            before += counts[k]

    def _collect(self) -> None:
        ready = [(key, p) for key, p in self.pending if p.ready()]
        if not ready:
            self.executor.wait([p for _, p in self.pending], 0.2)
            ready = [(key, p) for key, p in self.pending if p.ready()]
        for item in ready:
            self.pending.remove(item)
            key, p = item
            result = p.get()  # fail fast: the first error ends the run
            if key[0] == "count":
                self.counts[key[1]][key[2]] = result
                self._submit_counted(key[1])
                continue
            if not self.executor.live_progress:
                self.progress.update(result["num_docs"], result["num_input_bytes"])
            self.records.append(result)
            if key[0] == "slice":
                self.slices[key[1]][key[2]] = result
                self._join_if_done(key[1])

    def _join_if_done(self, task_index: int) -> None:
        n = self.num_slices.get(task_index)
        if (
            n is not None
            and len(self.slices[task_index]) == n
            and not any(key[:2] == ("slice", task_index) for key, _ in self.pending)
        ):
            self._join(task_index)

    def _join(self, task_index: int) -> None:
        records = [self.slices[task_index][k] for k in range(self.num_slices[task_index])]
        join_slices(self.out, task_index, records, self.fingerprint)
