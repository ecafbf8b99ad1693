"""Direct tests of shardloader.storage: URLs, retries, downloads, input listing and outputs.

Real parts only: local files, fsspec's ``memory://`` filesystem, the loopback S3 server
(``s3_server``) and real processes for the output lock.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import aiobotocore.session
import fsspec
import pytest

from shardloader import storage
from shardloader.errors import ConfigError, ShardError, StorageError
from shardloader.storage import OutputDir

# ---- urls ----------------------------------------------------------------------------------------


def test_url_kinds_and_normalize(tmp_path, monkeypatch):
    paths = ["/data/x", "rel/x", "file:///data/x", "s3://b/k", "memory://x"]
    assert [storage.is_url(p) for p in paths] == [False, False, True, True, True]
    assert [storage.is_local(p) for p in paths] == [True, True, True, False, False]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.normalize("rel/x") == str(tmp_path / "rel" / "x")
    assert storage.normalize("~/x") == str(tmp_path / "home" / "x")
    assert storage.normalize("s3://b/dir/") == "s3://b/dir"
    assert storage.normalize("file:///data/x/") == "file:///data/x"
    assert storage.normalize("memory://") == "memory://"


def test_join_dirname_relpath():
    assert storage.join("s3://b/a", "c", "d.bin") == "s3://b/a/c/d.bin"
    assert storage.join("file:///data", "x") == "file:///data/x"
    assert storage.join("/data", "c", "d") == os.path.join("/data", "c", "d")
    assert storage.dirname("s3://b/a/c.bin") == "s3://b/a"
    assert storage.dirname("file:///data/a/b") == "file:///data/a"
    assert storage.dirname("/data/a/b") == "/data/a"
    assert storage.relpath("s3://b/a/c/d.bin", "s3://b/a") == "c/d.bin"
    assert storage.relpath("file:///data/a/b", "file:///data") == "a/b"
    assert storage.relpath("/data/a/c/d", "/data/a") == "c/d"


def test_url_to_fs_local_file_url_and_unknown_scheme(tmp_path):
    fs, path = storage.url_to_fs(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x"
    assert "file" in fs.protocol
    fs, path = storage.url_to_fs(str(tmp_path / "x"))
    assert path == str(tmp_path / "x")
    with pytest.raises(StorageError, match=r"^nosuch://b/k: unknown scheme .*nosuch"):
        storage.url_to_fs("nosuch://b/k")
    with pytest.raises(StorageError, match="nosuch"):
        storage.file_type("nosuch://b/k")


def test_file_type(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    assert storage.file_type(str(tmp_path / "f")) == "file"
    assert storage.file_type(f"file://{tmp_path}/f") == "file"
    assert storage.file_type(str(tmp_path / "d")) == "directory"
    assert storage.file_type(str(tmp_path / "missing")) is None
    assert storage.file_type(str(tmp_path / "fifo")) == "other"  # not a file: callers refuse it


# ---- retry ---------------------------------------------------------------------------------------


class HTTPStatusError(Exception):
    """Shaped like aiohttp's ClientResponseError: a ``status`` attribute."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class NoCredentialsError(Exception):
    """Named like botocore's: permanent by name."""


TRANSIENT = [
    ConnectionResetError(errno.ECONNRESET, "reset"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError("slow"),
    OSError(errno.EIO, "io"),
    *[HTTPStatusError(code) for code in (500, 503, 429, 408)],
]
PERMANENT = [
    *[HTTPStatusError(code) for code in (400, 403, 404)],
    OSError(errno.EINVAL, "bad request"),  # how s3fs reports S3's 4xx request errors
    FileNotFoundError(errno.ENOENT, "missing"),
    PermissionError(errno.EACCES, "denied"),
    IsADirectoryError(errno.EISDIR, "dir"),
    StorageError("ours"),
    ShardError("ours"),
    ValueError("bug"),
    TypeError("bug"),
    NoCredentialsError("no keys"),
    KeyboardInterrupt(),
]


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        *[(err, True) for err in TRANSIENT],
        *[(err, False) for err in PERMANENT],
    ],
)
def test_is_transient(err, transient):
    assert storage.is_transient(err) is transient


