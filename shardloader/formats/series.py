"""A series of shards: one conversion task's samples cut into consecutive shards at size limits.

`ShardSeries` opens ``shard-{task}-{part}`` through a format's writer, closes it at
``shard_bytes`` of uncompressed payload or ``shard_samples`` samples, and publishes each shard
atomically (temporary name, then rename). Where the shards end depends only on the samples and the
limits, so whole-file tables and single samples give the same shards.

A failed write raises a `StorageError` that names the shard, the system's reason and a remedy
(`shardloader.storage.write_error`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from shardloader.errors import StorageError
from shardloader.formats import WriteSpec, get_format
from shardloader.formats.arrow import rows_before_limit
from shardloader.manifest import ShardInfo
from shardloader.storage import write_error

if TYPE_CHECKING:
    from shardloader.sources import DocumentTable
    from shardloader.storage import AtomicWriter, OutputDir

log = logging.getLogger(__name__)


class SeriesSettings(Protocol):
    """What a `ShardSeries` reads from the conversion settings (`ConvertConfig` has it all)."""

    @property
    def format(self) -> str:
        """Shard format name."""

    @property
    def shard_compression(self) -> str:
        """Compression name (resolved: ``zstd`` or ``none``)."""

    @property
    def compression_level(self) -> int:
        """Zstd level."""

    @property
    def batch_bytes(self) -> int:
        """Uncompressed bytes per Arrow record batch."""

    @property
    def shard_bytes(self) -> int:
        """Close a shard at this many uncompressed payload bytes."""

    @property
    def shard_samples(self) -> int | None:
        """Close a shard at this many samples (``None``: no limit)."""


class ShardSeries:
    """Writes one task's samples into consecutive shards, closing each at the configured limits.

    Args:
        out: The output directory.
        config: Format, compression and limits (a `ConvertConfig`).
        task: The task index: shards are named ``shard-{task:05d}-{part:04d}``; or, for a slice
            of a task, the name's middle as a string (``"00003-00001"``).
        fields: The shards' fields (name -> kind), as the manifest records them.
        token_dtype: Dtype of token ids in tokenized shards (``None`` for text).
        tmp_prefix: Prefix of the temporary names; unique per process, so two writers never
            share one.

    Raises:
        StorageError: Writing failed (full disk, read-only output, ...): the shard, the reason
            and a remedy.
    """

    def __init__(
        self,
        out: OutputDir,
        config: SeriesSettings,
        task: int | str,
        fields: Mapping[str, str],
        token_dtype: str | None,
        *,
        tmp_prefix: str = "",
    ) -> None:
        self._out, self._config = out, config
        self._task = task if isinstance(task, str) else f"{task:05d}"
        self._format = get_format(config.format)
        self._fields, self._token_dtype = fields, token_dtype
        self._suffix = self._format.file_suffix(config.shard_compression)
        self._tmp_prefix = tmp_prefix
        self._sink: AtomicWriter | None = None
        self._writer: Any = None
        self._name = ""
        self._num_samples = self._num_payload = self._num_tokens = 0
        self.shards: list[ShardInfo] = []
        # Per shard its record batches as [num_samples, offset, length], or None (tar shards).
        self.blocks: list[list[list[int]] | None] = []

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample (UTF-8 text bytes, or token ids already in the shard dtype)."""
        try:
            if self._writer is None:
                self._open()
            self._writer.write(doc_id, payload, fields)
            self._num_samples += 1
            if isinstance(payload, bytes):
                self._num_payload += len(payload)
            else:
                self._num_payload += payload.nbytes
                self._num_tokens += len(payload)
            self._close_if_full()
        except OSError as err:
            raise self._error(err) from err

    def write_table(self, table: DocumentTable) -> None:
        """Add a whole file of text samples; same shards and bytes as writing them one by one."""
        try:
            self._write_table(table)
        except OSError as err:
            raise self._error(err) from err

    def _write_table(self, table: DocumentTable) -> None:
        start, n = 0, len(table.sizes)
        while start < n:
            if self._writer is None:
                self._open()
            take = rows_before_limit(
                table.sizes[start:], self._num_payload, self._config.shard_bytes
            )
            if self._config.shard_samples:
                take = min(take, self._config.shard_samples - self._num_samples)
            part = table.slice(start, take)
            self._writer.write_columns(part.ids, part.texts, part.fields, part.sizes)
            self._num_samples += take
            self._num_payload += int(part.sizes.sum())
            start += take
            self._close_if_full()

    def _error(self, err: OSError) -> StorageError:
        if isinstance(err, StorageError):
            return err
        name = self._name or f"shard-{self._task}-{len(self.shards):04d}{self._suffix}"
        return write_error(self._out.url_of(name), err)

    def _close_if_full(self) -> None:
        limit = self._config.shard_samples
        if self._num_payload >= self._config.shard_bytes or (limit and self._num_samples >= limit):
            self._close_shard()

    def _open(self) -> None:
        stem = f"shard-{self._task}-{len(self.shards):04d}"
        self._name = stem + self._suffix
        self._sink = self._out.open_atomic(self._name, tmp_prefix=self._tmp_prefix)
        spec = WriteSpec(
            shard_name=stem,
            fields=self._fields,
            token_dtype=self._token_dtype,
            compression=self._config.shard_compression,
            compression_level=self._config.compression_level,
            batch_bytes=self._config.batch_bytes,
        )
        self._writer = self._format.open_writer(self._sink, spec)
        self._num_samples = self._num_payload = self._num_tokens = 0

    def _close_shard(self) -> None:
        assert self._sink is not None
        self._writer.close()
        self._sink.commit()
        self.blocks.append(getattr(self._writer, "blocks", None))
        self.shards.append(
            ShardInfo(
                path=self._name,
                num_samples=self._num_samples,
                num_bytes=self._sink.num_bytes,
                checksum=self._sink.sha256,
                num_tokens=self._num_tokens,
            )
        )
        self._writer = self._sink = None

    def close(self) -> list[ShardInfo]:
        """Finish the open shard and return all shards written."""
        if self._writer is not None:
            try:
                self._close_shard()
            except OSError as err:
                raise self._error(err) from err
        return self.shards

    def abort(self) -> None:
        """Drop the open shard's temporary file (best effort: this runs while an error unwinds)."""
        if self._sink is not None:
            try:
                self._sink.abort()
            except OSError as err:  # a full disk fails the flush in close() again
                log.debug("%s: could not drop the temporary file (%s)", self._name, err)
