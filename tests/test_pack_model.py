"""Packed rows through a real (tiny, random) Llama: documents must not see each other.

The per-token loss of every document in a packed batch must equal the loss of that document run
alone; for chat (SFT) conversations, rendered with a chat template, so must the labels (only the
assistant turns) and the logits. Negative controls show the pitfalls the pack module documents:
the default KV cache and a 2-D attention mask each let documents attend across boundaries.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from shardloader.pack import PackConfig, Packer, collate_rows
from shardloader.pack_attention import document_attention_mask, model_inputs
from tests.test_pack_encode import CHAT_TEMPLATE

VOCAB = 97
TOLERANCE = 1e-5


def tiny_llama(
    attn_implementation: str, vocab_size: int = VOCAB, max_positions: int = 128
) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).eval()


def packed_batch(mode: str = "bfd", seq_len: int = 48) -> tuple[dict[str, Any], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    lengths = [17, 3, 30, 1, 12, 25, 8, 40, 5, 19]
    docs = [rng.integers(0, VOCAB, n).astype(np.int64) for n in lengths]
    samples = [(i, {"sample_id": i, "input_ids": d}) for i, d in enumerate(docs)]
    config = PackConfig(seq_len=seq_len, mode=mode)
    rows = list(Packer(config).pack(iter(samples)))
    return collate_rows(rows, config), docs


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy in the HF convention (label t is predicted at t - 1); NaN if none."""
    losses = torch.full(labels.shape, float("nan"))
    shifted = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        reduction="none",
        ignore_index=-100,
    ).reshape(shifted.shape)
    losses[:, 1:] = torch.where(shifted == -100, float("nan"), ce)
    return losses


def alone_losses(model: LlamaForCausalLM, docs: list[np.ndarray], sample_id: int) -> torch.Tensor:
    ids = torch.from_numpy(docs[sample_id])[None]
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return token_losses(logits, labels)[0]


