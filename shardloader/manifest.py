"""The manifest: one versioned JSON file beside the shards that says what they hold.

The per-shard table is stored column by column (``"shards": {"path": [...], ...}``), which keeps
the file small and makes reading it a single ``json.loads`` plus one pass of checks: 100,000
shards (12 MB) parse in about 0.15 s here (``python -m tools.bench.manifest``), building no
per-shard objects. Everything a reader needs is here: the format and schema, per shard its path
relative to the manifest, sample count, size, checksum and first global sample id, plus the
tokenizer fingerprint, the conversion settings, the source files and the counts of skipped records.
Arrow shards (and indexed Parquet files) also have an optional ``blocks`` column: their record
batches (row groups) as four flat integer lists, ``count`` per shard then ``samples``, ``offset``
and ``length`` per block (`shardloader.blocks`, which checks it); readers before it ignore the
column, and a manifest without it reads as one block per shard. Past a million blocks the table
goes to a binary file beside the manifest, which the ``blocks`` entry names with its size and
sha256 (`shardloader.block_file`; `manifest_files` gives the files to write, in order).
Nothing time-dependent is written, so the same conversion always produces the same bytes.

A manifest is read as hostile input: every count must be a non-negative integer below
`MAX_COUNT`, a shard may claim at most `MAX_SAMPLES_PER_BYTE` samples per byte of its file, the
first ids and totals must add up, and Python's own limits (integers of over 4,300 digits, nesting
past the recursion limit) become `ManifestError`, so no absurd count reaches an allocation. The
reader then checks each count against the shard itself when it opens it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, overload

import numpy as np

from shardloader import storage
from shardloader.block_file import (
    BLOCK_FILE_MIN_BLOCKS,
    BLOCK_FILE_NAME,
    check_block_file_entry,
    decode_block_file,
    encode_block_file,
    is_block_file_entry,
)
from shardloader.blocks import (
    BlockColumns,
    BlockTable,
    block_columns,
    block_table,
    parse_block_columns,
)
from shardloader.errors import ManifestError

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("arrow", "tar")  # what convert writes
# What a manifest may name: also Parquet files indexed in place (`shardloader.index`).
READ_FORMATS = (*FORMATS, "parquet")
FIELD_TYPES = ("string", "int64", "float64", "bool", "json", "tokens")
_SHARD_COLUMNS = ("path", "num_samples", "num_bytes", "checksum", "first_sample_id", "num_tokens")
_COUNT_COLUMNS = ("num_samples", "num_bytes", "first_sample_id", "num_tokens")
COMPRESSIONS = ("zstd", "none")
TOKEN_DTYPES = ("uint16", "uint32")
MAX_COUNT = 1 << 48  # per shard and in total: far above any real dataset, far below int64
# Densest shard our writers make: empty Arrow rows under zstd, about 110 samples per byte.
MAX_SAMPLES_PER_BYTE = 1024
MAX_DEPTH = 32  # nesting of the manifest's JSON outside the shard table (ours: 4)


class ShardInfo(NamedTuple):
    """One shard as the manifest records it.

    Attributes:
        path: Path relative to the manifest's directory, with ``/`` separators.
        num_samples: Number of samples (documents) in the shard.
        num_bytes: Size of the shard file in bytes.
        checksum: Hex digest of the whole file, with the manifest's ``checksum_algorithm``.
        first_sample_id: Global id of the shard's first sample (ids follow manifest order).
        num_tokens: Number of tokens in the shard (0 for text shards).
    """

    path: str
    num_samples: int
    num_bytes: int
    checksum: str
    first_sample_id: int = 0
    num_tokens: int = 0


class ShardTable(Sequence[ShardInfo]):
    """The shard table, kept column by column; rows are built only when asked for.

    Reading a 100,000-shard manifest builds six lists, not 100,000 objects; the planner reads
    whole columns (``table.column("num_samples")``).
    """

    __slots__ = ("_block_columns", "_columns")

    def __init__(
        self,
        columns: Mapping[str, Sequence[Any]],
        *,
        blocks: Sequence[Any] | None = None,
        block_cols: BlockColumns | None = None,
    ) -> None:
        self._columns = {col: list(columns[col]) for col in _SHARD_COLUMNS}
        if blocks is not None:  # per-shard triples (writers): kept flat, as the manifest stores
            block_cols = block_columns(blocks)
        self._block_columns = block_cols

    @classmethod
    def from_rows(
        cls, rows: Iterable[ShardInfo], *, blocks: Sequence[Any] | None = None
    ) -> ShardTable:
        """Build a table from ``ShardInfo`` rows (and optionally their block lists)."""
        rows = list(rows)
        columns = {col: [getattr(r, col) for r in rows] for col in _SHARD_COLUMNS}
        return cls(columns, blocks=blocks)

    def column(self, name: str) -> list[Any]:
        """One column as a list (do not modify it)."""
        return self._columns[name]

    @property
    def blocks(self) -> list[Any] | None:
        """Per shard its ``[num_samples, offset, length]`` blocks or ``None`` (one block).

        ``None`` for the whole table when no shard records blocks (tar shards, older manifests).
        """
        cols = self._block_columns
        return None if cols is None else cols.per_shard()

    @property
    def block_columns(self) -> BlockColumns | None:
        """The block table as stored: flat columns (`shardloader.blocks.BlockColumns`)."""
        return self._block_columns

    def block_table(self) -> BlockTable:
        """Every block in manifest order (`shardloader.blocks.BlockTable`)."""
        return block_table(
            self._columns["num_samples"], self._columns["num_bytes"], self._block_columns
        )

    def __len__(self) -> int:
        return len(self._columns["path"])

    @overload
    def __getitem__(self, index: int) -> ShardInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[ShardInfo]: ...

    def __getitem__(self, index: int | slice) -> ShardInfo | list[ShardInfo]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        cols = self._columns
        return ShardInfo(*(cols[col][index] for col in _SHARD_COLUMNS))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShardTable):
            mine, theirs = self._block_columns, other._block_columns
            same_blocks = (mine is None and theirs is None) or (
                mine is not None
                and theirs is not None
                and all(_same_column(a, b) for a, b in zip(mine, theirs, strict=True))
            )
            return self._columns == other._columns and same_blocks
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a converted dataset holds.

    Attributes:
        format: Shard format, ``"arrow"`` or ``"tar"``.
        compression: ``"zstd"`` or ``"none"``.
        fields: Ordered mapping of field name to type (``string``, ``int64``, ``float64``,
            ``bool``, ``json`` or ``tokens``); ``id`` comes first, then ``text``, ``input_ids`` or
            (chat data) ``messages``.
        shards: The shards in global sample order.
        checksum_algorithm: Hash used for ``ShardInfo.checksum``.
        token_dtype: ``"uint16"`` or ``"uint32"`` for tokenized shards, else ``None``.
        tokenizer: Fingerprint, vocabulary size and special token ids when tokenized.
        config: The conversion settings that shaped the output.
        sources: One entry per input file: path, bytes and records read, records skipped.
        skipped: Count of skipped records by kind (only with ``on_bad_record="skip"``).
        skipped_examples: The first few skipped locations with their reasons.
        created_by: Library name and version that wrote the manifest.
        root: Where shard paths are relative to, when not the manifest's own directory: an
            absolute path or URL (``shardloader index --output`` writes it for files it may not
            write beside).
    """

    format: str
    compression: str
    fields: Mapping[str, str]
    shards: ShardTable
    checksum_algorithm: str = "sha256"
    token_dtype: str | None = None
    tokenizer: Mapping[str, Any] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    sources: tuple[Mapping[str, Any], ...] = ()
    skipped: Mapping[str, int] = field(default_factory=dict)
    skipped_examples: tuple[str, ...] = ()
    created_by: str = ""
    root: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shards, ShardTable):
            object.__setattr__(self, "shards", ShardTable.from_rows(self.shards))

    @property
    def num_samples(self) -> int:
        """Total number of samples in all shards."""
        return sum(self.shards.column("num_samples"))

    @property
    def num_bytes(self) -> int:
        """Total size of all shard files in bytes."""
        return sum(self.shards.column("num_bytes"))

    @property
    def num_tokens(self) -> int:
        """Total number of tokens (0 for text shards)."""
        return sum(self.shards.column("num_tokens"))

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size, if the manifest records one (token ids are below)."""
        size = (self.tokenizer or {}).get("vocab_size")
        return size if type(size) is int else None

    @property
    def tokenized(self) -> bool:
        """Whether the shards hold token ids rather than text."""
        return "input_ids" in self.fields

    @property
    def conversations(self) -> bool:
        """Whether the samples are chat data: ``messages``, or ids rendered with ``loss_spans``."""
        return "messages" in self.fields or "loss_spans" in self.fields


def _same_column(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


def shards_with_ids(
    shards: Iterable[ShardInfo], *, blocks: Sequence[Any] | None = None
) -> ShardTable:
    """Return ``shards`` with ``first_sample_id`` set from the running sum of sample counts.

    ``blocks``, if given, is each shard's block list (or ``None``), kept in the table.
    """
    out = []
    first = 0
    for s in shards:
        out.append(s._replace(first_sample_id=first))
        first += s.num_samples
    return ShardTable.from_rows(out, blocks=blocks)


def manifest_files(
    manifest: Manifest, *, block_file_min_blocks: int = BLOCK_FILE_MIN_BLOCKS
) -> list[tuple[str, bytes]]:
    """The files that store ``manifest``, in the order to write them: name and bytes.

    With at least ``block_file_min_blocks`` blocks, the block table goes to a binary file
    (`shardloader.block_file`) written before the manifest that names it; else the manifest
    alone, as `manifest_to_json` makes it.
    """
    columns = manifest.shards.block_columns
    if columns is None or len(columns.samples) < block_file_min_blocks:
        return [(MANIFEST_NAME, manifest_to_json(manifest))]
    data, entry = encode_block_file(columns, BLOCK_FILE_NAME)
    return [(BLOCK_FILE_NAME, data), (MANIFEST_NAME, manifest_to_json(manifest, blocks=entry))]


def manifest_to_json(manifest: Manifest, *, blocks: Mapping[str, Any] | None = None) -> bytes:
    """Serialize ``manifest`` to its canonical JSON bytes (deterministic key order).

    ``blocks``: the entry of a block file holding the block table (`manifest_files`), written
    instead of the table's lists.
    """
    shards = manifest.shards
    doc: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "created_by": manifest.created_by,
        "format": manifest.format,
        "compression": manifest.compression,
        "fields": dict(manifest.fields),
        "token_dtype": manifest.token_dtype,
        "tokenizer": dict(manifest.tokenizer) if manifest.tokenizer else None,
        "checksum_algorithm": manifest.checksum_algorithm,
        "totals": {
            "num_shards": len(shards),
            "num_samples": manifest.num_samples,
            "num_bytes": manifest.num_bytes,
            "num_tokens": manifest.num_tokens,
        },
        "config": dict(manifest.config),
        "skipped": dict(manifest.skipped),
        "skipped_examples": list(manifest.skipped_examples),
        "sources": [dict(s) for s in manifest.sources],
    }
    if manifest.root is not None:  # only then: other manifests keep their bytes
        doc["root"] = manifest.root
    # Everything but the shard table is indented for people; each shard column is one compact
    # line, which keeps a 100,000-shard manifest small and quick to parse.
    head = json.dumps(doc, indent=1, ensure_ascii=False)
    lines = [
        f'  "{col}": ' + json.dumps(shards.column(col), separators=(",", ":"))
        for col in _SHARD_COLUMNS
    ]
    if shards.block_columns is not None:  # absent when no shard has blocks: older readers' bytes
        table = shards.block_columns.to_json() if blocks is None else dict(blocks)
        lines.append('  "blocks": ' + json.dumps(table, separators=(",", ":")))
    columns = ",\n".join(lines)
    return (head[:-2] + ',\n "shards": {\n' + columns + "\n }\n}\n").encode("utf-8")


def parse_manifest(
    data: bytes,
    *,
    where: str = MANIFEST_NAME,
    read_file: Callable[[str], bytes] | None = None,
) -> Manifest:
    """Parse and validate manifest JSON bytes; ``where`` names the file in error messages.

    ``read_file`` reads a file beside the manifest by name: the block file, when the manifest's
    block table is in one (`shardloader.block_file`); without it such a manifest is refused.

    Raises:
        ManifestError: The bytes are not a valid manifest of a version this library reads.
    """
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a huge integer, deep nesting
        raise ManifestError(f"{where}: not valid JSON ({err}); reconvert or restore it") from err
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(doc).__name__}")
    if json_depth({k: v for k, v in doc.items() if k != "shards"}) > MAX_DEPTH:
        raise ManifestError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    version = doc.get("version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{where}: manifest version {version!r} is not supported (this shardloader reads "
            f"version {MANIFEST_VERSION}); upgrade shardloader or reconvert"
        )
    try:
        _check_types(doc, where)
        shards = _parse_shards(doc["shards"], where, read_file)
        manifest = Manifest(
            format=doc["format"],
            compression=doc["compression"],
            fields=dict(doc["fields"]),
            shards=shards,
            checksum_algorithm=doc["checksum_algorithm"],
            token_dtype=doc.get("token_dtype"),
            tokenizer=doc.get("tokenizer"),
            config=doc.get("config", {}),
            sources=tuple(doc.get("sources", ())),
            skipped=doc.get("skipped", {}),
            skipped_examples=tuple(doc.get("skipped_examples", ())),
            created_by=doc.get("created_by", ""),
            root=doc.get("root"),
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from err
    _check_manifest(manifest, doc.get("totals", {}), where)
    return manifest


_TOP_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "compression": (str,),
    "fields": (dict,),
    "checksum_algorithm": (str,),
    "token_dtype": (str, type(None)),
    "tokenizer": (dict, type(None)),
    "config": (dict,),
    "sources": (list,),
    "skipped": (dict,),
    "skipped_examples": (list,),
    "created_by": (str,),
    "totals": (dict,),
    "shards": (dict,),
    "root": (str, type(None)),
}


def _check_types(doc: Mapping[str, Any], where: str) -> None:
    for key, types in _TOP_TYPES.items():
        if key in doc and not isinstance(doc[key], types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ManifestError(
                f"{where}: {key} is a {type(doc[key]).__name__}, expected {expected}"
            )


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (0 for a scalar), found without recursion."""
    depth = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children)
    return depth


