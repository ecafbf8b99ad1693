"""Reading bytes: whole files, open files, and shard downloads streamed in bounded blocks.

Reads retry transient failures (:mod:`shardloader.storage.retry`); a file found missing is looked
for once more past the filesystem's cached listings before it counts as missing.

Shard downloads (:func:`iter_download`, used by :mod:`shardloader.cache_download`) stream one GET
in blocks and give every network wait its own deadline, so a hung server costs ``timeout_s`` and not
forever; :func:`retry_until` retries them until a deadline, resuming where the last try stopped.
On an async filesystem (s3fs, HTTP, gcsfs) each wait is a coroutine run on fsspec's event loop
under ``asyncio.wait_for``, so a stalled request is cancelled (its connection closed), not merely
abandoned in a thread. Setting botocore's ``read_timeout`` is not enough: s3fs and botocore retry
timed-out and refused requests inside one call (a refused connection alone costs 3.7 s there).
:func:`read_range` reads one block of a shard (one ranged GET) under the same deadlines; on S3 by
default as a plain HTTP GET of a presigned URL (:mod:`shardloader.storage.presigned`, a quarter of
the CPU of a GET through s3fs), else through s3fs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import IO, Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem

from shardloader.storage import presigned
from shardloader.storage.retry import with_retries
from shardloader.storage.urls import url_to_fs

T = TypeVar("T")

DOWNLOAD_BLOCK_BYTES = 4 << 20


def _run_bounded(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout_s: float, what: str
) -> T:
    """Run ``coro`` on fsspec's event loop; cancel it and raise ``TimeoutError`` after timeout_s."""
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout_s), loop)
    try:
        # The grace covers a busy loop; wait_for itself cancels the coroutine at timeout_s.
        return future.result(timeout_s + 5.0)
    except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as err:
        future.cancel()
        raise TimeoutError(f"{what}: no answer within timeout_s={timeout_s:g}") from err


async def _read_block(body: Any, num_bytes: int) -> bytes:
    """Read up to ``num_bytes`` from an aiobotocore body (less only at the end)."""
    parts: list[bytes] = []
    have = 0
    while have < num_bytes:
        chunk = await body.read(num_bytes - have)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _iter_s3(
    fs: Any, path: str, offset: int, timeout_s: float, block_bytes: int
) -> Generator[bytes, None, None]:
    """One streamed GET (from ``offset``), read a block at a time, the next block in flight."""
    bucket, key, version = fs.split_path(path)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version:
        kwargs["VersionId"] = version
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
    response = _run_bounded(fs.loop, fs._call_s3("get_object", **kwargs), timeout_s, "GET")
    body = response["Body"]
    pending: concurrent.futures.Future[bytes] | None = None
    try:

        def submit() -> concurrent.futures.Future[bytes]:
            coro = asyncio.wait_for(_read_block(body, block_bytes), timeout_s)
            return asyncio.run_coroutine_threadsafe(coro, fs.loop)

        pending = submit()
        while True:
            try:
                block = pending.result(timeout_s + 5.0)
            except (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError) as err:
                raise TimeoutError(
                    f"read stalled: no {block_bytes >> 20} MiB block within timeout_s={timeout_s:g}"
                ) from err
            if not block:
                return
            pending = submit()  # the loop reads ahead while the caller hashes and writes
            yield block
    finally:
        # Closing the body ends a read in flight at once; collect its error so that asyncio
        # does not log "exception was never retrieved".
        fs.loop.call_soon_threadsafe(body.close)
        if pending is not None:
            try:
                pending.result(timeout_s + 5.0)
            except BaseException:  # noqa: BLE001 - the attempt is over either way
                pending.cancel()


def _iter_async_ranges(
    fs: AsyncFileSystem, path: str, offset: int, timeout_s: float, block_bytes: int
) -> Generator[bytes, None, None]:
    """Ranged reads of ``block_bytes`` each, for async filesystems other than s3fs."""
    info = _run_bounded(fs.loop, fs._info(path), timeout_s, "stat")
    size = info.get("size")
    if size is None:  # e.g. HTTP without Content-Length: one whole read
        yield _run_bounded(fs.loop, fs._cat_file(path, start=offset), timeout_s, "GET")
        return
    while offset < size:
        end = min(offset + block_bytes, size)
        block = _run_bounded(fs.loop, fs._cat_file(path, start=offset, end=end), timeout_s, "GET")
        if not block:
            return
        offset += len(block)
        yield block


def _iter_sync(
    fs: fsspec.AbstractFileSystem, path: str, offset: int, block_bytes: int
) -> Generator[bytes, None, None]:
    with fs.open(path, "rb") as f:
        if offset:
            f.seek(offset)
        while block := f.read(block_bytes):
            yield block


