"""Transient-error retries: which failures retrying can cure, and how long to wait between tries.

:func:`with_retries` gives a call a fixed number of tries (reads, stats, uploads);
:func:`retry_until` retries until a deadline, for shard downloads that resume where the last try
stopped. Both wait with exponential backoff and jitter (:func:`backoff_s`) and let permanent errors
(:func:`is_transient`) through at once.
"""

from __future__ import annotations

import errno
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from shardloader.errors import ShardloaderError, StorageError

log = logging.getLogger("shardloader.storage")  # the package's log lines, under one name
T = TypeVar("T")

_NOT_TRANSIENT = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    FileExistsError,
)
# Errors that retrying cannot fix: programming or configuration errors, and ours.
_PERMANENT = (*_NOT_TRANSIENT, ShardloaderError, ValueError, TypeError, NotImplementedError)
_PERMANENT_NAMES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError"}
)
RETRIES = 5
BACKOFF_S = 0.2
MAX_BACKOFF_S = 10.0


def is_transient(err: BaseException) -> bool:
    """Whether retrying might cure ``err``: connection refused or reset, timeouts, 5xx, throttling.

    Missing files, denied access, bad requests (HTTP 4xx other than 408 and 429, S3 ``EINVAL``
    codes), missing credentials and shardloader's own errors are permanent.
    """
    if not isinstance(err, Exception) or isinstance(err, _PERMANENT):
        return False
    if type(err).__name__ in _PERMANENT_NAMES:
        return False
    if isinstance(err, OSError) and err.errno == errno.EINVAL:
        return False
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError (http://)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def backoff_s(attempt: int, *, base_s: float = BACKOFF_S, max_s: float = MAX_BACKOFF_S) -> float:
    """Delay before retry number ``attempt`` (1-based): doubling from ``base_s``, jittered ±50%.

    Never above ``max_s``: the cap applies after the jitter.
    """
    return min(max_s, base_s * 2 ** (attempt - 1) * (0.5 + random.random()))


def with_retries(fn: Callable[[], T], *, url: str, what: str, retries: int = RETRIES) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff and jitter.

    ``FileNotFoundError`` and other permanent errors (see :func:`is_transient`) pass through at
    once; after the last try a transient error becomes a :class:`StorageError` naming the URL and
    the cause.
    """
    for attempt in range(retries):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - fsspec backends raise anything
            if not is_transient(err):
                raise
            if attempt == retries - 1:
                raise StorageError(
                    f"{url}: {what} failed after {retries} tries ({type(err).__name__}: {err})"
                ) from err
            delay = backoff_s(attempt + 1)
            log.warning("%s: %s failed (%s); retrying in %.2fs", url, what, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def retry_until(
    fn: Callable[[], T],
    *,
    url: str,
    what: str,
    deadline_s: float,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors until ``deadline_s`` have passed.

    Retries wait with exponential backoff and jitter (:func:`backoff_s`), never past the deadline;
    ``fn`` should bound its own attempts (e.g. :func:`iter_download`'s ``timeout_s``). Permanent
    errors (:func:`is_transient`) pass through at once.

    Args:
        fn: One attempt.
        url: Named in log lines and errors.
        what: What is being done (``"download"``), for messages.
        deadline_s: Seconds after the first try after which no new try starts.
        stop: When set, waiting stops and a :class:`StorageError` is raised (used on shutdown).
        on_retry: Called with each transient error before the retry (e.g. to count retries).

    Raises:
        StorageError: Still failing at the deadline; names the URL, the tries and the last cause.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - fsspec backends raise anything
            if not is_transient(err):
                raise
            elapsed = time.monotonic() - start
            remaining = deadline_s - elapsed
            if remaining <= 0:
                raise StorageError(
                    f"{url}: {what} failed after {attempt} tries in {elapsed:.1f}s "
                    f"(last: {type(err).__name__}: {err}); check that the storage is reachable, "
                    "or allow longer with retry_deadline_s"
                ) from err
            delay = min(backoff_s(attempt), remaining)
            if on_retry is not None:
                on_retry(err)
            log.warning(
                "%s: %s try %d failed (%s: %s); retrying in %.2fs",
                url,
                what,
                attempt,
                type(err).__name__,
                err,
                delay,
            )
            if stop is not None and stop.wait(delay):
                raise StorageError(f"{url}: {what} stopped (shutting down)") from err
            if stop is None:
                time.sleep(delay)
