"""Mixtures: the pure schedule, the config, and real rank processes reading three sources.

The rank tests start every rank as its own process (``tests/mix_rank.py``, rank from ``RANK``),
with 0 to 2 real DataLoader workers, and check exact sets: per global batch the count of each
source is within one sample of ``weight x batch``; per source every sample is served once per
pass before any repeats; every rank gets the same number of samples; and the global stream is
the same on every topology, also across a kill and resume on another one.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardloader
from shardloader import ConfigError, Mixture, Phase, ResumeError, Source
from shardloader.mix_config import normalize
from shardloader.mix_plan import (
    MixCounters,
    SourceOrder,
    SourceSize,
    batch_layout,
    plan_mixture,
    sample_batch,
    token_batch,
)
from shardloader.plan import PlanConfig
from tests.conftest import convert_docs, make_docs

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = ROOT / "tests" / "mix_rank.py"
SIZES = {"a": 300, "b": 100, "c": 25}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def _spec(sizes: dict[str, int], unit: str = "samples", total: int | None = None, **kw: Any):
    mixture = Mixture(
        [Source(f"/data/{n}", WEIGHTS.get(n, 1.0), **kw.get(n, {})) for n in sizes],
        unit=unit,
        total=total,
        phases=kw.get("phases", ()),
    )
    tokens = kw.get("tokens", {})
    return plan_mixture(
        mixture,
        [SourceSize(np.array([s], np.int64), tokens.get(n, s * 10)) for n, s in sizes.items()],
        PlanConfig(seed=0),
    )


# --- the pure schedule ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    batch=st.integers(1, 97),
    steps=st.integers(1, 60),
)
def test_every_batch_is_within_one_sample_and_prefixes_stay_close(
    weights: list[int], batch: int, steps: int
) -> None:
    mixture = Mixture([Source(f"/d/{i}", float(w)) for i, w in enumerate(weights)], total=10**9)
    spec = plan_mixture(
        mixture, [SourceSize(np.array([1000], np.int64), 0) for _ in weights], PlanConfig()
    )
    exact = normalize([float(w) for w in weights])
    counters = MixCounters.fresh(len(weights))
    served = [0] * len(weights)
    for step in range(steps):
        counts = sample_batch(spec, counters, batch)
        assert sum(counts) == batch
        for i, count in enumerate(counts):
            assert abs(count - exact[i] * batch) < 1
            served[i] += count
            # Every prefix stays within one batch of the target (in fact within ~1 sample).
            assert abs(served[i] - exact[i] * batch * (step + 1)) < 2
    assert counters.taken == served


def test_batch_layout_interleaves_and_ranks_get_balanced_slices() -> None:
    sources, index = batch_layout((5, 3, 2))
    layout = list(zip(sources.tolist(), index.tolist(), strict=True))
    assert sorted(layout) == sorted(
        [(0, j) for j in range(5)] + [(1, j) for j in range(3)] + [(2, j) for j in range(2)]
    )
    # Each source's places stay in order, and each half of the batch holds about half of each.
    for i in range(3):
        js = [j for s, j in layout if s == i]
        assert js == sorted(js)
    first = collections.Counter(s for s, _ in layout[:5])
    assert first in ({0: 3, 1: 1, 2: 1}, {0: 2, 1: 2, 2: 1})
    assert batch_layout((2, 0, 2))[0].tolist() == [0, 2, 0, 2]  # equal keys: lower source first


def test_token_batches_are_exact_in_tokens_and_follow_the_weights() -> None:
    rng = np.random.default_rng(0)
    lengths = {i: rng.integers(1, 200, 5000) for i in range(3)}
    spec = _spec({"a": 5000, "b": 5000, "c": 5000}, unit="tokens", total=10**7)
    counters = MixCounters.fresh(3)
    per_source = np.zeros(3)
    for step in range(200):
        pieces = token_batch(spec, counters, 4096, lambda i, k: int(lengths[i][k % 5000]))
        assert sum(p.stop - p.start for p in pieces) == 4096
        for p in pieces:
            per_source[p.source] += p.stop - p.start
        target = np.array([0.5, 0.3, 0.2]) * 4096 * (step + 1)
        # Committed tokens never lead by a whole document; the lag is a few documents at most.
        assert np.all(np.abs(per_source - target) < 3 * 200)
    # Consecutive pieces continue documents exactly: the stream is a partition of documents.
    assert counters.served == [int(x) for x in per_source]


def test_source_order_is_a_permutation_per_pass_and_each_pass_reshuffles() -> None:
    order = SourceOrder(np.array([7, 0, 13, 5], np.int64), PlanConfig(seed=3), index=1)
    first = order.ids(0, 25)
    second = order.ids(25, 25)
    assert sorted(first.tolist()) == list(range(25)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    # Read in pieces or at once: the same stream.
    pieces = np.concatenate([order.ids(k, 1) for k in range(50)])
    assert pieces.tolist() == first.tolist() + second.tolist()
    other = SourceOrder(np.array([7, 0, 13, 5], np.int64), PlanConfig(seed=3), index=2)
    assert other.ids(0, 25).tolist() != first.tolist()


def test_phases_change_the_weights_at_their_unit() -> None:
    spec = _spec(
        {"a": 1000, "b": 1000},
        total=100,
        phases=[Phase(at=0.5, weights={"b": 1.0})],
    )
    counters = MixCounters.fresh(2)
    counts = [sample_batch(spec, counters, 10) for _ in range(10)]
    assert all(c in ([6, 4], [7, 3]) for c in counts[:5])  # 0.625 and 0.375 of 10
    assert counts[5:] == [[0, 10]] * 5


# --- the config --------------------------------------------------------------------------


def test_infeasible_mix_is_refused_naming_the_source_and_when() -> None:
    with pytest.raises(ConfigError, match=r"'c' runs out 250 samples into .* 4.00 passes"):
        _spec({"a": 300, "b": 100, "c": 50}, total=1000, c={"max_repetitions": 1})
    # Without total the run ends before the first source would repeat: c (25 at 0.2) at 125.
    assert _spec(SIZES).total == 125
    assert _spec(SIZES, c={"max_repetitions": 2}).total == 250


def test_mixture_files_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "mix.yaml"
    path.write_text(
        "unit: samples\ntotal: 600\nsources:\n"
        "  - {url: data/web, weight: 0.6}\n"
        "  - {url: data/code/, weight: 0.4, name: code, max_repetitions: 2}\n"
        "phases:\n  - {at: 0.9, weights: {web: 1, code: 1}}\n"
    )
    mix = Mixture.from_file(path)
    assert mix.names == ["web", "code"]
    assert mix.total == 600
    assert Mixture.from_dict(json.loads(json.dumps(mix.to_dict()))) == mix
    (tmp_path / "mix.json").write_text(json.dumps(mix.to_dict()))
    assert Mixture.from_file(tmp_path / "mix.json") == mix
    bad = [
        ({"sources": []}, "non-empty list"),
        ({"sources": [{"url": "x", "weight": -1}]}, "expected a number > 0"),
        ({"sources": [{"url": "x", "weight": 1, "wieght": 2}]}, "unknown key 'wieght'"),
        ({"sources": [{"url": "a/x", "weight": 1}, {"url": "b/x", "weight": 1}]}, "share"),
        ({"sources": [{"url": "x", "weight": 1}], "unit": "bytes"}, "'samples' or 'tokens'"),
        (
            {"sources": [{"url": "x", "weight": 1}], "phases": [{"at": 0.5, "weights": {"x": 1}}]},
            "no total",
        ),
        (
            {
                "sources": [{"url": "x", "weight": 1}],
                "total": 10,
                "phases": [{"at": 5, "weights": {"y": 1}}],
            },
            "'y', which is not a source",
        ),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            Mixture.from_dict(data, where="mix.yaml")
    (tmp_path / "bad.yaml").write_text("sources: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        Mixture.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such mixture file"):
        Mixture.from_file(tmp_path)


# --- real data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """Three tokenized Arrow datasets of 300, 100 and 25 documents (b as tar shards)."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for seed, (name, n) in enumerate(SIZES.items()):
        docs = make_docs(n, seed=10 + seed)
        out[name] = convert_docs(
            root / name,
            docs,
            shard_samples=17,
            tokenizer=str(tokenizer_dir),
            format="tar" if name == "b" else "arrow",
        )
    return out


