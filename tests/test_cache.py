"""ShardFetcher: local shards as they are, remote ones through the bounded node-local cache.

The fast tests use ``memory://`` and ``flaky://`` (a filesystem defined here that fails as told);
the ``s3`` tests use the loopback ``rclone serve s3``, with real processes for sharing, a server
stopped and started again on its port, a server frozen with SIGSTOP, and a ``kill -9``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import multiprocessing as mp
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from shardloader import storage
from shardloader.cache import LocalShard, default_cache_dir, entry_key
from shardloader.errors import ShardError, StorageError
from shardloader.fetch import ShardFetcher
from shardloader.testing import S3Server, find_rclone

KiB = 1 << 10
MiB = 1 << 20
_names = itertools.count()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(size: int, seed: int) -> bytes:
    """Deterministic bytes (cheaper than os.urandom for repeatable tests)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds (a condition, not a timed sleep, synchronizes)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def cache_bytes_on_disk(cache_dir: Path) -> int:
    return sum(p.stat().st_size for sub in ("shards", "tmp") for p in (cache_dir / sub).iterdir())


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for sub in ("tmp", "locks") for p in (cache_dir / sub).iterdir())


class FlakyFS(AbstractFileSystem):
    """An in-memory filesystem whose opens fail as scripted, per path.

    ``script[path]`` lists what each successive open does: ``"ok"``, ``"reset@N"`` (connection
    reset after N bytes), ``"corrupt"`` (flips a byte), ``"refused"``, ``"denied"``. With ``gate``
    set to an unset Event, reads wait for it (``active``/``max_active`` count readers at once).
    """

    protocol = ("flaky",)
    objects: ClassVar[dict[str, bytes]] = {}
    script: ClassVar[dict[str, list[str]]] = {}
    opens: ClassVar[dict[str, int]] = {}
    gate: ClassVar[threading.Event | None] = None
    active: ClassVar[int] = 0
    max_active: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BytesIO:
        path = self._strip_protocol(path)
        FlakyFS.opens[path] = FlakyFS.opens.get(path, 0) + 1
        todo = FlakyFS.script.get(path, [])
        action = todo.pop(0) if todo else "ok"
        if action == "refused":
            raise ConnectionRefusedError(f"flaky://{path}: refused")
        if action == "denied":
            raise PermissionError(f"flaky://{path}: access denied")
        if path not in FlakyFS.objects:
            raise FileNotFoundError(path)
        return _FlakyReader(FlakyFS.objects[path], action)


class _FlakyReader(io.BytesIO):
    def __init__(self, data: bytes, action: str) -> None:
        if action == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        super().__init__(data)
        self._fail_at = int(action.split("@")[1]) if action.startswith("reset@") else None
        with FlakyFS.lock:
            FlakyFS.active += 1
            FlakyFS.max_active = max(FlakyFS.max_active, FlakyFS.active)
        self._counted = True

    def read(self, size: int | None = -1) -> bytes:
        if FlakyFS.gate is not None:
            FlakyFS.gate.wait(30)
        if self._fail_at is not None and self.tell() + (size or 0) > self._fail_at:
            if self.tell() < self._fail_at:
                return super().read(self._fail_at - self.tell())
            raise ConnectionResetError("connection reset by peer")
        return super().read(size)

    def close(self) -> None:
        if self._counted:
            self._counted = False
            with FlakyFS.lock:
                FlakyFS.active -= 1
        super().close()


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


@pytest.fixture
def flaky() -> Iterator[type[FlakyFS]]:
    FlakyFS.objects.clear()
    FlakyFS.script.clear()
    FlakyFS.opens.clear()
    FlakyFS.gate = None
    FlakyFS.active = FlakyFS.max_active = 0
    yield FlakyFS
    if FlakyFS.gate is not None:
        FlakyFS.gate.set()
    FlakyFS.gate = None


def put_flaky(name: str, data: bytes, *script: str) -> dict[str, Any]:
    path = f"{name}-{next(_names)}.bin"
    FlakyFS.objects[path] = data
    FlakyFS.script[path] = list(script)
    return {"url": f"flaky://{path}", "num_bytes": len(data), "checksum": sha(data)}


