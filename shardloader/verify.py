"""Read a converted dataset back: every sample in order, and a full check of every shard.

``verify`` re-reads each shard, compares its size and checksum with the manifest, decodes every
sample and compares the count, and names each bad shard with what is wrong. Decoding applies the
formats' checks for hostile shards (member names and types, JSON shapes, token dtype and ids below
the vocabulary size), so a shard that streaming would refuse never verifies as OK.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from shardloader import storage
from shardloader.errors import ShardError
from shardloader.formats import ReadSpec, get_format
from shardloader.manifest import Manifest, ShardInfo, iter_shard_urls, read_manifest

log = logging.getLogger(__name__)


def read_shard(url: str, shard: ShardInfo, manifest: Manifest, *, check: bool = True) -> bytes:
    """Fetch a shard's bytes; with ``check``, compare size and checksum with the manifest.

    Raises:
        ShardError: The shard is missing or does not match the manifest.
    """
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise ShardError(f'{url}: shard is missing ({err}); run "shardloader verify"') from err
    if check:
        if len(data) != shard.num_bytes:
            raise ShardError(
                f"{url}: size {len(data)} bytes does not match manifest {shard.num_bytes} "
                "(truncated or replaced?)"
            )
        digest = hashlib.new(manifest.checksum_algorithm, data).hexdigest()
        if digest != shard.checksum:
            raise ShardError(
                f"{url}: {manifest.checksum_algorithm} {digest[:12]}… does not match manifest "
                f"{shard.checksum[:12]}…; the shard was modified or corrupted"
            )
    return data


def decode_shard(
    data: bytes,
    manifest: Manifest,
    *,
    where: str,
    num_samples: int | None = None,
    shard_path: str = "",
) -> Iterator[dict[str, Any]]:
    """Yield the samples held in a shard's bytes, checked as the formats check them.

    Raises:
        ShardError: The shard does not decode, or (with ``num_samples``) holds another count.
    """
    spec = ReadSpec.for_manifest(
        manifest, where=where, num_samples=num_samples, shard_path=shard_path
    )
    yield from get_format(manifest.format).iter_samples(io.BytesIO(data), spec)


def iter_samples(dataset: str, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield every sample of a dataset in manifest order, checking shards as they are read.

    Each sample gets ``sample_id``, its global position. For training use ``ShardDataset``;
    this is for inspection, tests and small jobs.
    """
    manifest = read_manifest(dataset)
    n = 0
    for shard, url in iter_shard_urls(dataset, manifest):
        data = read_shard(url, shard, manifest)
        samples = decode_shard(
            data, manifest, where=url, num_samples=shard.num_samples, shard_path=shard.path
        )
        for offset, sample in enumerate(samples):
            if limit is not None and n >= limit:
                return
            sample["sample_id"] = shard.first_sample_id + offset
            yield sample
            n += 1


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
        num_shards: Shards checked.
        num_samples: Samples decoded.
        num_bytes: Bytes read.
        problems: One message per bad shard, each naming the shard.
    """

    num_shards: int = 0
    num_samples: int = 0
    num_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every shard matched the manifest."""
        return not self.problems


def verify(dataset: str) -> VerifyReport:
    """Re-read every shard of ``dataset``: size, checksum, decodability and sample count.

    Raises:
        ManifestError: The manifest itself is missing or invalid.
    """
    manifest = read_manifest(dataset)
    report = VerifyReport()
    for shard, url in iter_shard_urls(dataset, manifest):
        report.num_shards += 1
        try:
            data = read_shard(url, shard, manifest)
            report.num_bytes += len(data)
            samples = decode_shard(
                data, manifest, where=url, num_samples=shard.num_samples, shard_path=shard.path
            )
            report.num_samples += sum(1 for _ in samples)
        except ShardError as err:
            report.problems.append(str(err))
            log.error("%s", err)
    return report
