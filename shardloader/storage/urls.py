"""URLs and local paths: joining and splitting them, and finding the filesystem that holds one.

Paths are URLs (``s3://bucket/dir``, ``memory://x``) or local paths; :func:`url_to_fs` turns
either into an fsspec filesystem and the path inside it, naming the package to install when a
scheme has none.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import posixpath
import threading
import weakref
from typing import Any

import fsspec
from fsspec.core import url_to_fs as _fsspec_url_to_fs

from shardloader.errors import StorageError
from shardloader.storage.presigned import OPTION as PRESIGNED_OPTION
from shardloader.storage.retry import with_retries


def _forget_inherited_sessions() -> None:
    """In a forked child: detach the session finalizers of filesystems the parent made.

    An s3fs (or gcsfs) filesystem closes its HTTP session when it is garbage collected, by
    running a coroutine on the fsspec event loop of the process that made it. In a forked child
    (a DataLoader worker) that loop's thread does not exist: each close waited 1 s for it (s3fs
    asks for 0.1 s, fsspec polls in whole seconds), and a worker that collected the parent's
    filesystems mid-epoch stalled 2 s (tokens from S3 with 2 workers: 1.3 s an epoch or 3.5 s,
    by when the collector ran). The child does not own those connections: the parent closes
    them. The filesystems are kept for the child's life, so that aiohttp does not warn about
    sessions left unclosed when they are collected. (``weakref.finalize`` keeps its live
    finalizers in a private registry.)
    """
    for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
        info = finalizer.peek()
        if info is not None and getattr(info[1], "__name__", "") == "close_session":
            _INHERITED.append(info)
            finalizer.detach()


_INHERITED: list[Any] = []  # in a forked child: the parent's filesystems (see above)


os.register_at_fork(after_in_child=_forget_inherited_sessions)


# Options s3fs takes itself; any other goes to the `AioSession` it makes (``profile``...), and
# then the filesystem keeps its own session (see `_s3_session`).
_S3_BASE_OPTIONS = frozenset(
    {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
)
_S3_SESSION_LOCK = threading.Lock()
_S3_SESSION: tuple[int, Any] | None = None  # (pid, the AioSession of this process's S3 reads)
_S3_LOADER: Any = None  # botocore's data loader, shared by this process and its forks


@functools.cache
def _s3fs_options(cls: type) -> frozenset[str]:
    """The options ``cls`` (s3fs's filesystem) takes itself rather than handing its session."""
    own = frozenset(inspect.signature(vars(cls)["__init__"]).parameters) - {"self", "kwargs"}
    return own | _S3_BASE_OPTIONS


def _s3_session(options: dict[str, Any]) -> Any | None:
    """The `AioSession` for an s3fs filesystem of ``options``, or ``None`` to let s3fs make one.

    A new S3 client reads and parses botocore's service model and endpoint rules (about 0.1 s
    of a process's first GET; 0.13-0.2 s in each DataLoader worker, which had to make its own
    after the fork). The sessions made here share one data loader, which caches what it parsed,
    and a forked worker inherits it: its first GET took 0.035-0.046 s instead of 0.087-0.2 s.
    One session per process (a child makes its own: credentials and locks stay per process);
    none where the options carry anything for the session itself (``profile``...).
    """
    global _S3_SESSION, _S3_LOADER
    try:
        import aiobotocore.session
        import s3fs
    except ImportError:
        return None
    if not set(options) <= _s3fs_options(s3fs.S3FileSystem):
        return None
    with _S3_SESSION_LOCK:
        if _S3_SESSION is None or _S3_SESSION[0] != os.getpid():
            session = aiobotocore.session.AioSession()
            if _S3_LOADER is None:
                _S3_LOADER = session.get_component("data_loader")
            else:
                session.register_component("data_loader", _S3_LOADER)
            _S3_SESSION = (os.getpid(), session)
        return _S3_SESSION[1]


def is_url(path: str) -> bool:
    """Whether ``path`` carries a URL scheme (``s3://...``) rather than being a local path."""
    return "://" in path


def is_local(url: str) -> bool:
    """Whether ``url`` names the local filesystem."""
    return not is_url(url) or url.startswith("file://")


def normalize(url: str) -> str:
    """Return ``url`` with a local path made absolute; URLs are returned unchanged."""
    if is_url(url):
        return url.rstrip("/") if not url.endswith("://") else url
    return os.path.abspath(os.path.expanduser(url))


def join(base: str, *parts: str) -> str:
    """Join path parts onto ``base`` with ``/`` (URLs) or the OS separator (local paths)."""
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(url: str) -> str:
    """Return the parent of ``url``."""
    return posixpath.dirname(url) if is_url(url) else os.path.dirname(url)


def relpath(url: str, start: str) -> str:
    """Return ``url`` relative to ``start`` with ``/`` separators."""
    if is_url(url):
        return posixpath.relpath(url.split("://", 1)[1], start.split("://", 1)[1])
    return os.path.relpath(url, start).replace(os.sep, "/")


def url_to_fs(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for ``url``.

    The key ``"presigned_ranges"`` of ``storage_options`` is shardloader's (see
    :func:`shardloader.storage.read_range`) and is not passed to the filesystem.

    Raises:
        StorageError: The URL's scheme is unknown, or needs a package that is not installed.
    """
    storage_options.pop(PRESIGNED_OPTION, None)  # shardloader's own, not the filesystem's
    if url.startswith(("s3://", "s3a://")) and storage_options.get("session") is None:
        session = _s3_session(storage_options)
        if session is not None:
            storage_options["session"] = session
    try:
        fs, path = _fsspec_url_to_fs(url, **storage_options)
    except ValueError as err:
        # fsspec's "Protocol not known: x" names no URL; other ValueErrors are not ours to word.
        if not str(err).startswith("Protocol not known"):
            raise
        raise StorageError(
            f"{url}: unknown scheme ({err}); use a local path or a URL fsspec knows "
            "(s3://, gs://, memory://, file://...)"
        ) from err
    except ImportError as err:
        scheme = url.split("://", 1)[0]
        extra = {"s3": "shardloader[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, "")
        hint = f"; install {extra}" if extra else ""
        raise StorageError(f"{url}: no filesystem for scheme {scheme!r} ({err}){hint}") from err
    _connect(fs)
    return fs, path


def _connect(fs: fsspec.AbstractFileSystem) -> None:
    """Make an s3fs filesystem's client now, with the garbage collector paused.

    A client builds botocore's service model, tens of thousands of objects, which set off full
    collections; with torch imported each walks millions of objects. The client took 0.15 s
    instead of 0.05 s (0.045 s with collections paused), in the main process before it reads
    the manifest and in each DataLoader worker before its first shard. Nothing is collected
    meanwhile in any thread; collection resumes after, as it was.
    """
    if getattr(fs, "_s3", False) is not None or not callable(getattr(fs, "connect", None)):
        return  # not s3fs, or connected already
    enabled = gc.isenabled()
    gc.disable()
    try:
        fs.connect()
    except Exception:  # noqa: BLE001 - made again by the first request, which raises the error
        pass
    finally:
        if enabled:
            gc.enable()


def file_type(url: str, **storage_options: Any) -> str | None:
    """The type the filesystem reports for ``url`` (``"file"``, ``"directory"``, ``"other"``...).

    ``None`` where it reports no type, or where ``url`` cannot be looked at (missing, access
    denied, still failing after the retries): opening it then gives the precise error.

    Raises:
        StorageError: The URL's scheme needs a package that is not installed.
    """
    fs, path = url_to_fs(url, **storage_options)
    try:
        info = with_retries(lambda: fs.info(path), url=url, what="stat")
    except OSError:
        return None
    kind = info.get("type")
    return None if kind is None else str(kind)


def _protocol_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if not _fs_is_local(fs) else path


def _fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