def put_memory(data: bytes) -> dict[str, Any]:
    url = f"memory://cache-test/{os.getpid()}-{next(_names)}.bin"
    fsspec.filesystem("memory").pipe_file(url, data)
    return {"url": url, "num_bytes": len(data), "checksum": sha(data)}


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def fetcher(cache_dir: Path) -> Iterator[ShardFetcher]:
    with ShardFetcher(cache_dir=str(cache_dir), timeout_s=5, retry_deadline_s=5) as f:
        yield f


# -- local shards -----------------------------------------------------------------------------


def test_local_path_and_file_url_are_served_in_place(tmp_path, fetcher, cache_dir):
    shard = tmp_path / "shard-00000.arrow"
    shard.write_bytes(b"abc" * 100)
    for url in (str(shard), f"file://{shard}"):
        with fetcher.open(url, num_bytes=300, checksum=sha(b"abc" * 100)) as local:
            assert local.path == str(shard)
    assert not cache_dir.exists()  # no cache, no copy
    assert fetcher.stats["cache_misses"] == fetcher.stats["cache_hits"] == 0


def test_local_shard_of_wrong_size_or_missing_is_refused(tmp_path, fetcher):
    shard = tmp_path / "shard-00001.arrow"
    shard.write_bytes(b"x" * 10)
    with pytest.raises(ShardError, match=r"shard-00001\.arrow: size 10 bytes .* manifest 11"):
        fetcher.open(str(shard), num_bytes=11, checksum="0" * 64)
    missing = tmp_path / "shard-00002.arrow"
    with pytest.raises(
        ShardError, match=r"shard-00002\.arrow: shard is missing.*shardloader verify"
    ):
        fetcher.open(str(missing), num_bytes=11, checksum="0" * 64)


def test_verify_local_checks_the_checksum(tmp_path, cache_dir):
    shard = tmp_path / "shard.arrow"
    shard.write_bytes(b"good bytes")
    with ShardFetcher(cache_dir=str(cache_dir), verify_local=True) as f:
        f.open(str(shard), num_bytes=10, checksum=sha(b"good bytes")).release()
        with pytest.raises(ShardError, match=f"does not match manifest {sha(b'good bytez')}"):
            f.open(str(shard), num_bytes=10, checksum=sha(b"good bytez"))
    with (  # on by default
        ShardFetcher(cache_dir=str(cache_dir)) as f,
        pytest.raises(ShardError, match="shard.arrow: sha256"),
    ):
        f.open(str(shard), num_bytes=10, checksum=sha(b"good bytez"))
    with ShardFetcher(cache_dir=str(cache_dir), verify_local=False) as f:  # off: size only
        f.open(str(shard), num_bytes=10, checksum=sha(b"good bytez")).release()


# -- construction -----------------------------------------------------------------------------


def test_construction_is_inert_and_the_default_dir_is_per_user(tmp_path):
    before = {t.name for t in threading.enumerate()}
    f = ShardFetcher(cache_dir=str(tmp_path / "not-yet"))
    assert not (tmp_path / "not-yet").exists()
    assert {t.name for t in threading.enumerate()} == before
    f.close()
    default = ShardFetcher().cache_dir
    assert default == default_cache_dir()
    assert default.endswith(f"shardloader-cache-{os.getuid()}")


def test_fetcher_pickles_with_its_settings_only(cache_dir):
    f = ShardFetcher(cache_dir=str(cache_dir), cache_bytes=123, timeout_s=7)
    copy = pickle.loads(pickle.dumps(f))
    assert (copy.cache_dir, copy.cache_bytes, copy.timeout_s) == (str(cache_dir), 123, 7)
    assert copy.stats["cache_hits"] == 0


def _use_inherited(f: ShardFetcher, shard: dict[str, Any], out: Any) -> None:
    with f.open(**shard) as local:
        out.put((Path(local.path).read_bytes(), f.stats["cache_hits"], f.stats["cache_misses"]))
    f.close()


