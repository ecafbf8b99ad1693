"""Conversion: determinism across process counts, crash + resume, slices + merge, CLI."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import shardloader
from shardloader import ConfigError, ConvertConfig, ManifestError, TextTokenizer, convert, merge
from tests.conftest import (
    convert_docs,
    kill_convert_midway,
    make_docs,
    published,
    run_cli,
    sha,
    write_jsonl,
)

# The module (the package exports a function of the same name).
CONVERT = importlib.import_module("shardloader.convert")


@pytest.fixture
def many_files(tmp_path: Path) -> tuple[Path, list[dict]]:
    """24 JSONL files of uneven sizes, so small task_bytes gives many tasks."""
    root = tmp_path / "many"
    docs = make_docs(1200, seed=3)
    bounds = [0]
    for i in range(24):
        bounds.append(min(len(docs), bounds[-1] + 20 + (i * 7) % 60))
    bounds[-1] = len(docs)
    for i in range(24):
        suffix = [".jsonl", ".jsonl.gz", ".jsonl.zst"][i % 3]
        write_jsonl(root / f"part-{i:03d}{suffix}", docs[bounds[i] : bounds[i + 1]])
    return root, docs


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
def test_output_identical_for_1_and_2_processes(many_files, tmp_path, fmt, monkeypatch):
    root, docs = many_files
    digests = []
    for num_proc, method in ((1, None), (2, "fork"), (2, "spawn")):
        if method is not None:
            monkeypatch.setattr(CONVERT, "pool_start_method", lambda m=method: m)
        out = tmp_path / f"out{num_proc}-{method}"
        result = convert(
            [str(root)],
            ConvertConfig(
                output=str(out), format=fmt, task_bytes=4000, shard_samples=40, num_proc=num_proc
            ),
        )
        assert result.tasks_total > 4  # really split into tasks
        assert result.manifest is not None
        assert result.manifest.num_samples == len(docs)
        digests.append(published(out))
    assert digests[0] == digests[1] == digests[2]
    assert "_manifest.json" in digests[0]


def test_workers_fork_only_while_no_other_thread_runs():
    """Forking a process that runs threads can copy a held lock into the child."""
    mod, fn = "shardloader.convert", "pool_start_method"
    fresh = subprocess.run(
        [sys.executable, "-c", f"import importlib; print(importlib.import_module({mod!r}).{fn}())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.strip() == ("fork" if sys.platform == "linux" else "spawn")
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert CONVERT.pool_start_method() == "spawn"
    finally:
        release.set()
        thread.join()


def test_tokenized_shards_decode_to_the_original_text(tmp_path, tokenizer_dir):
    docs = make_docs(200, seed=5)
    write_jsonl(tmp_path / "in.jsonl.zst", docs)
    out = tmp_path / "out"
    result = convert(
        [str(tmp_path / "in.jsonl.zst")],
        ConvertConfig(output=str(out), tokenizer=str(tokenizer_dir), shard_samples=60, num_proc=2),
    )
    manifest = result.manifest
    assert manifest is not None
    tok = TextTokenizer(str(tokenizer_dir))
    assert manifest.fields == {"id": "string", "input_ids": "tokens"}
    assert manifest.token_dtype == "uint16"
    assert manifest.tokenizer["fingerprint"] == tok.info.fingerprint
    samples = list(shardloader.iter_samples(str(out)))
    assert [s["id"] for s in samples] == [d["id"] for d in docs]
    total = 0
    for sample, doc in zip(samples, docs, strict=True):
        ids = sample["input_ids"]
        assert ids.dtype.name == "uint16"
        assert int(ids[-1]) == tok.eos_id
        assert tok.decode(ids[:-1]) == doc["text"]
        total += len(ids)
    assert manifest.num_tokens == total == result.num_tokens


def test_bos_and_no_eos(tmp_path, tokenizer_dir):
    docs = make_docs(10)
    out = convert_docs(tmp_path, docs, tokenizer=str(tokenizer_dir), add_eos=False, add_bos=True)
    tok = TextTokenizer(str(tokenizer_dir))
    for sample, doc in zip(shardloader.iter_samples(str(out)), docs, strict=True):
        assert int(sample["input_ids"][0]) == tok.bos_id
        assert tok.decode(sample["input_ids"][1:]) == doc["text"]


def test_text_folder_one_document_per_file(tmp_path, read_back):
    root = tmp_path / "texts"
    texts = {"a/one.txt": "first\n", "a/two.md": "second\r\nline", "b/three": "third 🙂\x00"}
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode("utf-8"))
    (root / ".hidden").write_text("ignored")
    out = tmp_path / "out"
    convert([str(root)], ConvertConfig(output=str(out), num_proc=1))
    samples = read_back(out)
    assert {s["id"]: s["text"] for s in samples} == texts


def test_generated_ids_name_file_and_line(tmp_path, read_back):
    docs = make_docs(5, with_ids=False)
    write_jsonl(tmp_path / "in" / "x.jsonl", docs)
    out = tmp_path / "out"
    convert([str(tmp_path / "in" / "*.jsonl")], ConvertConfig(output=str(out), num_proc=1))
    assert [s["id"] for s in read_back(out)] == [f"x.jsonl:{i}" for i in range(1, 6)]


def test_globs_and_input_order(tmp_path, read_back):
    a, b = make_docs(3, seed=1), make_docs(3, seed=2)
    write_jsonl(tmp_path / "in" / "b.jsonl", b)
    write_jsonl(tmp_path / "in" / "a.jsonl", a)
    out = tmp_path / "out"
    convert(
        [str(tmp_path / "in" / "b.jsonl"), str(tmp_path / "in" / "a*")],
        ConvertConfig(output=str(out), num_proc=1),
    )
    assert [s["id"] for s in read_back(out)] == [d["id"] for d in b + a]


def test_fsspec_output_url(corpus, tmp_path):
    root, docs = corpus
    url = f"memory://shardloader-test-{os.getpid()}/out"
    result = convert([str(root)], ConvertConfig(output=url, shard_samples=100, num_proc=1))
    assert result.manifest is not None
    samples = list(shardloader.iter_samples(url))
    assert [sha(s["text"]) for s in samples] == [sha(d["text"]) for d in docs]
    assert shardloader.verify(url).ok


def test_rerun_is_a_no_op_and_other_inputs_are_refused(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    config = ConvertConfig(output=str(out), num_proc=1)
    convert([str(root)], config)
    before = published(out)
    again = convert([str(root)], config)
    assert again.tasks_run == 0
    assert again.manifest is not None
    assert published(out) == before
    with pytest.raises(ConfigError, match="already holds another dataset.*--overwrite"):
        convert([str(root / "a.jsonl")], config)
    with pytest.raises(ConfigError, match="already holds another dataset"):
        convert([str(root)], ConvertConfig(output=str(out), format="tar", num_proc=1))
    replaced = convert([str(root / "a.jsonl")], ConvertConfig(output=str(out), overwrite=True))
    assert replaced.manifest is not None
    assert replaced.manifest.num_samples == 150
    assert shardloader.verify(str(out)).ok


def test_non_empty_output_is_refused(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        convert([str(root)], ConvertConfig(output=str(out)))
    assert (out / "notes.txt").read_text() == "mine"


def test_slices_then_merge_equal_one_run(many_files, tmp_path):
    root, docs = many_files
    single = tmp_path / "single"
    base = dict(task_bytes=4000, shard_samples=50, num_proc=1)
    convert([str(root)], ConvertConfig(output=str(single), **base))
    sliced = tmp_path / "sliced"
    for index in range(3):
        r = convert(
            [str(root)],
            ConvertConfig(output=str(sliced), num_tasks=3, task_index=index, **base),
        )
        assert r.manifest is None
        assert not (sliced / "_manifest.json").exists()
        if index == 1:
            with pytest.raises(ManifestError, match="tasks are not finished"):
                merge(str(sliced))
    manifest = merge(str(sliced))
    assert manifest.num_samples == len(docs)
    assert published(sliced) == published(single)


def test_cli_slices_and_merge(many_files, tmp_path):
    root, docs = many_files
    out = tmp_path / "out"
    for index in range(2):
        proc = run_cli(
            "convert",
            str(root),
            "-o",
            str(out),
            "--num-tasks",
            "2",
            "--task-index",
            str(index),
            "--task-bytes",
            "4KB",
            "--num-proc",
            "1",
        )
        assert "shardloader merge" in proc.stdout
    proc = run_cli("merge", str(out))
    assert f"{len(docs):,} samples" in proc.stdout
    assert shardloader.read_manifest(str(out)).num_samples == len(docs)


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    """Kill the whole conversion (parent and pool workers) after a few tasks, then resume."""
    root = tmp_path / "big"
    docs = make_docs(6000, seed=9)
    for i in range(60):
        write_jsonl(root / f"part-{i:03d}.jsonl.gz", docs[i * 100 : (i + 1) * 100])
    args = ["convert", str(root), "--task-bytes", "1", "--shard-samples", "30", "--num-proc", "2"]
    reference = tmp_path / "reference"
    run_cli(*args, "-o", str(reference))

    out = tmp_path / "out"
    kill_convert_midway(args, out, "task-*.json", 3)
    done = len(list((out / "_work").glob("task-*.json")))
    assert 3 <= done < 60

    rerun = run_cli(*args, "-o", str(out))
    assert f"{done} already done" in rerun.stdout or "already done" in rerun.stdout
    assert published(out) == published(reference)
    assert list((out / "_work" / "tmp").iterdir()) == []
    assert shardloader.verify(str(out)).ok


def test_leftover_temporaries_and_half_tasks_are_redone(many_files, tmp_path):
    root, _ = many_files
    config = ConvertConfig(
        output=str(tmp_path / "out"), task_bytes=4000, shard_samples=40, num_proc=1
    )
    convert([str(root)], config)
    reference = published(tmp_path / "out")
    out = tmp_path / "out"
    # Simulate a crash inside task 2: its record and manifest gone, a shard half-written.
    (out / "_manifest.json").unlink()
    (out / "_work" / "task-00002.json").unlink()
    shard = sorted(out.glob("shard-00002-*"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "_work" / "tmp" / "00002-shard-00002-0001.arrow").write_bytes(b"partial")
    result = convert([str(root)], config)
    assert result.tasks_run == 1
    assert published(out) == reference


def test_cli_convert_inspect_verify(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    proc = run_cli(
        "convert", str(root), "-o", str(out), "--shard-samples", "100", "--keep-fields", "lang"
    )
    assert f"converted {len(docs):,} documents" in proc.stdout
    assert "skipped:    0" in proc.stdout
    assert "compression ratio" in proc.stdout
    proc = run_cli("inspect", str(out), "--samples", "2")
    assert f"{len(docs):,} samples" in proc.stdout
    assert docs[0]["id"] in proc.stdout
    proc = run_cli("verify", str(out))
    assert proc.stdout.startswith("OK: 6 shards")


def test_verify_names_each_bad_shard(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    convert([str(root)], ConvertConfig(output=str(out), shard_samples=100, num_proc=1))
    shards = shardloader.read_manifest(str(out)).shards
    flipped = out / shards[1].path
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = out / shards[3].path
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (out / shards[4].path).unlink()
    proc = run_cli("verify", str(out), check=False)
    assert proc.returncode == 1
    bad = [line for line in proc.stdout.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 3
    assert shards[1].path in bad[0]
    assert "does not match manifest" in bad[0]
    assert shards[3].path in bad[1]
    assert "size" in bad[1]
    assert shards[4].path in bad[2]
    assert "missing" in bad[2]
    assert "FAILED: 3 bad shards" in proc.stdout


def test_python_api_and_manifest_contents(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    result = convert(str(root), ConvertConfig(output=str(out), num_proc=1))
    raw = json.loads((out / "_manifest.json").read_text())
    assert raw["version"] == 1
    assert raw["checksum_algorithm"] == "sha256"
    assert raw["totals"]["num_samples"] == len(docs)
    assert raw["config"]["format"] == "arrow"
    assert [s["num_records"] for s in raw["sources"]] == [150, 150, 150, 150]
    assert raw["skipped"] == {}
    manifest = result.manifest
    assert manifest is not None
    for shard in manifest.shards:
        data = (out / shard.path).read_bytes()
        assert len(data) == shard.num_bytes
        assert hashlib.sha256(data).hexdigest() == shard.checksum


def test_fsspec_input_urls_and_globs(tmp_path, read_back):
    import fsspec

    docs = make_docs(40, seed=11)
    fs = fsspec.filesystem("memory")
    base = f"memory://inputs-{os.getpid()}"
    for i, chunk in enumerate((docs[:25], docs[25:])):
        with fs.open(f"{base}/part-{i}.jsonl", "wb") as f:
            f.write("".join(json.dumps(d) + "\n" for d in chunk).encode())
    out = tmp_path / "out"
    result = convert([f"{base}/part-*.jsonl"], ConvertConfig(output=str(out), num_proc=1))
    assert result.manifest is not None
    assert [s["id"] for s in read_back(out)] == [d["id"] for d in docs]
    urls = [src["url"] for src in result.manifest.sources]
    assert len(urls) == 2
    for i, url in enumerate(urls):  # fsspec's canonical memory URLs have a third slash
        assert url.startswith("memory://")
        assert url.endswith(f"inputs-{os.getpid()}/part-{i}.jsonl")


def test_progress_bar_and_summary(corpus, tmp_path):
    root, docs = corpus
    proc = run_cli("convert", str(root), "-o", str(tmp_path / "out"), "--progress")
    assert "convert:" in proc.stderr  # tqdm bar
    assert "docs=" in proc.stderr
    for needle in ("tasks:", "bytes in:", "bytes out:", "skipped:    0", "dataset: 1 arrow shards"):
        assert needle in proc.stdout


@pytest.mark.parametrize("fmt", ["arrow", "tar"])
def test_whole_file_and_line_readers_give_identical_output(tmp_path, monkeypatch, fmt):
    """Clean JSONL goes through pyarrow's JSON reader; the result must not depend on it."""
    from shardloader import sources
    from shardloader.sources import jsonl_table
    from shardloader.storage import list_files

    root = tmp_path / "in"
    docs = make_docs(900, seed=21)
    for doc in docs[::3]:
        del doc["id"]  # generated ids in the fast path too
    write_jsonl(root / "a.jsonl", docs[:300])
    write_jsonl(root / "b.jsonl.zst", docs[300:600])
    (root / "c.jsonl").write_text(  # a blank line: this file must take the line reader
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[600:700]) + "\n"
    )
    write_jsonl(root / "d.jsonl.gz", docs[700:])
    spec = sources.RecordSpec(keep_fields={"lang": "string", "score": "float64"})
    taken = [sources.read_jsonl_table(f, spec=spec) is not None for f in list_files([str(root)])]
    assert taken == [True, True, False, True]

    settings = dict(
        format=fmt,
        keep_fields=("lang", "score:float64"),
        shard_bytes=20_000,
        batch_bytes=3_000,
        task_bytes=10**9,
        num_proc=1,
    )
    convert([str(root)], ConvertConfig(output=str(tmp_path / "fast"), **settings))
    monkeypatch.setattr(jsonl_table, "FAST_JSONL_MAX_BYTES", 0)
    convert([str(root)], ConvertConfig(output=str(tmp_path / "slow"), **settings))
    fast, slow = published(tmp_path / "fast"), published(tmp_path / "slow")
    assert len(fast) > 10  # many shards, so shard and batch cuts fall inside files
    assert fast == slow
    samples = list(shardloader.iter_samples(str(tmp_path / "fast")))
    assert [s["text"] for s in samples] == [d["text"] for d in docs]
    assert samples[0]["id"] == "a.jsonl:1"
    assert samples[1]["id"] == docs[1]["id"]