def _parse_shards(
    columns: Mapping[str, list[Any]], where: str, read_file: Callable[[str], bytes] | None
) -> ShardTable:
    for col in _SHARD_COLUMNS:
        if not isinstance(columns[col], list):
            raise ManifestError(f"{where}: shard column {col!r} is not a list")
    lengths = {col: len(columns[col]) for col in _SHARD_COLUMNS}
    if len(set(lengths.values())) != 1:
        raise ManifestError(f"{where}: shard columns have different lengths {lengths}")
    for col in _COUNT_COLUMNS:
        values = columns[col]
        if not all(type(v) is int and 0 <= v < MAX_COUNT for v in values):
            bad = next(v for v in values if type(v) is not int or not 0 <= v < MAX_COUNT)
            raise ManifestError(
                f"{where}: shard column {col!r} holds {bad!r:.60}, not a count below {MAX_COUNT}"
            )
    if not all(type(v) is str for v in columns["checksum"]):
        bad = next(v for v in columns["checksum"] if type(v) is not str)
        raise ManifestError(f"{where}: shard column 'checksum' holds {bad!r:.60}, not a string")
    _check_relative_paths(columns["path"], where)
    block_cols = None
    if "blocks" in columns:
        table: Any = columns["blocks"]
        if is_block_file_entry(table):
            table = _read_block_file(table, where, read_file)
        block_cols = parse_block_columns(
            table, columns["path"], columns["num_samples"], columns["num_bytes"], where
        )
    for path, num_samples, num_bytes in zip(
        columns["path"], columns["num_samples"], columns["num_bytes"], strict=True
    ):
        if num_samples > num_bytes * MAX_SAMPLES_PER_BYTE:
            raise ManifestError(
                f"{where}: shard {path} claims {num_samples} samples in {num_bytes} bytes, more "
                f"than {MAX_SAMPLES_PER_BYTE} a byte; the manifest is corrupt or tampered with: "
                "reconvert or restore it"
            )
    return ShardTable(columns, block_cols=block_cols)


