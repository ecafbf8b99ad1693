"""The model side of training: build a causal LM locally, wrap it in DDP or FSDP2, run it.

Nothing is downloaded: ``model`` is a preset name (a Llama built from a config, its vocabulary
sized to the data), a directory with ``config.json`` (plus weights to fine-tune, or none to
start from random weights) or a ``config.json`` file. `forward_loss_sum` runs a packed batch
through it (documents kept apart, see `shardloader.pack_attention`) and `no_sync` skips the
gradient all-reduce of all but the last micro-batch of a step.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardloader.errors import ConfigError
from shardloader.pack import IGNORE_INDEX
from shardloader.pack_attention import model_inputs

log = logging.getLogger(__name__)

# Llama shapes, parameters without embeddings: tiny ~0.1M (tests and the CPU demo), small ~4.4M,
# 100m ~85M (GPU runs; ~110M with a 32k vocabulary, tied embeddings).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "100m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def build_model(
    model: str,
    *,
    vocab_size: int,
    max_positions: int,
    seed: int,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A causal LM, on the CPU in fp32, identical on every rank.

    Args:
        model: A preset (``tiny``, ``small``, ``100m``), a local directory or a ``config.json``.
        vocab_size: Tokens the data uses (the tokenizer's vocabulary); presets get exactly
            this, a loaded model must have at least this many embeddings.
        max_positions: Longest row the model will see (``seq_len``).
        seed: Seeds the initialization of models built from a config.
        attn_implementation: transformers' attention (``sdpa``, ``eager``, ``flash_attention_2``).

    Raises:
        ConfigError: Unknown preset, missing path, or a model too small for the data.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if model in PRESETS:
        config = LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **PRESETS[model],
        )
        config._attn_implementation = attn_implementation
        return AutoModelForCausalLM.from_config(config)
    path = Path(model)
    if not path.exists():
        raise ConfigError(
            f"{model}: no such model directory or config, and not a preset "
            f"({', '.join(PRESETS)}); models are loaded from local paths only"
        )
    directory = path.parent if path.is_file() else path
    if path.is_file() or not any((directory / name).exists() for name in _WEIGHT_FILES):
        config = AutoConfig.from_pretrained(str(path))
        config._attn_implementation = attn_implementation
        log.info("%s: no weights, building %s from its config", model, type(config).__name__)
        built = AutoModelForCausalLM.from_config(config)
    else:
        built = AutoModelForCausalLM.from_pretrained(
            str(directory), attn_implementation=attn_implementation
        ).float()  # fp32 master weights, whatever the checkpoint's dtype
    embeddings = built.get_input_embeddings().num_embeddings
    if embeddings < vocab_size:
        raise ConfigError(
            f"{model}: the model has {embeddings} token embeddings, the data's tokenizer "
            f"{vocab_size}; use the model's own tokenizer to convert the corpus"
        )
    return built


def count_parameters(model: nn.Module) -> int:
    """Parameters of the unwrapped model (before sharding)."""
    return sum(p.numel() for p in model.parameters())


def parallelize(model: nn.Module, *, parallel: str, device: torch.device) -> nn.Module:
    """Wrap ``model`` for data parallelism over the default process group.

    Args:
        model: The model, on ``device``.
        parallel: ``"ddp"`` (replicated weights) or ``"fsdp"`` (FSDP2 ``fully_shard`` of each
            decoder layer, then of the whole model).
        device: Where the model lives.

    Returns:
        The model itself when not distributed, else the wrapped model.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.model.layers`` and kin)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP wrapper (FSDP2 wraps in place)."""
    inner: Any = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def export_model(model: nn.Module, directory: str, *, rank: int) -> None:
    """Write the trained model as a Hugging Face checkpoint (``from_pretrained`` reads it).

    A collective under FSDP (the full weights are gathered to rank 0's CPU); rank 0 writes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank == 0:
        inner: Any = unwrap(model)
        inner.save_pretrained(directory, state_dict=state)


def forward_loss_sum(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    device: torch.device,
    autocast: torch.dtype | None,
    attn_implementation: str,
) -> torch.Tensor:
    """Sum of the next-token losses of a batch (documents kept apart by ``position_ids``).

    Args:
        model: The (wrapped) model, on ``device``.
        batch: A packed batch (`shardloader.pack.collate_rows`).
        device: Where the batch goes.
        autocast: The autocast dtype, or ``None`` for full precision.
        attn_implementation: The model's attention, which decides the masking inputs.
    """
    on_device = {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    inputs = model_inputs(on_device, attn_implementation=attn_implementation)
    labels = inputs.pop("labels")
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with context:
        logits = model(**inputs).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def no_sync(model: nn.Module, last: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of a step (a context)."""
    if last:
        return nullcontext()
    wrapped: Any = model
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        return _ResyncFSDP(wrapped)
    return nullcontext()


class _ResyncFSDP:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.model.set_requires_gradient_sync(True)
