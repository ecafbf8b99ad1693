"""Parquet files: row group by row group -> documents, oversized and non-UTF-8 rows reported.

Row sizes are measured on the Arrow columns, so an oversized row is counted and left out before
any of its values becomes a Python object.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardloader.errors import CorpusError
from shardloader.sources.chat import SCHEMA_FIELDS, make_chat_document
from shardloader.sources.records import (
    BadRecords,
    DamagedFileError,
    Document,
    FileContext,
    RecordSpec,
    make_document,
)


def read_parquet(f: IO[bytes], file: FileContext, spec: RecordSpec) -> Iterator[Document]:
    """Yield the documents of the Parquet file ``f``, reporting each bad row to ``file.bad``.

    Raises:
        DamagedFileError: The file or one of its row groups cannot be read.
        CorpusError: The text column is missing or not a string column.
    """
    url, name, bad, stats = file.url, file.name, file.bad, file.stats
    max_record_bytes = file.max_record_bytes
    try:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: non-UTF-8 names
        raise DamagedFileError(url, f"not a readable Parquet file ({err})") from err
    if spec.schema == "text":
        _check_text_column(schema, spec, url)
        columns = [spec.text_field]
    else:  # a chat row missing a column is reported row by row (bad_chat_shape)
        columns = [k for k in SCHEMA_FIELDS[spec.schema] if k in schema.names]
    if spec.id_field is not None and spec.id_field in schema.names:
        columns.append(spec.id_field)
    columns += [k for k in spec.keep_fields if k in schema.names and k not in columns]
    make = make_document if spec.schema == "text" else make_chat_document
    row = 0
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise DamagedFileError(f"{url}: row group {group}", f"cannot be read ({err})") from err
        sizes = _row_bytes(table)
        over = np.flatnonzero(sizes > max_record_bytes)
        for index in over:  # counted first, then left out before any value becomes Python
            where = f"{url}: row {row + index} (row group {group})"
            bad.report_too_large(where, int(sizes[index]), max_record_bytes)
        kept = np.flatnonzero(sizes <= max_record_bytes) if len(over) else None
        if kept is not None:
            table = table.take(pa.array(kept))
        try:
            rows: list[dict[str, Any] | None] = list(table.to_pylist())
        except UnicodeDecodeError:  # Parquet does not validate UTF-8; find the bad rows
            numbers = [row + int(i) for i in kept] if kept is not None else None
            rows = _decode_rows(table, url, row, group, bad, numbers)
        if kept is not None:
            padded: list[dict[str, Any] | None] = [None] * len(sizes)
            for index, record in zip(kept, rows, strict=True):
                padded[index] = record
            rows = padded
        for offset, record in enumerate(rows):
            stats["records"] += 1
            if record is None:
                continue
            where = f"{url}: row {row + offset} (row group {group})"
            text = record.get(spec.text_field) if spec.schema == "text" else None
            if isinstance(text, str):
                stats["bytes"] += len(text.encode("utf-8"))
            doc = make(record, f"{name}:{row + offset}", where, spec, bad)
            if doc is not None:
                if spec.schema != "text":  # a conversation's size: its turns as canonical JSON
                    stats["bytes"] += len(doc.text.encode("utf-8"))
                yield doc
        row += len(rows)


def _check_text_column(schema: pa.Schema, spec: RecordSpec, url: str) -> None:
    """Raise unless ``schema`` has the text column, of a string type."""
    if spec.text_field not in schema.names:
        raise CorpusError(
            f"{url}: no column {spec.text_field!r} (columns: {', '.join(schema.names)}); "
            "choose the text column with --text-field"
        )
    kind = schema.field(spec.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{url}: column {spec.text_field!r} has type {kind}, expected string")


def _row_bytes(table: pa.Table) -> np.ndarray:
    """Bytes each row holds in its string and binary columns (its variable-size values)."""
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        t = column.type
        if (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_binary(t)
            or (pa.types.is_large_binary(t))
        ):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy().astype(np.int64)
    return sizes


def _decode_rows(
    table: pa.Table,
    url: str,
    first_row: int,
    group: int,
    bad: BadRecords,
    numbers: list[int] | None = None,
) -> list[dict[str, Any] | None]:
    """Decode a row group cell by cell, reporting invalid UTF-8; ``None`` marks a bad row.

    ``numbers`` are the rows' numbers in the file when ``table`` is not the whole row group.
    Only used when the fast whole-table decode fails, so its cost (a few microseconds per cell)
    is paid for bad row groups alone.
    """
    rows: list[dict[str, Any] | None] = []
    for index in range(table.num_rows):
        number = numbers[index] if numbers is not None else first_row + index
        record: dict[str, Any] = {}
        for column in table.column_names:
            try:
                record[column] = table.column(column)[index].as_py()
            except UnicodeDecodeError as err:
                bad.report(
                    "bad_utf8",
                    f"{url}: row {number} (row group {group})",
                    f"column {column!r} holds invalid UTF-8 "
                    f"({err.object[err.start : err.start + 4]!r}: {err.reason})",
                )
                break
        else:
            rows.append(record)
            continue
        rows.append(None)
    return rows
