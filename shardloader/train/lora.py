"""LoRA through ``peft`` (the ``lora`` extra): adapters on a frozen base, their identity, export.

``--lora-rank R`` wraps the built model in a ``peft`` ``PeftModel`` whose low-rank adapters
(``lora_A``, ``lora_B`` of each target linear layer) are the only trainable parameters; the base
is frozen and the optimizer holds the adapters alone. The rest of training is unchanged: DDP
wraps the ``PeftModel``, and FSDP2 shards each decoder layer, frozen and trainable parameters in
one group (supported by ``fully_shard``; run with 2 gloo processes on CPU in the tests).

Checkpoints hold the trainable parameters and their optimizer state only
(`shardloader.train.checkpoint` with ``trainable_only``), so they do not say which base they
adapt: `base_identity` does (a preset: its name, seed, vocabulary and positions; a directory: the
sha256 of its config and weight files), it goes into the trainer state, and `check_resume`
refuses a checkpoint of another base or other adapter settings before anything is loaded.

`export_lora` writes, at the end of a run, ``OUT/adapter/`` (``PeftModel.save_pretrained``:
``adapter_config.json`` and ``adapter_model.safetensors``), for a preset base also ``OUT/base/``
(a plain Hugging Face model the adapter's ``base_model_name_or_path`` points to; for a local
directory it points to that directory), and with ``merge`` ``OUT/model/``: the base with the
adapter merged in, which ``AutoModelForCausalLM.from_pretrained`` loads without ``peft``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardloader.errors import ConfigError, ResumeError
from shardloader.train.config import LORA_ALL_LINEAR, TrainConfig
from shardloader.train.model import PRESETS

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
BASE_DIR = "base"
_BASE_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin")
_CHECKED_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets")


def require_peft() -> Any:
    """The ``peft`` module.

    Raises:
        ConfigError: It is not installed; the message says what to install.
    """
    try:
        import peft
    except ImportError as err:
        raise ConfigError(
            f"--lora-rank needs the peft package ({err}); pip install 'shardloader[lora]'"
        ) from err
    return peft


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap ``model`` in a ``PeftModel`` with adapters as ``config`` says; the base is frozen.

    The adapters' initialization draws from torch's global generator, seeded by `build_model`,
    so every rank builds the same adapters.
    """
    peft = require_peft()
    targets: str | list[str] = (
        LORA_ALL_LINEAR if config.lora_targets == (LORA_ALL_LINEAR,) else list(config.lora_targets)
    )
    settings = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft reads a transformers attribute deprecated in v5
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            return peft.get_peft_model(model, settings)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ConfigError(
            f"{config.model}: cannot add LoRA adapters to {','.join(config.lora_targets)} ({err}); "
            f"pass --lora-targets {LORA_ALL_LINEAR} or module names of this model"
        ) from err


def count_trainable(model: nn.Module) -> int:
    """Parameters that get gradients (the adapters under LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- which base an adapter belongs to ------------------------------------------------------------


def base_identity(model: str, *, seed: int, vocab_size: int, max_positions: int) -> dict[str, Any]:
    """What identifies the base model a run adapts (stored in LoRA checkpoints).

    A preset is rebuilt from its name, seed, vocabulary and positions. A directory or
    ``config.json`` is identified by the sha256 of its config and weight files (read at ~1 GB/s:
    a 7B model in bf16 takes ~15 s, once per run); without weights it is built from its config
    with ``seed``, which then counts too.
    """
    if model in PRESETS:
        return {
            "preset": model,
            "seed": seed,
            "vocab_size": vocab_size,
            "max_positions": max_positions,
        }
    path = Path(model)
    directory = path.parent if path.is_file() else path
    files = [path] if path.is_file() else sorted({f for p in _BASE_FILES for f in path.glob(p)})
    hashes = {}
    for file in files:
        with open(file, "rb") as f:
            hashes[file.name] = hashlib.file_digest(f, "sha256").hexdigest()
    identity: dict[str, Any] = {"directory": str(directory.resolve()), "sha256": hashes}
    if not any(name != "config.json" for name in hashes) or path.is_file():
        identity["seed"] = seed  # random weights from the config
    return identity


def local_base(model: str) -> str | None:
    """The local directory of a base model with weights (resolved), or ``None``.

    ``None`` for a preset or a config without weights: such a base is written to ``OUT/base/``.
    """
    path = Path(model)
    if model in PRESETS or not path.is_dir():
        return None
    if not any(any(path.glob(p)) for p in _BASE_FILES if p != "config.json"):
        return None
    return str(path.resolve())


def describe_base(identity: dict[str, Any]) -> str:
    """One line naming a base model, for messages."""
    if "preset" in identity:
        return (
            f"preset {identity['preset']} (seed {identity['seed']}, vocabulary "
            f"{identity['vocab_size']}, {identity['max_positions']} positions)"
        )
    files = ", ".join(f"{name} {digest[:12]}…" for name, digest in identity["sha256"].items())
    seed = f", seed {identity['seed']}" if "seed" in identity else ""
    return f"{identity['directory']} ({files or 'no files'}{seed})"


def _same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same weights: a moved directory with the same files is the same base."""
    strip = {"directory"}
    return {k: v for k, v in a.items() if k not in strip} == {
        k: v for k, v in b.items() if k not in strip
    }


