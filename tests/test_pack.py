"""Packing: token conservation, document boundaries, exact resume, batch layout, DataLoader use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardloader.errors import ConfigError, CorpusError, ResumeError
from shardloader.pack import (
    ENCODE_GROUP,
    PackConfig,
    PackedRow,
    Packer,
    PackingCollator,
    best_fit_decreasing,
    collate_rows,
    empty_batch,
)
from shardloader.pack_encode import EncodedDoc


def make_samples(
    lengths: Sequence[int],
    *,
    gaps: Sequence[int] | None = None,
    dtype: Any = np.uint32,
    chats: Sequence[bool] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Samples whose tokens are unique increasing ints, so a token names its document and offset.

    Positions are consecutive, or spaced by ``gaps`` (an upstream may restart anywhere). Where
    ``chats`` is true the sample is a conversation: a ``loss_mask`` (see `chat_mask`) that
    `encode_masked` hands to the packer.
    """
    samples = []
    position, token = 0, 1
    for i, n in enumerate(lengths):
        ids = np.arange(token, token + n, dtype=dtype)
        token += n
        sample = {"id": f"d{i}", "sample_id": 1000 + i, "input_ids": ids}
        if chats and chats[i]:
            sample["loss_mask"] = chat_mask(n)
        samples.append((position, sample))
        position += 1 + (gaps[i] if gaps else 0)
    return samples


def chat_mask(n: int) -> np.ndarray:
    """Turns of 3 prompt tokens, then 2 answer tokens (with a loss)."""
    return np.arange(n) % 5 >= 3


def encode_masked(samples: Sequence[dict[str, Any]]) -> list[EncodedDoc]:
    """The token encoder, plus the test's ``loss_mask`` field (SFT documents)."""
    return [EncodedDoc(s["input_ids"], s.get("loss_mask")) for s in samples]


def run(config: PackConfig, samples: Sequence[tuple[int, dict[str, Any]]], skip: int = 0):
    return list(Packer(config, encoder=encode_masked).pack(iter(samples), skip=skip))


def resume(config: PackConfig, samples, cursor: tuple[int, int]) -> list[PackedRow]:
    position, skip = cursor
    return run(config, [s for s in samples if s[0] >= position], skip)


def assert_rows_equal(got: Sequence[PackedRow], want: Sequence[PackedRow]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.cursor == b.cursor
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.segment_lengths, b.segment_lengths)
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        # No mask and a mask of ones train the same tokens (a row's mask is None unless one of
        # the documents its chunk was cut from has one).
        ones = np.ones(len(a.input_ids), bool)
        a_mask = ones if a.loss_mask is None else a.loss_mask
        b_mask = ones if b.loss_mask is None else b.loss_mask
        np.testing.assert_array_equal(a_mask, b_mask)


def reference_concat(
    samples: Sequence[tuple[int, dict[str, Any]]], seq_len: int, *, drop_last: bool = False
) -> list[tuple[list[int], list[int], list[int], tuple[int, int]]]:
    """Token-by-token concat: (tokens, segment lengths, sample ids, cursor) per row."""
    stream = [
        (position, sample["sample_id"], offset, int(token))
        for position, sample in samples
        for offset, token in enumerate(sample["input_ids"])
    ]
    after_last = samples[-1][0] + 1 if samples else 0
    rows = []
    for start in range(0, len(stream), seq_len):
        chunk = stream[start : start + seq_len]
        if drop_last and len(chunk) < seq_len:
            break
        lengths: list[int] = []
        ids: list[int] = []
        for k, (position, sample_id, _, _) in enumerate(chunk):
            if k == 0 or position != chunk[k - 1][0]:
                lengths.append(0)
                ids.append(sample_id)
            lengths[-1] += 1
        after = stream[start + seq_len] if start + seq_len < len(stream) else None
        cursor = (after[0], after[2]) if after else (after_last, 0)
        rows.append(([t for *_, t in chunk], lengths, ids, cursor))
    return rows