def test_backoff_grows_and_never_exceeds_max():
    for attempt in range(1, 12):
        for _ in range(200):
            ideal = 0.1 * 2 ** (attempt - 1)
            delay = storage.backoff_s(attempt, base_s=0.1, max_s=5.0)
            assert 0.5 * min(ideal, 5.0) <= delay <= min(1.5 * ideal, 5.0)
    assert all(
        storage.backoff_s(a) <= storage.MAX_BACKOFF_S for a in range(1, 40) for _ in range(50)
    )
    # Jitter is ±50%, so attempt n+2 (4x the base) always waits longer than attempt n.
    assert min(storage.backoff_s(3) for _ in range(200)) > max(
        storage.backoff_s(1) for _ in range(200)
    )


def failing(errors: list[BaseException], result: str = "ok") -> tuple[list[int], Callable[[], str]]:
    """A callable that raises ``errors`` in turn, then returns ``result``; and its call count."""
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        if calls[0] <= len(errors):
            raise errors[calls[0] - 1]
        return result

    return calls, fn


def test_with_retries_retries_then_succeeds():
    calls, fn = failing([ConnectionResetError("reset")])
    assert storage.with_retries(fn, url="s3://b/k", what="read", retries=2) == "ok"
    assert calls == [2]


def test_with_retries_gives_up_naming_url_and_what():
    calls, fn = failing([ConnectionResetError("reset 1"), ConnectionResetError("reset 2")])
    with pytest.raises(StorageError, match=r"^s3://b/k: read failed after 2 tries") as info:
        storage.with_retries(fn, url="s3://b/k", what="read", retries=2)
    assert calls == [2]
    assert "reset 2" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionResetError)


@pytest.mark.parametrize(
    "err", [FileNotFoundError("gone"), ValueError("bug"), HTTPStatusError(403)]
)
def test_with_retries_passes_permanent_errors_at_once(err):
    calls, fn = failing([err])
    with pytest.raises(type(err)):
        storage.with_retries(fn, url="s3://b/k", what="read", retries=5)
    assert calls == [1]


def test_retry_until_stops_at_deadline():
    calls, fn = failing([ConnectionResetError("down")] * 1000)
    seen: list[BaseException] = []
    with pytest.raises(StorageError, match=r"^s3://b/k: download failed after (\d+) tries") as info:
        storage.retry_until(
            fn, url="s3://b/k", what="download", deadline_s=0.05, on_retry=seen.append
        )
    tries = int(info.value.args[0].split("after ")[1].split(" ")[0])
    assert tries == calls[0]
    assert 1 <= tries < 1000
    assert len(seen) == tries - 1  # on_retry before each retry, not after the last try
    assert "retry_deadline_s" in str(info.value)


def test_retry_until_recovers_and_passes_permanent_errors():
    calls, fn = failing([TimeoutError("slow")] * 2)
    assert storage.retry_until(fn, url="u", what="download", deadline_s=60) == "ok"
    assert calls == [3]
    calls, fn = failing([FileNotFoundError("gone")])
    with pytest.raises(FileNotFoundError):
        storage.retry_until(fn, url="u", what="download", deadline_s=60)
    assert calls == [1]


def test_retry_until_stop_event_ends_waiting():
    stop = threading.Event()
    stop.set()
    calls, fn = failing([ConnectionResetError("down")] * 10)
    with pytest.raises(StorageError, match=r"^u: download stopped \(shutting down\)"):
        storage.retry_until(fn, url="u", what="download", deadline_s=600, stop=stop)
    assert calls == [1]


# ---- download ------------------------------------------------------------------------------------


@pytest.fixture
def memory_dir():
    """A fresh ``memory://`` directory, removed afterwards (the memory filesystem is global)."""
    url = f"memory://test-storage-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.makedirs(url, exist_ok=True)
    yield url
    fs.rm(url, recursive=True)


def test_read_bytes_and_open_read(tmp_path, memory_dir):
    data = bytes(range(256)) * 3
    (tmp_path / "f.bin").write_bytes(data)
    fsspec.filesystem("memory").pipe_file(f"{memory_dir}/f.bin", data)
    for url in (str(tmp_path / "f.bin"), f"file://{tmp_path}/f.bin", f"{memory_dir}/f.bin"):
        assert storage.read_bytes(url) == data
        with storage.open_read(url) as f:
            assert f.read(10) == data[:10]
            assert f.read() == data[10:]
    for url in (str(tmp_path / "missing"), f"{memory_dir}/missing"):
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(url)
        with pytest.raises(FileNotFoundError):
            storage.open_read(url)