def _read_block_file(
    entry: Mapping[str, Any], where: str, read_file: Callable[[str], bytes] | None
) -> dict[str, Any]:
    name = entry.get("file")
    if read_file is None:
        raise ManifestError(
            f"{where}: the block table is in the file {name!r:.80} beside the manifest; read the "
            "manifest with read_manifest (or pass parse_manifest a read_file)"
        )
    check_block_file_entry(entry, where)
    try:
        data = read_file(entry["file"])
    except FileNotFoundError as err:
        raise ManifestError(
            f"{where}: block file {entry['file']} is missing; copy it with the manifest, or "
            "reconvert"
        ) from err
    return decode_block_file(data, entry, where)


def _check_relative_paths(paths: list[str], where: str) -> None:
    """Check every path; a few substring scans of the joined paths clear the common case."""
    if not all(type(p) is str and p and "\n" not in p for p in paths):
        for p in paths:
            check_relative_path(p, where)
    joined = "\n".join(paths)
    if joined.startswith("/") or any(t in joined for t in ("..", ":", "\\", "\n/")):
        for p in paths:
            check_relative_path(p, where)


def check_relative_path(path: str, where: str) -> None:
    """Refuse a shard path that is absolute, has a URL scheme or escapes the dataset root.

    Raises:
        ManifestError: ``path`` would point outside the manifest's directory.
    """
    if (
        not isinstance(path, str)
        or not path
        or path.startswith(("/", "\\"))
        or "://" in path
        or "\\" in path
        or any(c < " " for c in path)
        or (len(path) > 1 and path[1] == ":")
        or ".." in posixpath.normpath(path).split("/")
    ):
        raise ManifestError(
            f"{where}: shard path {path!r} is not a relative path inside the dataset; "
            "manifests may only name files under their own directory"
        )