def _mixture(sources: dict[str, Path], **kw: Any) -> Mixture:
    return Mixture(
        [
            Source(str(sources[n]), WEIGHTS[n], name=n, max_repetitions=8 if n == "c" else None)
            for n in SIZES
        ],
        **kw,
    )


def _run_ranks(
    tmp: Path, tag: str, mixture: Mixture, world: int, workers: int, **spec: Any
) -> list[dict[str, Any]]:
    spec = {
        "mixture": mixture.to_dict(),
        "batch_size": spec.pop("batch_size", 12 // world),
        "num_workers": workers,
        "seq_len": 32,
        "out": str(tmp / tag),
        **spec,
    }
    path = tmp / f"{tag}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "WORLD_SIZE": str(world), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(RANK_SCRIPT), str(path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(world)
    ]
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    return [json.loads((tmp / f"{tag}-rank{r}.json").read_text()) for r in range(world)]


def _global_batches(ranks: list[dict[str, Any]]) -> list[list[tuple[str, int]]]:
    """Step t of every rank, concatenated in rank order: the global batches."""
    steps = [r["steps"] for r in ranks]
    assert len({len(s) for s in steps}) == 1, "ranks made different numbers of steps"
    return [[tuple(x) for rank in steps for x in rank[t]] for t in range(len(steps[0]))]