def test_a_fetcher_copied_by_fork_starts_afresh_in_the_child(cache_dir):
    shards = [put_memory(blob(64 * KiB, 170 + i)) for i in range(2)]
    with ShardFetcher(cache_dir=str(cache_dir)) as f:
        f.open(**shards[0]).release()
        f.prefetch(**shards[1])  # the parent now has a prefetch thread (and may hold its lock)
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_use_inherited, args=(f, shards[0], out))
        child.start()
        assert out.get(timeout=60) == (blob(64 * KiB, 170), 1, 0)  # its own counters: one hit
        child.join(30)
        assert child.exitcode == 0
        f.open(**shards[1]).release()  # the parent's fetcher still works
        assert f.stats["cache_misses"] == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="cache_bytes=-1"):
        ShardFetcher(cache_bytes=-1)
    with pytest.raises(ValueError, match="timeout_s=0"):
        ShardFetcher(timeout_s=0)


# -- remote shards: memory:// and flaky:// ----------------------------------------------------


def test_download_is_checked_cached_and_then_a_hit(fetcher, cache_dir):
    data = blob(300 * KiB, 1)
    shard = put_memory(data)
    with fetcher.open(**shard) as local:
        assert Path(local.path).read_bytes() == data
        assert Path(local.path).parent == cache_dir / "shards"
    assert fetcher.stats["bytes_fetched"] == len(data)
    assert (fetcher.stats["cache_misses"], fetcher.stats["cache_hits"]) == (1, 0)
    with fetcher.open(**shard) as again:
        assert again.path == local.path
    assert fetcher.stats["bytes_fetched"] == len(data)  # nothing fetched for the hit
    assert fetcher.stats["cache_hits"] == 1
    assert leftovers(cache_dir) == []


def test_a_changed_shard_is_not_served_stale(fetcher):
    shard = put_memory(b"version one")
    fetcher.open(**shard).release()
    fsspec.filesystem("memory").pipe_file(shard["url"], b"version two")
    with fetcher.open(shard["url"], num_bytes=11, checksum=sha(b"version two")) as local:
        assert Path(local.path).read_bytes() == b"version two"
    assert fetcher.stats["cache_misses"] == 2


def test_two_datasets_with_same_names_do_not_collide(fetcher):
    a, b = put_memory(b"dataset a"), put_memory(b"dataset b")
    with fetcher.open(**a) as la, fetcher.open(**b) as lb:
        assert la.path != lb.path
        assert Path(la.path).read_bytes() == b"dataset a"
        assert Path(lb.path).read_bytes() == b"dataset b"


def test_transient_errors_are_retried_and_resume_where_they_stopped(flaky, fetcher):
    data = blob(10 * MiB, 2)
    shard = put_flaky("reset", data, "refused", "reset@5000000", "ok")
    with fetcher.open(**shard) as local:
        assert sha(Path(local.path).read_bytes()) == shard["checksum"]
    assert fetcher.stats["retries"] == 2
    assert fetcher.stats["bytes_fetched"] == len(data)  # resumed, not fetched again


def test_corrupt_download_is_fetched_again_once(flaky, fetcher, cache_dir):
    data = blob(64 * KiB, 3)
    shard = put_flaky("corrupt-once", data, "corrupt", "ok")
    with fetcher.open(**shard) as local:
        assert Path(local.path).read_bytes() == data
    assert fetcher.stats["bytes_fetched"] == 2 * len(data)


def test_corrupt_twice_names_the_url_and_both_checksums(flaky, fetcher, cache_dir):
    data = blob(64 * KiB, 4)
    bad = bytes([data[0] ^ 0xFF]) + data[1:]
    shard = put_flaky("corrupt", data, "corrupt", "corrupt", "ok")
    with pytest.raises(ShardError) as info:
        fetcher.open(**shard)
    message = str(info.value)
    assert message.startswith(shard["url"] + ": sha256 ")
    assert sha(bad) in message
    assert shard["checksum"] in message
    assert "shardloader verify" in message
    assert list((cache_dir / "shards").iterdir()) == []
    assert leftovers(cache_dir) == []


