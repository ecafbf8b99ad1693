"""Feed packed batches to a transformers causal LM so that documents do not see each other.

A batch of :func:`shardloader.pack.collate_rows` marks documents by ``position_ids`` that restart
at 0 and by ``cu_seqlens``; what each attention implementation needs to use them was measured
with transformers 5.23 on CPU (``tests/test_pack_model.py``: the per-token loss of a 2-layer
Llama on packed rows equals each document's alone within 1e-6 in fp32; the test allows 1e-5).
:func:`model_inputs` passes the right arguments:

- ``sdpa`` and ``eager``: pass ``position_ids`` and **no** ``attention_mask``, with
  ``use_cache=False``. Transformers then derives a block-diagonal causal mask from where the
  positions restart. With the default ``use_cache=True`` (even in ``train()`` mode) or with any
  2-D ``attention_mask`` (even all ones) it does not, and documents silently attend to each other.
- Anything else (other model code, older transformers): a 4-D mask from
  :func:`document_attention_mask`, boolean for ``sdpa`` and additive float for ``eager`` (a
  boolean mask is added as 0/1 by ``eager``, which is wrong).
- ``flash_attention_2`` / ``3`` (GPU): pass ``cu_seq_lens_q/k`` and ``max_length_q/k`` (from
  :func:`model_inputs`); without them transformers only finds documents from ``position_ids``
  when the batch has a single row, and rows of a batch ``B > 1`` attend across documents. The
  kwargs reach the attention function (tested on CPU with a registered varlen attention);
  flash-attn itself was not run here. On GPU, ``sdpa`` with packed rows gets a 4-D mask built
  by transformers, which rules out its flash kernel: prefer ``flash_attention_2``.
- ``flex_attention``: the forward pass separates documents on CPU, but it has no CPU backward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def document_attention_mask(
    position_ids: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A causal block-diagonal ``[B, 1, L, L]`` mask: each token sees its own segment only.

    Segments start where ``position_ids`` is 0, as in every batch of
    :func:`shardloader.pack.collate_rows`.
    Use ``torch.bool`` (the default) for ``sdpa`` (True: attend) and a float dtype for
    ``eager`` (additive: 0 or the dtype's minimum). Costs ``B * L * L`` elements: for short
    rows or for checking.
    """
    import torch

    segment = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def model_inputs(
    batch: Mapping[str, Any], *, attn_implementation: str = "sdpa", block_mask: bool = False
) -> dict[str, Any]:
    """The keyword arguments for a transformers causal LM that keep documents apart.

    Args:
        batch: A batch from :func:`shardloader.pack.collate_rows` (moved to the device or not).
        attn_implementation: The model's ``config._attn_implementation``; ``flash_attention_*``
            adds the varlen kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``).
        block_mask: Pass a 4-D :func:`document_attention_mask` instead of relying on
            transformers' detection from ``position_ids`` (``sdpa`` and ``eager`` only).
    """
    import torch

    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if "attention_mask" in batch:  # pad mode: one document per row
        inputs["attention_mask"] = batch["attention_mask"]
    elif attn_implementation.startswith("flash_attention"):
        cu_seqlens = batch["cu_seqlens"]
        inputs.update(
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=batch["max_seqlen"],
            max_length_k=batch["max_seqlen"],
        )
    elif block_mask:
        dtype = torch.bool if attn_implementation == "sdpa" else torch.float32
        inputs["attention_mask"] = document_attention_mask(batch["position_ids"], dtype)
    return inputs