def _check_mix(batches: list[list[tuple[str, int]]], batch: int) -> None:
    served: dict[str, list[int]] = collections.defaultdict(list)
    for step in batches:
        assert len(step) == batch
        counts = collections.Counter(s for s, _ in step)
        for name, weight in WEIGHTS.items():
            assert abs(counts[name] - weight * batch) < 1, (counts, step)
        for name, sample in step:
            served[name].append(sample)
    for name, ids in served.items():
        size = SIZES[name]
        # Pass p is ids[p*size:(p+1)*size]: each a permutation of the source.
        for p in range(len(ids) // size):
            assert sorted(ids[p * size : (p + 1) * size]) == list(range(size))
        rest = ids[len(ids) // size * size :]
        assert len(set(rest)) == len(rest)


@pytest.mark.slow
def test_ranks_and_workers_read_the_same_exact_global_stream(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    mixture = _mixture(sources, total=600)
    reference = None
    for world, workers in [(1, 0), (1, 2), (2, 1), (3, 2), (2, 0), (3, 0)]:
        ranks = _run_ranks(tmp_path, f"w{world}k{workers}", mixture, world, workers)
        counts = [sum(len(s) for s in r["steps"]) for r in ranks]
        assert counts == [counts[0]] * world
        batches = _global_batches(ranks)
        assert len(batches) == 600 // 12
        _check_mix(batches, 12)
        if reference is None:
            reference = batches
        assert batches == reference, f"{world} ranks x {workers} workers read another stream"
        # The state is global: every rank saves the same one.
        assert all(r["state"] == ranks[0]["state"] for r in ranks)
        served = {c["source"]: c["samples"] for c in ranks[0]["counters"]}
        assert served == {"a": 300, "b": 180, "c": 120}


@pytest.mark.slow
def test_kill_and_resume_on_the_same_and_on_another_topology(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    mixture = _mixture(sources, total=600)
    whole = _global_batches(_run_ranks(tmp_path, "whole", mixture, 2, 1, epochs=2))
    assert len(whole) == 100  # two epochs: the second continues every source stream
    _check_mix(whole, 12)
    first = _run_ranks(tmp_path, "first", mixture, 2, 2, stop=17)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first[1]["state"]))
    head = _global_batches(first)
    assert head == whole[:17]
    # Same topology: exactly the same batches.
    same = _run_ranks(tmp_path, "same", mixture, 2, 1, load=str(state), epochs=2)
    assert head + _global_batches(same) == whole
    # Three ranks of 4 (the same global batch) or one rank of 8: the mix stays exact and
    # nothing is lost or repeated in any source.
    for world, batch in [(3, 4), (1, 8)]:
        other = _run_ranks(
            tmp_path, f"other{world}", mixture, world, 0, load=str(state), batch_size=batch
        )
        rest = _global_batches(other)
        _check_mix(head + rest, len(rest[0])) if batch * world == 12 else None
        for step in rest:
            counts = collections.Counter(s for s, _ in step)
            for name, weight in WEIGHTS.items():
                assert abs(counts[name] - weight * batch * world) < 1
        served = collections.defaultdict(list)
        for step in head + rest:
            for name, sample in step:
                served[name].append(sample)
        for name, ids in served.items():
            size = SIZES[name]
            for p in range(len(ids) // size):
                assert sorted(ids[p * size : (p + 1) * size]) == list(range(size))


@pytest.mark.slow
def test_token_mixture_rows_across_ranks_are_one_token_stream(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    mixture = _mixture(sources, unit="tokens", total=12_000)
    one = _run_ranks(tmp_path, "t1", mixture, 1, 0, batch_size=6)
    two = _run_ranks(tmp_path, "t2", mixture, 2, 2, batch_size=3)
    assert len(one[0]["steps"]) == 12_000 // (6 * 32) == len(two[0]["steps"])
    for t, step in enumerate(one[0]["steps"]):
        joined = two[0]["steps"][t] + two[1]["steps"][t]
        assert [p[2] for p in step] == [p[2] for p in joined] or sum(
            (p[2] for p in step), []
        ) == sum((p[2] for p in joined), [])
        assert sum(len(p[2]) for p in step) == 6 * 32
    served = {c["source"]: (c["tokens"], c["target"]) for c in one[0]["counters"]}
    for tokens, target in served.values():
        assert abs(tokens - target) < 400, served  # within a few documents of the target
    # Token ids are the documents' own: a piece is a slice of its document.
    docs = {
        n: {s["sample_id"]: s["input_ids"].tolist() for s in shardloader.iter_samples(str(p))}
        for n, p in sources.items()
    }
    names = list(SIZES)
    for step in one[0]["steps"]:
        for source, sample, tokens in step:
            doc = docs[names[source]][sample]
            assert any(doc[k : k + len(tokens)] == tokens for k in range(len(doc)))


@pytest.mark.slow
@pytest.mark.torchrun
def test_one_source_on_s3_and_torchrun(
    sources: dict[str, Path], tmp_path: Path, s3_server: Any
) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    fs.mkdir("mixbucket")
    fs.put(str(sources["b"]) + "/", "mixbucket/b/", recursive=True)
    local = _mixture(sources, total=600)
    remote = Mixture(
        [
            s if s.name != "b" else Source("s3://mixbucket/b", s.weight, name="b")
            for s in local.sources
        ],
        total=600,
    )
    spec = {
        "mixture": remote.to_dict(),
        "batch_size": 6,
        "num_workers": 1,
        "out": str(tmp_path / "tr"),
        "storage_options": s3_server.storage_options,
        "gloo": True,
    }
    (tmp_path / "tr.json").write_text(json.dumps(spec))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(RANK_SCRIPT),
            str(tmp_path / "tr.json"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        check=True,
        timeout=240,
    )
    ranks = [json.loads((tmp_path / f"tr-rank{r}.json").read_text()) for r in range(2)]
    batches = _global_batches(ranks)
    reference = _global_batches(_run_ranks(tmp_path, "ref", local, 1, 0))
    assert batches == reference


def test_refusals_name_what_is_wrong(sources: dict[str, Path], tmp_path: Path) -> None:
    from shardloader import PackConfig, ShardDataset, ShardLoader

    text = convert_docs(tmp_path / "text", make_docs(20))
    mixed = Mixture(
        [Source(str(sources["a"]), 1.0), Source(str(text), 1.0, name="t")], unit="tokens"
    )
    dataset = ShardDataset(mixed, pack=PackConfig(seq_len=32))
    with pytest.raises(ConfigError, match="text dataset in a mixture with unit='tokens'"):
        dataset.spec()
    with pytest.raises(ConfigError, match="pass pack=PackConfig"):
        ShardDataset(mixed)
    loader = ShardLoader(ShardDataset(_mixture(sources, total=600)), batch_size=4)
    state = loader.state_dict()
    other = ShardLoader(ShardDataset(_mixture(sources, total=300)), batch_size=4)
    with pytest.raises(ResumeError, match="another mixture"):
        other.load_state_dict(state)
    broken = {**state, "counters": {**state["counters"], "taken": [1, -2, 3]}}
    with pytest.raises(ResumeError, match="taken must hold 3 counts"):
        loader.load_state_dict(broken)
    with pytest.raises(ConfigError, match="batch size"):
        ShardLoader(ShardDataset(_mixture(sources, total=600)))
    assert math.isinf(ShardDataset(_mixture(sources, total=600)).spec().runs_out[0])


def test_inspect_mix_prints_the_plan(sources: dict[str, Path], tmp_path: Path) -> None:
    from tests.conftest import run_cli

    path = tmp_path / "mix.json"
    path.write_text(json.dumps(_mixture(sources, total=600).to_dict()))
    out = run_cli("inspect", "--mix", str(path), "--batch-size", "12")
    assert "600 samples per epoch (50 global batches of 12 samples)" in out.stdout
    assert "c: 25 samples" in out.stdout
    assert "4.80 passes" in out.stdout  # c: 0.2 x 600 = 120 of 25
    (tmp_path / "bad.json").write_text(json.dumps(_mixture(sources, total=6000).to_dict()))
    bad = run_cli("inspect", "--mix", str(tmp_path / "bad.json"), check=False)
    assert bad.returncode != 0
    assert "'c' runs out 1,000 samples into the run of total=6,000" in bad.stderr


# --- training on a mixture ------------------------------------------------------------------


def _mix_file(sources: dict[str, Path], tmp_path: Path) -> Path:
    path = tmp_path / "mix.yaml"
    lines = ["unit: tokens", "sources:"]
    for name in SIZES:
        reps = ", max_repetitions: 20" if name == "c" else ""
        lines.append(f"  - {{url: '{sources[name]}', weight: {WEIGHTS[name]}, name: {name}{reps}}}")
    path.write_text("\n".join([*lines, "total: 20000", ""]))
    return path


@pytest.mark.slow
def test_train_on_a_mixture_logs_the_mix_and_resumes_exactly(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    import torch

    from shardloader.train import TrainConfig, train
    from shardloader.train.checkpoint import list_checkpoints

    mix = _mix_file(sources, tmp_path)

    def run(out: Path, **kw: Any) -> Any:
        config = TrainConfig(
            mix=str(mix),
            output_dir=str(out),
            model="tiny",
            seq_len=32,
            batch_size=4,
            warmup_steps=2,
            num_workers=2,
            log_samples=True,
            deterministic=True,
            schedule_steps=10,
            **kw,
        )
        return train(config)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = run(tmp_path / "full", max_steps=10)
        run(tmp_path / "part", max_steps=6, checkpoint_every=3)
        assert [s for s, _ in list_checkpoints(tmp_path / "part" / "checkpoints")] == [3, 6]
        shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000006")
        resumed = run(tmp_path / "part", max_steps=10, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed.history[0].step == 4
    assert [m.loss for m in full.history[3:]] == [m.loss for m in resumed.history]
    last = full.history[-1].mix
    assert last is not None
    assert set(last) == set(SIZES)
    # 10 steps x 4 rows x 32 tokens; each source within a few documents of its target.
    assert sum(v["tokens"] for v in last.values()) == 10 * 4 * 32
    assert all(v["samples"] > 0 for v in last.values())
    for v in last.values():
        assert abs(v["tokens"] - v["target"]) < 400
    assert resumed.history[-1].mix == last
    metrics = [
        json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics[-1]["mix"] == last


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_trains_on_a_mixture_from_the_command_line(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    mix = _mix_file(sources, tmp_path)
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "shardloader.train",
            "--mix",
            str(mix),
            "--output-dir",
            str(out),
            "--model",
            "tiny",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "5",
            "--num-workers",
            "1",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| mix a " in result.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5
    # Two ranks x 2 rows x 32 tokens per step, counted once (the counters are global).
    assert sum(v["tokens"] for v in metrics[-1]["mix"].values()) == 5 * 2 * 2 * 32


@pytest.mark.slow
def test_a_phase_changes_the_mix_at_its_step_on_every_rank(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    base = _mixture(sources, total=600)
    mixture = Mixture(base.sources, total=600, phases=[Phase(at=0.5, weights={"a": 1, "b": 1})])
    batches = _global_batches(_run_ranks(tmp_path, "phase", mixture, 2, 1))
    assert len(batches) == 50
    for t, step in enumerate(batches):
        counts = collections.Counter(s for s, _ in step)
        if t < 25:  # 0.5 / 0.3 / 0.2 of 12
            assert counts["a"] == 6
            assert counts["b"] in (3, 4)
            assert counts["c"] in (2, 3)
        else:  # from sample 300: a and b half each, c none
            assert counts == {"a": 6, "b": 6}


def test_sources_with_different_tokenizers_are_refused_naming_both(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    from shardloader import ShardDataset

    other_tok = tmp_path / "tok2"
    shardloader.train_bpe_tokenizer(
        [d["text"] for d in make_docs(300, seed=5)], str(other_tok), vocab_size=300
    )
    other = convert_docs(tmp_path / "other", make_docs(30, seed=6), tokenizer=str(other_tok))
    mixture = Mixture([Source(str(sources["a"]), 1.0), Source(str(other), 1.0, name="o")])
    with pytest.raises(ConfigError, match="different tokenizers") as err:
        ShardDataset(mixture).spec()
    assert str(sources["a"]) in str(err.value)
    assert str(other) in str(err.value)


# --- a chat source beside a text source in one token mixture --------------------------------


def encode_loss_spans(samples: Any) -> list[Any]:
    """The token encoder of tokenized chat shards: ``loss_spans`` ([start, end) pairs) -> mask."""
    from shardloader.pack_encode import EncodedDoc

    docs = []
    for sample in samples:
        ids = np.asarray(sample["input_ids"])
        mask = None
        if sample.get("loss_spans") is not None:
            mask = np.zeros(len(ids), bool)
            for start, end in sample["loss_spans"]:
                mask[start:end] = True
        docs.append(EncodedDoc(ids, mask))
    return docs


def test_token_mixture_of_chat_and_text_trains_chat_only_on_its_masks(tmp_path: Path) -> None:
    """Labels: every token of the text source; only the assistant tokens of the chat source.

    The chat source is conversations rendered at conversion with the default chat template
    (``input_ids`` + ``loss_spans``); the text source shares its tokenizer.
    """
    from shardloader.pack import PackConfig

    tok = tmp_path / "tok"
    texts = [d["text"] for d in make_docs(300, seed=20)]
    shardloader.train_bpe_tokenizer(texts, str(tok), vocab_size=500, chat_template=True)
    rng = np.random.default_rng(21)
    conversations = []
    for i, doc in enumerate(make_docs(60, seed=21)):
        words = doc["text"].split()
        cut = int(rng.integers(1, max(2, len(words))))
        messages = [
            {"role": "user", "content": " ".join(words[:cut])},
            {"role": "assistant", "content": " ".join(words[cut:]) or "ok"},
        ]
        if i % 3 == 0:  # some with a second exchange
            messages += [
                {"role": "user", "content": "more?"},
                {"role": "assistant", "content": " ".join(words[: cut // 2 + 1])},
            ]
        conversations.append({"id": f"c{i}", "messages": messages})
    chat = convert_docs(tmp_path / "chat", conversations, tokenizer=str(tok), shard_samples=17)
    text = convert_docs(
        tmp_path / "text", make_docs(80, seed=22), tokenizer=str(tok), shard_samples=17
    )
    stored = {
        name: {s["sample_id"]: s for s in shardloader.iter_samples(str(path))}
        for name, path in [("text", text), ("chat", chat)]
    }
    for sample in stored["chat"].values():
        assert sample["loss_spans"][-1][1] == len(sample["input_ids"])  # spans fit the ids
    mixture = Mixture(
        [Source(str(text), 0.5, name="text"), Source(str(chat), 0.5, name="chat")],
        unit="tokens",
        total=4 * 32 * 12,
    )
    # long_docs does not apply to a token mix (concat): long documents are cut, not dropped.
    dataset = shardloader.ShardDataset(mixture, pack=PackConfig(seq_len=32, long_docs="drop"))
    names = ["text", "chat"]
    previous: tuple[str, int, int] | None = None  # the last segment's document and its end
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for batch in shardloader.ShardLoader(dataset, batch_size=4):
        input_ids, labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
        cu = batch["cu_seqlens"].tolist()
        pieces = zip(batch["sample_sources"].tolist(), batch["sample_ids"].tolist(), strict=True)
        for (source, sample_id), lo, hi in zip(pieces, cu[:-1], cu[1:], strict=True):
            name = names[source]
            ids = stored[name][sample_id]["input_ids"]
            # A segment continues its document if the previous one was its unfinished start.
            offset = 0
            if (
                previous is not None
                and previous[:2] == (name, sample_id)
                and previous[2] < len(ids)
            ):
                offset = previous[2]
            previous = (name, sample_id, offset + hi - lo)
            np.testing.assert_array_equal(input_ids[lo:hi].numpy(), ids[offset : offset + hi - lo])
            want = np.asarray(ids[offset : offset + hi - lo], np.int64).copy()
            if name == "chat":
                mask = encode_loss_spans([stored[name][sample_id]])[0].loss_mask
                want[~mask[offset : offset + hi - lo]] = -100
            want[0] = -100  # each segment's first label (mask_boundary_labels)
            np.testing.assert_array_equal(labels[lo:hi].numpy(), want)
            seen[name, "tokens"] += hi - lo
            seen[name, "continued"] += offset > 0
            seen[name, "trained"] += int((want != -100).sum())
    # Not vacuous: both sources served; chat prompts masked, some chat tokens trained.
    assert seen["text", "tokens"] > 500
    assert seen["chat", "tokens"] > 500
    assert seen["text", "tokens"] + seen["chat", "tokens"] == mixture.total  # all planned
    assert seen["text", "continued"] > 0
    assert seen["chat", "continued"] > 0
    assert 0 < seen["chat", "trained"] < 0.8 * seen["chat", "tokens"]
    assert seen["text", "trained"] > 0.8 * seen["text", "tokens"]


def _step_ids(samples: list[dict[str, Any]]) -> list[list[Any]]:
    return [[s["source"], s["sample_id"]] for s in samples]


@pytest.mark.parametrize("unit", ["samples", "tokens"])
def test_grouped_transfers_give_the_steps_and_states_of_single_ones(
    sources: dict[str, Path], unit: str
) -> None:
    # With workers a MixLoader takes several steps per transfer (a step crossing from a worker
    # costs the main process about 0.1 ms); steps, their order and the state after each one are
    # those of one step per transfer.
    from shardloader import PackConfig, ShardDataset, ShardLoader

    tokens = unit == "tokens"

    def run(transfer: int) -> tuple[list[Any], list[dict[str, Any]]]:
        mixture = _mixture(sources, unit=unit, total=6_000 if tokens else 300)
        dataset = ShardDataset(mixture, pack=PackConfig(seq_len=32) if tokens else None)
        loader = ShardLoader(
            dataset,
            batch_size=3 if tokens else 12,
            num_workers=2,
            transfer_batches=transfer,
            collate_fn=None if tokens else _step_ids,
        )
        steps, states = [], []
        for batch in loader:
            if tokens:
                batch = [batch[k].tolist() for k in ("input_ids", "sample_ids", "sample_sources")]
            steps.append(batch)
            states.append(loader.state_dict())
        return steps, states

    single, grouped = run(1), run(8)
    assert len(single[0]) == (6_000 // (3 * 32) if tokens else 300 // 12)
    assert grouped[0] == single[0]
    assert grouped[1] == single[1]
    assert len({json.dumps(s, sort_keys=True) for s in grouped[1]}) == len(grouped[1])


def test_mix_loader_iter_starts_its_workers_at_once(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    # Like ShardLoader (and a DataLoader), iter() starts the epoch before the first next().
    from shardloader import ShardDataset, ShardLoader
    from tests.test_loader import _MarkFirstBatch, _wait_for

    mark = tmp_path / "made"
    mixture = _mixture(sources, unit="samples", total=300)
    loader = ShardLoader(
        ShardDataset(mixture), batch_size=12, num_workers=2, collate_fn=_MarkFirstBatch(mark)
    )
    it = iter(loader)
    assert _wait_for(mark), "no worker made a step before the first next()"
    steps = list(it)
    assert len(steps) == 300 // 12
    assert all(len(step) == 12 for step in steps)