lengths_st = st.lists(st.integers(0, 40), min_size=0, max_size=30)
seq_len_st = st.integers(1, 24)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, seq_len=seq_len_st, drop_last=st.booleans())
def test_concat_matches_token_by_token_reference(lengths, seq_len, drop_last):
    samples = make_samples(lengths)
    config = PackConfig(seq_len=seq_len, drop_last=drop_last)
    rows = run(config, samples)
    want = reference_concat(samples, seq_len, drop_last=drop_last)
    assert len(rows) == len(want)
    for row, (tokens, seg_lens, sample_ids, cursor) in zip(rows, want, strict=True):
        assert row.input_ids.tolist() == tokens
        assert row.segment_lengths.tolist() == seg_lens
        assert row.sample_ids.tolist() == sample_ids
        assert row.cursor == cursor
    total = sum(lengths)
    if not drop_last and total:
        assert [len(r.input_ids) for r in rows[:-1]] == [seq_len] * (len(rows) - 1)


def test_concat_large_stream_crosses_chunks():
    """Many vectorized chunks: the same rows as the reference, all full but the last."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 3000, 300).tolist()
    samples = make_samples(lengths)
    rows = run(PackConfig(seq_len=1000), samples)
    want = reference_concat(samples, 1000)
    assert [r.input_ids.tolist() for r in rows] == [w[0] for w in want]
    assert [r.cursor for r in rows] == [w[3] for w in want]
    assert [r.sample_ids.tolist() for r in rows] == [w[2] for w in want]


def check_pieces(rows: Sequence[PackedRow], samples, seq_len: int, *, whole: bool) -> None:
    """Every token exactly once; each segment a contiguous slice of its sample's document."""
    docs = {s["sample_id"]: s["input_ids"] for _, s in samples}
    seen = []
    for row in rows:
        assert 0 < len(row.input_ids) <= seq_len
        assert row.segment_lengths.sum() == len(row.input_ids)
        start = 0
        for n, sample_id in zip(row.segment_lengths, row.sample_ids, strict=True):
            piece = row.input_ids[start : start + n].astype(np.int64)
            start += n
            doc = docs[int(sample_id)].astype(np.int64)
            offset = int(piece[0] - doc[0])
            np.testing.assert_array_equal(piece, doc[offset : offset + n])
            if whole and len(doc) <= seq_len:
                assert len(piece) == len(doc)
            seen.append(piece)
    flat = np.sort(np.concatenate(seen)) if seen else np.array([], np.int64)
    want = np.concatenate([[]] + [s["input_ids"] for _, s in samples]).astype(np.int64)
    np.testing.assert_array_equal(flat, want)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, seq_len=seq_len_st, buffer_size=st.integers(1, 12))
def test_bfd_places_documents_whole_and_tightly(lengths, seq_len, buffer_size):
    samples = make_samples(lengths)
    rows = run(PackConfig(seq_len=seq_len, mode="bfd", buffer_size=buffer_size), samples)
    check_pieces(rows, samples, seq_len, whole=True)
    # Within a buffer, no two rows could have been one: their fills add up to more than seq_len.
    buffer_of = {1000 + i: i // buffer_size for i in range(len(lengths))}
    by_buffer: dict[int, list[int]] = {}
    for row in rows:
        by_buffer.setdefault(buffer_of[int(row.sample_ids[0])], []).append(len(row.input_ids))
    for fills in by_buffer.values():
        fills.sort()
        if len(fills) > 1:
            assert fills[0] + fills[1] > seq_len


def test_bfd_fills_rows_on_a_long_tailed_distribution():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, 4000).astype(int) + 1, 20000).tolist()
    packer = Packer(PackConfig(seq_len=2048, mode="bfd", buffer_size=1024))
    rows = list(packer.pack(iter(make_samples(lengths))))
    assert packer.stats.num_row_tokens == sum(lengths)
    assert packer.stats.utilization > 0.98
    assert sum(len(r.input_ids) for r in rows) == sum(lengths)


