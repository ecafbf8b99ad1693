"""`shardloader profile`: every stage measured on real shards, the bottleneck, the advice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardloader import ConfigError
from shardloader.profiling import (
    ProfileConfig,
    ProfileReport,
    StageResult,
    profile_dataset,
    suggest,
)
from tests.conftest import ROOT
from tests.streaming import serve_dataset


def stage(report: ProfileReport, name: str) -> StageResult:
    return next(s for s in report.stages if s.name == name)


def test_every_stage_of_tokenized_shards_is_measured(token_dir: Path) -> None:
    report = profile_dataset(str(token_dir), seq_len=64, num_workers=(0, 2), seconds=0.3)
    assert report.tokenized
    assert not report.remote
    assert report.num_shards == 7
    for name in ("fetch", "decode", "pack", "collate"):
        assert stage(report, name).tokens_per_s > 0, name
    assert stage(report, "decode").amount == 1003  # every shard decoded, every row taken
    assert stage(report, "tokenize").tokens_per_s is None  # nothing to tokenize
    timed = {s.name: s.tokens_per_s for s in report.stages if s.tokens_per_s}
    assert report.bottleneck == min(timed, key=timed.__getitem__)
    assert [run.num_workers for run in report.loaders] == [0, 2]
    assert all(run.batches > 0 and run.tokens_per_s > 0 for run in report.loaders)
    assert report.suggestions  # at least the worker count


def test_text_shards_need_a_tokenizer_and_then_time_it(
    dataset_dir: Path, tokenizer_dir: Path
) -> None:
    with pytest.raises(ConfigError, match="text shards; pass --tokenizer"):
        profile_dataset(str(dataset_dir), seconds=0.1)
    report = profile_dataset(
        str(dataset_dir),
        tokenizer=str(tokenizer_dir),
        seq_len=64,
        num_workers=(0,),
        seconds=0.3,
    )
    assert not report.tokenized
    assert stage(report, "tokenize").amount > 0
    assert stage(report, "tokenize").tokens_per_s > 0


@pytest.mark.s3
def test_a_remote_dataset_is_downloaded_and_judged_against_the_cache(
    token_dir: Path, tmp_path: Path
) -> None:
    with serve_dataset(token_dir) as s3:
        report = profile_dataset(
            "s3://data/set",
            seq_len=64,
            num_workers=(0,),
            seconds=0.3,
            cache_dir=str(tmp_path / "cache"),
            storage_options=s3.storage_options,
        )
    assert report.remote
    assert stage(report, "fetch").note == "download into a fresh cache"
    assert stage(report, "fetch").amount > 0
    assert any("holds the whole dataset" in line for line in report.suggestions)


def synthetic(**changes: object) -> ProfileReport:
    stages = (
        StageResult("fetch", 1.0, 100.0, "MB", 50e6),
        StageResult("decode", 1.0, 1e5, "samples", 40e6),
        StageResult("tokenize", 1.0, 1e6, "tokens", 1e6),
        StageResult("pack", 1.0, 3e7, "tokens", 30e6),
        StageResult("collate", 1.0, 6e7, "tokens", 60e6),
    )
    report = ProfileReport(
        source="s3://b/d",
        remote=True,
        num_shards=100,
        dataset_bytes=int(50e9),
        mean_shard_bytes=5e8,
        tokenized=False,
        stages=stages,
        loaders=(),
        per_worker_tokens_per_s=0.95e6,
        bottleneck="tokenize",
        suggestions=(),
    )
    return dataclasses.replace(report, **changes)  # type: ignore[arg-type]


def test_advice_follows_the_figures() -> None:
    advice = suggest(synthetic(), cpu_count=16, cache_bytes=16 << 30)
    text = "\n".join(advice)
    # 15 usable cores (one left to training) x 0.95M = 14.25M, under the fetch's 50M; 8 workers
    # reach only 7.6M, so it takes all 15.
    assert "num_workers=15: about 14.2M tokens/s" in text
    assert "convert with --tokenizer" in text
    assert "larger than the cache" in text
    assert "50.0 GB" in text
    assert "shards are small" not in text


def test_advice_on_fetch_small_shards_and_a_cache_that_fits() -> None:
    report = synthetic(
        bottleneck="fetch",
        per_worker_tokens_per_s=20e6,
        dataset_bytes=int(1e9),
        mean_shard_bytes=2e6,
        num_shards=500,
        stages=(StageResult("fetch", 1.0, 10.0, "MB", 5e6),),
    )
    advice = "\n".join(suggest(report, cpu_count=4, cache_bytes=16 << 30))
    assert "fetching is the slowest stage" in advice
    assert "(capped by fetch)" in advice  # one worker already out-runs the fetch
    assert "holds the whole dataset" in advice
    assert "shards are small (2.0 MB" in advice


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardloader", "profile", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prints_a_table_and_json(token_dir: Path) -> None:
    common = (str(token_dir), "--seq-len", "64", "--num-workers", "0", "--seconds", "0.2")
    table = run_cli(*common)
    assert table.returncode == 0, table.stderr
    assert "bottleneck:" in table.stdout
    assert "decode" in table.stdout
    as_json = run_cli(*common, "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert {s["name"] for s in report["stages"]} >= {"fetch", "decode", "pack", "collate"}


def test_cli_names_a_missing_dataset(tmp_path: Path) -> None:
    result = run_cli(str(tmp_path / "nothing-here"))
    assert result.returncode == 1
    assert "nothing-here" in result.stderr
    assert "no manifest" in result.stderr
    assert "Traceback" not in result.stderr


def test_profile_config_is_what_profile_dataset_takes() -> None:
    # `shardloader profile` calls profile_dataset(**asdict(config)): names and defaults agree.
    import inspect

    params = inspect.signature(profile_dataset).parameters
    for f in dataclasses.fields(ProfileConfig):
        assert f.name in params, f.name
        if f.name != "source":
            assert params[f.name].default == f.default, f.name
    with pytest.raises(ConfigError, match="seconds, seq_len and batch_size must be > 0"):
        ProfileConfig(source="d", seconds=0)
    with pytest.raises(ConfigError, match="num_workers must be >= 0"):
        ProfileConfig(source="d", num_workers=(0, -1))


def test_cli_flags_come_from_profile_config(tmp_path: Path) -> None:
    from shardloader.cli import build_parser
    from shardloader.options import config_from_args

    args = build_parser().parse_args(
        ["profile", "d/", "--num-workers", "1,3", "--seq-len", "64", "--json"]
    )
    config = config_from_args(ProfileConfig, args)
    assert config == ProfileConfig(source="d/", num_workers=(1, 3), seq_len=64)
    assert args.json is True
    bad = run_cli(str(tmp_path), "--num-workers", "two")
    assert bad.returncode == 2
    assert "--num-workers: takes counts like 0,2; got 'two'" in bad.stderr
