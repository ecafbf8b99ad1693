"""Shard formats: the :class:`ShardFormat` protocol and the registry keyed by the manifest's format.

A format writes samples into one shard (a binary sink it does not own) and reads them back.
Samples are plain dicts: ``id`` (str), then ``text`` (str) or ``input_ids`` (numpy array), then
any kept fields. No format uses pickle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import IO, Any, Protocol

import numpy as np
import pyarrow as pa

from shardloader.errors import ConfigError

COMPRESSIONS = ("zstd", "none")


class ShardWriter(Protocol):
    """Writes the samples of one shard."""

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample: UTF-8 text bytes or a token id array, plus kept fields."""

    def write_columns(
        self, ids: pa.Array, texts: pa.Array, fields: Mapping[str, pa.Array], sizes: np.ndarray
    ) -> None:
        """Add many text samples at once; ``sizes`` are the UTF-8 byte lengths of ``texts``.

        The output is the same as writing the rows one by one.
        """

    def close(self) -> None:
        """Finish the shard (footer, compression frame); does not close the sink."""


class ShardFormat(Protocol):
    """A shard file format."""

    name: str

    def file_suffix(self, compression: str) -> str:
        """File name suffix for shards with this compression (``.arrow``, ``.tar.zst``)."""

    def open_writer(
        self,
        sink: Any,
        *,
        shard_name: str,
        fields: Mapping[str, str],
        token_dtype: str | None,
        compression: str,
        compression_level: int,
        batch_bytes: int,
    ) -> ShardWriter:
        """Start a shard written to ``sink`` (a binary file-like object)."""

    def iter_samples(
        self,
        source: IO[bytes],
        *,
        fields: Mapping[str, str],
        token_dtype: str | None,
        compression: str,
        where: str,
    ) -> Iterator[dict[str, Any]]:
        """Yield the samples of one shard in order; ``where`` names it in errors."""

    def read_columns(
        self,
        path: str,
        *,
        fields: Mapping[str, str],
        token_dtype: str | None,
        compression: str,
        where: str,
    ) -> ShardColumns:
        """Decode the local shard file ``path`` for random access; ``where`` names it in errors."""


class ShardColumns(Protocol):
    """A decoded shard, for random access by row."""

    num_rows: int

    def take(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """The values of rows ``rows`` (offsets in the shard, any order), column by column.

        Text and string fields come as ``str``, token ids as numpy arrays, ``json`` fields parsed.
        """


def get_format(name: str) -> ShardFormat:
    """Return the format registered as ``name``.

    Raises:
        ConfigError: No such format.
    """
    from shardloader.formats.arrow import ArrowFormat
    from shardloader.formats.tar import TarFormat

    registry: dict[str, ShardFormat] = {"arrow": ArrowFormat(), "tar": TarFormat()}
    if name not in registry:
        raise ConfigError(f"format {name!r} is not known; use one of {', '.join(registry)}")
    return registry[name]


def extra_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """The kept fields of a schema (everything but id, text and input_ids)."""
    return {k: v for k, v in fields.items() if k not in ("id", "text", "input_ids")}
