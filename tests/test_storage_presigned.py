"""Ranged reads of S3 objects by presigned URLs (shardloader.storage.presigned), on the loopback
S3 server: the same bytes and errors as through s3fs, refreshed URLs, and the fallbacks."""

from __future__ import annotations

import errno
import itertools
import os
import time

import fsspec
import pytest

from shardloader import storage
from shardloader.storage import presigned

pytestmark = pytest.mark.s3

SLOW = {"presigned_ranges": False}
_ids = itertools.count()


@pytest.fixture
def obj(s3_server):
    """A 300 kB object in a fresh bucket: (url, data)."""
    bucket = f"presigned-{os.getpid()}-{next(_ids)}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    data = os.urandom(300_000)
    url = f"s3://{bucket}/shard.bin"
    fs.pipe_file(url, data)
    return url, data


def presigner(url: str, **options):
    return presigned.presigner_for(storage.url_to_fs(url, **options)[0])


def read(url: str, offset: int, length: int, **options) -> bytes | str:
    """The bytes, or the error (type and errno) for comparing the two paths."""
    try:
        return storage.read_range(url, offset, length, timeout_s=30, storage_options=options)
    except OSError as err:
        return f"{type(err).__name__} {err.errno}"


def test_same_bytes_and_errors_as_through_s3fs(obj):
    url, data = obj
    size = len(data)
    p = presigner(url)
    gets = p.gets
    ranges = [(0, 1), (123_457, 65_536), (size - 1000, 1000), (size - 1000, 5000), (0, size + 9)]
    ranges += [(size, 10), (size + 100, 10)]  # past the end: refused (EINVAL) both ways
    for offset, length in ranges:
        fast = read(url, offset, length)
        assert fast == read(url, offset, length, **SLOW), (offset, length)
        if offset < size:
            assert fast == data[offset : offset + length]
        else:
            assert fast == f"OSError {errno.EINVAL}"
    assert p.gets - gets == len(ranges)  # every read went by presigned URL
    assert not p.disabled


def test_missing_object_names_the_s3_url(obj):
    url, _ = obj
    missing = url.replace("shard.bin", "missing.bin")
    with pytest.raises(FileNotFoundError) as caught:
        storage.read_range(missing, 0, 10, timeout_s=30)
    assert missing in str(caught.value)
    assert "X-Amz" not in str(caught.value)
    assert not presigner(url).disabled


def test_expired_url_is_signed_again(obj, monkeypatch):
    url, data = obj
    monkeypatch.setattr(presigned, "PRESIGN_EXPIRES_S", 1)
    monkeypatch.setattr(presigned, "REFRESH_MARGIN_S", -3600)  # use URLs past their expiry
    assert storage.read_range(url, 10, 100, timeout_s=30) == data[10:110]
    p = presigner(url)
    signed, gets = p.signed, p.gets
    time.sleep(2.5)
    assert storage.read_range(url, 1000, 100, timeout_s=30) == data[1000:1100]
    assert (p.signed - signed, p.gets - gets) == (1, 2)  # refused as expired, signed, read
    assert not p.disabled


def test_disabled_fast_path_reads_through_s3fs(obj):
    url, data = obj
    p = presigner(url)
    gets = p.gets
    assert storage.read_range(url, 5, 50, timeout_s=30, storage_options=SLOW) == data[5:55]
    assert p.gets == gets
    fs, path = storage.url_to_fs(url, requester_pays=True)
    assert not presigned.supports(fs, path)  # options a presigned URL cannot carry


def test_refused_url_falls_back_to_s3fs_for_good(obj, monkeypatch):
    url, data = obj
    sign = presigned._Presigner.url

    async def bad_signature(self, path, *, fresh=False):
        return (await sign(self, path, fresh=fresh)).replace(
            "X-Amz-Signature=", "X-Amz-Signature=0"
        )

    monkeypatch.setattr(presigned._Presigner, "url", bad_signature)
    p = presigner(url)
    gets = p.gets
    try:
        assert storage.read_range(url, 7, 70, timeout_s=30) == data[7:77]
        assert p.disabled  # refused, signed again, refused: s3fs read it
        assert p.gets - gets == 2
        assert storage.read_range(url, 8, 80, timeout_s=30) == data[8:88]
        assert p.gets - gets == 2
    finally:
        p.disabled = False


def test_wrong_secret_is_permission_error(obj, s3_server):
    url, _ = obj
    options = {**s3_server.storage_options, "secret": "wrong"}
    with pytest.raises(PermissionError) as caught:
        storage.read_range(url, 0, 10, timeout_s=30, storage_options=options)
    assert "X-Amz" not in str(caught.value)