@pytest.mark.parametrize("fast", [True, False])
def test_progress_reports_add_up_to_the_input(many_files, tmp_path, fast):
    from collections import Counter

    from shardloader.convert import Task, run_task
    from shardloader.storage import list_files

    root, docs = many_files
    plain = [f for f in list_files([str(root)]) if f.url.endswith(".jsonl")]
    reported: Counter[str] = Counter()

    def report(num_docs: int, num_bytes: int) -> None:
        reported["docs"] += num_docs
        reported["bytes"] += num_bytes

    record = run_task(
        Task(0, tuple(plain)),
        ConvertConfig(output=str(tmp_path / "o")),
        "fp",
        report,
        fast_jsonl=fast,
    )
    assert reported["docs"] == record["num_docs"] > 0
    assert reported["bytes"] == record["num_input_bytes"] == sum(f.num_bytes for f in plain)


def test_slurm_array_example_simulated_with_a_loop(many_files, tmp_path):
    """examples/slurm_array.sh without Slurm: a loop over the array, then merge."""
    root, docs = many_files
    reference = tmp_path / "reference"
    convert([str(root)], ConvertConfig(output=str(reference), task_bytes=4000, num_proc=1))
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        INPUT=str(root),
        OUTPUT=str(out),
        NUM_TASKS="3",
        CONVERT_ARGS="--task-bytes 4000 --num-proc 1",
        PYTHONPATH=str(repo),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    proc = subprocess.run(
        ["bash", str(repo / "examples" / "slurm_array.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("this slice is done") == 3
    assert f"{len(docs):,} samples" in proc.stdout
    assert published(out) == published(reference)