@settings(max_examples=100, deadline=None)
@given(
    lengths=lengths_st,
    seq_len=seq_len_st,
    group=st.booleans(),
    truncate=st.booleans(),
    buffer_size=st.integers(1, 8),
)
def test_pad_one_document_per_row(lengths, seq_len, group, truncate, buffer_size):
    samples = make_samples(lengths)
    config = PackConfig(
        seq_len=seq_len,
        mode="pad",
        group_by_length=group,
        buffer_size=buffer_size,
        long_docs="truncate" if truncate else "split",
    )
    packer = Packer(config)
    rows = list(packer.pack(iter(samples)))
    assert all(len(r.segment_lengths) == 1 for r in rows)
    if truncate:
        assert [int(r.sample_ids[0]) for r in rows if not group] == [
            s["sample_id"] for _, s in samples if len(s["input_ids"]) and not group
        ]
        kept = sum(min(n, seq_len) for n in lengths)
        assert packer.stats.num_row_tokens == kept
        assert packer.stats.num_truncated_tokens == sum(lengths) - kept
    else:
        check_pieces(rows, samples, seq_len, whole=True)
    if group:  # longest first within each buffer
        buffer_of = {1000 + i: i // buffer_size for i in range(len(lengths))}
        keys = [(buffer_of[int(r.sample_ids[0])], -len(r.input_ids)) for r in rows]
        assert keys == sorted(keys)


def expected_policy(sample: dict[str, Any], config: PackConfig) -> str:
    """What ``long_docs`` does to one document: keep, split, truncate or drop."""
    n, mask = len(sample["input_ids"]), sample.get("loss_mask")
    if n <= config.seq_len:
        return "keep"
    how = config.long_docs
    if how == "auto":
        how = "split" if mask is None else "truncate"
    first = 1 if config.mask_boundary_labels else 0
    if how == "truncate" and mask is not None and not mask[first : config.seq_len].any():
        how = "drop"  # truncation left nothing to train
    return how


def pieces_by_document(rows: Sequence[PackedRow]) -> dict[int, list[tuple[np.ndarray, Any]]]:
    """Each document's pieces (tokens, loss mask or None) in the order of their tokens."""
    out: dict[int, list[tuple[np.ndarray, Any]]] = {}
    for row in rows:
        start = 0
        for n, sample_id in zip(row.segment_lengths.tolist(), row.sample_ids.tolist(), strict=True):
            mask = row.loss_mask[start : start + n] if row.loss_mask is not None else None
            out.setdefault(sample_id, []).append((row.input_ids[start : start + n], mask))
            start += n
    for pieces in out.values():
        pieces.sort(key=lambda p: int(p[0][0]))
    return out


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=0, max_size=30),
    chats=st.lists(st.booleans(), min_size=30, max_size=30),
    seq_len=seq_len_st,
    policy=st.sampled_from(["auto", "split", "truncate", "drop"]),
    mode=st.sampled_from(
        [{"mode": "bfd"}, {"mode": "pad"}, {"mode": "pad", "group_by_length": True}]
    ),
    buffer_size=st.integers(1, 8),
    boundary=st.booleans(),
)
def test_long_documents_follow_long_docs_and_are_counted(
    lengths, chats, seq_len, policy, mode, buffer_size, boundary
):
    """Conversations stay whole, or keep their start (auto), unless a policy forces otherwise.

    Masks travel with their tokens, and every input token is in a row or counted.
    """
    samples = make_samples(lengths, chats=chats)
    config = PackConfig(
        seq_len=seq_len,
        buffer_size=buffer_size,
        long_docs=policy,
        mask_boundary_labels=boundary,
        **mode,
    )
    packer = Packer(config, encoder=encode_masked)
    pieces = pieces_by_document(list(packer.pack(iter(samples))))
    want = {"truncate": [0, 0], "drop": [0, 0]}
    for _, sample in samples:
        ids, mask = sample["input_ids"], sample.get("loss_mask")
        n = len(ids)
        how = expected_policy(sample, config)
        got = pieces.get(sample["sample_id"], [])
        if how == "drop" or n == 0:
            assert got == []
        elif how == "truncate":
            assert len(got) == 1
            np.testing.assert_array_equal(got[0][0], ids[:seq_len])
        else:  # whole, or split into seq_len pieces
            assert [len(p) for p, _ in got] == [min(seq_len, n - k) for k in range(0, n, seq_len)]
            np.testing.assert_array_equal(np.concatenate([p for p, _ in got]), ids)
        for tokens, got_mask in got:
            offset = int(tokens[0] - ids[0])
            if mask is None:
                assert got_mask is None or got_mask.all()
            else:
                np.testing.assert_array_equal(got_mask, mask[offset : offset + len(tokens)])
        if how in want:
            want[how][0] += 1
            want[how][1] += n - seq_len if how == "truncate" else n
    stats = packer.stats
    assert [stats.num_truncated_docs, stats.num_truncated_tokens] == want["truncate"]
    assert [stats.num_dropped_docs, stats.num_dropped_tokens] == want["drop"]
    assert stats.num_input_tokens == sum(lengths)
    assert (
        stats.num_row_tokens + stats.num_truncated_tokens + stats.num_dropped_tokens
        == stats.num_input_tokens
    )


