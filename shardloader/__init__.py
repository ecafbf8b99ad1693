"""shardloader: convert text corpora into compressed shards and stream them to LLM training."""

from __future__ import annotations

__version__ = "0.1.0"

from shardloader.convert import ConvertConfig, ConvertResult, convert, merge
from shardloader.errors import (
    ConfigError,
    CorpusError,
    ManifestError,
    ResumeError,
    ShardError,
    ShardloaderError,
    StorageError,
)
from shardloader.manifest import Manifest, ShardInfo, read_manifest
from shardloader.plan import EpochPlan, PlanConfig, ResumePoint, WorkerPlan, plan_epoch
from shardloader.tokenizer import TextTokenizer, train_bpe_tokenizer
from shardloader.verify import VerifyReport, iter_samples, verify

__all__ = [
    "ConfigError",
    "ConvertConfig",
    "ConvertResult",
    "CorpusError",
    "EpochPlan",
    "Manifest",
    "ManifestError",
    "PlanConfig",
    "ResumeError",
    "ResumePoint",
    "ShardError",
    "ShardInfo",
    "ShardloaderError",
    "StorageError",
    "TextTokenizer",
    "VerifyReport",
    "WorkerPlan",
    "__version__",
    "convert",
    "iter_samples",
    "merge",
    "plan_epoch",
    "read_manifest",
    "train_bpe_tokenizer",
    "verify",
]
