"""The Ray executor: the same tasks and records as the local pool, so the same bytes and resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import ray

from shardloader import ConfigError, ConvertConfig, CorpusError, convert, merge
from tests.conftest import make_docs, published, run_cli, write_jsonl

pytestmark = pytest.mark.slow  # starting Ray takes ~7 s; the module runs in ~25 s


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the module; starting one takes a few seconds."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Small files (several tasks) and two files big enough to be cut into slices."""
    root = tmp_path_factory.mktemp("ray-in")
    docs = make_docs(900, seed=7)
    for i in range(4):
        write_jsonl(root / f"part-{i}.jsonl.gz", docs[i * 100 : (i + 1) * 100])
    write_jsonl(root / "part-8-big.jsonl.gz", docs[400:650])  # slices read by one reader
    write_jsonl(root / "part-9-big.jsonl", docs[650:])  # slices of byte ranges
    return root, len(docs)


SETTINGS = dict(task_bytes=2_000, slice_bytes=30_000, shard_samples=70)


def test_ray_output_is_byte_identical_to_local(ray_cluster, inputs, tmp_path):
    root, num_docs = inputs
    local = tmp_path / "local"
    convert([str(root)], ConvertConfig(output=str(local), num_proc=2, **SETTINGS))
    on_ray = tmp_path / "ray"
    result = convert([str(root)], ConvertConfig(output=str(on_ray), executor="ray", **SETTINGS))
    assert result.manifest is not None
    assert result.manifest.num_samples == result.num_docs == num_docs
    assert result.tasks_run == result.tasks_total == 6
    names = published(on_ray)
    assert any(name.startswith("shard-00004-00002-") for name in names)  # stream slices
    assert any(name.startswith("shard-00005-00002-") for name in names)  # byte-range slices
    assert published(on_ray) == published(local)


def test_resume_across_executors(ray_cluster, inputs, tmp_path):
    """Slice 0 of 2 on Ray, slice 1 locally, then merge: the same as one local run."""
    root, _ = inputs
    reference = tmp_path / "reference"
    convert([str(root)], ConvertConfig(output=str(reference), num_proc=1, **SETTINGS))
    out = tmp_path / "out"
    first = ConvertConfig(output=str(out), executor="ray", num_tasks=2, task_index=0, **SETTINGS)
    assert convert([str(root)], first).manifest is None
    second = ConvertConfig(output=str(out), num_proc=1, num_tasks=2, task_index=1, **SETTINGS)
    assert convert([str(root)], second).manifest is None
    merge(str(out))
    assert published(out) == published(reference)
    # Interrupted locally (a task's record lost), finished on Ray.
    (out / "_manifest.json").unlink()
    (out / "_work" / "task-00001.json").unlink()
    again = convert([str(root)], ConvertConfig(output=str(out), executor="ray", **SETTINGS))
    assert again.tasks_run == 1
    assert published(out) == published(reference)


def test_a_bad_record_on_ray_raises_our_error(ray_cluster, tmp_path):
    bad = tmp_path / "in" / "bad.jsonl"
    write_jsonl(bad, make_docs(30))
    with bad.open("a") as f:
        f.write('{"text": 5}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:31: field 'text' is a number"):
        convert([str(bad)], ConvertConfig(output=str(tmp_path / "out"), executor="ray"))


def test_cli_joins_the_running_cluster_and_summarizes(ray_cluster, inputs, tmp_path):
    root, num_docs = inputs
    out = tmp_path / "out"
    proc = run_cli(
        "convert",
        str(root),
        "-o",
        str(out),
        "--executor",
        "ray",
        "--ray-address",
        "auto",
        "--task-bytes",
        "2KB",
        "--progress",
    )
    assert f"converted {num_docs:,} documents" in proc.stdout
    assert "tasks:      6 run" in proc.stdout
    assert "docs=" in proc.stderr  # the progress bar counted finished tasks


def test_ray_refuses_a_dataset_in_memory_and_a_stray_address(tmp_path):
    with pytest.raises(ConfigError, match="ray_address applies to executor='ray'"):
        ConvertConfig(output=str(tmp_path / "o"), ray_address="auto")
    ds = datasets.Dataset.from_list([{"text": "a"}])
    with pytest.raises(ConfigError, match="a dataset in memory converts on the local executor"):
        convert(ds, ConvertConfig(output=str(tmp_path / "o"), executor="ray"))
