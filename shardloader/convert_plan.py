"""Plan a conversion: list the input files and group them into tasks, under one fingerprint.

Consecutive files (sorted within each pattern) make a task of about ``task_bytes`` input bytes.
A JSONL file of more than ``slice_bytes`` of text is a task of its own, cut into slices of whole
lines that convert in parallel (`shardloader.sources.slices`). The grouping and the cuts depend
only on the inputs and the settings, never on the number of processes, so the output is
byte-identical for any ``num_proc``. The plan (settings, tokenizer, sources, tasks)
is fingerprinted; task records and the manifest carry the fingerprint, so a rerun tells its own
finished work from another conversion's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shardloader import storage
from shardloader.chat_template import ChatRenderer, load_chat_tokenizer
from shardloader.convert_config import ConvertConfig, check_chat_settings, check_text_settings
from shardloader.errors import ConfigError, CorpusError
from shardloader.sources import CHAT_SCHEMAS, detect_file_schema
from shardloader.sources.slices import plan_slices
from shardloader.storage import InputFile
from shardloader.tokenizer import TextTokenizer, TokenizerInfo

# The conversion logs under one name, as it did as one module ("shardloader.convert: ...").
log = logging.getLogger("shardloader.convert")


@dataclass(frozen=True)
class Task:
    """A group of consecutive input files converted together into ``shard-{index}-*``.

    A task of one big file may be cut into slices (``split``, one of
    `shardloader.sources.slices.SPLITS`), each converted on its own into
    ``shard-{index}-{slice}-*``; ``ranges`` are their stored byte ranges (none for ``stream``).
    """

    index: int
    files: tuple[InputFile, ...]
    split: str = ""
    ranges: tuple[tuple[int, int], ...] = ()


def plan_tasks(
    files: Sequence[InputFile],
    task_bytes: int,
    splits: Mapping[str, tuple[str, Sequence[tuple[int, int]]]] | None = None,
) -> list[Task]:
    """Group consecutive files into tasks of at least ``task_bytes`` bytes (the last: any size).

    A file in ``splits`` (url -> split, ranges; see `shardloader.sources.slices.plan_slices`)
    is a task of its own.
    """
    splits = splits or {}
    tasks: list[Task] = []
    group: list[InputFile] = []
    size = 0
    for f in files:
        if f.url in splits:
            if group:
                tasks.append(Task(len(tasks), tuple(group)))
                group, size = [], 0
            split, ranges = splits[f.url]
            tasks.append(Task(len(tasks), (f,), split, tuple((a, b) for a, b in ranges)))
            continue
        group.append(f)
        size += f.num_bytes
        if size >= task_bytes:
            tasks.append(Task(len(tasks), tuple(group)))
            group, size = [], 0
    if group:
        tasks.append(Task(len(tasks), tuple(group)))
    return tasks


def fingerprint(obj: Any) -> str:
    """A short sha256 of ``obj`` as canonical JSON."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def _location(url: str) -> str:
    """A comparable form of a path or URL: symlinks resolved for local paths."""
    if storage.is_url(url):
        return storage.normalize(url).rstrip("/")
    return os.path.realpath(os.path.expanduser(url))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _list_inputs(inputs: Sequence[str], output: str) -> list[InputFile]:
    """List the input files; an input folder that holds the output is read without it.

    Raises:
        ConfigError: An input (file, folder or pattern) is inside the output directory.
        CorpusError: An input matches nothing, or nothing is left.
    """
    out_at = _location(output)
    files: list[InputFile] = []
    for pattern in inputs:
        if _inside(_location(pattern), out_at):
            raise ConfigError(
                f"{pattern}: this input is inside the output directory {output}; a conversion "
                "cannot read its own output: move the input or choose another output"
            )
        try:
            found = storage.list_files([pattern])
        except FileNotFoundError as err:
            raise CorpusError(f"{err}; check the input paths") from err
        kept = [f for f in found if not _inside(_location(f.url), out_at)]
        if len(kept) < len(found):
            log.info(
                "%s: left out %d files inside the output directory %s",
                pattern,
                len(found) - len(kept),
                output,
            )
        files.extend(kept)
    return files


def plan_settings(
    config: ConvertConfig, schema: str
) -> tuple[dict[str, Any], TokenizerInfo | None]:
    """The output settings of a conversion of records of shape ``schema``, and its tokenizer.

    The tokenizer is loaded here, so a bad one fails before any work starts.

    Raises:
        ConfigError: Settings that do not go with the shape (`check_chat_settings`).
    """
    chat = schema in CHAT_SCHEMAS
    if chat:
        check_chat_settings(config)
    else:
        check_text_settings(config)
    info = None
    if config.tokenizer:
        info = TextTokenizer(
            config.tokenizer, eos_token=config.eos_token, bos_token=config.bos_token
        ).info
        if chat:  # the template's text is part of what the shards depend on
            renderer = ChatRenderer(load_chat_tokenizer(config.tokenizer), config.tokenizer)
            info = replace(info, chat_template=renderer.template_hash)
    settings = {**config.output_settings(info.fingerprint if info else None), "schema": schema}
    if chat and info is not None:  # the template writes BOS and EOS
        settings.update(add_eos=None, add_bos=None, chat_template=info.chat_template)
    return settings, info


def make_plan(config: ConvertConfig, inputs: Sequence[str]) -> tuple[dict[str, Any], list[Task]]:
    """The work plan (JSON-ready, with its ``fingerprint``) and the tasks of converting ``inputs``.

    Raises:
        ConfigError: An input is inside the output directory.
        CorpusError: No input files.
    """
    files = _list_inputs(inputs, config.output)
    if not files:
        raise CorpusError(f"no input files found in {list(inputs)}")
    schema = config.schema
    if schema == "auto":  # the corpus's first record decides, for every task
        schema = detect_file_schema(files[0], config.text_field, config.max_record_bytes)
    settings, info = plan_settings(config, schema)
    splits: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    for f in files:
        split, ranges = plan_slices(f, config.slice_bytes)
        if split:
            splits[f.url] = (split, ranges)
    if splits:  # recorded only where it shapes the output, so other plans keep their fingerprint
        settings["slice_bytes"] = config.slice_bytes
    tasks = plan_tasks(files, config.task_bytes, splits)
    plan: dict[str, Any] = {
        "version": 1,
        "settings": settings,
        "tokenizer": info.to_dict() if info else None,
        "token_dtype": info.dtype if info else None,
        "sources": [[f.url, f.num_bytes, f.root] for f in files],
        "tasks": [
            [files.index(t.files[0]), len(t.files)]
            + ([t.split, [list(r) for r in t.ranges]] if t.split else [])
            for t in tasks
        ],
    }
    plan["fingerprint"] = fingerprint(plan)
    return plan, tasks