def test_wrong_size_is_refused_with_both_sizes(flaky, fetcher):
    shard = put_flaky("size", b"0123456789")
    shard["num_bytes"] = 12
    with pytest.raises(
        ShardError, match=r"10 bytes with sha256 \w+ do not match manifest 12 bytes"
    ):
        fetcher.open(**shard)
    shard["num_bytes"] = 8
    with pytest.raises(ShardError, match=r"size-\d+\.bin: longer than manifest 8 bytes"):
        fetcher.open(**shard)
    assert fetcher.stats["bytes_fetched"] == 2 * 10 + 2 * 9  # stops one byte past the manifest


def test_permanent_errors_fail_at_once(flaky, fetcher):
    missing = {"url": "flaky://nowhere.bin", "num_bytes": 1, "checksum": "0" * 64}
    with pytest.raises(ShardError, match=r"flaky://nowhere\.bin: shard is missing.*verify"):
        fetcher.open(**missing)
    denied = put_flaky("denied", b"secret", "denied", "ok")
    with pytest.raises(StorageError, match=r"flaky://denied-\d+\.bin: access denied"):
        fetcher.open(**denied)
    assert fetcher.stats["retries"] == 0


def test_transient_errors_past_the_deadline_name_url_tries_and_cause(flaky, cache_dir):
    shard = put_flaky("down", b"data", *["refused"] * 1000)
    with (
        ShardFetcher(cache_dir=str(cache_dir), retry_deadline_s=0.5) as f,
        pytest.raises(StorageError) as info,
    ):
        f.open(**shard)
    message = str(info.value)
    assert message.startswith(shard["url"] + ": download failed after ")
    assert "tries" in message
    assert "ConnectionRefusedError" in message
    assert f.stats["retries"] >= 1
    assert leftovers(cache_dir) == []


def test_threads_opening_one_shard_download_it_once(flaky, fetcher):
    shard = put_flaky("shared", blob(MiB, 5))
    FlakyFS.gate = threading.Event()
    paths: list[str] = []

    def reader() -> None:
        with fetcher.open(**shard) as local:
            paths.append(Path(local.path).read_bytes() == blob(MiB, 5) and local.path)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: FlakyFS.active == 1, "the first download")
    FlakyFS.gate.set()
    for t in threads:
        t.join(30)
    assert len(paths) == 4
    assert len(set(paths)) == 1
    assert all(paths)
    assert FlakyFS.opens[shard["url"].removeprefix("flaky://")] == 1
    assert (fetcher.stats["cache_misses"], fetcher.stats["cache_hits"]) == (1, 3)


# -- budget -----------------------------------------------------------------------------------


def test_budget_evicts_least_recently_used_never_pinned(cache_dir):
    size = 100 * KiB
    shards = [put_memory(blob(size, 10 + i)) for i in range(6)]
    with ShardFetcher(cache_dir=str(cache_dir), cache_bytes=3 * size) as f:
        pinned = [f.open(**shards[0]), f.open(**shards[1])]
        f.open(**shards[2]).release()
        f.open(**shards[3]).release()  # over budget: 2 evicted, the pinned ones stay
        assert cache_bytes_on_disk(cache_dir) <= 3 * size
        assert all(Path(p.path).exists() for p in pinned)
        pinned[0].release()
        f.open(**shards[3]).release()  # now 3 is more recent than 0
        f.open(**shards[4]).release()  # evicts 0 (least recently used), not 3
        names = {p.name for p in (cache_dir / "shards").iterdir()}
        key = {i: entry_key(s["url"], "sha256", s["checksum"]) for i, s in enumerate(shards)}
        assert {n[:32] for n in names} == {key[1], key[3], key[4]}
        assert f.stats["evictions"] == 2
        pinned[1].release()


def test_shard_larger_than_the_budget_is_served_then_evicted(cache_dir):
    big, small = put_memory(blob(300 * KiB, 20)), put_memory(blob(10 * KiB, 21))
    with ShardFetcher(cache_dir=str(cache_dir), cache_bytes=100 * KiB) as f:
        f.open(**small).release()
        with f.open(**big) as local:
            assert Path(local.path).read_bytes() == blob(300 * KiB, 20)
        assert cache_bytes_on_disk(cache_dir) <= 100 * KiB
        assert list((cache_dir / "shards").iterdir()) == []