def segments(batch: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """(row, column, length, sample_id) of every document piece; padding segments left out."""
    width = batch["input_ids"].shape[1]
    starts = batch["cu_seqlens"][:-1].tolist()
    lengths = torch.diff(batch["cu_seqlens"]).tolist()
    pieces = list(zip(batch["sample_ids"].tolist(), batch["sample_rows"].tolist(), strict=True))
    out = []
    for row in range(batch["input_ids"].shape[0]):
        spans = [(s, n) for s, n in zip(starts, lengths, strict=True) if s // width == row]
        mine = [sample_id for sample_id, r in pieces if r == row]
        assert len(spans) - len(mine) in (0, 1)  # at most one padding segment, at the end
        out += [(row, s - row * width, n, i) for (s, n), i in zip(spans, mine, strict=False)]
    return out


def packed_losses(model: LlamaForCausalLM, batch: dict[str, Any], inputs: dict[str, Any]):
    with torch.no_grad():
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return token_losses(logits, batch["labels"])


def max_gap(model: LlamaForCausalLM, batch: dict[str, Any], docs, inputs: dict[str, Any]) -> float:
    """Largest difference between packed and alone per-token losses, over whole documents."""
    packed = packed_losses(model, batch, inputs)
    gap, compared = 0.0, 0
    for row, col, n, sample_id in segments(batch):
        if n != len(docs[sample_id]) or batch["input_ids"][row, col] != int(docs[sample_id][0]):
            continue  # a piece of a split document cannot see its beginning
        want, got = alone_losses(model, docs, sample_id), packed[row, col : col + n]
        both = ~torch.isnan(want)
        assert torch.equal(both, ~torch.isnan(got))
        compared += int(both.sum())
        if both.any():
            gap = max(gap, float((want[both] - got[both]).abs().max()))
    assert compared > 50  # not vacuous: many tokens were compared
    return gap


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_each_document_alone(attn):
    batch, docs = packed_batch()
    assert batch["input_ids"].shape[0] >= 3
    model = tiny_llama(attn)
    assert max_gap(model, batch, docs, model_inputs(batch, attn_implementation=attn)) < TOLERANCE


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_mask_keeps_documents_apart(attn):
    batch, docs = packed_batch()
    model = tiny_llama(attn)
    inputs = model_inputs(batch, attn_implementation=attn, block_mask=True)
    assert inputs["attention_mask"].dim() == 4
    assert max_gap(model, batch, docs, inputs) < TOLERANCE


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pad_rows_with_attention_mask_match_documents_alone(attn):
    batch, docs = packed_batch(mode="pad")
    assert "attention_mask" in model_inputs(batch)
    assert max_gap(tiny_llama(attn), batch, docs, model_inputs(batch)) < TOLERANCE


def test_concat_rows_keep_whole_documents_apart():
    """concat splits documents across rows; the pieces that are whole documents still match."""
    batch, docs = packed_batch(mode="concat", seq_len=64)
    assert len(segments(batch)) > len(docs)  # some documents were split
    assert max_gap(tiny_llama("sdpa"), batch, docs, model_inputs(batch)) < TOLERANCE


def test_gradients_equal_the_sum_over_documents():
    batch, docs = packed_batch()
    model = tiny_llama("sdpa").train()
    inputs = model_inputs(batch)
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    token = token_losses(logits, batch["labels"])
    packed_sum = token[~torch.isnan(token)].sum()
    packed_sum.backward()
    packed_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    total = torch.zeros(())
    for sample_id in set(batch["sample_ids"].tolist()):
        ids = torch.from_numpy(docs[sample_id])[None]
        labels = ids.clone()
        labels[0, 0] = -100
        alone = token_losses(model(input_ids=ids, use_cache=False).logits, labels)
        total = total + alone[~torch.isnan(alone)].sum()
    total.backward()
    torch.testing.assert_close(packed_sum, total.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        packed_grad, model.model.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4
    )


def test_pitfalls_let_documents_see_each_other():
    """Guards against a vacuous pass: each documented pitfall does change the losses."""
    batch, docs = packed_batch()
    model = tiny_llama("sdpa")
    with_cache = {**model_inputs(batch), "use_cache": True}
    with pytest.raises(AssertionError):
        assert max_gap(model, batch, docs, with_cache) < 1e-2
    ones = {**model_inputs(batch), "attention_mask": torch.ones_like(batch["input_ids"])}
    with pytest.raises(AssertionError):
        assert max_gap(model, batch, docs, ones) < 1e-2


def varlen_reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """What flash-attn varlen computes, on CPU: causal attention within ``cu_seq_lens_q`` spans.

    Like flash-attention, it sees the batch flattened to ``B * L`` tokens and no mask at all;
    without ``cu_seq_lens_*`` (a document run alone) it is plain causal attention.
    """
    assert attention_mask is None
    batch, heads, length, dim = query.shape
    cu = kwargs.get("cu_seq_lens_q", torch.arange(batch + 1) * length).long()
    assert torch.equal(cu, kwargs.get("cu_seq_lens_k", cu).long())
    assert kwargs.get("max_length_q", length) == int(torch.diff(cu).max())
    segment = torch.zeros(batch * length, dtype=torch.long)
    segment[cu[1:-1]] = 1
    segment = segment.cumsum(0).reshape(batch, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    return sdpa_attention_forward(module, query, key, value, mask, scaling=kwargs.get("scaling"))


def test_flash_attention_kwargs_reach_the_attention_and_separate_documents():
    AttentionInterface.register("varlen_reference", varlen_reference_attention)
    batch, docs = packed_batch()
    model = tiny_llama("varlen_reference")
    inputs = model_inputs(batch, attn_implementation="flash_attention_2")
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= set(inputs)
    assert max_gap(model, batch, docs, inputs) < TOLERANCE


def test_position_ids_match_what_transformers_derives_for_flash_attention():
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch, _ = packed_batch()
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_q.tolist() == batch["cu_seqlens"].tolist()
    assert int(max_q) == batch["max_seqlen"]


def test_document_attention_mask_float_is_additive():
    batch, _ = packed_batch()
    boolean = document_attention_mask(batch["position_ids"])
    additive = document_attention_mask(batch["position_ids"], torch.float32)
    assert torch.equal(additive == 0, boolean)
    assert (additive[~boolean] == torch.finfo(torch.float32).min).all()


# --- chat (SFT) conversations ---------------------------------------------------------------

WORDS = ["naïve", "café", "déjà", "vu", "doc", "answer", "question", "русский", "Ελληνικά", "ok"]


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Multi-turn chats (an optional system turn, 1-3 user/assistant exchanges) of varied length."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))

    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            chat += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        chats.append(chat)
    return chats


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def collated(config: PackConfig, tokenizer: Any, samples: list[dict[str, Any]]):
    rows = list(Packer(config, tokenizer=tokenizer).pack(enumerate(samples)))
    return rows, collate_rows(rows, config)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chat_masks_and_logits_survive_packing(chat_tokenizer, attn):
    """Conversations packed several per row (bfd) get the labels and logits they get alone."""
    samples = [{"sample_id": i, "messages": c} for i, c in enumerate(conversations(24))]
    config = PackConfig(seq_len=256, mode="bfd")
    rows, batch = collated(config, chat_tokenizer, samples)
    assert len(rows) < len(samples) / 2  # several conversations per row
    assert max(len(r.sample_ids) for r in rows) >= 3
    model = tiny_llama(attn, vocab_size=len(chat_tokenizer), max_positions=256)
    inputs = model_inputs(batch, attn_implementation=attn)
    with torch.no_grad():
        packed = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    compared = trained = 0
    for row, col, n, sample_id in segments(batch):
        (alone_row,), alone = collated(config, chat_tokenizer, [samples[sample_id]])
        assert n == len(alone_row.input_ids)  # whole: bfd keeps a conversation in one row
        ids = alone["input_ids"][:, :n]
        assert torch.equal(batch["input_ids"][row, col : col + n], ids[0])
        labels = alone["labels"][0, :n]
        assert torch.equal(batch["labels"][row, col : col + n], labels)
        # Not vacuous: the prompt is masked, the assistant turns are not.
        assert 0 < int((labels != -100).sum()) < n - 1
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]
        torch.testing.assert_close(packed[row, col : col + n], logits, rtol=0, atol=TOLERANCE)
        compared += 1
        trained += int((labels != -100).sum())
    assert compared == len(samples)
    assert trained == int((batch["labels"] != -100).sum())  # no other token is trained
    # Not vacuous: letting conversations see each other (a 2-D mask of ones) changes the logits.
    leaky = {k: v for k, v in inputs.items() if k != "labels"}
    leaky["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        assert (model(**leaky).logits - packed).abs().max() > 1e-2