def test_iter_download_sync_filesystems(tmp_path, memory_dir):
    data = os.urandom(10_000)
    (tmp_path / "f.bin").write_bytes(data)
    fsspec.filesystem("memory").pipe_file(f"{memory_dir}/f.bin", data)
    for url in (str(tmp_path / "f.bin"), f"{memory_dir}/f.bin"):
        blocks = list(storage.iter_download(url, block_bytes=4096))
        assert [len(b) for b in blocks] == [4096, 4096, 10_000 - 8192]
        assert b"".join(storage.iter_download(url, offset=5000, block_bytes=4096)) == data[5000:]


_bucket_ids = itertools.count()


@pytest.fixture
def bucket(s3_server):
    name = f"storage-{os.getpid()}-{next(_bucket_ids)}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


@pytest.mark.s3
def test_iter_download_from_s3_in_bounded_blocks(bucket):
    data = os.urandom(300_000)
    url = f"{bucket}/shard.bin"
    fsspec.filesystem("s3").pipe_file(url, data)
    block_bytes = 64 << 10
    blocks = list(storage.iter_download(url, block_bytes=block_bytes, timeout_s=30))
    assert b"".join(blocks) == data
    assert len(blocks) >= 300_000 // block_bytes
    assert max(map(len, blocks)) <= block_bytes
    rest = b"".join(storage.iter_download(url, offset=123_457, block_bytes=block_bytes))
    assert hashlib.sha256(rest).digest() == hashlib.sha256(data[123_457:]).digest()
    assert storage.read_bytes(url) == data
    assert storage.file_type(url) == "file"
    with pytest.raises(FileNotFoundError):
        b"".join(storage.iter_download(f"{bucket}/missing.bin", timeout_s=30))
    assert storage.file_type(f"{bucket}/missing.bin") is None


def test_read_range_sync_filesystems(tmp_path, memory_dir):
    data = os.urandom(10_000)
    (tmp_path / "f.bin").write_bytes(data)
    fsspec.filesystem("memory").pipe_file(f"{memory_dir}/f.bin", data)
    for url in (str(tmp_path / "f.bin"), f"{memory_dir}/f.bin"):
        assert storage.read_range(url, 1234, 4000) == data[1234:5234]
        assert storage.read_range(url, 9000, 4000) == data[9000:]  # short past the end
        assert storage.read_range(url, 5, 0) == b""


@pytest.mark.s3
def test_read_range_from_s3_is_one_ranged_get_of_exactly_the_bytes(bucket):
    data = os.urandom(300_000)
    url = f"{bucket}/shard.bin"
    fsspec.filesystem("s3").pipe_file(url, data)
    for offset, length in ((0, 1), (123_457, 65_536), (299_000, 1000)):
        got = storage.read_range(url, offset, length, timeout_s=30)
        assert got == data[offset : offset + length]
    assert storage.read_range(url, 299_000, 5000, timeout_s=30) == data[299_000:]  # short
    with pytest.raises(FileNotFoundError):
        storage.read_range(f"{bucket}/missing.bin", 0, 10, timeout_s=30)


# ---- inputs --------------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    files = {"b.jsonl": b"bb", "a.jsonl": b"a", "sub/c.jsonl": b"ccc", "sub/d.txt": b"dddd"}
    hidden = {".hidden": b"x", "_SUCCESS": b"", "sub/_tmp/e.jsonl": b"x", "sub/.git/f": b"x"}
    for rel, data in {**files, **hidden}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_list_files_directory_recursive_sorted_hidden_skipped(tmp_path):
    make_tree(tmp_path / "in")
    found = storage.list_files([str(tmp_path / "in")])
    root = str(tmp_path / "in")
    assert [(f.url, f.num_bytes, f.root) for f in found] == [
        (f"{root}/a.jsonl", 1, root),
        (f"{root}/b.jsonl", 2, root),
        (f"{root}/sub/c.jsonl", 3, root),
        (f"{root}/sub/d.txt", 4, root),
    ]


