"""Index Parquet files in place: a manifest over existing files, no shard rewritten.

``index_parquet(source)`` lists the Parquet files under ``source`` (a directory, a glob or one
file; local or any fsspec URL), reads only their footers (row counts per row group, schema,
column chunk offsets, null counts), checks the text column is a string column (and the kept
fields' and the id's types), and writes ``_manifest.json`` of format ``"parquet"`` beside them
(or in ``output``, with ``root`` pointing back at them): one shard per file, its sample count from
the footer, its size and an identity the reader checks before using the file.

Identity: local files are hashed (sha256, the manifest's usual checksum: about 1.7 GB/s on one
core here, and the same hash the reader computes anyway before it first uses a local shard in a
process); remote files are named by size and ETag from the object store's ``info()``. Where every
ETag is a plain MD5 (S3 objects uploaded in one PUT, and rclone's), the ETag *is* the checksum
(``checksum_algorithm: "md5"``): nothing is downloaded to index, and the reader's whole-file
download is checked against it, so a replaced object is refused. Multipart ETags (``md5-N``) are not
a hash of the bytes: then every remote file is streamed once and hashed (sha256), and a warning
says so. A file rewritten after indexing fails that check, or the footer's row count, by name.

Row groups are recorded as the shard's blocks in the manifest's block table (`shardloader.blocks`:
per row group its rows, and the byte span of its column chunks from the footer, for range reads);
a file of one row group, or whose row groups cannot be blocks, has none and is read whole. Local
files also get a digest per row group (`shardloader.formats.parquet.row_group_digest`: its
column chunks and the footer), so block mode checks the row groups it reads instead of hashing
the file whole in every process.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardloader import storage
from shardloader._version import __version__
from shardloader.errors import ConfigError, CorpusError, ShardloaderError
from shardloader.formats.parquet import field_kind, hash_parquet_file, id_column_ok
from shardloader.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    check_relative_path,
    manifest_files,
    shards_with_ids,
)

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
RESERVED_FIELDS = ("id", "text", "sample_id", "is_padding")
_MD5 = re.compile(r"[0-9a-f]{32}")
_HASH_BLOCK = 4 << 20


@dataclass(frozen=True, slots=True)
class _Footer:
    """What one file's footer says, plus its identity."""

    url: str
    rel: str
    num_bytes: int
    num_rows: int
    schema: pa.Schema
    blocks: list[list[int]]
    etag: str | None


