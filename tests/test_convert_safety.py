"""Convert under hostile conditions: output inside the input, failed writes, two runs at once."""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

import shardloader
from shardloader import ConfigError, ConvertConfig, StorageError, convert
from shardloader.cli import main
from shardloader.formats.series import ShardSeries
from shardloader.storage import OutputDir
from tests.conftest import make_docs, published, start_cli, wait_while_running, write_jsonl
from tests.conftest import run_cli as conftest_run_cli

SHARD_FLAGS = ("--task-bytes", "1", "--shard-samples", "40", "--no-progress")


run_cli = functools.partial(conftest_run_cli, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    docs = make_docs(400, seed=5)
    for i in range(4):
        write_jsonl(root / f"part-{i}.jsonl", docs[i * 100 : (i + 1) * 100])
    return root


def test_output_inside_the_input_folder_is_left_out(folder, tmp_path):
    reference = tmp_path / "reference"
    convert([str(folder)], ConvertConfig(output=str(reference), shard_samples=40, num_proc=1))
    out = folder / "shards"
    config = ConvertConfig(output=str(out), shard_samples=40, num_proc=1)
    first = convert([str(folder)], config)
    assert first.num_docs == 400
    assert published(out) == published(reference)

    # Rerun after a crash inside task 0 (what kill -9 leaves): it resumes, not "other inputs".
    (out / "_manifest.json").unlink()
    (out / "_work" / "task-00000.json").unlink()
    resumed = convert([str(folder)], config)
    assert (resumed.tasks_run, resumed.num_docs) == (1, 400)
    assert published(out) == published(reference)
    again = run_cli("convert", str(folder), "-o", str(out), "--shard-samples", "40")
    assert again.returncode == 0, again.stderr
    assert "already converted" in again.stdout
    assert "left out" in again.stderr  # the log line says what was excluded


def test_input_inside_the_output_is_refused(folder, tmp_path):
    out = tmp_path / "out"
    convert([str(folder)], ConvertConfig(output=str(out), num_proc=1))
    shard = next(out.glob("shard-*.arrow"))
    with pytest.raises(ConfigError, match="inside the output directory"):
        convert([str(folder), str(shard)], ConvertConfig(output=str(out), num_proc=1))
    proc = run_cli("convert", str(out), "-o", str(out))
    assert_one_line_error(proc, str(out), "cannot read its own output")


def test_file_where_the_output_directory_should_be(folder, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    out = blocker / "out"
    proc = run_cli("convert", str(folder), "-o", str(out), *SHARD_FLAGS)
    assert_one_line_error(proc, str(out), "Not a directory", "choose another output")


def test_full_disk_while_writing_the_manifest(folder, tmp_path, capsys):
    """/dev/full really returns ENOSPC: our manifest's temporary name points at it."""
    out = tmp_path / "out"
    tmp = out / "_work" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / f"p{os.getpid()}-_manifest.json").symlink_to("/dev/full")
    code = main(["convert", str(folder), "-o", str(out), "--num-proc", "1", *SHARD_FLAGS])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert f"{out / '_manifest.json'}: cannot write (No space left on device)" in line
    assert "free space" in line
    assert not (out / "_manifest.json").exists()
    # The tasks are kept: after the disk is freed the rerun only writes the manifest.
    result = convert([str(folder)], ConvertConfig(output=str(out), task_bytes=1, shard_samples=40))
    assert result.tasks_run == 0
    assert shardloader.verify(str(out)).ok


def test_full_disk_while_writing_a_shard(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    config = ConvertConfig(output=out.url)
    series = ShardSeries(out, config, 3, {"id": "string", "text": "string"}, None, tmp_prefix="t-")
    tmp = tmp_path / "out" / "_work" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "t-shard-00003-0000.arrow").symlink_to("/dev/full")

    def write_and_close() -> None:
        series.write("a", b"x" * 100_000, None)
        series.close()

    with pytest.raises(StorageError) as info:
        write_and_close()
    series.abort()
    message = str(info.value)
    assert message.startswith(f"{out.url_of('shard-00003-0000.arrow')}: cannot write (")
    assert "No space left on device" in message
    assert isinstance(info.value.__cause__, OSError)
    # It crosses the process pool intact.
    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), str(again)) == (StorageError, message)


def test_full_disk_error_is_a_storage_error_with_a_remedy():
    from shardloader.storage import write_error

    with pytest.raises(OSError, match="No space left") as info, open("/dev/full", "wb") as f:
        f.write(np.zeros(10, dtype=np.uint8).tobytes())
    err = write_error("/data/out/x.arrow", info.value)
    assert isinstance(err, StorageError)
    assert str(err).startswith("/data/out/x.arrow: cannot write (No space left on device); free")


def _wait_for_lock(out: Path, proc: subprocess.Popen[bytes]) -> None:
    lock = out / "_work" / "lock"
    wait_while_running(
        proc,
        lambda: lock.exists() and lock.read_text().startswith(f"{proc.pid} "),
        "the first conversion ended before it took the lock",
    )


@pytest.mark.slow
def test_second_convert_into_one_output_fails_at_once_and_a_dead_holder_frees_it(tmp_path):
    # 40 tasks: the first run is stopped (or killed) as soon as it holds the lock, long before
    # it could finish.
    folder = tmp_path / "big"
    docs = make_docs(4000, seed=6)
    for i in range(40):
        write_jsonl(folder / f"part-{i:02d}.jsonl.gz", docs[i * 100 : (i + 1) * 100])
    args = ["convert", str(folder), *SHARD_FLAGS, "--num-proc", "1"]
    reference = tmp_path / "reference"
    assert run_cli(*args, "-o", str(reference)).returncode == 0
    out = tmp_path / "out"
    first = start_cli(*args, "-o", str(out))
    try:
        _wait_for_lock(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, mid-run, for as long as we need
        second = run_cli(*args, "-o", str(out))
        line = assert_one_line_error(
            second, str(out), f"is being written by pid {first.pid} on ", "wait for it"
        )
        assert str(out / "_work" / "lock") in line
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert published(out) == published(reference)
    assert not (out / "_work" / "lock").exists()

    # A holder killed with -9 leaves its lock file behind, but not the lock: the rerun goes on.
    out2 = tmp_path / "out2"
    first = start_cli(*args, "-o", str(out2))
    _wait_for_lock(out2, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (out2 / "_work" / "lock").exists()
    rerun = run_cli(*args, "-o", str(out2))
    assert rerun.returncode == 0, rerun.stderr
    assert published(out2) == published(reference)
    assert list((out2 / "_work" / "tmp").iterdir()) == []


def test_temporaries_of_a_killed_run_are_removed_and_a_live_writers_kept(folder, tmp_path):
    # What a run killed while writing its plan leaves: p<pid>-plan.json of a pid now gone.
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = out / "_work" / "tmp"
    tmp.mkdir(parents=True)
    (tmp / f"p{dead.pid}-plan.json").write_text("{")
    (tmp / f"p{os.getpid()}-record.json").write_text("{")  # a live process's: kept
    convert([str(folder)], ConvertConfig(output=str(out), shard_samples=40))
    assert sorted(p.name for p in tmp.iterdir()) == [f"p{os.getpid()}-record.json"]
    assert shardloader.verify(str(out)).ok
