"""Ranged reads of S3 objects by presigned URLs: one plain HTTP GET per block, no botocore per GET.

A block of a shard is one ranged GET (:func:`shardloader.storage.download.read_range`). Through
s3fs each GET costs the reading process about 1.7 ms of CPU, nearly all in botocore (building,
signing and parsing the request), which in block mode sets the time of an epoch. Here an object's
``GET`` is presigned once (SigV4 query signature, valid :data:`PRESIGN_EXPIRES_S`), with the
credentials, endpoint and region s3fs uses (a second client from s3fs's session and options),
and each block is a plain ``GET`` with ``Range: bytes=a-b`` through one pooled, keep-alive aiohttp
session on s3fs's event loop.

Cost, measured on a busy 2-core machine against the loopback S3 server (rclone), 765 blocks of
about 54 KB from 8 threads, CPU per GET of the reading process: the bare aiohttp GET 0.42-0.64
ms (urllib3's pool called from the threads: 0.57-0.81 ms, and no deadline on the whole body);
:func:`shardloader.storage.read_range` 0.9-1.3 ms this way, 2.5-3.1 ms through s3fs.

Errors: 404 is ``FileNotFoundError``, 5xx, 408, 429 and broken connections are transient
``OSError`` (:func:`shardloader.storage.retry.is_transient`), and the request and the body must
each come within ``timeout_s`` (``TimeoutError``). A 400 or 403 presigns the URL again (it may
have expired, or the credentials rotated) and tries once more; if that fails too, the caller reads
through s3fs, which gives the authoritative answer (``PermissionError`` for denied access) and,
when s3fs succeeds where the presigned URL did not (a redirect to another region, a server that
refuses query signatures), turns the fast path off for that filesystem. A presigned URL is a
credential: it is never logged or put in an error message; errors name the ``s3://`` URL.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

log = logging.getLogger("shardloader.storage")

PRESIGN_EXPIRES_S = 3600
REFRESH_MARGIN_S = 300  # a URL this close to expiring is signed again before use
MAX_URLS = 4096  # presigned URLs kept per filesystem (the least recently used go first)
MAX_CONNECTIONS = 32  # pooled keep-alive connections per filesystem
OPTION = "presigned_ranges"  # storage_options key: False reads blocks through s3fs instead

# storage_options (s3fs arguments) under which a presigned URL would not do what s3fs does.
_UNSUPPORTED_KWARGS = (
    "SSECustomerKey",
    "SSECustomerAlgorithm",
    "RequestPayer",
    "ExpectedBucketOwner",
)


class FastPathUnusable(Exception):  # noqa: N818 - a signal to the caller, not a failure of the read
    """The presigned read cannot answer for this object: read it through s3fs instead."""


def supports(fs: Any, path: str) -> bool:
    """Whether reads of ``path`` on ``fs`` may go by presigned URL (s3fs, plain options)."""
    if not hasattr(fs, "_call_s3") or not hasattr(fs, "split_path"):
        return False
    if getattr(fs, "requester_pays", False) or getattr(fs, "version_aware", False):
        return False
    extra = getattr(fs, "s3_additional_kwargs", None) or {}
    if any(name in extra for name in _UNSUPPORTED_KWARGS):
        return False
    presigner = _PRESIGNERS.get(fs)
    return presigner is None or not presigner.disabled


class _Presigner:
    """Presigned URLs of one s3fs filesystem and the HTTP session that fetches them."""

    def __init__(self, fs: Any) -> None:
        self.pid = os.getpid()
        self.disabled = False
        self.signed = 0  # URLs presigned (counted on the event loop, as are gets)
        self.gets = 0  # GETs of presigned URLs
        self._fs_ref = weakref.ref(fs)
        self._lock = threading.Lock()
        self._urls: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._client: Any = None
        self._client_cm: Any = None
        self._session: Any = None

    async def _make_client(self) -> Any:
        from aiobotocore.config import AioConfig
        from botocore import UNSIGNED

        fs = self._fs_ref()
        if fs is None:
            raise FastPathUnusable("filesystem gone")
        await fs.set_session()  # s3fs's own session (credentials, profile) comes first
        client_kwargs = dict(fs.client_kwargs)
        init_kwargs = {
            "aws_access_key_id": fs.key,
            "aws_secret_access_key": fs.secret,
            "aws_session_token": fs.token,
            "endpoint_url": fs.endpoint_url,
        }
        init_kwargs = {
            k: v for k, v in init_kwargs.items() if v is not None and v != client_kwargs.get(k)
        }
        if "use_ssl" not in client_kwargs:
            init_kwargs["use_ssl"] = fs.use_ssl
        config_kwargs = fs._prepare_config_kwargs()
        # s3fs's client presigns with SigV2 unless a signature version is configured; S3 (and
        # servers like rclone) want SigV4.
        config_kwargs["signature_version"] = "s3v4"
        if fs.anon:
            for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
                init_kwargs.pop(name, None)
                client_kwargs.pop(name, None)
            config_kwargs["signature_version"] = UNSIGNED
        creator = fs.session.create_client(
            "s3", config=AioConfig(**config_kwargs), **init_kwargs, **client_kwargs
        )
        self._client = await creator.__aenter__()
        self._client_cm = creator
        return self._client

    async def url(self, path: str, *, fresh: bool = False) -> str:
        """A presigned GET URL for ``path`` (``bucket/key``), signed again if old or ``fresh``."""
        now = time.monotonic()
        with self._lock:
            got = self._urls.get(path)
            if got is not None and not fresh and got[1] - REFRESH_MARGIN_S > now:
                self._urls.move_to_end(path)
                return got[0]
        client = self._client or await self._make_client()
        bucket, key, _ = self._fs_ref().split_path(path)  # type: ignore[union-attr]
        expires_s = PRESIGN_EXPIRES_S
        url = await client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )
        self.signed += 1
        with self._lock:
            self._urls[path] = (url, now + expires_s)
            self._urls.move_to_end(path)
            while len(self._urls) > MAX_URLS:
                self._urls.popitem(last=False)
        return str(url)

    def session(self) -> Any:
        """The pooled HTTP session (created on first use, on the event loop)."""
        if self._session is None:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the HTTP session and the presigning client (best effort, at garbage collection)."""
        session, client_cm = self._session, self._client_cm
        self._session = self._client = self._client_cm = None

        async def close_all() -> None:
            if session is not None:
                await session.close()
            if client_cm is not None:
                await client_cm.__aexit__(None, None, None)

        if loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(close_all(), loop)