def test_auto_is_the_default_and_keeps_conversations_whole_in_bfd():
    """A conversation never shares its turns across rows; text longer than a row is split."""
    assert PackConfig().long_docs == "auto"
    samples = make_samples([30, 9, 25, 7, 12], chats=[True, True, False, True, False])
    packer = Packer(PackConfig(seq_len=16, mode="bfd"), encoder=encode_masked)
    pieces = pieces_by_document(list(packer.pack(iter(samples))))
    assert [len(pieces[1000 + i]) for i in range(5)] == [1, 1, 2, 1, 1]
    assert len(pieces[1000][0][0]) == 16  # the long conversation keeps its first 16 tokens
    assert (packer.stats.num_truncated_docs, packer.stats.num_truncated_tokens) == (1, 14)
    assert packer.stats.num_dropped_docs == 0


def test_truncated_conversation_with_nothing_left_to_train_is_dropped():
    ids = np.arange(1, 21, dtype=np.uint32)
    late = np.arange(20) >= 10  # the answer starts after the cut at 8
    first_only = np.arange(20) == 0  # its one trained token opens the segment
    samples = [
        (0, {"sample_id": 0, "input_ids": ids, "loss_mask": late}),
        (1, {"sample_id": 1, "input_ids": ids + 20, "loss_mask": first_only}),
        (2, {"sample_id": 2, "input_ids": ids[:5] + 40, "loss_mask": np.zeros(5, bool)}),
    ]
    for boundary, kept in [(True, [2]), (False, [1, 2])]:
        config = PackConfig(seq_len=8, mode="bfd", mask_boundary_labels=boundary)
        packer = Packer(config, encoder=encode_masked)
        rows = list(packer.pack(iter(samples)))
        assert sorted(pieces_by_document(rows)) == kept  # short ones are kept as they are
        stats = packer.stats
        assert stats.num_dropped_docs == 3 - len(kept)
        assert stats.num_dropped_tokens == 20 * (3 - len(kept))
        assert stats.num_truncated_docs == len(kept) - 1


def test_long_documents_are_logged_at_powers_of_ten(caplog):
    samples = make_samples([20] * 25 + [3], chats=[True] * 26)
    config = PackConfig(seq_len=8, mode="bfd", buffer_size=1, long_docs="drop")
    with caplog.at_level("WARNING", logger="shardloader.pack"):
        rows = run(config, samples)
    assert [int(r.sample_ids[0]) for r in rows] == [1025]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("1 documents longer than seq_len=8 so far (long_docs='drop')")
    assert "10 dropped (200 tokens" in messages[1]


MODES = [
    {"mode": "concat"},
    {"mode": "concat", "drop_last": True},
    {"mode": "bfd"},
    {"mode": "bfd", "long_docs": "truncate"},
    {"mode": "bfd", "long_docs": "drop"},
    {"mode": "bfd", "long_docs": "split"},
    {"mode": "pad"},
    {"mode": "pad", "long_docs": "drop"},
    {"mode": "pad", "group_by_length": True},
]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=25),
    gaps=st.lists(st.integers(0, 2), min_size=25, max_size=25),
    seq_len=st.integers(1, 16),
    buffer_size=st.integers(1, 7),
    chats=st.lists(st.booleans(), min_size=25, max_size=25),
    mode=st.sampled_from(MODES),
    data=st.data(),
)
def test_resume_from_any_row_reproduces_the_rest(
    lengths, gaps, seq_len, buffer_size, chats, mode, data
):
    """Also with conversations truncated or dropped, and documents dropped (long_docs)."""
    samples = make_samples(lengths, gaps=gaps, chats=chats)
    config = PackConfig(seq_len=seq_len, buffer_size=buffer_size, **mode)
    rows = run(config, samples)
    if not rows:
        return
    k = data.draw(st.integers(0, len(rows) - 1))
    assert all(isinstance(v, int) for v in rows[k].cursor)
    assert_rows_equal(resume(config, samples, rows[k].cursor), rows[k + 1 :])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(map(str, m.values())))
