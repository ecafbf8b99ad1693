"""shardloader: convert text corpora into compressed shards and stream them to LLM training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardloader._version import __version__
from shardloader.convert import ConvertConfig, ConvertResult, convert, merge
from shardloader.errors import (
    CheckpointDamagedError,
    ConfigError,
    CorpusError,
    ManifestError,
    ResumeError,
    ShardError,
    ShardloaderError,
    StorageError,
)
from shardloader.index import index_parquet
from shardloader.manifest import Manifest, ShardInfo, read_manifest
from shardloader.mix_config import Mixture, Phase, Source
from shardloader.pack import (
    PackConfig,
    PackedRow,
    Packer,
    PackingCollator,
    PackStats,
    best_fit_decreasing,
    collate_rows,
)
from shardloader.pack_attention import document_attention_mask, model_inputs
from shardloader.pack_encode import EncodedDoc, SampleEncoder
from shardloader.plan import EpochPlan, PlanConfig, ResumePoint, WorkerPlan, plan_epoch
from shardloader.state import LoaderState, merge_states
from shardloader.tokenizer import (
    TextTokenizer,
    check_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from shardloader.verify import VerifyReport, iter_samples, verify
from shardloader.world import WorldInfo, end_process_group

if TYPE_CHECKING:
    from shardloader.dataset import ShardDataset, StreamConfig
    from shardloader.loader import ShardLoader
    from shardloader.mix_dataset import MixDataset, MixLoader
    from shardloader.train import TrainConfig, TrainResult

# These import torch (about a second): loaded on first use, so `shardloader convert` and its
# pool workers start without it.
_LAZY = {
    "ShardDataset": "shardloader.dataset",
    "StreamConfig": "shardloader.dataset",
    "ShardLoader": "shardloader.loader",
    "MixDataset": "shardloader.mix_dataset",
    "MixLoader": "shardloader.mix_dataset",
    "TrainConfig": "shardloader.train",
    "TrainResult": "shardloader.train",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shardloader' has no attribute {name!r}")


__all__ = [
    "CheckpointDamagedError",
    "ConfigError",
    "ConvertConfig",
    "ConvertResult",
    "CorpusError",
    "EncodedDoc",
    "EpochPlan",
    "LoaderState",
    "Manifest",
    "ManifestError",
    "MixDataset",
    "MixLoader",
    "Mixture",
    "PackConfig",
    "PackStats",
    "PackedRow",
    "Packer",
    "PackingCollator",
    "Phase",
    "PlanConfig",
    "ResumeError",
    "ResumePoint",
    "SampleEncoder",
    "ShardDataset",
    "ShardError",
    "ShardInfo",
    "ShardLoader",
    "ShardloaderError",
    "Source",
    "StorageError",
    "StreamConfig",
    "TextTokenizer",
    "TrainConfig",
    "TrainResult",
    "VerifyReport",
    "WorkerPlan",
    "WorldInfo",
    "__version__",
    "best_fit_decreasing",
    "check_tokenizer",
    "index_parquet",
    "collate_rows",
    "convert",
    "document_attention_mask",
    "end_process_group",
    "iter_samples",
    "merge",
    "merge_states",
    "model_inputs",
    "plan_epoch",
    "read_manifest",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "verify",
]