def _check_manifest(manifest: Manifest, totals: Mapping[str, Any], where: str) -> None:
    if manifest.format not in READ_FORMATS:
        raise ManifestError(f"{where}: unknown shard format {manifest.format!r}")
    if manifest.compression not in COMPRESSIONS:
        raise ManifestError(f"{where}: unknown compression {manifest.compression!r:.60}")
    if manifest.checksum_algorithm not in hashlib.algorithms_guaranteed:
        raise ManifestError(
            f"{where}: unknown checksum algorithm {manifest.checksum_algorithm!r:.60}"
        )
    _check_fields(manifest, where)
    _check_root(manifest.root, where)
    compressed_tar = manifest.format == "tar" and manifest.compression != "none"
    if compressed_tar and manifest.shards.block_columns is not None:
        raise ManifestError(
            f"{where}: .tar.zst shards have a blocks column; a compressed tar is one stream, "
            "read whole (one block), so the manifest is corrupt or tampered with: reconvert or "
            "restore it"
        )
    expected = 0
    shards = manifest.shards
    firsts = shards.column("first_sample_id")
    for index, num_samples in enumerate(shards.column("num_samples")):
        if firsts[index] != expected:
            raise ManifestError(
                f"{where}: shard {shards[index].path} has first_sample_id {firsts[index]}, "
                f"expected {expected} (the sum of the sample counts before it)"
            )
        expected += num_samples
    if expected >= MAX_COUNT or manifest.num_tokens >= MAX_COUNT:
        raise ManifestError(
            f"{where}: the shards add up to {expected} samples and {manifest.num_tokens} tokens, "
            f"more than {MAX_COUNT}; the manifest is corrupt"
        )
    for key, actual in (
        ("num_shards", len(manifest.shards)),
        ("num_samples", expected),
        ("num_bytes", manifest.num_bytes),
        ("num_tokens", manifest.num_tokens),
    ):
        if key in totals and totals[key] != actual:
            raise ManifestError(
                f"{where}: totals.{key} is {totals[key]} but the shard table adds up to {actual}"
            )