_PRESIGNERS: weakref.WeakKeyDictionary[Any, _Presigner] = weakref.WeakKeyDictionary()
_PRESIGNERS_LOCK = threading.Lock()


def presigner_for(fs: Any) -> _Presigner:
    """The presigner of ``fs`` (one per filesystem instance and process)."""
    with _PRESIGNERS_LOCK:
        presigner = _PRESIGNERS.get(fs)
        if presigner is None or presigner.pid != os.getpid():
            presigner = _Presigner(fs)
            _PRESIGNERS[fs] = presigner
            weakref.finalize(fs, presigner.close, fs.loop)
        return presigner


def disable(fs: Any, url: str, why: str) -> None:
    """Read ``fs`` through s3fs from now on (logged once, naming ``url``, never a signed URL)."""
    presigner = presigner_for(fs)
    if not presigner.disabled:
        presigner.disabled = True
        log.info("%s: ranged reads go through s3fs from now on (presigned GET: %s)", url, why)


def _body_start(status: int, content_range: str | None) -> int | None:
    """Where a 200/206 body starts in the object (``Content-Range: bytes a-b/n``), if known."""
    if content_range is None:
        return 0 if status == 200 else None  # 200 without a range: the whole object
    unit, _, rest = content_range.partition(" ")
    first = rest.split("-", 1)[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


async def _get(
    session: Any, signed: str, offset: int, length: int, timeout_s: float
) -> tuple[int, bytes]:
    """One ranged GET: the status and (for 200/206) up to ``length + 1`` bytes of the body.

    A 200/206 whose body does not start at ``offset`` comes back as status 0.
    """
    headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
    async with asyncio.timeout(timeout_s):
        response = await session.get(signed, headers=headers, allow_redirects=False)
    try:
        if response.status not in (200, 206):
            async with asyncio.timeout(timeout_s):
                body = await response.content.read(4096)  # an S3 error document
            return response.status, body
        if _body_start(response.status, response.headers.get("Content-Range")) != offset:
            response.close()  # a server that ignores ranges: not read whole
            return 0, b""
        declared = response.content_length
        if declared is not None and declared <= length:
            async with asyncio.timeout(timeout_s):
                return (
                    response.status,
                    await response.read(),
                )  # bounded; one wake-up, not one a chunk
        parts: list[bytes] = []
        have = 0
        async with asyncio.timeout(timeout_s):
            # Read to the end of the body (one byte past the range at most), so that the
            # connection goes back to the pool; a server that ignores the range is not read whole.
            while have <= length:
                chunk = await response.content.read(length + 1 - have)
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
        if have > length:
            response.close()
        return response.status, b"".join(parts)
    finally:
        response.release()


async def read_range(
    fs: Any, path: str, url: str, offset: int, length: int, timeout_s: float
) -> bytes:
    """The ``length`` bytes of ``path`` at ``offset`` by presigned GET (run on ``fs.loop``).

    Args:
        fs: The s3fs filesystem (:func:`supports` said yes).
        path: ``bucket/key``.
        url: The ``s3://`` URL, for messages.
        offset: First byte.
        length: Bytes wanted; fewer come back only where the object ends first.
        timeout_s: Bound on the request and on the body, each.

    Raises:
        FastPathUnusable: Presigning failed, or the presigned URL was refused twice (400/403) or
            redirected: read through s3fs.
        FileNotFoundError: The object does not exist.
        TimeoutError: The request or the body took longer than ``timeout_s``.
        OSError: 5xx, 408, 429 or a broken connection (transient).
    """
    import aiohttp

    presigner = presigner_for(fs)
    what = f"{url}: GET of bytes [{offset}, {offset + length})"
    for fresh in (False, True):
        try:
            signed = await presigner.url(path, fresh=fresh)
        except Exception as err:  # noqa: BLE001 - any failure to sign: s3fs reads instead
            raise FastPathUnusable(f"presigning failed ({type(err).__name__})") from None
        presigner.gets += 1
        try:
            status, body = await _get(presigner.session(), signed, offset, length, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{what}: no answer within timeout_s={timeout_s:g}") from None
        except aiohttp.ClientError as err:
            # aiohttp's messages may carry the request URL, which is a credential here.
            message = str(err).replace(signed, url).split("?X-Amz-", 1)[0]
            raise OSError(errno.EIO, f"{what}: {type(err).__name__}: {message}") from None
        if status in (200, 206):
            return body[:length]
        if status == 416:  # offset at or past the end: refused, as s3fs refuses it
            raise OSError(errno.EINVAL, f"{what}: InvalidRange (past the end of the object)")
        if status == 404:
            raise FileNotFoundError(errno.ENOENT, f"{url}: no such object")
        if status >= 500 or status in (408, 429):
            raise OSError(errno.EIO, f"{what}: HTTP {status} {_error_code(body)}")
        if status in (400, 403) and not fresh:
            continue  # expired, or credentials rotated: sign again, once
        break
    raise FastPathUnusable(f"HTTP {status} {_error_code(body)}".strip())


def _error_code(body: bytes) -> str:
    """The ``<Code>`` of an S3 error document, or ``""``."""
    text = body.decode("utf-8", "replace")
    start = text.find("<Code>")
    end = text.find("</Code>", start)
    return text[start + 6 : end] if start >= 0 and end > start else ""
