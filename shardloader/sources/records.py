"""What a record is and what makes one bad: the types every corpus reader shares.

:class:`RecordSpec` says which fields to read, :func:`make_document` checks one parsed record
(JSONL object or Parquet row) against it and builds a :class:`Document`, and :class:`BadRecords`
raises on a bad record or, with ``on_bad_record="skip"``, counts it by kind with its first
locations. :class:`DamagedFileError` marks a file that cannot be read to its end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardloader.errors import ConfigError, CorpusError

MAX_EXAMPLES = 20
ON_BAD_RECORD = ("raise", "skip")
RESERVED_FIELDS = ("id", "text", "input_ids", "loss_spans")  # loss_spans: the trained tokens
KEEP_FIELD_TYPES = ("string", "int64", "float64", "bool", "json")
MAX_RECORD_BYTES = 256 << 20  # one JSONL line, Parquet row or text file; --max-record-bytes
_INT64 = (-(2**63), 2**63 - 1)


class DamagedFileError(CorpusError):
    """A file cannot be read to its end (truncated or corrupt compression, not Parquet).

    With ``on_bad_record="skip"`` the rest of the file is skipped and counted as
    ``damaged_file``; the records read before the damage are kept.
    """

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what

    def __reduce__(self) -> tuple[type[DamagedFileError], tuple[str, str]]:
        # A pool worker's error reaches the parent pickled; the default rebuilds from the
        # message alone, which this constructor refuses (and the pool then hangs).
        return (DamagedFileError, (self.where, self.what))


@dataclass(frozen=True, kw_only=True)
class FileContext:
    """One input file as its reader sees it: where it is, and where bad records and counts go.

    Attributes:
        url: The file, for error messages.
        name: Its path under the input root; ids of records without one are made from it.
        codec: Its compression (``"none"``, ``"gzip"``, ``"zstd"``).
        bad: Raises on or counts each bad record.
        stats: Receives ``records``, ``bytes`` and (JSONL) ``blank_lines``.
        max_record_bytes: A record over this size is bad (``record_too_large``).
        first_line: The line number of the first line read: 1, or later for a slice of a file
            (`shardloader.sources.slices`), so ids and errors name the file's own lines.
    """

    url: str
    name: str
    codec: str
    bad: BadRecords
    stats: Counter[str]
    max_record_bytes: int
    first_line: int = 1


@dataclass(frozen=True, slots=True)
class Document:
    """One raw document.

    Attributes:
        id: The record's id field, or ``"{file}:{line}"`` (``"{file}"`` for text files).
        text: The document text, exactly as decoded; for chat records, their turns as canonical
            JSON (``[{"content": ..., "role": ...}, ...]``).
        fields: Kept extra fields (name -> value), already type-checked.
        where: ``path:line`` (or ``path: row N``) of the record, for error messages.
    """

    id: str
    text: str
    fields: Mapping[str, Any] | None
    where: str


@dataclass
class BadRecords:
    """Policy and tally for bad records.

    Args:
        on_bad_record: ``"raise"`` stops at the first bad record; ``"skip"`` counts and goes on.
    """

    on_bad_record: str = "raise"
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, kind: str, where: str, message: str, remedy: str = "fix it") -> None:
        """Raise or count one bad record of ``kind`` at ``where``."""
        if self.on_bad_record != "skip":
            raise CorpusError(f"{where}: {message}; {remedy} or pass --on-bad-record=skip")
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {kind}: {message}")

    def report_too_large(self, where: str, size: int, max_record_bytes: int) -> None:
        """Raise or count one record of ``size`` bytes, over ``max_record_bytes``."""
        self.report(
            "record_too_large",
            where,
            f"record is {size} bytes, over --max-record-bytes {max_record_bytes}",
            remedy="raise the limit",
        )

    @property
    def total(self) -> int:
        """Number of records skipped so far."""
        return sum(self.counts.values())


@dataclass(frozen=True, kw_only=True)
class RecordSpec:
    """Which fields of a record to read.

    Args:
        text_field: Field holding the document text.
        id_field: Field holding the document id; when a record lacks it, an id is made from the
            file and line. ``None`` always makes ids.
        keep_fields: Extra fields to keep, name -> type (one of ``KEEP_FIELD_TYPES``).
        schema: ``"text"``, or the chat shape the records have (see `shardloader.sources.chat`);
            then a document's text is its conversation normalized to ``messages``, as JSON.
    """

    text_field: str = "text"
    id_field: str | None = "id"
    keep_fields: Mapping[str, str] = field(default_factory=dict)
    schema: str = "text"


def parse_keep_fields(specs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse ``["url", "score:float64"]`` into ``{"url": "string", "score": "float64"}``.

    Raises:
        ConfigError: Unknown type, reserved or duplicate name.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, _, kind = spec.partition(":")
        name, kind = name.strip(), (kind.strip() or "string")
        if not name:
            raise ConfigError(f"keep_fields: empty field name in {spec!r}")
        if kind not in KEEP_FIELD_TYPES:
            raise ConfigError(
                f"keep_fields: {spec!r} has type {kind!r}; use one of {', '.join(KEEP_FIELD_TYPES)}"
            )
        if name in RESERVED_FIELDS:
            raise ConfigError(f"keep_fields: {name!r} is reserved ({', '.join(RESERVED_FIELDS)})")
        if name in out:
            raise ConfigError(f"keep_fields: {name!r} is listed twice")
        out[name] = kind
    return out


def make_document(
    record: Mapping[str, Any], default_id: str, where: str, spec: RecordSpec, bad: BadRecords
) -> Document | None:
    """Check one parsed record against ``spec``; its :class:`Document`, or ``None`` if it is bad.

    A bad record (text missing, empty or not a string; id or kept field of the wrong type) is
    reported to ``bad`` under its kind.
    """
    text = _text_of(record, where, spec, bad)
    if text is None:
        return None
    doc_id = default_id
    if spec.id_field is not None:
        value = record.get(spec.id_field)
        if isinstance(value, str) and value:
            doc_id = value
        elif isinstance(value, int) and not isinstance(value, bool):
            doc_id = str(value)
        elif value is not None:
            bad.report(
                "bad_id",
                where,
                f"id field {spec.id_field!r} is {type_name(value)} ({value!r:.40}), expected a "
                "non-empty string or an integer",
            )
            return None
    fields = None
    if spec.keep_fields:
        fields = {}
        for key, kind in spec.keep_fields.items():
            value = record.get(key)
            problem = _check_field(value, kind)
            if problem:
                bad.report("bad_field", where, f"field {key!r} {problem}; declare it {key}:json")
                return None
            fields[key] = float(value) if kind == "float64" and value is not None else value
    return Document(doc_id, text, fields, where)


def _text_of(
    record: Mapping[str, Any], where: str, spec: RecordSpec, bad: BadRecords
) -> str | None:
    """The record's text field, or ``None`` (reported to ``bad``) if missing, empty or no string."""
    if spec.text_field not in record:
        present = ", ".join(sorted(record)[:8]) or "none"
        bad.report(
            "missing_text",
            where,
            f"no {spec.text_field!r} field (fields present: {present}); "
            "choose the text field with --text-field",
        )
        return None
    text = record[spec.text_field]
    if text is None:
        bad.report("missing_text", where, f"field {spec.text_field!r} is null, expected a string")
        return None
    if not isinstance(text, str):
        bad.report(
            "bad_text_type",
            where,
            f"field {spec.text_field!r} is {type_name(text)}, expected a string",
        )
        return None
    if not text:
        bad.report("empty_text", where, f"field {spec.text_field!r} is an empty string")
        return None
    return text


def _check_field(value: Any, kind: str) -> str:
    if value is None or kind == "json":
        return ""
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int64": isinstance(value, int)
        and not isinstance(value, bool)
        and _INT64[0] <= value <= _INT64[1],
        "float64": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    return "" if ok else f"is {type_name(value)} ({value!r:.40}), expected {kind}"


def type_name(value: Any) -> str:
    """Name ``value``'s type as JSON does (``null``, ``an array``), not as Python does."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
