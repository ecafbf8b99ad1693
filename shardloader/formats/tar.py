"""WebDataset-compatible tar shards, optionally zstd-compressed (``.tar.zst``).

Each sample is a group of members sharing a key (``{shard}-{index:07d}``): ``.txt`` holds the
UTF-8 text, or ``.npy`` the token ids (a numpy ``.npy`` file, never pickled); ``.json`` holds the
id and the kept fields. ``webdataset.WebDataset(urls)`` reads them as they are. Member headers
carry fixed times and owners, so the same input always gives the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
import zstandard

from shardloader.errors import ShardError
from shardloader.formats import extra_fields


class TarShardWriter:
    """Streams samples as tar members, through a zstd frame when compressed."""

    def __init__(
        self, sink: Any, *, shard_name: str, compression: str, compression_level: int
    ) -> None:
        self._zstd = None
        stream: Any = sink
        if compression == "zstd":
            self._zstd = zstandard.ZstdCompressor(level=compression_level).stream_writer(
                sink, closefd=False
            )
            stream = self._zstd
        self._tar = tarfile.open(  # noqa: SIM115 - closed in close()
            fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT
        )
        self._prefix = shard_name
        self._index = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0
        self._tar.addfile(info, io.BytesIO(data))

    def write(
        self, doc_id: str, payload: bytes | np.ndarray, fields: Mapping[str, Any] | None
    ) -> None:
        """Add one sample as ``key.txt`` or ``key.npy``, plus ``key.json``."""
        key = f"{self._prefix}-{self._index:07d}"
        self._index += 1
        meta = {"id": doc_id, **(fields or {})}
        self._add(key + ".json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        if isinstance(payload, bytes):
            self._add(key + ".txt", payload)
        else:
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(payload), allow_pickle=False)
            self._add(key + ".npy", buf.getvalue())

    def close(self) -> None:
        """Write the tar end blocks and end the zstd frame."""
        self._tar.close()
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
            self._zstd.close()


class TarFormat:
    """WebDataset tar shards (``.tar`` or ``.tar.zst``)."""

    name = "tar"

    def file_suffix(self, compression: str) -> str:
        """``.tar.zst`` when compressed, else ``.tar``."""
        return ".tar.zst" if compression == "zstd" else ".tar"

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
    ) -> TarShardWriter:
        """Start a tar shard."""
        return TarShardWriter(
            sink,
            shard_name=shard_name,
            compression=compression,
            compression_level=compression_level,
        )

    def iter_samples(
        self,
        source: IO[bytes],
        *,
        fields: Mapping[str, str],
        token_dtype: str | None,
        compression: str,
        where: str,
    ) -> Iterator[dict[str, Any]]:
        """Yield the samples of a tar shard in member order."""
        stream: Any = source
        if compression == "zstd":
            stream = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        extras = list(extra_fields(fields))
        payload = "input_ids" if "input_ids" in fields else "text"
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                key, parts = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    member_key, _, ext = base.partition(".")
                    if key is not None and member_key != key:
                        yield _sample(parts, payload, extras, f"{where}:{key}")
                        parts = {}
                    key = member_key
                    reader = tar.extractfile(member)
                    parts[ext] = reader.read() if reader else b""
                if key is not None:
                    yield _sample(parts, payload, extras, f"{where}:{key}")
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as err:
            raise ShardError(f"{where}: not a readable tar shard ({err})") from err


def _sample(parts: dict[str, bytes], payload: str, extras: list[str], where: str) -> dict[str, Any]:
    try:
        meta = json.loads(parts["json"])
        sample: dict[str, Any] = {"id": meta["id"]}
        if payload == "text":
            sample["text"] = parts["txt"].decode("utf-8")
        else:
            sample["input_ids"] = np.load(io.BytesIO(parts["npy"]), allow_pickle=False)
    except (KeyError, ValueError) as err:
        raise ShardError(f"{where}: incomplete or undecodable sample ({err!r})") from err
    for key in extras:
        sample[key] = meta.get(key)
    return sample