def test_resume_from_every_row_of_a_long_stream(mode):
    """Every cursor of a stream with many chunks and buffers, on a realistic length mix."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 700, 400).tolist()
    samples = make_samples(lengths, dtype=np.uint32, chats=[i % 3 == 0 for i in range(400)])
    config = PackConfig(seq_len=256, buffer_size=64, **mode)
    rows = run(config, samples)
    assert len(rows) > 60
    for k in range(0, len(rows), 7):
        assert_rows_equal(resume(config, samples, rows[k].cursor), rows[k + 1 :])


def test_cursor_that_does_not_fit_is_refused():
    samples = make_samples([5, 5, 5])
    with pytest.raises(ResumeError, match="position 0: cursor skips 6 tokens but the document"):
        run(PackConfig(seq_len=4), samples, skip=6)
    with pytest.raises(ResumeError, match="cursor skips 9 rows but its buffer packs into 3"):
        run(PackConfig(seq_len=8, mode="bfd"), samples, skip=9)
    with pytest.raises(ResumeError, match=">= 0"):
        run(PackConfig(seq_len=8), samples, skip=-1)


def test_positions_must_rise():
    samples = make_samples([3, 3])
    with pytest.raises(ConfigError, match="position 0 follows 0"):
        run(PackConfig(seq_len=4), [samples[0], samples[0]])


def test_samples_without_tokens_need_a_tokenizer():
    packer = Packer(PackConfig(seq_len=4))
    with pytest.raises(CorpusError, match="'d0': no input_ids; pass a tokenizer"):
        list(packer.pack([(0, {"id": "d0", "text": "hello"})]))
    with pytest.raises(CorpusError, match="1-D integer array"):
        list(packer.pack([(0, {"id": "d0", "input_ids": np.zeros(3, np.float32)})]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be >= 1"),
        ({"mode": "greedy"}, "mode must be one of concat, bfd, pad"),
        ({"long_docs": "cut"}, "long_docs must be one of auto, split, truncate, drop, got 'cut'"),
        ({"buffer_size": 0}, "buffer_size must be >= 1"),
        ({"pad_to_longest": True}, "pad_to_longest needs mode='pad'"),
        ({"mode": "bfd", "group_by_length": True}, "group_by_length needs mode='pad'"),
    ],
)
def test_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PackConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = PackConfig(seq_len=64, mode="bfd", buffer_size=8)
    assert PackConfig(**config.to_dict()) == config


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=60), st.integers(50, 80))
def test_best_fit_decreasing_is_an_any_fit_packing(lengths, capacity):
    bins = best_fit_decreasing(np.array(lengths, dtype=np.int64), capacity)
    if not lengths:
        assert len(bins) == 0
        return
    fills = np.bincount(bins, weights=lengths)
    assert set(bins.tolist()) == set(range(len(fills)))  # bins numbered 0.. with none empty
    assert fills.max() <= capacity
    fills.sort()
    assert len(fills) == 1 or fills[0] + fills[1] > capacity
    assert len(fills) >= -(-sum(lengths) // capacity)


def test_best_fit_decreasing_picks_the_tightest_row():
    # 6 opens bin 0, 5 opens bin 1 (6 + 5 > 10), 4 goes to bin 0 (4 left, tighter than 5), 3 to 1.
    assert best_fit_decreasing(np.array([3, 5, 6, 4]), 10).tolist() == [1, 1, 0, 0]
    with pytest.raises(ConfigError, match=r"item sizes must be in \[1, 10\], got 0 to 11"):
        best_fit_decreasing(np.array([0, 11]), 10)


def collate_invariants(batch: dict[str, Any], rows: Sequence[PackedRow], width: int) -> None:
    input_ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert input_ids.shape == labels.shape == pos.shape == (len(rows), width)
    assert input_ids.dtype == labels.dtype == pos.dtype == torch.int64
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32
    assert cu[0] == 0
    assert cu[-1] == input_ids.numel()
    seg_lens = torch.diff(cu)
    assert batch["max_seqlen"] == int(seg_lens.max())
    # position ids restart exactly at segment starts and count up by one inside a segment
    starts = torch.zeros(input_ids.numel(), dtype=torch.bool)
    starts[cu[:-1].long()] = True
    flat_pos = pos.reshape(-1)
    assert torch.equal(flat_pos == 0, starts)
    assert torch.equal(flat_pos[~starts], flat_pos[torch.roll(~starts, -1)] + 1)
    # a label never crosses a boundary: a labelled token's predecessor is in its segment
    flat_labels = labels.reshape(-1)
    assert not (flat_labels != -100)[starts].any()
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        assert input_ids[i, :n].tolist() == row.input_ids.tolist()
        assert (labels[i, n:] == -100).all()
        real = labels[i, :n]
        keep = real != -100
        assert torch.equal(real[keep], input_ids[i, :n][keep])
    assert batch["sample_ids"].tolist() == [int(s) for r in rows for s in r.sample_ids]
    assert batch["cursor"].tolist() == [list(r.cursor) for r in rows]


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    seq_len=seq_len_st,
    mode=st.sampled_from(MODES),
    batch_size=st.integers(1, 5),
)
def test_batches_have_fixed_shapes_and_separate_documents(lengths, seq_len, mode, batch_size):
    config = PackConfig(seq_len=seq_len, buffer_size=5, **mode)
    rows = run(config, make_samples(lengths))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate_rows(chunk, config)
        collate_invariants(batch, chunk, seq_len)
        assert ("attention_mask" in batch) == (config.mode == "pad")


def test_pad_mode_attention_mask_and_pad_to_longest():
    config = PackConfig(seq_len=64, mode="pad", pad_to_longest=True, pad_id=7)
    rows = run(config, make_samples([3, 10, 5]))
    batch = collate_rows(rows, config)
    assert batch["input_ids"].shape == (3, 16)  # longest is 10, rounded up to a multiple of 8
    assert batch["attention_mask"].sum(1).tolist() == [3, 10, 5]
    assert (batch["input_ids"][0, 3:] == 7).all()
    collate_invariants(batch, rows, 16)
    with pytest.raises(ConfigError, match="at least one row"):
        collate_rows([], config)


def test_labels_keep_the_first_token_when_asked():
    config = PackConfig(seq_len=8, mask_boundary_labels=False)
    (row,) = run(config, make_samples([3, 5]))
    labels = collate_rows([row], config)["labels"]
    assert labels[0].tolist() == row.input_ids.astype(np.int64).tolist()


def test_flattening_collator_gives_the_same_positions_and_labels():
    from transformers import DataCollatorWithFlattening

    samples = make_samples([7, 1, 12, 4])
    docs = [s for _, s in samples]
    reference = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": d["input_ids"].astype(np.int64).tolist()} for d in docs]
    )
    total = sum(len(d["input_ids"]) for d in docs)
    for seq_len in (total, total + 5):  # one exact row, then one with padding after it
        batch = PackingCollator(PackConfig(seq_len=seq_len))(docs)
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(batch[key][:, :total], reference[key]), key
        cu = batch["cu_seqlens"][: len(docs) + 1]
        assert cu.tolist() == reference["cu_seq_lens_q"].tolist()
    assert batch["max_seqlen"] == reference["max_length_q"]


def test_packing_collator_counts_what_it_packed():
    collator = PackingCollator(PackConfig(seq_len=16, mode="bfd"))
    batch = collator([s for _, s in make_samples([10, 6, 9, 7])])
    assert batch["input_ids"].shape == (2, 16)
    assert sorted(batch["sample_ids"].tolist()) == [1000, 1001, 1002, 1003]
    assert collator.packer.stats.utilization == 1.0
    with pytest.raises(CorpusError, match="a batch of 1 samples holds no tokens"):
        collator([{"input_ids": np.array([], np.uint16)}])


class DocDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def test_packing_collator_in_dataloader_workers():
    samples = [s for _, s in make_samples(np.random.default_rng(3).integers(1, 90, 64).tolist())]
    config = PackConfig(seq_len=64, mode="bfd")
    loader = torch.utils.data.DataLoader(
        DocDataset(samples),
        batch_size=16,
        num_workers=2,
        collate_fn=PackingCollator(config),
        multiprocessing_context="fork",
    )
    seen: list[int] = []
    tokens = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] == 64
        assert isinstance(batch["max_seqlen"], int)
        assert batch["input_ids"][batch["labels"] != -100].numel() > 0
        seen += batch["sample_ids"].tolist()
        tokens += int((batch["input_ids"] != 0).sum())  # pad_id 0; real tokens start at 1
    # documents longer than a row are split, so their id shows up once per piece
    assert sorted(set(seen)) == [s["sample_id"] for s in samples]
    assert tokens == sum(len(s["input_ids"]) for s in samples)


def stream(samples: list[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
    yield from samples


def test_packer_reads_lazily_and_counts():
    samples = make_samples([100] * 2000)
    packer = Packer(PackConfig(seq_len=128))
    rows = packer.pack(stream(samples))
    first = next(rows)
    assert len(first.input_ids) == 128
    assert packer.stats.num_samples < 2000  # it read ahead a chunk, not the whole stream
    rest = list(rows)
    assert packer.stats.num_samples == 2000
    assert packer.stats.num_rows == len(rest) + 1
    assert packer.stats.num_input_tokens == packer.stats.num_row_tokens == 200_000


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "concat"},
        {"mode": "bfd"},
        {"mode": "pad"},
        {"mode": "pad", "pad_to_longest": True, "group_by_length": True},
    ],
)
def test_empty_batch_has_the_layout_of_a_real_batch_and_trains_nothing(settings):
    config = PackConfig(seq_len=16, buffer_size=4, **settings)
    real = collate_rows(run(config, make_samples([5, 9, 30, 2]))[:3], config)
    empty = empty_batch(config, 3)
    assert empty.keys() == real.keys()
    for key, value in real.items():
        assert type(empty[key]) is type(value), key
        if isinstance(value, torch.Tensor):
            assert empty[key].dtype == value.dtype, key
            assert empty[key].dim() == value.dim(), key
    for key in ("input_ids", "labels", "position_ids"):
        assert empty[key].shape == (3, 16)
    assert empty["cursor"].shape == real["cursor"].shape == (3, 2)
    assert (empty["labels"] == -100).all()  # no token is trained
    assert empty["sample_ids"].numel() == empty["sample_rows"].numel() == 0
    assert empty["cu_seqlens"].tolist() == [0, 16, 32, 48]
    assert empty["position_ids"][1].tolist() == list(range(16))
    if config.mode == "pad":
        assert not empty["attention_mask"].any()
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        empty_batch(config, 0)


def test_the_first_row_waits_for_one_rows_worth_of_documents_not_a_chunk() -> None:
    # Rows are cut after seq_len tokens at first, then after twice as many each time (up to
    # CHUNK_TOKENS): the first batch of a stream does not wait for 64k tokens of documents.
    samples = make_samples([10] * 20_000)
    consumed = []

    def counted() -> Iterator[tuple[int, dict[str, Any]]]:
        for position, sample in samples:
            consumed.append(position)
            yield position, sample

    rows = Packer(PackConfig(seq_len=64), encoder=encode_masked).pack(counted())
    first = next(rows)
    assert len(first.input_ids) == 64
    assert len(consumed) <= 2 * ENCODE_GROUP  # (documents are encoded in groups); was 6,554
    assert [r.input_ids.tolist() for r in [first, *rows]] == [
        r.input_ids.tolist() for r in run(PackConfig(seq_len=64), samples)
    ]