def test_list_files_globs_explicit_files_and_order(tmp_path):
    make_tree(tmp_path / "in")
    root = str(tmp_path / "in")
    urls = [f.url.removeprefix(root) for f in storage.list_files([f"{root}/**/*.jsonl"])]
    # A pattern decides for itself: `**` walks into _tmp (only directory listings skip it).
    assert urls == ["/a.jsonl", "/b.jsonl", "/sub/_tmp/e.jsonl", "/sub/c.jsonl"]
    found = storage.list_files([f"{root}/sub/*.txt", f"{root}/_SUCCESS", f"{root}/[ab].jsonl"])
    assert [f.url for f in found] == [
        f"{root}/sub/d.txt",
        f"{root}/_SUCCESS",  # named explicitly: taken although hidden in a listing
        f"{root}/a.jsonl",
        f"{root}/b.jsonl",
    ]
    assert found[0].root == f"{root}/sub"
    assert found[1].root == root


def test_list_files_memory_urls(memory_dir):
    fs = fsspec.filesystem("memory")
    for name in ("z.jsonl", "a.jsonl", "_tmp.jsonl"):
        fs.pipe_file(f"{memory_dir}/{name}", b"{}")
    found = storage.list_files([memory_dir])
    assert [f.url.rsplit("/", 1)[1] for f in found] == ["a.jsonl", "z.jsonl"]
    assert all(f.url.startswith("memory://") and f.num_bytes == 2 for f in found)
    assert storage.read_bytes(found[0].url) == b"{}"


def test_list_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file or directory"):
        storage.list_files([str(tmp_path / "nope")])
    with pytest.raises(FileNotFoundError, match="the pattern matches no file"):
        storage.list_files([str(tmp_path / "*.parquet")])
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="the directory holds no file"):
        storage.list_files([str(tmp_path / "only")])


# ---- output --------------------------------------------------------------------------------------