def iter_download(
    url: str,
    *,
    offset: int = 0,
    timeout_s: float = 60.0,
    block_bytes: int = DOWNLOAD_BLOCK_BYTES,
    storage_options: Mapping[str, Any] | None = None,
) -> Generator[bytes, None, None]:
    """Yield the bytes of ``url`` from ``offset`` on, in blocks of up to ``block_bytes``.

    One attempt, no retries (wrap it in :func:`retry_until`, restarting at the bytes received).
    On async filesystems every network wait (the request, each block) must end within
    ``timeout_s``, else the request is cancelled and ``TimeoutError`` raised. s3fs gets one
    streamed GET (``Range: bytes=offset-``) with the next block read while the caller processes
    the last; other async filesystems get ranged reads. Synchronous filesystems (``memory://``,
    SFTP) are read in the calling thread with their own timeouts.

    Raises:
        FileNotFoundError: ``url`` does not exist.
        TimeoutError: A request or block took longer than ``timeout_s``.
        OSError: Other failures of the backend (see :func:`is_transient`).
    """
    fs, path = url_to_fs(url, **dict(storage_options or {}))
    if isinstance(fs, AsyncFileSystem) and fs.async_impl:
        if hasattr(fs, "_call_s3"):
            return _iter_s3(fs, path, offset, timeout_s, block_bytes)
        return _iter_async_ranges(fs, path, offset, timeout_s, block_bytes)
    return _iter_sync(fs, path, offset, block_bytes)


def _read_range_s3(fs: Any, path: str, offset: int, length: int, timeout_s: float) -> bytes:
    """One ranged GET of ``[offset, offset + length)``, the request and the body each bounded."""
    bucket, key, version = fs.split_path(path)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if version:
        kwargs["VersionId"] = version
    kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
    response = _run_bounded(fs.loop, fs._call_s3("get_object", **kwargs), timeout_s, "GET")
    body = response["Body"]
    # Read to the end of the body (one byte past the range at most: a server that ignores the
    # range is not read whole), so that aiohttp puts the connection back in its pool: the next
    # block's GET then skips the TCP handshake. Closing a body closes its connection.
    try:
        data = _run_bounded(fs.loop, _read_block(body, length + 1), timeout_s, "read")
    except BaseException:
        fs.loop.call_soon_threadsafe(body.close)
        raise
    if len(data) > length:
        fs.loop.call_soon_threadsafe(body.close)
    return data


def _read_range_presigned(
    fs: Any, path: str, url: str, offset: int, length: int, timeout_s: float
) -> bytes:
    """A ranged GET by presigned URL; through s3fs where that cannot answer (then for good)."""
    # The request and the body each have timeout_s inside; the rest bounds presigning.
    coro = presigned.read_range(fs, path, url, offset, length, timeout_s)
    try:
        return _run_bounded(fs.loop, coro, 3 * timeout_s, f"{url}: GET")
    except presigned.FastPathUnusable as err:
        data = _read_range_s3(fs, path, offset, length, timeout_s)
        presigned.disable(fs, url, str(err))  # s3fs could read what the presigned URL could not
        return data


def read_range(
    url: str,
    offset: int,
    length: int,
    *,
    timeout_s: float = 60.0,
    storage_options: Mapping[str, Any] | None = None,
) -> bytes:
    """The ``length`` bytes of ``url`` at ``offset``: one ranged read (a block of a shard).

    One attempt, no retries (wrap it in :func:`retry_until`). On async filesystems the request
    and the body must each arrive within ``timeout_s``, else the request is cancelled and
    ``TimeoutError`` raised; s3fs gets one ``GET`` with ``Range: bytes=offset-(offset+length-1)``,
    by default of a presigned URL (:mod:`shardloader.storage.presigned`; ``storage_options``
    ``{"presigned_ranges": False}`` goes through s3fs). Fewer bytes come back only where the
    object is shorter (the caller checks what it got); a start past the end is refused
    (``OSError`` ``EINVAL``).

    Raises:
        FileNotFoundError: ``url`` does not exist.
        TimeoutError: The request or the body took longer than ``timeout_s``.
        OSError: Other failures of the backend (see :func:`is_transient`).
    """
    if length <= 0:
        return b""
    options = dict(storage_options or {})
    fast = bool(options.get(presigned.OPTION, True))
    fs, path = url_to_fs(url, **options)
    if isinstance(fs, AsyncFileSystem) and fs.async_impl:
        if hasattr(fs, "_call_s3"):
            if fast and presigned.supports(fs, path):
                return _read_range_presigned(fs, path, url, offset, length, timeout_s)
            return _read_range_s3(fs, path, offset, length, timeout_s)
        coro = fs._cat_file(path, start=offset, end=offset + length)
        return bytes(_run_bounded(fs.loop, coro, timeout_s, "GET"))
    return bytes(fs.cat_file(path, start=offset, end=offset + length))


def _uncached_on_miss(fs: fsspec.AbstractFileSystem, path: str, fn: Callable[[], T]) -> T:
    """Call ``fn``; if it finds no file, forget cached listings of ``path`` and call it again.

    Object-store filesystems (s3fs, gcsfs) cache directory listings per instance and answer
    "missing" from a listing taken before another process (a pool worker, another machine)
    wrote the file; a miss therefore costs one fresh look before it counts.
    """
    try:
        return fn()
    except FileNotFoundError:
        fs.invalidate_cache(path)
        return fn()


def read_bytes(url: str, **storage_options: Any) -> bytes:
    """Read a whole file. Raises ``FileNotFoundError`` when it does not exist."""
    fs, path = url_to_fs(url, **storage_options)
    return with_retries(
        lambda: _uncached_on_miss(fs, path, lambda: fs.cat_file(path)), url=url, what="read"
    )


def open_read(url: str, **storage_options: Any) -> IO[bytes]:
    """Open ``url`` for binary reading. Raises ``FileNotFoundError`` when it does not exist."""
    fs, path = url_to_fs(url, **storage_options)
    return with_retries(
        lambda: _uncached_on_miss(fs, path, lambda: fs.open(path, "rb")), url=url, what="open"
    )
