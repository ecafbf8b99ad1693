"""`shardloader profile`: every stage measured on real shards, the bottleneck, the advice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardloader import ConfigError
from shardloader.mix_profile import SourceProfile, mix_bottleneck, profile_mixture
from shardloader.profiling import (
    LoaderResult,
    ProfileConfig,
    ProfileReport,
    StageResult,
    profile_dataset,
    stream_advice,
    suggest,
    transfer_advice,
)
from tests.conftest import ROOT, convert_docs, make_docs
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
    # Local shards converted by this version: the defaults read blocks in 64 MiB windows.
    assert (report.shuffle_unit, report.window_bytes, report.block_digests) == (
        "block",
        64 << 20,
        True,
    )
    assert any("holds at most 64 MiB decoded (shuffle_bytes)" in s for s in report.suggestions)


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
    # Remote: whole shards under "auto", and the advice names the way to blocks.
    assert report.shuffle_unit == "shard"
    assert report.window_units == 4
    assert report.window_bytes > 0  # the 4 largest shards, decoded
    assert any("shuffle_unit='block'" in line for line in report.suggestions)


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


def test_advice_on_the_unit_of_the_shuffle_follows_how_the_defaults_read() -> None:
    def advice(**changes: object) -> str:
        return "\n".join(stream_advice(synthetic(**changes)))

    remote_blocks = advice(shuffle_unit="block", window_bytes=64 << 20, bottleneck="fetch")
    assert "holds at most 64 MiB decoded" in remote_blocks
    assert "raise range_requests" in remote_blocks
    assert "range_requests" not in advice(shuffle_unit="block", remote=False, bottleneck="fetch")
    whole = advice(shuffle_unit="shard", window_units=4, window_bytes=512 << 20, block_digests=True)
    assert "mixes only 4 shards (512 MiB decoded)" in whole
    assert "shuffle_unit='block'" in whole
    old = advice(shuffle_unit="shard", window_units=4, block_digests=False)
    assert "no block digests" in old
    assert "shuffle_unit='block'" not in old


def test_advice_on_a_decode_bottleneck_names_decode_threads() -> None:
    advice = "\n".join(suggest(synthetic(bottleneck="decode"), cpu_count=4, cache_bytes=1 << 40))
    assert "decoding is the slowest stage (40.0M tokens/s): raise decode_threads" in advice
    assert "decode_threads" not in "\n".join(suggest(synthetic(), cpu_count=4, cache_bytes=1 << 40))
    local_blocks = synthetic(bottleneck="decode", remote=False, shuffle_unit="block")
    advice = "\n".join(suggest(local_blocks, cpu_count=4, cache_bytes=1 << 40))
    assert "add DataLoader workers (each decodes its own blocks)" in advice
    assert "raise decode_threads" not in advice


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

    # With --mix, profile_mixture(mix, **the rest): the same holds for it.
    for function, first in ((profile_dataset, "source"), (profile_mixture, "mix")):
        params = inspect.signature(function).parameters
        for f in dataclasses.fields(ProfileConfig):
            if f.name in ("source", "mix"):
                continue
            assert f.name in params, f.name
            assert params[f.name].default == f.default, f.name
        assert first in params
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


# --- mixtures (--mix) ----------------------------------------------------------------------

MIX_SOURCES = {"web": (300, 0.5), "code": (100, 0.3), "chat": (40, 0.2)}


@pytest.fixture(scope="module")
def mix_file(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A token mixture of three small tokenized datasets (web, code, chat)."""
    root = tmp_path_factory.mktemp("profile-mix")
    lines = ["unit: tokens", "total: 30000", "sources:"]
    for seed, (name, (n, weight)) in enumerate(MIX_SOURCES.items()):
        out = convert_docs(
            root / name,
            make_docs(n, seed=20 + seed),
            shard_samples=25,
            tokenizer=str(tokenizer_dir),
        )
        lines.append(f"  - {{url: '{out}', weight: {weight}, name: {name}, max_repetitions: 50}}")
    path = root / "mix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_profiles_each_source_the_mix_loader_and_names_the_limiting_source(
    mix_file: Path,
) -> None:
    common = ("--mix", str(mix_file), "--seq-len", "32", "--batch-size", "4", "--seconds", "0.2")
    table = run_cli(*common, "--num-workers", "0,1")
    assert table.returncode == 0, table.stderr
    out = table.stdout
    assert "3 sources, weights in tokens" in out
    for name, (_, weight) in MIX_SOURCES.items():
        assert f"source {name}: weight {weight:.3f}, {weight:.1%} of the mix's tokens" in out
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert f"{weight:.1%}" in row  # the per-worker table: rate, token share, rate / share
    assert out.count("\ndecode ") == 3  # a stage table per source
    assert "MixLoader num_workers=0: " in out
    assert "MixLoader num_workers=1: " in out
    assert "busy share of the main process: fetch_wait" in out
    assert "busy share of 1 worker: fetch_wait" in out
    head = next(line for line in out.splitlines() if line.startswith("bottleneck: source "))
    assert head.split()[2] in MIX_SOURCES

    as_json = run_cli(*common, "--num-workers", "0", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert [s["name"] for s in report["sources"]] == list(MIX_SOURCES)
    assert report["bottleneck"] in MIX_SOURCES
    slowest = min(report["sources"], key=lambda s: s["mix_tokens_per_s"])
    assert report["bottleneck"] == slowest["name"]
    for source in report["sources"]:
        assert source["per_worker_tokens_per_s"] > 0
        assert {s["name"] for s in source["report"]["stages"]} >= {"fetch", "decode", "pack"}
    (run,) = report["loaders"]
    assert run["num_workers"] == 0
    assert run["batches"] > 0
    assert run["tokens_per_s"] > 0
    assert set(run["stage_busy"]) == {"fetch_wait", "decode", "pack", "collate"}


def test_cli_needs_a_dataset_or_a_mixture_and_refuses_a_bad_one(
    mix_file: Path, token_dir: Path, tmp_path: Path
) -> None:
    neither = run_cli("--seconds", "0.2")
    assert neither.returncode == 1
    assert "profile needs a dataset (directory or URL) or --mix FILE" in neither.stderr
    both = run_cli(str(token_dir), "--mix", str(mix_file))
    assert both.returncode == 1
    assert "profile takes a dataset or --mix FILE, not both" in both.stderr
    missing = run_cli("--mix", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert "nope.yaml: no such mixture file" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"sources:\n  - {{url: '{token_dir}', wieght: 1}}\n")
    refused = run_cli("--mix", str(bad))
    assert refused.returncode == 1
    assert "unknown key 'wieght'" in refused.stderr
    for result in (neither, both, missing, refused):
        assert "Traceback" not in result.stderr


def test_the_source_with_the_lowest_rate_per_share_limits_the_mix() -> None:
    report = synthetic()

    def source(name: str, rate: float, share: float) -> SourceProfile:
        return SourceProfile(name, share, share, rate, rate / share, report)

    # fast: 4M tokens/s for half the tokens (8M per share); slow: 1M for the other half (2M).
    per_worker, name, time_share = mix_bottleneck(
        [source("fast", 4e6, 0.5), source("slow", 1e6, 0.5)]
    )
    assert name == "slow"
    assert per_worker == pytest.approx(1 / (0.5 / 4e6 + 0.5 / 1e6))  # 1.6M
    assert time_share == pytest.approx(0.8)
    # A slower source with a small share limits less than a faster one with a large share.
    _, name, _ = mix_bottleneck([source("big", 3e6, 0.9), source("small", 1e6, 0.1)])
    assert name == "big"


def test_advice_on_fast_batches_names_transfer_batches() -> None:
    def loader(workers: int, per_s: float) -> LoaderResult:
        return LoaderResult(workers, 1e6, 0.1, 1000, {}, per_s)

    # 0.15 ms a transfer: 4,000 batches/s in groups of 8 is 7.5% of the main process; 32 at
    # once bring it to 1.9%.
    fast = "\n".join(transfer_advice([loader(0, 9000.0), loader(2, 4000.0)], 8))
    assert "num_workers=2 the main process takes 4,000 batches/s" in fast
    assert "at transfer_batches=8 that is 8% of its time" in fast
    assert "transfer_batches=32" in fast
    assert transfer_advice([loader(0, 9000.0), loader(2, 2000.0)], 8) == []  # 3.8%: fine
    assert transfer_advice([loader(2, 4000.0)], 16) == []  # 3.8% at 16
    capped = "\n".join(transfer_advice([loader(4, 1e6)], 8))
    assert "transfer_batches=64" in capped
    # The report's suggestions include it, with ShardLoader's default.
    report = synthetic(loaders=(loader(2, 4000.0),))
    assert "transfer_batches=32" in "\n".join(suggest(report, cpu_count=4, cache_bytes=1 << 40))
    assert "transfer_batches" not in "\n".join(suggest(synthetic(), cpu_count=4, cache_bytes=1))