def test_atomic_writer_publishes_only_at_commit(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    tmp_dir = tmp_path / "out" / OutputDir.TMP_DIR
    w = out.open_atomic("sub/shard.bin")
    w.write(b"hello ")
    w.write(memoryview(b"world"))
    assert not out.exists("sub/shard.bin")
    assert len(os.listdir(tmp_dir)) == 1
    assert w.tell() == w.num_bytes == 11
    assert w.sha256 == hashlib.sha256(b"hello world").hexdigest()
    w.commit()
    assert (tmp_path / "out" / "sub" / "shard.bin").read_bytes() == b"hello world"
    assert os.listdir(tmp_dir) == []


def test_atomic_writer_abort_leaves_nothing(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    w = out.open_atomic("x.bin")
    w.write(b"partial")
    w.abort()

    def crash_mid_write() -> None:
        with out.open_atomic("y.bin") as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        crash_mid_write()
    assert out.list() == ["_work"]
    assert os.listdir(tmp_path / "out" / OutputDir.TMP_DIR) == []


def test_output_dir_basics(tmp_path, memory_dir):
    for url in (str(tmp_path / "out"), memory_dir):
        out = OutputDir(url)
        assert out.list() == []
        out.write_bytes_atomic("a.bin", b"abc")
        storage.write_file(out, "d/b.bin", b"12345")
        assert (out.exists("a.bin"), out.exists("zzz"), out.size("d/b.bin")) == (True, False, 5)
        assert out.read_bytes("a.bin") == b"abc"
        assert storage.read_bytes(out.url_of("d/b.bin")) == b"12345"
        assert (out.list("d"), out.list("none")) == (["b.bin"], [])
        assert "a.bin" in out.list()
        out.remove("a.bin")
        out.remove("a.bin")  # missing: no error
        assert not out.exists("a.bin")
        with pytest.raises(FileNotFoundError):
            out.read_bytes("a.bin")
        out.close()
    out = OutputDir(str(tmp_path / "out"))
    (tmp_path / "out" / OutputDir.TMP_DIR / "p123-x").write_bytes(b"left by a crash")
    (tmp_path / "out" / OutputDir.TMP_DIR / "p456-y").write_bytes(b"another run's")
    out.clean_tmp("p123-")
    assert os.listdir(tmp_path / "out" / OutputDir.TMP_DIR) == ["p456-y"]


def test_write_error_enospc_from_dev_full():
    with (
        pytest.raises(StorageError) as info,
        storage.writing("/out/shard-0.arrow"),
        open("/dev/full", "wb", buffering=0) as f,
    ):
        f.write(b"x" * 100)
    msg = str(info.value)
    assert msg.startswith("/out/shard-0.arrow: cannot write (No space left on device")
    assert "free space there or choose another output" in msg
    assert info.value.__cause__.errno == errno.ENOSPC


def test_write_error_enotdir_when_a_file_is_in_the_way(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    out = OutputDir(str(tmp_path / "file" / "out"))
    with pytest.raises(StorageError, match="a file is in the way of the output directory") as info:
        storage.write_file(out, "m.json", b"{}")
    assert str(info.value).startswith(f"{tmp_path}/file/out/m.json: cannot write (Not a directory")
    assert info.value.__cause__.errno == errno.ENOTDIR


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (errno.EROFS, "the output is not writable; choose another output"),
        (errno.EACCES, "choose another output or fix its permissions"),
        (errno.EDQUOT, "free space there"),
        (errno.EISDIR, "a directory is in the way of an output file"),
        (errno.EIO, "check the output location, then rerun"),
    ],
)
def test_write_error_maps_errno_to_remedy(code, remedy):
    err = storage.write_error("s3://b/out/x", OSError(code, os.strerror(code), "/tmp/spool/x"))
    assert isinstance(err, StorageError)
    assert str(err).startswith(f"s3://b/out/x: cannot write ({os.strerror(code)}: /tmp/spool/x); ")
    assert remedy in str(err)


def test_writing_lets_our_errors_through():
    with pytest.raises(ShardError, match="^ours$"), storage.writing("/x"):
        raise ShardError("ours")


HOLDER = """
import sys
from shardloader.storage import OutputDir, lock_output
fd = lock_output(OutputDir(sys.argv[1]), "_work/lock")
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_output_excludes_another_process_until_it_dies(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"  # the pipe is the synchronization
        with pytest.raises(ConfigError) as info:
            storage.lock_output(out, "_work/lock")
        msg = str(info.value)
        assert msg.startswith(f"{out.url}: is being written by pid {holder.pid} on ")
        assert socket.gethostname() in msg
        assert "remove" in msg
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
    # The dead holder's file is still there, naming it; the kernel dropped its lock.
    lock_file = tmp_path / "out" / "_work" / "lock"
    assert lock_file.read_text().split()[0] == str(holder.pid)
    fd = storage.lock_output(out, "_work/lock")
    assert fd is not None
    assert lock_file.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    storage.unlock_output(out, "_work/lock", fd)
    assert not lock_file.exists()
    assert storage.lock_output(OutputDir("memory://remote-out"), "_work/lock") is None


@pytest.mark.s3
def test_open_read_sees_an_object_written_after_a_cached_listing(s3_server, bucket):
    fs = fsspec.filesystem("s3")  # the instance storage gets too (fsspec caches instances)
    fs.pipe_file(f"{bucket}/old.bin", b"old")
    assert fs.ls(bucket, detail=False)  # s3fs now holds a listing without new.bin
    (s3_server.data_dir / bucket.removeprefix("s3://") / "new.bin").write_bytes(
        b"new"
    )  # another writer
    with storage.open_read(f"{bucket}/new.bin") as f:
        assert f.read() == b"new"


_FORK_SCRIPT = """
import gc, multiprocessing, sys, time
import aiobotocore.session
import fsspec
from shardloader import storage

url = sys.argv[1]
assert storage.read_bytes(url) == b"x"  # this process now holds an S3 session


def child(out):
    started = time.perf_counter()
    fsspec.filesystem("s3")  # a new process: fsspec drops the instances the parent made
    gc.collect()
    out.value = time.perf_counter() - started
"""


_FORK_CHILD = """
import multiprocessing

context = multiprocessing.get_context("fork")
out = context.Value("d", -1.0)
process = context.Process(target=child, args=(out,))
process.start()
process.join(60)
print(process.exitcode, out.value)
"""


def _fork_in_a_fresh_process(script: str, bucket: str) -> list[str]:
    """Run ``script`` in a new interpreter, then its ``child(out)`` in a forked process.

    The script reads ``{bucket}/x.bin`` (b"x") first. A fresh process: this one holds the S3
    sessions of every test before. Returns the child's exit code and what it left in ``out``.
    """
    fsspec.filesystem("s3").pipe_file(f"{bucket}/x.bin", b"x")
    result = subprocess.run(
        [sys.executable, "-c", script + _FORK_CHILD, f"{bucket}/x.bin"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.s3
def test_a_forked_child_does_not_wait_to_close_the_parents_s3_sessions(bucket):
    # DataLoader workers are forked after the main process read the manifest over S3. An s3fs
    # filesystem closes its session on the event loop of the process that made it; in the
    # child that loop's thread is gone, and each close waited 1 s (a worker stalled 2 s
    # mid-epoch). The child leaves the parent's sessions alone. (A fresh process: this one
    # holds the sessions of every test before.)
    exitcode, seconds = _fork_in_a_fresh_process(_FORK_SCRIPT, bucket)
    assert exitcode == "0"
    assert 0 <= float(seconds) < 0.5


_SHARED_LOADER_SCRIPT = """
import multiprocessing, sys
from shardloader import storage
from shardloader.storage import urls

url = sys.argv[1]
assert storage.read_bytes(url) == b"x"  # this process made its session and parsed the models
parent_session = urls._s3_session({})
parent_loader = parent_session.get_component("data_loader")


def child(out):
    assert storage.read_bytes(url) == b"x"
    session = urls._s3_session({})
    out.value = (session is not parent_session) + 2 * (
        session.get_component("data_loader") is parent_loader
    )
"""


@pytest.mark.s3
def test_a_forked_child_makes_its_own_s3_session_over_the_parents_parsed_models(bucket):
    # A DataLoader worker's first GET made a new S3 client, which parsed botocore's service
    # model and endpoint rules again (0.1-0.2 s a worker); the sessions share one data loader.
    # its own session, the parent's loader
    assert _fork_in_a_fresh_process(_SHARED_LOADER_SCRIPT, bucket) == ["0", "3.0"]


@pytest.mark.s3
def test_s3_options_for_the_session_itself_keep_their_own_session(s3_server):
    from shardloader.storage import urls

    plain = dict(s3_server.storage_options)
    shared = urls._s3_session(plain)
    assert shared is not None
    assert urls._s3_session(plain) is shared  # one per process: fsspec's instance cache holds
    fs, _ = storage.url_to_fs("s3://b/x", **plain)
    assert fs.session is shared
    assert storage.url_to_fs("s3://b/x", **plain)[0] is fs
    # `profile` (and anything s3fs hands to the AioSession it makes) is the session's own.
    assert urls._s3_session({**plain, "profile": "other"}) is None
    mine = aiobotocore.session.AioSession()
    assert storage.url_to_fs("s3://b/x", **plain, session=mine)[0].session is mine


@pytest.mark.s3
def test_an_s3_client_is_made_with_the_garbage_collector_paused(s3_server, monkeypatch):
    # A client builds botocore's service model, whose objects set off full collections; with
    # torch imported each walks millions of objects (a client: 0.15 s instead of 0.05 s, in the
    # main process before the manifest and in each DataLoader worker before its first shard).
    collecting: list[bool] = []
    create = aiobotocore.session.AioSession._create_client

    async def observed(self, *args, **kwargs):
        collecting.append(gc.isenabled())
        return await create(self, *args, **kwargs)

    monkeypatch.setattr(aiobotocore.session.AioSession, "_create_client", observed)
    options = {**s3_server.storage_options, "skip_instance_cache": True}
    fs, _ = storage.url_to_fs("s3://b/x", **options)
    assert fs._s3 is not None  # made by url_to_fs, not at the first request
    assert collecting == [False]
    assert gc.isenabled()  # and collection resumed
    gc.disable()  # a caller's own choice is kept
    try:
        storage.url_to_fs("s3://b/x", **options)
        assert collecting == [False, False]
        assert not gc.isenabled()
    finally:
        gc.enable()
