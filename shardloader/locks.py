"""Locks on files that processes share and may unlink under each other, for the node cache.

Every lock is an ``flock``, which dies with its process, so a ``kill -9`` leaves no lock held. A
holder may unlink the file it locked (the cache deletes a lock file once a download is done, and
evicts entries), so a lock taken on an open file counts only while the file still has its name:
each function here compares the inode with the name after locking, and treats a mismatch as "not
locked" (or locks again).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator


def same_file(st: os.stat_result, path: str) -> bool:
    """Whether the open file ``st`` still has the name ``path``."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_nlink > 0 and (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


@contextlib.contextmanager
def exclusive(path: str, *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed); with ``remove``, delete it after.

    A lock file may be unlinked by its holder, so after locking the inode is compared with the
    name; on a mismatch the lock is taken again on the new file.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if same_file(os.fstat(fd), path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        if remove:
            unlink_and_close(path, fd)
        else:
            os.close(fd)


def try_exclusive(path: str, *, create: bool = True) -> int | None:
    """An fd of ``path`` locked exclusively, or None if another holds a lock on it.

    Without ``create``, ``path`` is opened read-only (another user's file in a shared folder
    may be), and None also means it is missing.
    """
    flags = os.O_RDWR | os.O_CREAT if create else os.O_RDONLY
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not same_file(os.fstat(fd), path):
        os.close(fd)
        return None
    return fd


def unlink_and_close(path: str, fd: int) -> None:
    """Delete ``path`` (if it is still there), then close ``fd``, which drops its lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)