def _check_root(root: str | None, where: str) -> None:
    """Refuse a ``root`` that is not an absolute path or URL."""
    if root is None:
        return
    if not root or any(c < " " for c in root) or not (root.startswith("/") or "://" in root):
        raise ManifestError(f"{where}: root {root!r:.200} is not an absolute path or URL")


def _check_fields(manifest: Manifest, where: str) -> None:
    """Check the schema: ``id``, then the payload, then extras.

    The payload is ``text``, ``input_ids`` (with a token dtype) or ``messages`` (chat data, a
    ``json`` field).
    """
    fields = manifest.fields
    unknown = {k: v for k, v in fields.items() if not isinstance(v, str) or v not in FIELD_TYPES}
    if unknown:
        raise ManifestError(f"{where}: unknown field types {unknown}")
    names = list(fields)
    payload = names[1] if len(names) > 1 else None
    payload_kind = {"text": "string", "input_ids": "tokens", "messages": "json"}
    if (
        names[:1] != ["id"]
        or fields["id"] != "string"
        or payload not in payload_kind
        or fields[payload] != payload_kind[payload]
        or any(fields[n] == "tokens" for n in names[2:])
    ):
        raise ManifestError(
            f"{where}: fields {dict(fields)!r:.200} do not start with id (string) and then text "
            "(string), input_ids (tokens) or messages (json)"
        )
    dtype = manifest.token_dtype
    if (payload == "input_ids") != (dtype is not None) or dtype not in (None, *TOKEN_DTYPES):
        raise ManifestError(
            f"{where}: token_dtype {dtype!r:.60} does not fit fields with {payload}; expected "
            + (" or ".join(TOKEN_DTYPES) if payload == "input_ids" else "null")
        )
    vocab_size = (manifest.tokenizer or {}).get("vocab_size")
    if vocab_size is not None:
        limit = 1 << (16 if dtype == "uint16" else 32)
        if type(vocab_size) is not int or not 0 < vocab_size <= limit:
            raise ManifestError(
                f"{where}: tokenizer.vocab_size {vocab_size!r:.60} is not a count in 1..{limit}"
            )