def check_resume(
    where: Path, state: dict[str, Any], config: TrainConfig, identity: dict[str, Any] | None
) -> None:
    """Refuse a checkpoint whose adapters belong to another base or LoRA setting.

    Called with the checkpoint's trainer state before its weights are loaded.

    Raises:
        ResumeError: Full fine-tuning against LoRA, other adapter settings, or another base;
            the message names both sides.
    """
    import json

    saved_config = json.loads(state["config"])
    saved_rank = int(saved_config.get("lora_rank", 0))
    if bool(saved_rank) != bool(config.lora_rank):
        kind = {True: "LoRA adapters", False: "a fully fine-tuned model"}
        raise ResumeError(
            f"{where}: the checkpoint holds {kind[bool(saved_rank)]}, this run trains "
            f"{kind[bool(config.lora_rank)]}; resume with the --lora-rank it was written with "
            f"({saved_rank})"
        )
    if not config.lora_rank:
        return
    mine = config.to_dict()
    for name in _CHECKED_SETTINGS:
        theirs, ours = saved_config.get(name), mine[name]
        if name == "lora_targets":
            theirs, ours = list(theirs or ()), list(ours)
        if theirs != ours:
            raise ResumeError(
                f"{where}: the adapters were trained with {name}={theirs}, this run has "
                f"{name}={ours}; resume with the settings the checkpoint was written with"
            )
    saved = json.loads(state.get("base_model", "null"))
    if saved is None or identity is None or not _same_base(saved, identity):
        raise ResumeError(
            f"{where}: the adapters were trained on the base "
            f"{describe_base(saved) if saved else '(not recorded)'}, this run's base is "
            f"{describe_base(identity) if identity else '(unknown)'}; resume with the base "
            "model the checkpoint was written with"
        )


# --- export --------------------------------------------------------------------------------------


def export_lora(
    model: nn.Module,
    output: Path,
    *,
    rank: int,
    rebuild: Callable[[], nn.Module],
    base_directory: str | None,
    merge: bool,
    model_dir: str,
) -> None:
    """Write the adapter, and the base or the merged model; a collective under FSDP.

    Every rank gathers the full state dict (to rank 0's CPU, as `export_model` does); rank 0
    loads it into a fresh CPU copy of the ``PeftModel`` (``rebuild``) and writes from there, so
    the training model is left as it is.

    Args:
        model: The trained (wrapped) ``PeftModel``.
        output: The run's output directory.
        rank: This process's rank (rank 0 writes).
        rebuild: Makes an unwrapped CPU ``PeftModel`` of the same shape (base and adapters).
        base_directory: The local base model directory, or ``None`` for a preset (then the base
            is written to ``OUT/base/``).
        merge: Also write ``OUT/<model_dir>/``, the base with the adapter merged in.
        model_dir: Name of the merged model's directory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank != 0:
        return
    with torch.random.fork_rng(devices=[]):  # rebuilding a preset reseeds the generator
        built: Any = rebuild()
    built.load_state_dict(state)
    base_path = Path(base_directory) if base_directory else output / BASE_DIR
    if base_directory is None:
        base: Any = copy.deepcopy(built).unload()  # the frozen weights, adapters removed
        base.save_pretrained(str(base_path))
    built.peft_config["default"].base_model_name_or_path = str(base_path.resolve())
    built.save_pretrained(str(output / ADAPTER_DIR))
    log.info("adapter written to %s (base: %s)", output / ADAPTER_DIR, base_path)
    if merge:
        merged = built.merge_and_unload()
        merged.save_pretrained(str(output / model_dir))
        log.info("merged model written to %s", output / model_dir)