def test_pinned_shards_may_exceed_the_budget_until_released(cache_dir):
    size = 100 * KiB
    shards = [put_memory(blob(size, 30 + i)) for i in range(3)]
    with ShardFetcher(cache_dir=str(cache_dir), cache_bytes=2 * size) as f:
        held = [f.open(**s) for s in shards]
        assert cache_bytes_on_disk(cache_dir) == 3 * size
        assert all(Path(h.path).read_bytes() == blob(size, 30 + i) for i, h in enumerate(held))
        for h in held:
            h.release()
        assert cache_bytes_on_disk(cache_dir) <= 2 * size


# -- prefetch ---------------------------------------------------------------------------------


def test_prefetch_runs_at_most_prefetch_threads_then_open_hits(flaky, cache_dir):
    shards = [put_flaky("pre", blob(256 * KiB, 40 + i)) for i in range(5)]
    FlakyFS.gate = threading.Event()
    with ShardFetcher(cache_dir=str(cache_dir), prefetch_threads=2) as f:
        for s in shards:
            f.prefetch(**s)
        wait_for(lambda: FlakyFS.active == 2, "two downloads")
        FlakyFS.gate.set()
        wait_for(lambda: len(list((cache_dir / "shards").iterdir())) == 5, "all prefetched")
        assert FlakyFS.max_active == 2
        for i, s in enumerate(shards):
            with f.open(**s) as local:
                assert Path(local.path).read_bytes() == blob(256 * KiB, 40 + i)
        assert (f.stats["cache_misses"], f.stats["cache_hits"]) == (5, 5)
        assert f.stats["bytes_fetched"] == 5 * 256 * KiB
        assert all(n == 1 for n in FlakyFS.opens.values())


def test_prefetch_of_local_or_cached_shards_does_nothing(tmp_path, fetcher):
    local = tmp_path / "s.bin"
    local.write_bytes(b"x")
    fetcher.prefetch(str(local), num_bytes=1, checksum=sha(b"x"))
    remote = put_memory(b"y")
    fetcher.open(**remote).release()
    fetcher.prefetch(**remote)
    assert not [t for t in threading.enumerate() if t.name.startswith("shardloader-prefetch")]


def test_prefetch_errors_surface_at_open(flaky, fetcher):
    shard = put_flaky("pre-bad", b"data", "corrupt", "corrupt")
    fetcher.prefetch(**shard)
    with pytest.raises(ShardError, match="does not match manifest"):
        fetcher.open(**shard)


def test_prefetched_shards_count_against_the_budget_and_are_evictable(cache_dir):
    size = 100 * KiB
    shards = [put_memory(blob(size, 50 + i)) for i in range(4)]
    with ShardFetcher(cache_dir=str(cache_dir), cache_bytes=2 * size, prefetch_threads=1) as f:
        f.prefetch(**shards[0])
        wait_for(lambda: (cache_dir / "shards").is_dir(), "the cache")
        wait_for(lambda: len(list((cache_dir / "shards").iterdir())) == 1, "the prefetch")
        prefetched = next((cache_dir / "shards").iterdir())
        for s in shards[1:]:
            f.open(**s).release()
            assert cache_bytes_on_disk(cache_dir) <= 2 * size
        assert f.stats["evictions"] == 2
        assert not prefetched.exists()  # never opened: the least recently used


def test_close_stops_the_prefetch_threads(flaky, cache_dir):
    shards = [put_flaky("stop", blob(64 * KiB, 60 + i)) for i in range(4)]
    FlakyFS.gate = threading.Event()
    f = ShardFetcher(cache_dir=str(cache_dir), prefetch_threads=2)
    for s in shards:
        f.prefetch(**s)
    wait_for(lambda: FlakyFS.active == 2, "two downloads")
    FlakyFS.gate.set()
    f.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("shardloader-prefetch")]
    with pytest.raises(RuntimeError, match="closed"):
        f.open(**shards[0])


# -- real S3 ----------------------------------------------------------------------------------