def index_parquet(
    source: str,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    keep_fields: Sequence[str] = (),
    output: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write a manifest over the Parquet files at ``source``; return it.

    Args:
        source: A directory (its ``.parquet`` files, recursively), a glob or one file; local
            or a URL.
        text_field: The string column holding the text.
        id_field: The column holding the ids (strings or integers), used when the files have
            it; else (or with ``None``) a sample's id is ``<file path>:<row>``.
        keep_fields: Other columns to serve with each sample (scalars, or lists and structs as
            ``json``).
        output: Directory for ``_manifest.json`` (default: beside the files, at ``source``'s
            directory); another one records where the files are (``root``).
        storage_options: Passed to fsspec.

    Raises:
        CorpusError: No Parquet file, a file that is not Parquet, a missing or mistyped column,
            nulls in the text column; each names the file.
        ConfigError: A kept field that collides with ``id``, ``text`` or another name.
    """
    opts = dict(storage_options or {})
    for name in keep_fields:
        if name in RESERVED_FIELDS or name in (text_field, id_field):
            raise ConfigError(
                f"--keep-fields {name!r}: the name is taken (id, text, sample_id, is_padding, "
                "the text and id columns); keep another column"
            )
    files = _list_parquet(source, opts)
    root = files[0].root
    footers = [_read_footer(f.url, f.num_bytes, root, text_field, opts) for f in files]
    empty = [f for f in footers if f.num_rows == 0]
    footers = [f for f in footers if f.num_rows > 0]
    if empty:
        log.warning("%s: left out %d files with no rows", source, len(empty))
    if not footers:
        raise CorpusError(f"{source}: every Parquet file is empty; nothing to index")
    fields, use_id = _fields(footers, text_field, id_field, keep_fields)
    blocks = [_row_group_blocks(f) for f in footers]  # StreamConfig(shuffle_unit="block")
    if all(storage.is_local(f.url) for f in footers):
        # Each file read once: its checksum and its row groups' digests.
        hashed = [_hash_local(f, b) for f, b in zip(footers, blocks, strict=True)]
        algorithm, checksums = "sha256", [c for c, _ in hashed]
        blocks = [b for _, b in hashed]
    else:
        algorithm, checksums = _remote_identities(footers, opts)
    shards = [
        ShardInfo(path=f.rel, num_samples=f.num_rows, num_bytes=f.num_bytes, checksum=c)
        for f, c in zip(footers, checksums, strict=True)
    ]
    out_dir = storage.normalize(output) if output else root
    manifest = Manifest(
        format="parquet",
        compression="none",
        fields=fields,
        shards=shards_with_ids(shards, blocks=blocks),
        checksum_algorithm=algorithm,
        config={
            "source": "parquet files indexed in place",
            "text_field": text_field,
            "id_field": id_field if use_id else None,
            "keep_fields": list(keep_fields),
        },
        sources=tuple(_source_entry(f) for f in footers),
        skipped={"empty_files": len(empty)} if empty else {},
        created_by=f"shardloader {__version__}",
        root=None if out_dir == root else root,
    )
    out = storage.OutputDir(out_dir, opts)
    out.makedirs()
    for name, data in manifest_files(manifest):  # a block file (if any) before the manifest
        storage.write_file(out, name, data)
    log.info(
        "%s: indexed %d files, %d samples",
        out.url_of(MANIFEST_NAME),
        len(shards),
        sum(f.num_rows for f in footers),
    )
    return manifest


def _list_parquet(source: str, opts: dict[str, Any]) -> list[storage.InputFile]:
    try:
        files = storage.list_files([source], **opts)
    except FileNotFoundError as err:
        raise CorpusError(f"{err}; name a directory, glob or file of Parquet files") from err
    kind = storage.file_type(storage.normalize(source), **opts)
    if kind == "directory":  # a dataset folder also holds READMEs, licences, scripts
        kept = [f for f in files if f.url.endswith(PARQUET_SUFFIXES)]
        if len(kept) < len(files):
            log.info("%s: ignored %d files not named *.parquet", source, len(files) - len(kept))
        files = kept
    if not files:
        raise CorpusError(f"{source}: no Parquet file (*.parquet) there")
    roots = {f.root for f in files}
    if len(roots) != 1:
        raise CorpusError(f"{source}: files under several roots {sorted(roots)}; index each")
    return files


def _read_footer(
    url: str, num_bytes: int, root: str, text_field: str, opts: dict[str, Any]
) -> _Footer:
    rel = storage.relpath(url, root)
    check_relative_path(rel, url)
    etag = None
    try:
        if storage.is_local(url):
            meta = pq.read_metadata(url.removeprefix("file://"))
        else:
            fs, path = storage.url_to_fs(url, **opts)
            info = storage.with_retries(lambda: fs.info(path), url=url, what="stat")
            num_bytes = int(info.get("size") or num_bytes)
            raw = info.get("ETag") or info.get("etag")
            etag = str(raw).strip('"') if raw else None
            with storage.open_read(url, **opts) as f:
                meta = pq.read_metadata(f)
        schema = meta.schema.to_arrow_schema()
    except ShardloaderError:  # ours (also ValueError / OSError): as it is
        raise
    except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: non-UTF-8 names
        raise CorpusError(f"{url}: not a readable Parquet file ({err})") from err
    if text_field not in schema.names:
        raise CorpusError(
            f"{url}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
            "choose the text column with --text-field"
        )
    kind = schema.field(text_field).type
    if field_kind(kind) != "string":
        raise CorpusError(f"{url}: column {text_field!r} has type {kind}, expected string")
    blocks, nulls = [], 0
    for group in range(meta.num_row_groups):
        rg = meta.row_group(group)
        start, end = num_bytes, 0
        for c in range(rg.num_columns):
            chunk = rg.column(c)
            first = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
                first = min(first, chunk.dictionary_page_offset)
            start, end = min(start, first), max(end, first + chunk.total_compressed_size)
            stats = chunk.statistics
            if chunk.path_in_schema == text_field and stats is not None and stats.has_null_count:
                nulls += stats.null_count
        # Decoded bytes: the row group's uncompressed size (every column: an upper bound).
        blocks.append([rg.num_rows, start, max(0, end - start), max(0, rg.total_byte_size)])
    if nulls:
        raise CorpusError(
            f"{url}: column {text_field!r} holds {nulls} nulls; filter them out, or convert "
            "(which skips them) instead of indexing"
        )
    return _Footer(url, rel, num_bytes, meta.num_rows, schema, blocks, etag)


def _fields(
    footers: list[_Footer], text_field: str, id_field: str | None, keep_fields: Sequence[str]
) -> tuple[dict[str, str], bool]:
    """The manifest's fields, every file's columns checked; and whether the id column is used."""
    has_id = [id_field is not None and id_field in f.schema.names for f in footers]
    if any(has_id) and not all(has_id):
        missing = footers[has_id.index(False)].url
        raise CorpusError(
            f"{missing}: no column {id_field!r}, which other files have; pass --id-field '' to "
            "make ids from file and row for all"
        )
    use_id = all(has_id)
    fields = {"id": "string", "text": "string"}
    for f in footers:
        if use_id and id_field is not None and not id_column_ok(f.schema.field(id_field).type):
            kind = f.schema.field(id_field).type
            raise CorpusError(
                f"{f.url}: id column {id_field!r} has type {kind}; expected string "
                "or integer (or pass --id-field '')"
            )
        for name in keep_fields:
            if name not in f.schema.names:
                raise CorpusError(f"{f.url}: no column {name!r} to keep")
            kind = field_kind(f.schema.field(name).type)
            if kind is None:
                raise CorpusError(
                    f"{f.url}: column {name!r} has type {f.schema.field(name).type}, which "
                    "cannot be kept (strings, numbers, booleans, lists and structs can)"
                )
            if fields.setdefault(name, kind) != kind:
                raise CorpusError(
                    f"{f.url}: column {name!r} is {kind} here but {fields[name]} in other files"
                )
    return fields, use_id


def _remote_identities(footers: list[_Footer], opts: dict[str, Any]) -> tuple[str, list[str]]:
    """The checksum algorithm and each remote file's checksum (see the module docstring)."""
    etags = [f.etag or "" for f in footers]
    if all(_MD5.fullmatch(e) for e in etags):
        return "md5", etags
    log.warning(
        "%d of %d files have no plain MD5 ETag (multipart uploads?): hashing every file (%d "
        "bytes read once)",
        sum(1 for e in etags if not _MD5.fullmatch(e)),
        len(etags),
        sum(f.num_bytes for f in footers),
    )
    return "sha256", [_hash_url(f.url, opts) for f in footers]


def _hash_url(url: str, opts: dict[str, Any]) -> str:
    hasher = hashlib.sha256()
    try:
        with storage.open_read(url, **opts) as f:
            while block := f.read(_HASH_BLOCK):
                hasher.update(block)
    except OSError as err:
        raise CorpusError(f"{url}: cannot read it to hash ({err})") from err
    return hasher.hexdigest()


def _row_group_blocks(footer: _Footer) -> list[list[int]] | None:
    """The file's row groups as blocks (`shardloader.blocks`), or ``None``: read it whole.

    A file whose row groups cannot be blocks (an empty row group, or byte spans that are not
    increasing and inside the file) is one block, so block ``i`` is always row group ``i``.
    """
    end = 0
    for num_rows, offset, length, _ in footer.blocks:
        if num_rows <= 0 or length <= 0 or offset < end or offset + length > footer.num_bytes:
            return None
        end = offset + length
    return [list(b) for b in footer.blocks] if len(footer.blocks) > 1 else None


def _hash_local(
    footer: _Footer, blocks: list[list[Any]] | None
) -> tuple[str, list[list[Any]] | None]:
    """A local file's sha256, and its ``blocks`` each with its `row_group_digest`."""
    spans = [(b[1], b[2]) for b in blocks or []]
    try:
        checksum, digests = hash_parquet_file(
            footer.url.removeprefix("file://"), footer.num_bytes, spans
        )
    except (OSError, ShardloaderError) as err:
        raise CorpusError(f"{footer.url}: cannot read it to hash ({err})") from err
    if blocks is None:
        return checksum, None
    return checksum, [[*b, d] for b, d in zip(blocks, digests, strict=True)]


def _source_entry(f: _Footer) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": f.rel,
        "num_bytes": f.num_bytes,
        "num_rows": f.num_rows,
    }
    if f.etag is not None:
        entry["etag"] = f.etag
    return entry