def manifest_url(dataset_url: str) -> str:
    """Return the manifest URL for a dataset URL (a directory, or the manifest file itself)."""
    if dataset_url.rstrip("/").endswith(".json"):
        return dataset_url
    return storage.join(dataset_url, MANIFEST_NAME)


def read_manifest(dataset_url: str, **storage_options: Any) -> Manifest:
    """Read and validate the manifest of the dataset at ``dataset_url``.

    ``storage_options`` go to the filesystem (fsspec), e.g. an S3 endpoint.

    Raises:
        ManifestError: No manifest there (the conversion did not finish?) or it is invalid.
    """
    url = manifest_url(dataset_url)
    try:
        data = storage.read_bytes(url, **storage_options)
    except FileNotFoundError as err:
        raise ManifestError(
            f"{url}: no manifest found; convert a corpus there first, or finish the conversion "
            "(a manifest is written only when every task is done)"
        ) from err
    base = storage.dirname(url)
    return parse_manifest(
        data,
        where=url,
        read_file=lambda name: storage.read_bytes(storage.join(base, name), **storage_options),
    )


def iter_shard_urls(dataset_url: str, manifest: Manifest) -> Iterator[tuple[ShardInfo, str]]:
    """Yield each shard with its full URL (under ``manifest.root`` when it has one)."""
    base = manifest.root or storage.dirname(manifest_url(dataset_url))
    for s in manifest.shards:
        yield s, storage.join(base, s.path)