def put_s3(server: S3Server, name: str, data: bytes) -> dict[str, Any]:
    """Write an object straight into the server's directory; returns the open() arguments."""
    bucket = f"cache-{os.getpid()}"
    path = server.data_dir / bucket / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"url": f"s3://{bucket}/{name}", "num_bytes": len(data), "checksum": sha(data)}


@pytest.fixture
def own_server() -> Iterator[S3Server]:
    """A server of this test's own, free to be stopped, frozen and started again."""
    with S3Server() as server:
        yield server


def s3_fetcher(server: S3Server, cache_dir: Path, **kwargs: Any) -> ShardFetcher:
    return ShardFetcher(cache_dir=str(cache_dir), storage_options=server.storage_options, **kwargs)


@pytest.mark.s3
def test_s3_download_matches_and_is_cached(s3_server, cache_dir):
    data = blob(3 * MiB + 17, 70)
    shard = put_s3(s3_server, f"one-{next(_names)}.arrow", data)
    with s3_fetcher(s3_server, cache_dir) as f:
        with f.open(**shard) as local:
            assert Path(local.path).read_bytes() == data
            assert local.path.endswith(".arrow")
        with f.open(**shard) as again:
            assert again.path == local.path
        assert f.stats["bytes_fetched"] == len(data)
        assert (f.stats["cache_misses"], f.stats["cache_hits"]) == (1, 1)


def _open_all(
    cache_dir: str, options: dict[str, Any], shards: list[dict[str, Any]], barrier: Any, out: Any
) -> None:
    with ShardFetcher(cache_dir=cache_dir, storage_options=options) as f:
        barrier.wait(60)
        digests = {}
        for s in shards:
            with f.open(**s) as local:
                digests[s["url"]] = sha(Path(local.path).read_bytes())
        out.put((digests, f.stats))


