"""Writing outputs: files published whole, failures explained, one run per output directory.

Writes go to a temporary name and are published whole (``os.replace`` locally, a single PUT
remotely), so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import posixpath
import re
import shutil
import socket
import tempfile
from collections.abc import Generator, Mapping
from types import TracebackType
from typing import IO, Any

import fsspec

from shardloader.errors import ConfigError, ShardloaderError, StorageError
from shardloader.locks import same_file, unlink_and_close
from shardloader.storage.retry import with_retries
from shardloader.storage.urls import _fs_is_local, join, normalize, url_to_fs


class AtomicWriter:
    """A binary file written under a temporary name and published whole by :meth:`commit`.

    It hashes what it writes (sha256) and counts bytes, so the checksum costs no second read.
    Use as a context manager: leaving the block normally commits, an exception aborts.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, final_path: str, tmp_path: str) -> None:
        self._fs = fs
        self._final = final_path
        self._tmp = tmp_path
        self._local = _fs_is_local(fs)
        self._file: IO[bytes] = open(tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hash = hashlib.sha256()
        self._num_bytes = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``; returns the number of bytes written."""
        self._file.write(data)
        self._hash.update(data)
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._num_bytes += n
        return n

    def tell(self) -> int:
        """Bytes written so far."""
        return self._num_bytes

    def flush(self) -> None:
        """Flush the temporary file."""
        self._file.flush()

    def writable(self) -> bool:
        """This is a writable stream."""
        return True

    def close(self) -> None:
        """Do nothing: writers may close their sink, but publishing needs :meth:`commit`."""

    @property
    def num_bytes(self) -> int:
        """Bytes written so far."""
        return self._num_bytes

    @property
    def sha256(self) -> str:
        """Hex sha256 of what was written so far."""
        return self._hash.hexdigest()

    def commit(self) -> None:
        """Publish the file under its final name."""
        self._file.close()
        self.closed = True
        if self._local:
            os.replace(self._tmp, self._final)
        else:
            final = self._final
            with_retries(lambda: self._fs.put_file(self._tmp, final), url=final, what="upload")
            os.unlink(self._tmp)

    def abort(self) -> None:
        """Drop the temporary file."""
        if not self._file.closed:
            self._file.close()
        self.closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class OutputDir:
    """A directory (local or remote) that a conversion writes into.

    Args:
        url: Local path or fsspec URL of the directory.
        storage_options: Passed to fsspec for remote URLs.
    """

    TMP_DIR = "_work/tmp"

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = normalize(url)
        self._fs, self._path = url_to_fs(self.url, **dict(storage_options or {}))
        self.local = _fs_is_local(self._fs)
        self._remote_tmp: str | None = None

    def _full(self, rel: str) -> str:
        return posixpath.join(self._path, rel)

    def local_path(self, rel: str) -> str:
        """The local path of ``rel`` in a local output (for files that only this machine reads)."""
        if not self.local:
            raise ValueError(f"{self.url}: not a local directory")
        return self._full(rel)

    def _fresh(self, rel: str) -> str:
        """Full path of ``rel``, with cached listings of it and its parents forgotten.

        Pool workers and other machines write into this directory while this process looks at
        it, so a listing that s3fs cached earlier would hide their files.
        """
        full = self._full(rel) if rel else self._path
        self._fs.invalidate_cache(full)
        return full

    def url_of(self, rel: str) -> str:
        """Full URL of ``rel`` inside this directory."""
        return join(self.url, rel)

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists."""
        return bool(self._fs.exists(self._fresh(rel)))

    def size(self, rel: str) -> int:
        """Size of ``rel`` in bytes."""
        return int(self._fs.size(self._fresh(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """Read ``rel`` whole; raises ``FileNotFoundError`` when missing."""
        full = self._fresh(rel)
        return with_retries(lambda: self._fs.cat_file(full), url=self.url_of(rel), what="read")

    def list(self, rel: str = "") -> list[str]:
        """Names of the files directly in ``rel`` (empty when it does not exist)."""
        full = self._fresh(rel)
        if not self._fs.exists(full):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self._fs.ls(full, detail=False))

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        """Remove ``rel`` if it exists."""
        full = self._fresh(rel)
        if self._fs.exists(full):
            self._fs.rm(full, recursive=recursive)

    def makedirs(self, rel: str = "") -> None:
        """Create ``rel`` (and parents) where the filesystem has directories."""
        self._fs.makedirs(self._full(rel) if rel else self._path, exist_ok=True)

    def open_atomic(self, rel: str, *, tmp_prefix: str = "") -> AtomicWriter:
        """Open ``rel`` for writing under a temporary name; see :class:`AtomicWriter`.

        Local temporaries live in ``_work/tmp`` of this directory (same filesystem, so the final
        rename is atomic) named ``{tmp_prefix}{basename}``; remote ones in a local temp folder.
        """
        name = tmp_prefix + posixpath.basename(rel)
        if self.local:
            tmp_dir = self._full(self.TMP_DIR)
            os.makedirs(tmp_dir, exist_ok=True)
            os.makedirs(posixpath.dirname(self._full(rel)), exist_ok=True)
        else:
            if self._remote_tmp is None:
                self._remote_tmp = tempfile.mkdtemp(prefix="shardloader-")
            tmp_dir = self._remote_tmp
        return AtomicWriter(self._fs, self._full(rel), os.path.join(tmp_dir, name))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def clean_tmp(self, prefix: str) -> None:
        """Remove local temporaries whose names start with ``prefix`` (left by a crash)."""
        if not self.local:
            return
        tmp_dir = self._full(self.TMP_DIR)
        if os.path.isdir(tmp_dir):
            for name in os.listdir(tmp_dir):
                if name.startswith(prefix):
                    os.unlink(os.path.join(tmp_dir, name))

    def clean_dead_tmp(self) -> tuple[str, ...]:
        """Remove `write_file` temporaries (``p<pid>-...``) of processes no longer running here.

        A run killed while writing its plan, a task record or the manifest leaves one behind; the
        next run removes it once it holds the lock. A pid that is alive keeps its file (it may
        be a slice of the same conversion writing at this moment). Returns the names removed.
        """
        if not self.local:
            return ()
        tmp_dir = self._full(self.TMP_DIR)
        removed: tuple[str, ...] = ()
        if not os.path.isdir(tmp_dir):
            return removed
        for name in os.listdir(tmp_dir):
            match = re.match(r"p(\d+)-", name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(tmp_dir, name))
                removed += (name,)
        return removed

    def close(self) -> None:
        """Remove the local temp folder used for remote uploads."""
        if self._remote_tmp is not None:
            shutil.rmtree(self._remote_tmp, ignore_errors=True)
            self._remote_tmp = None


# ---- writing an output: failures as StorageError with a remedy, one run per output -------------
#
# `write_error` turns an ``OSError`` from writing into a `StorageError` that names the file, the
# system's reason and a remedy (a full disk reports ``[Errno 28]`` with no path of its own);
# `writing` applies it to a block. `lock_output` keeps a second run out of a local output.

_REMEDIES = {
    errno.ENOSPC: "free space there or choose another output, then rerun (finished tasks are kept)",
    errno.EDQUOT: "free space there or choose another output, then rerun (finished tasks are kept)",
    errno.EROFS: "the output is not writable; choose another output",
    errno.EACCES: "the output is not writable; choose another output or fix its permissions",
    errno.EPERM: "the output is not writable; choose another output or fix its permissions",
    errno.ENOTDIR: "a file is in the way of the output directory; choose another output",
    errno.EEXIST: "a file is in the way of the output directory; choose another output",
    errno.EISDIR: "a directory is in the way of an output file; choose another output",
}


def write_error(url: str, err: OSError) -> StorageError:
    """A `StorageError` for ``err``, raised while writing ``url``: where, why, and what to do."""
    reason = err.strerror or str(err)
    if err.filename and os.fspath(err.filename) != url:
        reason = f"{reason}: {err.filename}"
    remedy = _REMEDIES.get(err.errno or 0, "check the output location, then rerun")
    return StorageError(f"{url}: cannot write ({reason}); {remedy}")


@contextlib.contextmanager
def writing(url: str) -> Generator[None, None, None]:
    """Turn an ``OSError`` from writing ``url`` into a `StorageError` with a remedy."""
    try:
        yield
    except ShardloaderError:
        raise
    except OSError as err:
        raise write_error(url, err) from err


def write_file(out: OutputDir, rel: str, data: bytes) -> None:
    """Write ``rel`` atomically, under a temporary name no other process uses.

    Raises:
        StorageError: Writing failed (the file, the reason, a remedy).
    """
    with writing(out.url_of(rel)):
        f = out.open_atomic(rel, tmp_prefix=f"p{os.getpid()}-")
        try:
            f.write(data)
            f.commit()
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk fails the flush in close() again
                f.abort()
            raise


def lock_output(out: OutputDir, rel: str) -> int | None:
    """Lock ``out`` for this run; returns the descriptor to hold (``None``: a remote output).

    The lock is an ``flock`` on ``rel``, so the kernel drops it when its holder dies and a rerun
    after ``kill -9`` takes it at once; the file names the holder (pid and host) for the message
    a second run gets. Object stores have no locks: there, one run per output is up to the user.

    Raises:
        ConfigError: Another process holds the lock.
    """
    if not out.local:
        return None
    path = url_to_fs(out.url_of(rel))[1]
    with writing(out.url_of(rel)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").split()
                os.close(fd)
                pid, host = [*holder, "?", "?"][:2]
                raise ConfigError(
                    f"{out.url}: is being written by pid {pid} on {host}; wait for it or remove "
                    f"{path} if it died"
                ) from None
            if same_file(os.fstat(fd), path):
                break
            os.close(fd)  # its holder removed it as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def unlock_output(out: OutputDir, rel: str, fd: int | None) -> None:
    """Release the lock `lock_output` took (and remove its file)."""
    if fd is not None:
        unlink_and_close(url_to_fs(out.url_of(rel))[1], fd)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal counts as alive).

    A zombie (killed, not yet reaped: a pool worker of a run killed with ``kill -9`` whose
    parent died too, in a container whose init does not reap) is dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:  # no /proc (macOS), or it just went away
        return True
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split at the last ")".
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state != b"Z"
