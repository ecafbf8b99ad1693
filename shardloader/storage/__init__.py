"""All byte I/O: the only package that imports fsspec (and, through it, s3fs).

Rule: only modules of this package import fsspec or s3fs; every other module reaches storage
through the names re-exported here (``storage.read_bytes``, ``from shardloader.storage import
OutputDir``). The one exception is :mod:`shardloader.testing`, whose loopback S3 server asks s3fs
whether it answers. A test that replaces a function (``monkeypatch.setattr``) must replace it where
it is looked up: ``storage.open_read`` for callers outside the package, the submodule's attribute
for callers inside it.

Paths are URLs (``s3://bucket/dir``, ``memory://x``) or local paths. Reads retry transient failures
with exponential backoff and jitter; writes go to a temporary name and are published whole
(``os.replace`` locally, a single PUT remotely), so a crash never leaves a half-written file under
its final name.

Modules, lower first (each imports only those above it; ``presigned`` imports none of them):

- ``retry``: which errors are transient; :func:`with_retries`, :func:`retry_until`, backoff.
- ``urls``: URL and path helpers, :func:`url_to_fs`, :func:`file_type`.
- ``download``: :func:`read_bytes`, :func:`open_read`, :func:`iter_download` (the bounded
  shard download used by :mod:`shardloader.cache_download`) and :func:`read_range` (one block of
  a shard, used by :mod:`shardloader.fetch_blocks`).
- ``presigned``: ranged reads of S3 objects by presigned URLs and plain HTTP GETs (the default
  for :func:`read_range` on s3fs; imported by ``urls`` and ``download``, imports neither).
- ``inputs``: :class:`InputFile` and :func:`list_files` (files, directories, globs).
- ``output``: :class:`OutputDir` and :class:`AtomicWriter`, write errors with a remedy
  (:func:`write_error`, :func:`writing`, :func:`write_file`) and the one-run-per-output lock.
"""

from shardloader.storage.download import (
    DOWNLOAD_BLOCK_BYTES,
    iter_download,
    open_read,
    read_bytes,
    read_range,
)
from shardloader.storage.inputs import InputFile, list_files
from shardloader.storage.output import (
    AtomicWriter,
    OutputDir,
    lock_output,
    unlock_output,
    write_error,
    write_file,
    writing,
)
from shardloader.storage.retry import (
    BACKOFF_S,
    MAX_BACKOFF_S,
    RETRIES,
    backoff_s,
    is_transient,
    retry_until,
    with_retries,
)
from shardloader.storage.urls import (
    dirname,
    file_type,
    is_local,
    is_url,
    join,
    normalize,
    relpath,
    url_to_fs,
)

__all__ = [
    "BACKOFF_S",
    "DOWNLOAD_BLOCK_BYTES",
    "MAX_BACKOFF_S",
    "RETRIES",
    "AtomicWriter",
    "InputFile",
    "OutputDir",
    "backoff_s",
    "dirname",
    "file_type",
    "is_local",
    "is_transient",
    "is_url",
    "iter_download",
    "join",
    "list_files",
    "lock_output",
    "normalize",
    "open_read",
    "read_bytes",
    "read_range",
    "relpath",
    "retry_until",
    "unlock_output",
    "url_to_fs",
    "with_retries",
    "write_error",
    "write_file",
    "writing",
]
