"""``shardloader stats``: exact counts, sampled text lengths, packing rows, JSON, PNG, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardloader
from shardloader.cli import main
from shardloader.errors import ManifestError, ShardError
from shardloader.pack import PackConfig, Packer, count_rows
from shardloader.stats import dataset_stats, length_histogram, summarize
from tests.conftest import convert_docs, make_docs


def _docs(n: int) -> list[dict[str, object]]:
    return make_docs(n, seed=5)


@pytest.fixture(scope="module")
def text_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats-text")
    return convert_docs(tmp, _docs(300), shard_samples=70, num_proc=1)


@pytest.fixture(scope="module")
def token_out(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("stats-tokens")
    return convert_docs(tmp, _docs(300), tokenizer=str(tokenizer_dir), shard_samples=70, num_proc=1)


def test_summary_and_histogram_are_exact():
    s = summarize([0, 1, 2, 3, 4, 100])
    assert (s.count, s.total, s.min, s.p50, s.max) == (6, 110, 0, 2, 100)
    assert length_histogram([0, 1, 2, 3, 4, 100]) == [
        (0, 1, 1),
        (1, 2, 1),
        (2, 4, 2),
        (4, 8, 1),
        (8, 16, 0),
        (16, 32, 0),
        (32, 64, 0),
        (64, 128, 1),
    ]
    assert summarize([]).count == 0


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=0, max_size=60),
    seq_len=st.integers(1, 128),
    mode=st.sampled_from(["concat", "bfd", "pad"]),
    buffer_size=st.integers(1, 9),
)
def test_count_rows_matches_the_packer(lengths, seq_len, mode, buffer_size):
    config = PackConfig(seq_len=seq_len, mode=mode, buffer_size=buffer_size)
    packer = Packer(config)
    samples = [(i, {"input_ids": np.ones(n, np.uint16)}) for i, n in enumerate(lengths)]
    rows = list(packer.pack(samples))
    assert count_rows(np.array(lengths, np.int64), config) == (
        len(rows),
        sum(len(r.input_ids) for r in rows),
    )


def test_text_stats_are_exact_when_all_documents_fit_the_sample(text_out):
    docs = _docs(300)
    stats = dataset_stats(str(text_out))
    chars = [len(d["text"]) for d in docs]
    assert not stats.sampled
    assert stats.num_documents == stats.num_measured == 300
    assert stats.num_shards == 5
    assert stats.length_unit == "characters"
    assert stats.lengths == summarize(chars)
    assert stats.histogram == length_histogram(chars)
    assert stats.num_empty == 0
    assert stats.num_long == 0
    assert stats.shard_documents.total == 300
    assert sorted(stats.shard_sizes) == sorted(
        s.num_bytes for s in shardloader.read_manifest(str(text_out)).shards
    )
    assert [s["num_records"] for s in stats.sources] == [300]
    assert stats.pack == []


def test_text_stats_sample_documents_from_shards_spread_over_the_dataset(text_out):
    stats = dataset_stats(str(text_out), sample=100, long_threshold=50)
    assert stats.sampled
    assert stats.num_measured == 100
    # Shards of 70, 70, 70, 70, 20 documents: 100 is 20 from the start of each.
    chars = [len(d["text"]) for d in _docs(300)]
    measured = [c for start in range(0, 300, 70) for c in chars[start : start + 20]]
    assert stats.lengths == summarize(measured)
    assert stats.num_long == sum(c > 50 for c in measured)
    assert stats.num_documents == 300  # from the manifest: exact


def test_token_stats_count_every_document_and_pack_rows(token_out):
    ours = [len(s["input_ids"]) for s in shardloader.iter_samples(str(token_out))]
    stats = dataset_stats(str(token_out), seq_len=64, sample=10)  # sample: text only
    assert not stats.sampled
    assert stats.num_measured == 300
    assert stats.num_tokens == sum(ours) == stats.lengths.total
    assert stats.lengths == summarize(ours)
    assert stats.num_long == sum(n > 64 for n in ours)
    for estimate in stats.pack:
        config = PackConfig(seq_len=64, mode=estimate.mode)
        samples = ((s["sample_id"], s) for s in shardloader.iter_samples(str(token_out)))
        rows = list(Packer(config).pack(samples))
        assert estimate.num_rows == len(rows)
    assert [p.mode for p in stats.pack] == ["concat", "bfd"]
    assert stats.pack[0].num_rows == -(-sum(ours) // 64)


def test_tar_token_stats_match_arrow(tmp_path, tokenizer_dir, token_out):
    out = convert_docs(
        tmp_path, _docs(300), tokenizer=str(tokenizer_dir), format="tar", shard_samples=70
    )
    a, b = dataset_stats(str(out), seq_len=64), dataset_stats(str(token_out), seq_len=64)
    assert (a.lengths, a.histogram, a.pack) == (b.lengths, b.histogram, b.pack)


def test_cli_json_and_plot(text_out, tmp_path, capsys):
    png = tmp_path / "stats.png"
    assert main(["stats", str(text_out), "--json", "--plot", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_documents"] == 300
    assert doc["lengths"]["count"] == 300
    assert doc["sampled"] is False
    assert sum(c for _, _, c in doc["histogram"]) == 300
    assert "shard_sizes" not in doc
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_cli_text_output_names_what_is_sampled(text_out, capsys):
    assert main(["stats", str(text_out), "--sample", "150"]) == 0
    out = capsys.readouterr().out
    assert "a sample of 150 documents from shards spread over the dataset" in out
    assert "300 documents" in out


def test_a_missing_shard_is_named(tmp_path):
    out = convert_docs(tmp_path, _docs(50), shard_samples=20, num_proc=1)
    shard = out / shardloader.read_manifest(str(out)).shards[1].path
    shard.unlink()
    with pytest.raises(ShardError, match=rf"^{shard}: shard is missing"):
        dataset_stats(str(out))


def test_a_damaged_manifest_is_named(tmp_path, capsys):
    (tmp_path / "_manifest.json").write_text('{"version": 1, "shards": ')
    with pytest.raises(ManifestError, match=r"_manifest\.json"):
        dataset_stats(str(tmp_path))
    assert main(["stats", str(tmp_path)]) == 1
    assert "_manifest.json" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra(text_out, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    stats = dataset_stats(str(text_out))
    from shardloader.stats import write_plot

    with pytest.raises(shardloader.errors.ConfigError, match=r"shardloader\[plot\]"):
        write_plot(stats, str(tmp_path / "x.png"))