@pytest.mark.s3
@pytest.mark.slow
def test_s3_processes_sharing_the_cache_download_each_shard_once(s3_server, cache_dir):
    shards = [
        put_s3(s3_server, f"shared-{next(_names)}.bin", blob(2 * MiB, 80 + i)) for i in range(4)
    ]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    args = (str(cache_dir), s3_server.storage_options, shards, barrier, out)
    procs = [ctx.Process(target=_open_all, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    for digests, _ in results:
        assert digests == {s["url"]: s["checksum"] for s in shards}
    assert sum(stats["cache_misses"] for _, stats in results) == len(shards)
    assert sum(stats["bytes_fetched"] for _, stats in results) == 4 * 2 * MiB
    assert sum(stats["cache_hits"] for _, stats in results) == 2 * len(shards)


def _pin(
    cache_dir: str, options: dict[str, Any], shard: dict[str, Any], pinned: Any, go: Any
) -> None:
    with ShardFetcher(cache_dir=cache_dir, storage_options=options) as f, f.open(**shard):
        pinned.set()
        go.wait(60)


@pytest.mark.s3
@pytest.mark.slow
def test_s3_budget_never_evicts_a_shard_pinned_by_another_process(s3_server, cache_dir):
    size = 512 * KiB
    shards = [put_s3(s3_server, f"budget-{next(_names)}.bin", blob(size, 90 + i)) for i in range(5)]
    ctx = mp.get_context("spawn")
    pinned, go = ctx.Event(), ctx.Event()
    child = ctx.Process(
        target=_pin, args=(str(cache_dir), s3_server.storage_options, shards[0], pinned, go)
    )
    child.start()
    try:
        assert pinned.wait(60)
        held = Path(next((cache_dir / "shards").iterdir()))
        with s3_fetcher(s3_server, cache_dir, cache_bytes=2 * size) as f:
            for s in shards[1:]:
                with f.open(**s) as local:
                    assert sha(Path(local.path).read_bytes()) == s["checksum"]
                assert cache_bytes_on_disk(cache_dir) <= 2 * size
                assert held.read_bytes() == blob(size, 90)
            assert f.stats["evictions"] == 3
    finally:
        go.set()
        child.join(30)
    assert child.exitcode == 0


@pytest.mark.s3
def test_s3_corrupted_object_is_refused_naming_url_and_both_checksums(s3_server, cache_dir):
    data = blob(MiB, 100)
    shard = put_s3(s3_server, f"corrupt-{next(_names)}.arrow", data)
    bad = data[:1000] + b"\x00" * 24 + data[1024:]
    (s3_server.data_dir / shard["url"].removeprefix("s3://")).write_bytes(bad)
    with s3_fetcher(s3_server, cache_dir) as f:
        with pytest.raises(ShardError) as info:
            f.open(**shard)
        assert f.stats["bytes_fetched"] == 2 * len(data)  # fetched again once
    message = str(info.value)
    assert message.startswith(f"{shard['url']}: sha256 {sha(bad)} does not match manifest ")
    assert shard["checksum"] in message
    assert list((cache_dir / "shards").iterdir()) == []
    assert leftovers(cache_dir) == []


@pytest.mark.s3
@pytest.mark.slow
def test_s3_server_down_and_up_again_mid_sequence(own_server, cache_dir):
    shards = [put_s3(own_server, f"seq-{i}.bin", blob(256 * KiB, 110 + i)) for i in range(6)]
    got: dict[str, str] = {}
    errors: list[BaseException] = []
    f = s3_fetcher(own_server, cache_dir, timeout_s=1, retry_deadline_s=60)

    def read(some: list[dict[str, Any]]) -> None:
        try:
            for s in some:
                with f.open(**s) as local:
                    got[s["url"]] = sha(Path(local.path).read_bytes())
        except BaseException as err:  # reported by the test thread
            errors.append(err)

    with f:
        read(shards[:2])
        own_server.stop()
        reader = threading.Thread(target=read, args=(shards[2:],))
        reader.start()
        wait_for(lambda: f.stats["retries"] >= 2, "retries while the server is down")
        own_server.start_again()
        reader.join(60)
    assert not errors
    assert got == {s["url"]: s["checksum"] for s in shards}
    assert f.stats["retries"] >= 2


@pytest.mark.s3
@pytest.mark.slow
def test_s3_frozen_server_times_out_each_try_and_recovers(own_server, cache_dir):
    shards = [put_s3(own_server, f"frozen-{i}.bin", blob(256 * KiB, 120 + i)) for i in range(2)]
    errors: list[BaseException] = []
    with s3_fetcher(own_server, cache_dir, timeout_s=0.3, retry_deadline_s=60) as f:
        f.open(**shards[0]).release()  # a warm connection, as in a running epoch

        def read() -> None:
            try:
                with f.open(**shards[1]) as local:
                    assert sha(Path(local.path).read_bytes()) == shards[1]["checksum"]
            except BaseException as err:  # reported by the test thread
                errors.append(err)

        with own_server.paused():
            reader = threading.Thread(target=read)
            reader.start()
            wait_for(lambda: f.stats["retries"] >= 2, "tries timing out")
        reader.join(60)
        assert not reader.is_alive()
        assert not errors
        assert f.stats["retries"] >= 2


@pytest.mark.s3
@pytest.mark.slow
def test_s3_server_gone_for_good_gives_storage_error_after_the_deadline(own_server, cache_dir):
    shard = put_s3(own_server, "gone.bin", blob(KiB, 130))
    own_server.stop()
    with s3_fetcher(own_server, cache_dir, timeout_s=0.5, retry_deadline_s=1.5) as f:
        with pytest.raises(StorageError) as info:
            f.open(**shard)
        assert f.stats["retries"] >= 1
    message = str(info.value)
    assert message.startswith(f"{shard['url']}: download failed after ")
    assert "retry_deadline_s" in message
    assert leftovers(cache_dir) == []


@pytest.mark.s3
def test_s3_frozen_server_with_everything_else_default_still_returns(own_server, cache_dir):
    """timeout_s alone bounds a hung GET: botocore's own timeouts are not what ends it."""
    shard = put_s3(own_server, "hung.bin", blob(KiB, 140))
    f = s3_fetcher(own_server, cache_dir, timeout_s=0.3, retry_deadline_s=0.5)
    with f, own_server.paused(), pytest.raises(StorageError, match="no answer within timeout_s"):
        f.open(**shard)


@pytest.mark.s3
def test_s3_range_read_counts_its_bytes_and_bounds_a_frozen_server(own_server, cache_dir):
    data = blob(300 * KiB, 145)
    shard = put_s3(own_server, "ranged.bin", data)
    f = s3_fetcher(own_server, cache_dir, timeout_s=0.3, retry_deadline_s=0.5)
    with f:
        assert f.read_range(shard["url"], 1000, 70_000) == data[1000:71_000]
        assert (f.stats["bytes_fetched"], f.stats["range_reads"]) == (70_000, 1)
        assert not list(cache_dir.rglob("*.bin"))  # nothing cached
        with pytest.raises(ShardError, match="shard is missing"):
            f.read_range(shard["url"] + ".gone", 0, 10)
        with own_server.paused(), pytest.raises(StorageError, match="no answer within timeout_s"):
            f.read_range(shard["url"], 0, 10)
        assert f.stats["retries"] >= 1


def _open_one(cache_dir: str, options: dict[str, Any], shard: dict[str, Any]) -> None:
    with ShardFetcher(cache_dir=cache_dir, storage_options=options) as f:
        f.open(**shard).release()


@pytest.mark.s3
@pytest.mark.slow
def test_s3_kill_9_during_a_download_leaves_nothing_in_the_way(own_server, cache_dir):
    shard = put_s3(own_server, "killed.bin", blob(2 * MiB, 150))
    other = put_s3(own_server, "other.bin", blob(KiB, 151))
    key = entry_key(shard["url"], "sha256", shard["checksum"])
    part = cache_dir / "tmp" / f"{key}.part"
    ctx = mp.get_context("spawn")
    with own_server.paused():  # the child's GET hangs: it dies holding its lock mid-download
        child = ctx.Process(
            target=_open_one, args=(str(cache_dir), own_server.storage_options, shard)
        )
        child.start()
        try:
            wait_for(part.exists, "the child's download", timeout_s=60)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert leftovers(cache_dir) == [f"{key}.lock", f"{key}.part"]
    with s3_fetcher(own_server, cache_dir, timeout_s=5) as f:
        f.open(**other).release()  # any download trims: the dead process's files go
        assert leftovers(cache_dir) == []
        with f.open(**shard) as local:
            assert Path(local.path).read_bytes() == blob(2 * MiB, 150)
    assert leftovers(cache_dir) == []


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """``rclone serve http`` over a directory (ranged GETs): returns (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [find_rclone(), "serve", "http", "--config", os.devnull, "--dir-cache-time", "0s"]
    cmd += ["--addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen([*cmd, str(root)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), "rclone serve http")
        yield root, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except OSError:
        return False
    return True


def test_http_download_in_ranged_blocks(http_root, cache_dir):
    root, base = http_root
    data = blob(9 * MiB + 5, 160)  # three blocks
    (root / "s.bin").write_bytes(data)
    with ShardFetcher(cache_dir=str(cache_dir), timeout_s=5, retry_deadline_s=5) as f:
        with f.open(f"{base}/s.bin", num_bytes=len(data), checksum=sha(data)) as local:
            assert Path(local.path).read_bytes() == data
        with pytest.raises(ShardError, match=r"/nope\.bin: shard is missing"):
            f.open(f"{base}/nope.bin", num_bytes=1, checksum="0" * 64)
        assert f.stats["retries"] == 0


class _HTTPStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (ConnectionRefusedError("refused"), True),
        (ConnectionResetError("reset"), True),
        (TimeoutError("no answer"), True),
        (OSError(5, "InternalError (500)"), True),
        (_HTTPStatus(503), True),
        (_HTTPStatus(429), True),
        (FileNotFoundError("nope"), False),
        (PermissionError("AccessDenied"), False),
        (OSError(22, "InvalidRange"), False),
        (_HTTPStatus(403), False),
        (ValueError("bad argument"), False),
        (ShardError("ours"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_which_errors_are_retried(err, transient):
    assert storage.is_transient(err) is transient


def test_local_shard_release_is_idempotent(tmp_path):
    shard = LocalShard(str(tmp_path / "x"))
    shard.release()
    shard.release()
