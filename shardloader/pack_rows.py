"""Pack token documents into rows of at most ``seq_len`` tokens, keeping documents apart.

The row builder of `shardloader.pack`, which re-exports its public names and turns rows into
batches (`shardloader.pack.collate_rows`).

Modes (``PackConfig.mode``):

- ``concat``: documents are joined and cut into rows of exactly ``seq_len`` tokens; the rest of
  a document carries into the next row. Only the last row of a stream is partly filled.
- ``bfd`` (best-fit decreasing): the documents of each buffer of ``buffer_size`` samples are
  placed whole into rows, longest first, each into the row whose free space fits it most tightly
  (a new row when none does). Documents longer than ``seq_len`` follow ``long_docs`` (below).
  Any two rows of a buffer together hold more than ``seq_len`` tokens (else the later row's
  first document would have fitted the earlier row).
- ``pad``: one document per row, padded; with ``group_by_length`` each buffer is emitted longest
  first, so that ``pad_to_longest`` batches waste less.

Documents longer than ``seq_len`` in ``bfd`` and ``pad`` (``PackConfig.long_docs``):

- ``auto`` (the default): plain documents are split into ``seq_len`` pieces (each piece its own
  segment); conversations (documents with a loss mask: SFT samples) are truncated, keeping their
  start, so a turn is never cut off from the prompt before it.
- ``split``, ``truncate``, ``drop``: that policy for every document (``split`` cuts
  conversations mid-turn too; ``drop`` leaves the whole document out).

A truncated conversation whose kept part has no token with a loss (every assistant turn was cut
off; with ``mask_boundary_labels`` the first token does not count, as its label is masked) would
train nothing: it is dropped instead. Truncated and dropped documents and their tokens are
counted in `PackStats` and logged as a warning when their number reaches 1, 10, 100, ...
(``num_input_tokens == num_row_tokens + num_truncated_tokens + num_dropped_tokens``). ``concat``
(and so every token mixture) cuts all documents at row ends and ignores ``long_docs``.

Resume cursor: every row carries ``cursor = (upstream_position, skip)``, plain ints, naming where
the *next* row starts: restart the upstream at ``upstream_position``, pack with
``Packer.pack(samples, skip=skip)``, and the first row is exactly the row after this one.

- ``concat``: ``skip`` tokens of that sample's document are dropped (the carry, to the token).
- ``bfd`` and grouped ``pad``: the sample starts a buffer; it is refilled and placed again (the
  placement is deterministic) and its first ``skip`` rows are dropped.
- plain ``pad``: ``skip`` rows (pieces) of that sample's document; after a document's last
  piece the cursor is ``(its position + 1, 0)``.

After the last row of a buffer (or when a row ends exactly at a document end) the cursor is
``(last position read + 1, 0)``.

Algorithm and cost (``python -m tools.bench.pack``, one process on a shared 2-core VM,
``seq_len`` 2048, documents of median ~370 tokens): ``concat`` gathers about 64 Ki tokens of
documents, makes one ``np.concatenate``, finds all segment boundaries and cursors with a few
``searchsorted`` calls and yields rows as views (145-245 M tokens/s); ``bfd`` runs a Python
best-fit loop over a sorted list of free spaces (``bisect``), one step per document, then one
gather (97-245 M tokens/s). The per-document Python work (a few us) dominates for short
documents.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from shardloader.errors import ConfigError, ResumeError
from shardloader.options import option
from shardloader.pack_encode import Encoder, SampleEncoder, encode_token_samples

if TYPE_CHECKING:
    from shardloader.reader import TokenRun

# The public module's logger, as before the row builder moved here.
log = logging.getLogger("shardloader.pack")

MODES = ("concat", "bfd", "pad")
LONG_DOC_POLICIES = ("auto", "split", "truncate", "drop")
# concat: documents gathered per vectorized cut (at least 4 rows); bigger buys little.
CHUNK_TOKENS = 1 << 16
# Samples per batched tokenizer call; plain pad mode's placement group (any size gives one result).
ENCODE_GROUP = 256


@dataclass(frozen=True, kw_only=True)
class PackConfig:
    """How documents become rows; serializable with :meth:`to_dict` for loader state.

    Each field's meaning is its `shardloader.options.option` help, like every config's. The
    training command exposes ``seq_len`` and ``mode`` (``--seq-len``, ``--pack-mode``).

    Raises:
        ConfigError: A value is out of range or unknown.
    """

    seq_len: int = option(2048, "tokens per row")
    mode: str = option("concat", "concat, bfd or pad", choices=MODES)
    buffer_size: int = option(1024, "bfd, and pad with group_by_length: samples placed together")
    long_docs: str = option(
        "auto",
        "bfd and pad, documents longer than seq_len: split, truncate (keep the start) or drop"
        " them; auto splits plain text and truncates conversations (documents with a loss mask)",
        choices=LONG_DOC_POLICIES,
    )
    group_by_length: bool = option(False, "pad: emit each buffer's rows longest first")
    pad_to_longest: bool = option(False, "pad: pad a batch to its longest row (a multiple of 8)")
    mask_boundary_labels: bool = option(True, "label -100 on each segment's first token")
    drop_last: bool = option(False, "concat: drop the partly filled last row of a stream")
    pad_id: int = option(0, "input id of padding (its own segment, label -100)")
    add_bos: bool = option(False, "text samples: prepend BOS")
    add_eos: bool = option(True, "text samples: append EOS (as shardloader convert does)")
    text_field: str = option("text", "text samples: the field holding the text")

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.long_docs not in LONG_DOC_POLICIES:
            raise ConfigError(
                f"long_docs must be one of {', '.join(LONG_DOC_POLICIES)}, got {self.long_docs!r}"
            )
        if self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.pad_to_longest and self.mode != "pad":
            raise ConfigError(f"pad_to_longest needs mode='pad' (rows of {self.mode} are full)")
        if self.group_by_length and self.mode != "pad":
            raise ConfigError("group_by_length needs mode='pad' (bfd sorts by length already)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the loader state's config fingerprint."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class PackedRow:
    """One row before padding.

    Attributes:
        input_ids: The row's tokens (at most ``seq_len``; the upstream dtype).
        segment_lengths: Length of each document piece in the row, in order (int64).
        sample_ids: The ``sample_id`` of each piece's document (int64).
        loss_mask: Which tokens get a loss (SFT), or ``None`` for all of them.
        cursor: ``(upstream_position, skip)`` where the next row starts (module docstring).
    """

    input_ids: np.ndarray
    segment_lengths: np.ndarray
    sample_ids: np.ndarray
    loss_mask: np.ndarray | None
    cursor: tuple[int, int]


@dataclass
class PackStats:
    """Counts of what a :class:`Packer` consumed and produced (all its streams together)."""

    seq_len: int
    num_samples: int = 0
    num_input_tokens: int = 0  # after a resume's skip
    num_rows: int = 0
    num_row_tokens: int = 0
    num_truncated_docs: int = 0  # bfd/pad: documents cut to seq_len (long_docs)
    num_truncated_tokens: int = 0  # the tokens cut off them
    num_dropped_docs: int = 0  # bfd/pad: documents left out (long_docs; nothing left to train)
    num_dropped_tokens: int = 0  # their tokens, and concat's partial last row with drop_last

    @property
    def utilization(self) -> float:
        """Real tokens over row capacity (``num_rows * seq_len``)."""
        return self.num_row_tokens / (self.num_rows * self.seq_len) if self.num_rows else 0.0


class _Doc(NamedTuple):
    position: int
    sample_id: int
    input_ids: np.ndarray
    loss_mask: np.ndarray | None
    offset: int  # first token's index in its document


class Packer:
    """Packs a stream of ``(position, sample)`` pairs into :class:`PackedRow` s.

    Args:
        config: The packing settings.
        tokenizer: For text and SFT samples: a :class:`shardloader.TextTokenizer` or a Hugging
            Face fast tokenizer. Without one, samples must carry ``input_ids``.
        encoder: Replaces the default encoder (:class:`~shardloader.pack_encode.SampleEncoder`).
    """

    def __init__(
        self, config: PackConfig, *, tokenizer: Any = None, encoder: Encoder | None = None
    ) -> None:
        self.config = config
        if encoder is None:
            encoder = (
                SampleEncoder(
                    tokenizer,
                    add_bos=config.add_bos,
                    add_eos=config.add_eos,
                    text_field=config.text_field,
                )
                if tokenizer is not None
                else encode_token_samples
            )
        self.encoder = encoder
        self.stats = PackStats(seq_len=config.seq_len)
        self._next_warning = 1  # warn of long documents at 1, 10, 100, ... of them

    def pack(
        self, samples: Iterable[tuple[int, Mapping[str, Any]]], *, skip: int = 0
    ) -> Iterator[PackedRow]:
        """Yield rows; ``skip`` comes from a cursor when resuming (module docstring).

        Args:
            samples: ``(position, sample)`` pairs with rising positions. To resume from a
                cursor, the first pair must be the one at the cursor's position.
            skip: The cursor's second number (0 for a fresh start).

        Raises:
            ResumeError: ``skip`` does not fit the first sample or buffer (changed data or config).
            ConfigError: Positions do not increase.
        """
        if skip < 0:
            raise ResumeError(f"cursor skip must be >= 0, got {skip}")
        docs = self._read(samples)
        if self.config.mode == "concat":
            return self._logged(self._concat(self._doc_runs(docs), skip))
        return self._logged(self._buffered(docs, skip))

    def _logged(self, rows: Iterator[PackedRow]) -> Iterator[PackedRow]:
        yield from rows
        log.debug("end of stream; totals so far: %s", self.stats)

    def _read(self, samples: Iterable[tuple[int, Mapping[str, Any]]]) -> Iterator[_Doc]:
        group: list[tuple[int, Mapping[str, Any]]] = []
        previous = -1
        for raw_position, sample in samples:
            position = int(raw_position)  # cursors are plain ints, whatever the upstream yields
            if position <= previous:
                raise ConfigError(f"position {position} follows {previous}; positions must rise")
            previous = position
            group.append((position, sample))
            if len(group) == ENCODE_GROUP:
                yield from self._encode(group)
                group = []
        if group:
            yield from self._encode(group)

    def _encode(self, group: list[tuple[int, Mapping[str, Any]]]) -> Iterator[_Doc]:
        encoded = self.encoder([sample for _, sample in group])
        self.stats.num_samples += len(group)
        for (position, sample), (ids, mask) in zip(group, encoded, strict=True):
            yield _Doc(position, int(sample.get("sample_id", position)), ids, mask, 0)

    def _emit(self, rows: list[PackedRow]) -> list[PackedRow]:
        self.stats.num_rows += len(rows)
        self.stats.num_row_tokens += sum(len(r.input_ids) for r in rows)
        return rows

    def pack_runs(self, runs: Iterable[TokenRun], *, skip: int = 0) -> Iterator[PackedRow]:
        """`pack` for ``concat`` mode from runs of token documents, not one sample at a time.

        The rows (and cursors) are those `pack` makes of the same documents as samples at
        positions 0, 1, 2, ... (`shardloader.reader.ShardReader.iter_token_runs` reads them).

        Raises:
            ConfigError: The mode is not ``concat``.
            ResumeError: ``skip`` does not fit the first document.
        """
        if self.config.mode != "concat":
            raise ConfigError(f"pack_runs packs mode 'concat', not {self.config.mode!r}")
        if skip < 0:
            raise ResumeError(f"cursor skip must be >= 0, got {skip}")
        return self._logged(self._concat(self._runs(runs), skip))

    def _runs(self, runs: Iterable[TokenRun]) -> Iterator[_Run]:
        position = 0
        for run in runs:
            n = len(run.lengths)
            if not n:
                continue
            self.stats.num_samples += n
            positions = np.arange(position, position + n, dtype=np.int64)
            position += n
            offsets = np.zeros(n, np.int64)
            yield _Run(positions, run.sample_ids, offsets, run.lengths, run.tokens, None)

    def _doc_runs(self, docs: Iterator[_Doc]) -> Iterator[_Run]:
        """Documents as runs of about `CHUNK_TOKENS` tokens (at least 4 rows; `_chunks`)."""
        chunks = _chunks(self.config.seq_len)
        chunk = next(chunks)
        pending: list[_Doc] = []
        total = 0
        for doc in docs:
            pending.append(doc)
            total += len(doc.input_ids)
            if total >= chunk:
                yield _docs_run(pending)
                pending, total = [], 0
                chunk = next(chunks)
        if pending:
            yield _docs_run(pending)

    def _concat(self, runs: Iterator[_Run], skip: int) -> Iterator[PackedRow]:
        seq_len = self.config.seq_len
        chunks = _chunks(seq_len)
        chunk = next(chunks)
        pending: _Run | None = None
        last_position = -1
        for run in runs:
            before = 0 if pending is None else len(pending.tokens)
            pending = _join(pending, run)  # the documents' tokens copied once, here
            if skip:
                pending = _advance_run(pending, skip)
                skip = 0
            self.stats.num_input_tokens += len(pending.tokens) - before
            last_position = int(run.positions[-1])
            if len(pending.tokens) >= chunk:
                rows, pending = _cut_concat(pending, seq_len, last_position, final=False)
                yield from self._emit(rows)
                chunk = next(chunks)
        if pending is not None and len(pending.tokens):
            total = len(pending.tokens)
            if self.config.drop_last and total % seq_len:
                self.stats.num_dropped_tokens += total % seq_len
            rows, _ = _cut_concat(
                pending, seq_len, last_position, final=True, drop_last=self.config.drop_last
            )
            yield from self._emit(rows)

    def _buffered(self, docs: Iterator[_Doc], skip: int) -> Iterator[PackedRow]:
        config = self.config
        keyed = config.mode == "bfd" or config.group_by_length
        size = config.buffer_size if keyed else ENCODE_GROUP
        buffer: list[_Doc] = []
        for doc in docs:
            buffer.append(doc)
            if len(buffer) == size:
                yield from self._emit(self._place(buffer, skip, keyed))
                buffer, skip = [], 0
        if buffer:
            yield from self._emit(self._place(buffer, skip, keyed))

    def _place(self, buffer: list[_Doc], skip: int, keyed: bool) -> list[PackedRow]:
        config = self.config
        seq_len = config.seq_len
        lengths = np.fromiter((len(d.input_ids) for d in buffer), np.int64, len(buffer))
        self.stats.num_input_tokens += int(lengths.sum())
        # Tokens kept per document: seq_len if truncated, 0 if dropped; split into pieces below.
        kept = self._fit_long(buffer, lengths)
        num_pieces = -(-kept // seq_len)
        piece_doc = np.repeat(np.arange(len(buffer)), num_pieces)
        first_piece = np.cumsum(num_pieces) - num_pieces
        piece_index = np.arange(len(piece_doc)) - np.repeat(first_piece, num_pieces)
        piece_len = np.minimum(kept[piece_doc] - piece_index * seq_len, seq_len)
        if config.mode == "bfd":
            piece_row = best_fit_decreasing(piece_len, seq_len)
        else:
            piece_row = np.arange(len(piece_len))
            if config.group_by_length:  # the longest piece gets the first row
                piece_row[np.argsort(-piece_len, kind="stable")] = np.arange(len(piece_len))
        num_rows = int(piece_row.max()) + 1 if len(piece_row) else 0
        if skip > num_rows:
            raise ResumeError(
                f"position {buffer[0].position}: cursor skips {skip} rows but its buffer packs"
                f" into {num_rows}; resume with the data and PackConfig the cursor was made with"
            )
        order = np.lexsort((np.arange(len(piece_row)), piece_row))
        if keyed:
            cursors = [(buffer[0].position, r + 1) for r in range(num_rows - 1)]
            cursors.append((buffer[-1].position + 1, 0))
        else:  # one piece per row, in document order: the next piece, or the next document
            # (not the next row's document: with documents dropped that depends on the grouping)
            last_piece = piece_index == num_pieces[piece_doc] - 1
            cursors = [
                (buffer[d].position + 1, 0) if last else (buffer[d].position, i + 1)
                for d, i, last in zip(
                    piece_doc[order].tolist(),
                    piece_index[order].tolist(),
                    last_piece[order].tolist(),
                    strict=True,
                )
            ]
        starts = piece_index * seq_len
        return _assemble(buffer, piece_doc, starts, piece_len, piece_row, order, cursors, skip)

    def _fit_long(self, buffer: list[_Doc], lengths: np.ndarray) -> np.ndarray:
        """Apply ``long_docs`` (module docstring); return the tokens kept of each document."""
        config, stats = self.config, self.stats
        seq_len = config.seq_len
        long = np.flatnonzero(lengths > seq_len)
        if not len(long) or config.long_docs == "split":
            return lengths
        kept = lengths.copy()
        first = 1 if config.mask_boundary_labels else 0  # a segment's first label is masked
        for i in long.tolist():
            mask = buffer[i].loss_mask
            if config.long_docs == "auto" and mask is None:
                continue  # plain text: split
            length = int(lengths[i])
            if config.long_docs == "drop" or (mask is not None and not mask[first:seq_len].any()):
                kept[i] = 0
                stats.num_dropped_docs += 1
                stats.num_dropped_tokens += length
            else:
                kept[i] = seq_len
                stats.num_truncated_docs += 1
                stats.num_truncated_tokens += length - seq_len
        count = stats.num_truncated_docs + stats.num_dropped_docs
        if count >= self._next_warning:
            while self._next_warning <= count:
                self._next_warning *= 10
            log.warning(
                "%d documents longer than seq_len=%d so far (long_docs=%r): %d truncated"
                " (%d tokens cut off), %d dropped (%d tokens; a truncated conversation with no"
                " token left to train is dropped too); Packer.stats counts them",
                count,
                seq_len,
                config.long_docs,
                stats.num_truncated_docs,
                stats.num_truncated_tokens,
                stats.num_dropped_docs,
                stats.num_dropped_tokens,
            )
        return kept


def _chunks(seq_len: int) -> Iterator[int]:
    """Tokens to gather before cutting rows, cut after cut.

    One row's worth first (the first batch waits for few documents), then twice as many each
    time, up to `CHUNK_TOKENS` (at least 4 rows). Rows do not depend on where the cuts fall:
    a cut keeps what is left of the tokens.
    """
    chunk, limit = seq_len, max(CHUNK_TOKENS, 4 * seq_len)
    while True:
        yield chunk
        chunk = min(2 * chunk, limit)


def _flat_masks(pieces: Sequence[tuple[np.ndarray | None, int]]) -> np.ndarray | None:
    if all(mask is None for mask, _ in pieces):
        return None
    return np.concatenate([m if m is not None else np.ones(n, bool) for m, n in pieces])


class _Run(NamedTuple):
    """Consecutive documents (or their rests) as flat arrays, for ``concat``."""

    positions: np.ndarray  # each document's upstream position (int64)
    sample_ids: np.ndarray  # (int64)
    offsets: np.ndarray  # each document's first token's index in its document (int64)
    lengths: np.ndarray  # tokens of each document in ``tokens`` (int64)
    tokens: Any  # the documents one after the other (np.ndarray; a list of them before _join)
    mask: np.ndarray | None  # aligned with ``tokens``; None: every token has a loss


def _docs_run(docs: Sequence[_Doc]) -> _Run:
    n = len(docs)
    return _Run(
        np.fromiter((d.position for d in docs), np.int64, n),
        np.fromiter((d.sample_id for d in docs), np.int64, n),
        np.fromiter((d.offset for d in docs), np.int64, n),
        np.fromiter((len(d.input_ids) for d in docs), np.int64, n),
        np.concatenate([d.input_ids for d in docs]) if n > 1 else docs[0].input_ids,
        _flat_masks([(d.loss_mask, len(d.input_ids)) for d in docs]),
    )


def _advance_run(run: _Run, num_tokens: int) -> _Run:
    """Drop the first ``num_tokens`` tokens of the run's first document (a resume's skip)."""
    first = int(run.lengths[0])
    if num_tokens > first:
        raise ResumeError(
            f"position {int(run.positions[0])}: cursor skips {num_tokens} tokens but the "
            f"document has {first}; resume with the data and tokenizer the cursor was made with"
        )
    return _cut_front(run, 0, num_tokens)


def _cut_front(run: _Run, k: int, num_tokens: int) -> _Run:
    """The run from document ``k`` on, less ``num_tokens`` tokens of document ``k``."""
    offsets, lengths = run.offsets[k:].copy(), run.lengths[k:].copy()
    offsets[0] += num_tokens
    lengths[0] -= num_tokens
    start = int(run.lengths[:k].sum()) + num_tokens
    mask = run.mask[start:] if run.mask is not None else None
    return _Run(run.positions[k:], run.sample_ids[k:], offsets, lengths, run.tokens[start:], mask)


def _join(a: _Run | None, b: _Run) -> _Run:
    """``b`` after ``a``: their tokens made one array (``b``'s may come as pieces)."""
    pieces = b.tokens if isinstance(b.tokens, list) else [b.tokens]
    if a is None or not len(a.lengths):
        return b._replace(tokens=pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
    mask = None
    if a.mask is not None or b.mask is not None:
        mask = _flat_masks([(a.mask, len(a.tokens)), (b.mask, int(b.lengths.sum()))])
    return _Run(
        np.concatenate([a.positions, b.positions]),
        np.concatenate([a.sample_ids, b.sample_ids]),
        np.concatenate([a.offsets, b.offsets]),
        np.concatenate([a.lengths, b.lengths]),
        np.concatenate([a.tokens, *pieces]),
        mask,
    )


def _cut_concat(
    run: _Run, seq_len: int, last_position: int, *, final: bool, drop_last: bool = False
) -> tuple[list[PackedRow], _Run | None]:
    """Cut a run into full rows (and, if ``final``, a last partial one); return the rest."""
    lengths = run.lengths
    ends = np.cumsum(lengths)
    starts = ends - lengths
    total = int(ends[-1])
    num_rows = total // seq_len
    if final and total % seq_len and not drop_last:
        num_rows += 1
    if not final and total and total % seq_len == 0:
        # A row ending at the last token waits for the next run: its cursor is the sample of
        # the next token, which may come after documents without tokens.
        num_rows -= 1
    cut = min(num_rows * seq_len, total)
    rest = None
    if not final and cut < total:
        k = int(np.searchsorted(ends, cut, side="right"))
        rest = _cut_front(run, k, cut - int(starts[k]))
    if num_rows == 0:
        return [], rest
    flat, flat_mask = run.tokens, run.mask
    row_starts = np.arange(num_rows, dtype=np.int64) * seq_len
    doc_starts = starts[(lengths > 0) & (starts < cut)]
    seg_starts = np.union1d(doc_starts, row_starts)
    seg_lens = np.diff(np.append(seg_starts, cut))
    seg_samples = run.sample_ids[np.searchsorted(ends, seg_starts, side="right")]
    row_segs = np.searchsorted(seg_starts, np.append(row_starts, cut)).tolist()
    row_ends = np.minimum(row_starts + seq_len, total)
    next_doc = np.searchsorted(ends, row_ends, side="right")
    inside = next_doc < len(lengths)
    at = np.minimum(next_doc, len(lengths) - 1)
    cursor_pos = np.where(inside, run.positions[at], last_position + 1).tolist()
    cursor_skip = np.where(inside, run.offsets[at] + row_ends - starts[at], 0).tolist()
    rows = []
    for r, (lo, hi) in enumerate(zip(row_starts.tolist(), row_ends.tolist(), strict=True)):
        a, b = row_segs[r], row_segs[r + 1]
        mask = flat_mask[lo:hi] if flat_mask is not None else None
        cursor = (cursor_pos[r], cursor_skip[r])
        rows.append(PackedRow(flat[lo:hi], seg_lens[a:b], seg_samples[a:b], mask, cursor))
    return rows, rest


def _assemble(
    buffer: list[_Doc],
    piece_doc: np.ndarray,
    piece_start: np.ndarray,
    piece_len: np.ndarray,
    piece_row: np.ndarray,
    order: np.ndarray,
    cursors: list[tuple[int, int]],
    skip: int,
) -> list[PackedRow]:
    """Gather the pieces row by row (``order``) into one array and slice it into rows."""
    if not len(order):
        return []
    spans = [
        (buffer[d], s, s + n)
        for d, s, n in zip(
            piece_doc[order].tolist(),
            piece_start[order].tolist(),
            piece_len[order].tolist(),
            strict=True,
        )
    ]
    flat = np.concatenate([doc.input_ids[s:e] for doc, s, e in spans])
    flat_mask = _flat_masks(
        [(doc.loss_mask[s:e] if doc.loss_mask is not None else None, e - s) for doc, s, e in spans]
    )
    seg_lens = piece_len[order]
    seg_samples = np.fromiter((doc.sample_id for doc, _, _ in spans), np.int64, len(spans))
    sorted_rows = piece_row[order]
    row_segs = np.searchsorted(sorted_rows, np.arange(len(cursors) + 1)).tolist()
    token_ends = np.append(0, np.cumsum(seg_lens))[row_segs].tolist()
    rows = []
    for r in range(skip, len(cursors)):
        lo, hi = token_ends[r], token_ends[r + 1]
        a, b = row_segs[r], row_segs[r + 1]
        mask = flat_mask[lo:hi] if flat_mask is not None else None
        rows.append(PackedRow(flat[lo:hi], seg_lens[a:b], seg_samples[a:b], mask, cursors[r]))
    return rows


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Assign items to bins by best-fit decreasing; return each item's bin, in creation order.

    Items are taken longest first (ties in input order); each goes into the bin with the least
    free space that still fits it (ties: the oldest bin), or opens a new bin. Deterministic.

    Args:
        lengths: Item sizes, each in ``[1, capacity]``.
        capacity: Bin size.

    Raises:
        ConfigError: An item is empty or larger than ``capacity``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ConfigError(
            f"item sizes must be in [1, {capacity}], got {lengths.min()} to {lengths.max()}"
        )
    bins = np.empty(n, dtype=np.int64)
    free: list[int] = []  # free * n + bin, sorted: bisect finds the tightest fit
    num_bins = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[i])
        j = bisect.bisect_left(free, length * n)
        if j < len(free):
            room, b = divmod(free.pop(j), n)
        else:
            room, b = capacity, num_bins
            num_bins += 1
        bins[i] = b
        if room > length:
            bisect.insort(free, (room - length) * n + b)
    return bins


def count_rows(
    lengths: np.ndarray, config: PackConfig, *, conversations: bool = False
) -> tuple[int, int]:
    """Rows and row tokens a `Packer` with ``config`` makes of documents of ``lengths`` tokens.

    From the lengths alone (no token ids), one stream in the given order: ``concat`` joins them
    and cuts rows of ``seq_len`` (the last partly filled unless ``drop_last``); ``bfd`` places each
    buffer of ``buffer_size`` documents with `best_fit_decreasing`, the same placement as
    `Packer`. Documents over ``seq_len`` follow ``long_docs`` (``auto``: split, or truncated when
    ``conversations``); a truncated conversation that `Packer` drops because no kept token has a
    loss cannot be told from lengths, so for conversations the count is an upper bound. ``pad``:
    one row per piece.

    Returns:
        ``(num_rows, num_row_tokens)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    seq_len = config.seq_len
    if config.mode == "concat":
        total = int(lengths.sum())
        rows = total // seq_len if config.drop_last else -(-total // seq_len)
        return rows, min(total, rows * seq_len)
    policy = config.long_docs
    if policy == "auto":
        policy = "truncate" if conversations else "split"
    kept = lengths
    if policy == "truncate":
        kept = np.minimum(lengths, seq_len)
    elif policy == "drop":
        kept = np.where(lengths > seq_len, 0, lengths)
    if config.mode == "pad":
        return int((-(-kept // seq_len)).sum()), int(kept.sum())
    num_rows = 0
    for start in range(0, len(kept), config.buffer_size):
        buffer = kept[start : start + config.buffer_size]
        num_pieces = -(-buffer // seq_len)
        piece_doc = np.repeat(np.arange(len(buffer)), num_pieces)
        first_piece = np.cumsum(num_pieces) - num_pieces
        piece_index = np.arange(len(piece_doc)) - np.repeat(first_piece, num_pieces)
        piece_len = np.minimum(buffer[piece_doc] - piece_index * seq_len, seq_len)
        if len(piece_len):
            num_rows += int(best_fit_decreasing(piece_len, seq_len).max()) + 1
    return num_rows, int(kept.sum())
