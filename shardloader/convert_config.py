"""The settings of a conversion: `ConvertConfig`, its fields also ``shardloader convert`` flags.

`ConvertConfig.output_settings` names the fields that shape the output; the manifest and the work
plan record them, so that a rerun with other settings is told apart from a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardloader.errors import ConfigError
from shardloader.formats import COMPRESSIONS
from shardloader.manifest import FORMATS
from shardloader.options import option, parse_size
from shardloader.sources import (
    CHAT_SCHEMAS,
    MAX_RECORD_BYTES,
    ON_BAD_RECORD,
    SCHEMAS,
    parse_keep_fields,
)

KiB = 1 << 10
MiB = 1 << 20
# The compression of each format's shards when ``compression`` is not given.
DEFAULT_COMPRESSION = {"arrow": "zstd", "tar": "none"}
EXECUTORS = ("local", "ray")


def check_chat_settings(config: ConvertConfig) -> None:
    """Refuse settings that do not go with chat data.

    Without a tokenizer chat data is stored as a ``messages`` field; with one it is rendered with
    the tokenizer's chat template into ``input_ids`` and ``loss_spans``, and BOS / EOS are
    whatever the template writes (``add_eos`` does not apply).

    Raises:
        ConfigError: A kept field named ``messages``, or ``add_bos`` with a tokenizer.
    """
    if "messages" in parse_keep_fields(config.keep_fields):
        raise ConfigError("keep_fields: 'messages' is where chat data is stored; do not keep it")
    if config.tokenizer and config.add_bos:
        raise ConfigError(
            "add_bos: chat data is rendered with the tokenizer's chat template, which writes BOS "
            "and EOS itself; drop --add-bos (or use a template that writes BOS)"
        )


def check_text_settings(config: ConvertConfig) -> None:
    """Refuse chat-only settings for text data.

    Raises:
        ConfigError: ``max_prompt_tokens`` with text data.
    """
    if config.max_prompt_tokens is not None:
        raise ConfigError(
            "max_prompt_tokens: applies to chat data only (the tokens before the first assistant "
            "turn), and this corpus is text; drop it or choose a chat shape with --schema"
        )


def _none_if_empty(text: str) -> str | None:
    return text or None


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Settings of a conversion: where the shards go, their format and limits, the tokenizer.

    Every field is also a ``shardloader convert`` flag (``shard_bytes`` -> ``--shard-bytes``,
    sizes like ``64MB``), declared with `shardloader.options.option`; the help text is in the
    field. `output_settings` are the fields that shape the output; the manifest records them.
    """

    output: str = option(
        help="output directory or URL (an input folder that holds it is read without it)",
        flags=("-o", "--output"),
    )
    format: str = option(
        "arrow", "shard format: Arrow IPC files or WebDataset tar", choices=FORMATS
    )
    compression: str | None = option(
        None,
        "zstd or none (default: zstd for Arrow, per record batch; none for tar, plain .tar that "
        "webdataset.WebDataset(urls) reads as it is; tar with zstd: .tar.zst)",
        choices=COMPRESSIONS,
    )
    # 2 compresses text about twice as fast as 3 here for ~4% more bytes, and decompresses
    # faster (``python -m tools.bench.convert``).
    compression_level: int = option(2, "zstd level, -7 to 22")
    shard_bytes: int = option(
        128 * MiB, "close a shard at this many uncompressed payload bytes", parse=parse_size
    )
    shard_samples: int | None = option(None, "close a shard at this many samples")
    batch_bytes: int = option(
        128 * KiB,
        "Arrow record batch size, uncompressed (plain tar: a run of whole samples): a block, "
        "the unit streaming shuffles and checks (smaller mixes more shards per window of "
        "shuffle_bytes)",
        parse=parse_size,
    )
    task_bytes: int = option(
        64 * MiB, "group input files into tasks of about this many (stored) bytes", parse=parse_size
    )
    slice_bytes: int = option(
        256 * MiB,
        "cut a JSONL file of more text than this into slices of whole lines that convert in "
        "parallel (plain: byte ranges; multi-frame .zst: groups of frames; .gz or single-frame "
        ".zst: one reader hands out slices of decompressed lines)",
        parse=parse_size,
    )
    text_field: str = option("text", "field (or Parquet column) holding the text")
    schema: str = option(
        "auto",
        "record shape: text, or chat data stored as messages (OpenAI messages, ShareGPT "
        "conversations, Alpaca instruction/input/output, prompt/response); auto: from the "
        "first record",
        choices=SCHEMAS,
    )
    id_field: str | None = option(
        "id",
        "field with the document id; ids are made from file:line where missing "
        "(pass '' to always make them)",
        parse=_none_if_empty,
    )
    keep_fields: tuple[str, ...] = option(
        (),
        "comma-separated extra fields to keep, each name or name:type "
        "(string, int64, float64, bool, json)",
    )
    tokenizer: str | None = option(
        None,
        "tokenizer.json or a local Hugging Face tokenizer directory: store token ids (chat data: "
        "rendered with the directory's chat template, with loss_spans over the assistant turns)",
    )
    eos_token: str | None = option(None, "override the tokenizer's end-of-document token")
    bos_token: str | None = option(None, "override the tokenizer's beginning-of-document token")
    add_eos: bool = option(
        True, "append EOS to tokenized documents (--no-eos: do not)", negative="--no-eos"
    )
    add_bos: bool = option(False, "prepend BOS to tokenized documents")
    max_prompt_tokens: int | None = option(
        None,
        "chat data with --tokenizer: a conversation with more tokens than this before its first "
        "assistant turn is a bad record (prompt_too_long)",
    )
    on_bad_record: str = option(
        "raise",
        "raise: stop at the first bad record; skip: count and skip it",
        choices=ON_BAD_RECORD,
    )
    max_record_bytes: int = option(
        MAX_RECORD_BYTES,
        "longest record (JSONL line, Parquet row's strings, text file); a longer one is a bad "
        "record (record_too_large), measured but never held in memory",
        parse=parse_size,
    )
    num_proc: int | None = option(None, "worker processes (default: the CPUs this process may use)")
    num_tasks: int = option(1, "split the conversion into this many independent slices (machines)")
    task_index: int = option(0, "which slice this run converts (0-based)")
    executor: str = option(
        "local",
        "where tasks run: local (a process pool of num_proc) or ray (a Ray cluster; "
        "pip install shardloader[ray])",
        choices=EXECUTORS,
    )
    ray_address: str | None = option(
        None,
        "with --executor ray: the cluster to join (auto: the running one; default: RAY_ADDRESS, "
        "else a local instance)",
    )
    overwrite: bool = option(False, "replace a different dataset already in the output")
    progress: bool | None = option(None, "show a progress bar (default: when stderr is a terminal)")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format {self.format!r} is not known; use one of {FORMATS}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression {self.compression!r}; use one of {COMPRESSIONS}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ConfigError(f"on_bad_record {self.on_bad_record!r}; use one of {ON_BAD_RECORD}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor {self.executor!r}; use one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise ConfigError("ray_address applies to executor='ray' only; add --executor ray")
        for name in (
            "shard_bytes",
            "batch_bytes",
            "task_bytes",
            "slice_bytes",
            "max_record_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shard_samples is not None and self.shard_samples <= 0:
            raise ConfigError(f"shard_samples must be positive, got {self.shard_samples}")
        if self.num_proc is not None and self.num_proc <= 0:
            raise ConfigError(f"num_proc must be positive, got {self.num_proc}")
        if self.num_tasks <= 0 or not 0 <= self.task_index < self.num_tasks:
            raise ConfigError(
                f"task_index must be in [0, num_tasks); got task_index={self.task_index}, "
                f"num_tasks={self.num_tasks}"
            )
        if not -7 <= self.compression_level <= 22:
            raise ConfigError(
                f"compression_level must be in [-7, 22], got {self.compression_level}"
            )
        if self.schema not in SCHEMAS:
            raise ConfigError(f"schema {self.schema!r}; use one of {', '.join(SCHEMAS)}")
        parse_keep_fields(self.keep_fields)  # validates
        if self.max_prompt_tokens is not None:
            if self.max_prompt_tokens <= 0:
                raise ConfigError(
                    f"max_prompt_tokens must be positive, got {self.max_prompt_tokens}"
                )
            if not self.tokenizer:
                raise ConfigError(
                    "max_prompt_tokens counts tokens, so it needs a tokenizer; pass --tokenizer "
                    "(a directory with a chat template)"
                )
        if self.schema in CHAT_SCHEMAS:
            check_chat_settings(self)
        elif self.schema == "text":
            check_text_settings(self)

    @property
    def shard_compression(self) -> str:
        """The compression the shards get: `compression`, or the format's default when unset.

        Arrow shards compress each record batch with zstd; tar shards are plain ``.tar`` by
        default, because ``webdataset.WebDataset(urls)`` opens a ``.tar.zst`` only through a
        ``pipe:`` URL.
        """
        if self.compression is not None:
            return self.compression
        return DEFAULT_COMPRESSION.get(self.format, "zstd")

    def output_settings(self, tokenizer_fingerprint: str | None) -> dict[str, Any]:
        """The settings that shape the output (recorded in the manifest and the work plan).

        ``max_prompt_tokens`` appears only when set, so other conversions keep their fingerprint.
        """
        settings = {
            "format": self.format,
            "compression": self.shard_compression,
            "compression_level": self.compression_level,
            "shard_bytes": self.shard_bytes,
            "shard_samples": self.shard_samples,
            "batch_bytes": self.batch_bytes,
            "task_bytes": self.task_bytes,
            "text_field": self.text_field,
            "schema": self.schema,
            "id_field": self.id_field,
            "keep_fields": list(self.keep_fields),
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "add_eos": self.add_eos if tokenizer_fingerprint else None,
            "add_bos": self.add_bos if tokenizer_fingerprint else None,
            "on_bad_record": self.on_bad_record,
        }
        if self.max_prompt_tokens is not None:
            settings["max_prompt_tokens"] = self.max_prompt_tokens
        return settings
