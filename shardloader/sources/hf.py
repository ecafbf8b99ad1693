"""Hugging Face ``datasets`` objects in memory as a corpus: rows -> documents, like JSONL records.

A `datasets.Dataset` is read by row range in batches of `BATCH_ROWS` (``dataset[lo:hi]``, only
the columns the spec needs), so a task holds one batch of Python values at a time whatever the
dataset's size. A `datasets.IterableDataset` is read row by row in its own order. Each row goes
through `make_document` (or `make_chat_document`) exactly as a JSONL record would: the same bad
records, the same ``on_bad_record`` policy, the same kept-field checks. A record's location is
``{name}: row {index}`` and a row without an id gets ``{name}:{index}``.

``datasets`` is never imported here: a caller that has a dataset object has imported it.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from shardloader.errors import ConfigError
from shardloader.sources.chat import SCHEMA_FIELDS, make_chat_document
from shardloader.sources.jsonl import has_lone_surrogate
from shardloader.sources.records import BadRecords, Document, RecordSpec, make_document

BATCH_ROWS = 1000  # rows decoded into Python at once from a `datasets.Dataset`


def hf_dataset_kind(obj: Any) -> str | None:
    """``"map"`` for a `datasets.Dataset`, ``"iterable"`` for an `IterableDataset`, else None.

    Raises:
        ConfigError: A ``DatasetDict`` or ``IterableDatasetDict``: the caller must pick a split.
    """
    module = sys.modules.get("datasets")
    if module is None:  # no datasets object can exist without the module imported
        return None
    if isinstance(obj, module.Dataset):
        return "map"
    if isinstance(obj, module.IterableDataset):
        return "iterable"
    if isinstance(obj, (module.DatasetDict, module.IterableDatasetDict)):
        raise ConfigError(
            f"a {type(obj).__name__} of splits {sorted(obj)}: convert one split, e.g. "
            "dataset['train']"
        )
    return None


def hf_dataset_name(dataset: Any) -> str:
    """A name for locations: ``Dataset`` or ``IterableDataset``, with the dataset's own name."""
    info = getattr(dataset, "info", None)
    own = getattr(info, "dataset_name", None) or ""
    split = getattr(dataset, "split", None)
    suffix = f"({own}{f'/{split}' if split else ''})" if own else ""
    return type(dataset).__name__ + suffix


def _columns(dataset: Any, spec: RecordSpec) -> list[str] | None:
    """The dataset's columns that ``spec`` reads (``None``: the column names are unknown)."""
    names = getattr(dataset, "column_names", None)
    if not names:
        return None
    wanted = [spec.text_field] if spec.schema == "text" else list(SCHEMA_FIELDS[spec.schema])
    if spec.id_field is not None:
        wanted.append(spec.id_field)
    wanted += list(spec.keep_fields)
    return [n for n in dict.fromkeys(wanted) if n in names]


def first_record(dataset: Any) -> dict[str, Any] | None:
    """The first row of a dataset (for detecting its shape), or None if it has none."""
    if hf_dataset_kind(dataset) == "map":
        return dict(dataset.with_format(None)[0]) if len(dataset) else None
    for row in dataset:
        return dict(row)
    return None


def _rows(dataset: Any, start: int, stop: int | None, spec: RecordSpec) -> Iterator[dict[str, Any]]:
    columns = _columns(dataset, spec)
    if stop is None:  # an IterableDataset: its own order, one row at a time
        source = dataset.select_columns(columns) if columns is not None else dataset
        for row in source:
            yield dict(row)
        return
    view = dataset.with_format(None)
    if columns is not None:
        view = view.select_columns(columns)
    for lo in range(start, stop, BATCH_ROWS):
        batch = view[lo : min(lo + BATCH_ROWS, stop)]
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            yield dict(zip(names, values, strict=True))


def read_hf_documents(
    dataset: Any,
    start: int,
    stop: int | None,
    *,
    spec: RecordSpec,
    bad: BadRecords,
    stats: Counter[str],
    max_record_bytes: int,
) -> Iterator[Document]:
    """Yield the documents of rows ``[start, stop)`` of a dataset (``stop=None``: all, in order).

    ``stats`` receives ``records`` and ``bytes`` (the UTF-8 bytes of the texts, or of the
    conversations as canonical JSON). A text over ``max_record_bytes`` is a bad record of kind
    ``record_too_large``.

    Raises:
        CorpusError: A bad record (with ``on_bad_record="raise"``).
    """
    name = hf_dataset_name(dataset)
    make = make_document if spec.schema == "text" else make_chat_document
    for index, record in enumerate(_rows(dataset, start, stop, spec), start):
        stats["records"] += 1
        where = f"{name}: row {index}"
        text = record.get(spec.text_field) if spec.schema == "text" else None
        if isinstance(text, str):
            size = len(text.encode("utf-8", "surrogatepass"))  # lone ones: reported below
            if size > max_record_bytes:
                bad.report_too_large(where, size, max_record_bytes)
                continue
            stats["bytes"] += size
        doc = make(record, f"{name}:{index}", where, spec, bad)
        # Arrow-backed rows are valid UTF-8; rows an IterableDataset makes in Python may not be.
        if doc is None or has_lone_surrogate(doc, spec, bad):
            continue
        if spec.schema != "text":
            stats["bytes"] += len(doc.text.encode("utf-8", "surrogatepass"))
        yield doc
