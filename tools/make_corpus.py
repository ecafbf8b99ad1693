"""Deterministic synthetic English-ish corpus for tests and benchmarks, with no network.

Usage::

    python tools/make_corpus.py OUTPUT_DIR [--mb 300] [--num-files 32]
        [--format jsonl|jsonl.gz|jsonl.zst|parquet|txt] [--seed 0] [--no-ids]

What the text looks like:

- Words are drawn from ``tools/data/words.txt`` (3,527 real English words in frequency order)
  with a Zipf-Mandelbrot law, plus ~1% numbers. Sentences (median 13 words) start with a capital
  letter, carry commas, semicolons and colons, and end in ``.``, ``?`` or ``!``; paragraphs are
  separated by a blank line (``"\\n\\n"``).
- Document lengths are long-tailed: 2% are very short (1-20 words); the rest are log-normal with a
  median of 300 words and sigma 1.0 (about 1% of documents are over 10x the median), capped at 50x.
- 5% of documents contain non-ASCII words (accented Latin, CJK, emoji); 1% contain tabs.

Determinism: the only input is ``words.txt``. Random numbers come from raw PCG64 output seeded
with ``SeedSequence([seed, file_index])`` (both stable across NumPy versions), turned into
distributions here rather than by ``numpy.random.Generator`` methods, whose streams NumPy does not
promise to keep. Files are generated one after another, so ids are global and output is
byte-identical for the same arguments. ``--mb`` is the target total of UTF-8 text bytes (10^6
bytes per MB), met within a few percent.

Algorithm and cost: per chunk of documents, every token is a pair (word piece, separator piece) that
indexes one table of UTF-8 byte strings; the chunk's bytes are gathered with one ``np.repeat`` plus
a fancy index, then sliced per document. 300 MB of JSONL takes about 10 s on one core.

How ``words.txt`` was built (once, kept in the repo so every machine reads the same list): words of
the prose in ``pydoc_data.topics`` and of the docstrings of the Python 3.11 standard library
(lines with code punctuation dropped), lowercased, alphabetic, seen at least twice, kept only if the
lowercase word is in Debian's ``wamerican`` dictionary, sorted by count (descending), then
alphabetically.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

WORDS_PATH = Path(__file__).resolve().parent / "data" / "words.txt"
FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt")
BYTES_PER_MB = 1_000_000

# Document lengths, in words.
MEDIAN_DOC_WORDS = 300
DOC_WORDS_SIGMA = 1.0
MAX_DOC_WORDS = 50 * MEDIAN_DOC_WORDS
SHORT_DOC_FRACTION = 0.02
MAX_SHORT_DOC_WORDS = 20
# Sentences and paragraphs.
MEDIAN_SENTENCE_WORDS = 13
SENTENCE_WORDS_SIGMA = 0.5
PARAGRAPH_END_PROBABILITY = 0.25  # per sentence end: about four sentences per paragraph
# Zipf-Mandelbrot word law: weight of rank r is 1 / (r + ZIPF_SHIFT) ** ZIPF_EXPONENT.
ZIPF_EXPONENT = 1.05
ZIPF_SHIFT = 2.7
NUMBER_FRACTION = 0.01
MAX_NUMBER = 2100
CAPITALIZED_FRACTION = 0.01  # mid-sentence capitalized words, like names
# Rare features.
NON_ASCII_DOC_FRACTION = 0.05
NON_ASCII_TOKEN_FRACTION = 0.04  # within a non-ASCII document
TAB_DOC_FRACTION = 0.01
TAB_SEPARATOR_FRACTION = 0.08  # within a tab document, of the plain spaces
# A chunk is generated in one vectorized pass; this bounds its memory (~100 bytes per word).
CHUNK_WORDS = 1_000_000
PARQUET_ROW_GROUPS_PER_FILE = 4
ZSTD_LEVEL = 3

NON_ASCII_WORDS = (
    "café", "naïve", "résumé", "façade", "über", "señor", "crème", "déjà", "piñata", "jalapeño",
    "Zürich", "São", "Ångström", "smørrebrød", "Kraków", "garçon", "coöperate", "élan", "fiancée",
    "Dvořák", "数据", "模型", "東京", "日本語", "学习", "한국어", "北京", "こんにちは",
    "🙂", "🚀", "📚", "✨", "🔥", "👍", "🎉", "—", "«bonjour»", "½", "€20", "±3",
)  # fmt: skip

# Separator pieces. A token's separator follows its word; the last token of a document gets a
# bare mark so the text ends without trailing whitespace.
SEPARATORS = (
    " ", ", ", "; ", ": ", ". ", "? ", "! ", ".\n\n", "?\n\n", "!\n\n", ".", "?", "!", "\t",
)  # fmt: skip
SEP_SPACE, SEP_COMMA, SEP_SEMICOLON, SEP_COLON = 0, 1, 2, 3
SEP_SENTENCE, SEP_PARAGRAPH, SEP_DOC_END, SEP_TAB = 4, 7, 10, 13  # + mark (0 '.', 1 '?', 2 '!')


@dataclass(frozen=True, kw_only=True)
class Document:
    """One generated document.

    Args:
        doc_index: Position in the whole corpus, from 0.
        text: The document text.
        num_words: Number of word tokens in the text (numbers and non-ASCII words included).
    """

    doc_index: int
    text: str
    num_words: int

    @property
    def doc_id(self) -> str:
        """Stable id, ``doc-`` plus the zero-padded index."""
        return f"doc-{self.doc_index:09d}"


class _Uniforms:
    """Uniform floats in [0, 1) from raw PCG64 output, identical on every NumPy version."""

    def __init__(self, seed: int, file_index: int) -> None:
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, file_index]))

    def uniform(self, n: int) -> np.ndarray:
        raw = self._bits.random_raw(n)
        return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def normal(self, n: int) -> np.ndarray:
        # Box-Muller; 1 - u is in (0, 1], so the log is finite.
        u1, u2 = self.uniform(n), self.uniform(n)
        return np.sqrt(-2.0 * np.log(1.0 - u1)) * np.cos(2.0 * math.pi * u2)

    def below(self, n: int, probability: float) -> np.ndarray:
        """``n`` booleans, each true with ``probability``."""
        return self.uniform(n) < probability

    def integers(self, n: int, high: int) -> np.ndarray:
        """``n`` integers uniform in [0, high)."""
        return np.floor(self.uniform(n) * high).astype(np.int64)


class _PieceTable:
    """All byte strings a token can emit, concatenated, with start offsets and lengths."""

    def __init__(self, words: Sequence[str]) -> None:
        lower = ["I" if w == "i" else w for w in words]
        capital = [w[:1].upper() + w[1:] for w in words]
        numbers = [str(n) for n in range(MAX_NUMBER)]
        pieces = lower + capital + list(NON_ASCII_WORDS) + numbers + list(SEPARATORS)
        self.num_words = len(words)
        self.capital_offset = len(words)
        self.non_ascii_offset = 2 * len(words)
        self.number_offset = self.non_ascii_offset + len(NON_ASCII_WORDS)
        self.separator_offset = self.number_offset + len(numbers)
        encoded = [p.encode("utf-8") for p in pieces]
        self.lengths = np.array([len(b) for b in encoded], dtype=np.int64)
        self.starts = np.zeros(len(encoded), dtype=np.int64)
        np.cumsum(self.lengths[:-1], out=self.starts[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        ranks = np.arange(len(words), dtype=np.float64)
        weights = 1.0 / (ranks + ZIPF_SHIFT) ** ZIPF_EXPONENT
        # math.fsum, not BLAS or SIMD sums, so the result cannot depend on the machine.
        total = math.fsum(weights.tolist())
        self.word_cdf = np.cumsum(weights) / total
        self.word_cdf[-1] = 1.0
        pairs = zip(weights.tolist(), self.lengths[: len(words)].tolist(), strict=True)
        self.mean_word_bytes = math.fsum(weight * size for weight, size in pairs) / total

    def gather(self, pieces: np.ndarray) -> bytes:
        """Concatenate the byte strings of ``pieces`` (an index array) into one bytes object."""
        lengths = self.lengths[pieces]
        out_starts = np.cumsum(lengths) - lengths
        source = np.repeat(self.starts[pieces] - out_starts, lengths)
        source += np.arange(source.size, dtype=np.int64)
        return self.data[source].tobytes()


def load_words(path: Path = WORDS_PATH) -> list[str]:
    """Read the vocabulary, one word per line in frequency order."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line]


def draw_doc_words(uniforms: _Uniforms, target_bytes: int, bytes_per_word: float) -> np.ndarray:
    """Draw document lengths (in words) until their expected text size reaches ``target_bytes``."""
    batches: list[np.ndarray] = []
    expected = 0.0
    while expected < target_bytes or not batches:
        n = 256
        lognormal = MEDIAN_DOC_WORDS * np.exp(DOC_WORDS_SIGMA * uniforms.normal(n))
        short = 1 + np.floor(uniforms.uniform(n) * MAX_SHORT_DOC_WORDS)
        is_short = uniforms.uniform(n) < SHORT_DOC_FRACTION
        words = np.where(is_short, short, np.clip(np.rint(lognormal), 1, MAX_DOC_WORDS))
        batches.append(words.astype(np.int64))
        expected += float(words.sum()) * bytes_per_word
    lengths = np.concatenate(batches)
    # Keep documents up to and including the one that crosses the target.
    cutoff = int(np.searchsorted(np.cumsum(lengths) * bytes_per_word, target_bytes)) + 1
    return lengths[: min(cutoff, lengths.size)]


def _token_pieces(
    table: _PieceTable, uniforms: _Uniforms, doc_words: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Word and separator piece ids of every token of a run of documents."""
    num_docs, num_tokens = doc_words.size, int(doc_words.sum())
    doc_of_token = np.repeat(np.arange(num_docs), doc_words)
    doc_ends = np.cumsum(doc_words) - 1
    is_doc_end = np.zeros(num_tokens, dtype=bool)
    is_doc_end[doc_ends] = True

    # Sentence ends: a running stream of sentence lengths, restarted by document ends.
    num_sentences = num_tokens // 4 + 16
    log_words = SENTENCE_WORDS_SIGMA * uniforms.normal(num_sentences)
    sentence_words = np.clip(np.rint(MEDIAN_SENTENCE_WORDS * np.exp(log_words)), 1, 80)
    sentence_ends = np.cumsum(sentence_words.astype(np.int64)) - 1
    is_sentence_end = is_doc_end.copy()
    is_sentence_end[sentence_ends[sentence_ends < num_tokens]] = True
    is_paragraph_end = (
        is_sentence_end & ~is_doc_end & uniforms.below(num_tokens, PARAGRAPH_END_PROBABILITY)
    )
    is_sentence_start = np.ones(num_tokens, dtype=bool)
    is_sentence_start[1:] = is_sentence_end[:-1]

    # Words: Zipf ranks, some numbers, capitals at sentence starts and for a few names.
    words = np.searchsorted(table.word_cdf, uniforms.uniform(num_tokens), side="right")
    words = np.minimum(words, table.num_words - 1)
    capitalize = is_sentence_start | uniforms.below(num_tokens, CAPITALIZED_FRACTION)
    pieces = np.where(capitalize, words + table.capital_offset, words)
    numbers = table.number_offset + uniforms.integers(num_tokens, MAX_NUMBER)
    pieces = np.where(uniforms.below(num_tokens, NUMBER_FRACTION), numbers, pieces)
    non_ascii_doc = uniforms.below(num_docs, NON_ASCII_DOC_FRACTION)
    special = table.non_ascii_offset + uniforms.integers(num_tokens, len(NON_ASCII_WORDS))
    use_special = non_ascii_doc[doc_of_token] & uniforms.below(num_tokens, NON_ASCII_TOKEN_FRACTION)
    pieces = np.where(use_special, special, pieces)

    # Separators: punctuation inside sentences, marks at sentence, paragraph and document ends.
    mark = np.searchsorted(np.array([0.9, 0.96]), uniforms.uniform(num_tokens), side="right")
    inner_cdf = np.array([0.07, 0.075, 0.078])  # comma 7%, semicolon 0.5%, colon 0.3%, else space
    inner = np.searchsorted(inner_cdf, uniforms.uniform(num_tokens), side="right")
    inner = np.array([SEP_COMMA, SEP_SEMICOLON, SEP_COLON, SEP_SPACE])[inner]
    tab_doc = uniforms.below(num_docs, TAB_DOC_FRACTION)
    use_tab = tab_doc[doc_of_token] & (inner == SEP_SPACE)
    use_tab &= uniforms.below(num_tokens, TAB_SEPARATOR_FRACTION)
    separators = np.where(use_tab, SEP_TAB, inner)
    separators = np.where(is_sentence_end, SEP_SENTENCE + mark, separators)
    separators = np.where(is_paragraph_end, SEP_PARAGRAPH + mark, separators)
    separators = np.where(is_doc_end, SEP_DOC_END + mark, separators)
    return pieces, separators + table.separator_offset


def _chunks(doc_words: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split documents into runs of about ``CHUNK_WORDS`` words: (first, end) document indexes."""
    first, total = 0, 0
    for index, words in enumerate(doc_words.tolist()):
        total += words
        if total >= CHUNK_WORDS:
            yield first, index + 1
            first, total = index + 1, 0
    if first < doc_words.size:
        yield first, int(doc_words.size)


def generate_file_documents(
    *, file_index: int, target_bytes: int, seed: int, first_doc_index: int, table: _PieceTable
) -> Iterator[list[Document]]:
    """Generate the documents of one output file, in chunks.

    Args:
        file_index: Which file of the corpus; with ``seed`` it picks the random stream.
        target_bytes: Approximate UTF-8 text bytes of this file.
        seed: Corpus seed.
        first_doc_index: Corpus-wide index of this file's first document.
        table: Piece table built from the vocabulary.

    Yields:
        Lists of documents, in order.
    """
    uniforms = _Uniforms(seed, file_index)
    mean_separator_bytes = 1.1
    doc_words = draw_doc_words(uniforms, target_bytes, table.mean_word_bytes + mean_separator_bytes)
    for first, end in _chunks(doc_words):
        words = doc_words[first:end]
        pieces, separators = _token_pieces(table, uniforms, words)
        interleaved = np.empty(2 * pieces.size, dtype=np.int64)
        interleaved[0::2], interleaved[1::2] = pieces, separators
        data = table.gather(interleaved)
        token_bytes = table.lengths[pieces] + table.lengths[separators]
        doc_ends = np.cumsum(token_bytes)[np.cumsum(words) - 1].tolist()
        doc_starts = [0, *doc_ends[:-1]]
        first_index = first_doc_index + first
        yield [
            Document(doc_index=first_index + i, text=data[s:e].decode("utf-8"), num_words=n)
            for i, (s, e, n) in enumerate(zip(doc_starts, doc_ends, words.tolist(), strict=True))
        ]


def generate_documents(
    *, total_mb: float, num_files: int, seed: int = 0
) -> Iterator[list[Document]]:
    """Generate the corpus as one list of documents per output file.

    Args:
        total_mb: Approximate total UTF-8 text size in MB (10^6 bytes).
        num_files: Number of files the corpus is split into.
        seed: Corpus seed.

    Yields:
        For each file in order, its documents.
    """
    table = _PieceTable(load_words())
    target_bytes = max(1, round(total_mb * BYTES_PER_MB / num_files))
    next_doc_index = 0
    for file_index in range(num_files):
        docs = [
            doc
            for chunk in generate_file_documents(
                file_index=file_index,
                target_bytes=target_bytes,
                seed=seed,
                first_doc_index=next_doc_index,
                table=table,
            )
            for doc in chunk
        ]
        next_doc_index += len(docs)
        yield docs


def _json_line(doc: Document, with_ids: bool) -> str:
    record: dict[str, object] = {"id": doc.doc_id} if with_ids else {}
    record.update(text=doc.text, source="synthetic", num_words=doc.num_words)
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: Path, docs: Sequence[Document], *, file_format: str, with_ids: bool) -> int:
    """Write documents as JSON lines, compressed per ``file_format``; returns the bytes written."""
    with path.open("wb") as raw:
        out: BinaryIO | gzip.GzipFile
        if file_format == "jsonl.gz":
            # mtime=0 and no file name in the header keep the bytes identical from run to run.
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
        elif file_format == "jsonl.zst":
            import zstandard

            out = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False)
        else:
            out = raw
        for start in range(0, len(docs), 1000):
            lines = "".join(_json_line(doc, with_ids) for doc in docs[start : start + 1000])
            out.write(lines.encode("utf-8"))
        if out is not raw:
            out.close()  # flushes the compressor; the raw file closes with the ``with``
    return path.stat().st_size


def write_parquet(path: Path, docs: Sequence[Document], *, with_ids: bool) -> int:
    """Write documents as Parquet (zstd) with several row groups; returns the bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list[object]] = {}
    if with_ids:
        columns["id"] = [d.doc_id for d in docs]
    columns["text"] = [d.text for d in docs]
    columns["source"] = ["synthetic"] * len(docs)
    columns["num_words"] = [d.num_words for d in docs]
    table = pa.table(columns)
    rows_per_group = max(1, math.ceil(len(docs) / PARQUET_ROW_GROUPS_PER_FILE))
    pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd")
    return path.stat().st_size


def write_text_files(folder: Path, docs: Sequence[Document]) -> int:
    """Write one ``doc-NNNNNNN.txt`` per document into ``folder``; returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for doc in docs:
        data = doc.text.encode("utf-8")
        (folder / f"doc-{doc.doc_index:07d}.txt").write_bytes(data)
        total += len(data)
    return total


def write_corpus(
    output_dir: Path,
    *,
    total_mb: float,
    num_files: int,
    file_format: str,
    seed: int,
    with_ids: bool,
) -> tuple[int, int, int]:
    """Generate and write the corpus.

    Args:
        output_dir: Folder to write into (created if missing).
        total_mb: Approximate total text size in MB.
        num_files: Number of output files (of text folders for ``txt``).
        file_format: One of ``FORMATS``.
        seed: Corpus seed.
        with_ids: Whether records carry an ``id`` field.

    Returns:
        (number of files or folders, number of documents, total UTF-8 text bytes).
    """
    if file_format not in FORMATS:
        raise ValueError(f"format {file_format!r} is not one of {', '.join(FORMATS)}")
    if num_files < 1 or total_mb <= 0:
        raise ValueError(f"need --num-files >= 1 and --mb > 0, got {num_files} and {total_mb}")
    output_dir.mkdir(parents=True, exist_ok=True)
    num_docs = text_bytes = 0
    corpus = generate_documents(total_mb=total_mb, num_files=num_files, seed=seed)
    for file_index, docs in enumerate(corpus):
        if file_format == "txt":
            write_text_files(output_dir / "docs" / f"{file_index:03d}", docs)
        elif file_format == "parquet":
            write_parquet(output_dir / f"part-{file_index:05d}.parquet", docs, with_ids=with_ids)
        else:
            path = output_dir / f"part-{file_index:05d}.{file_format}"
            write_jsonl(path, docs, file_format=file_format, with_ids=with_ids)
        num_docs += len(docs)
        text_bytes += sum(len(d.text.encode("utf-8")) for d in docs)
    return num_files, num_docs, text_bytes


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("output_dir", type=Path, help="folder to write the corpus into")
    parser.add_argument(
        "--mb", type=float, default=300.0, help="approximate total text size in MB (10^6 bytes)"
    )
    parser.add_argument("--num-files", type=int, default=32, help="number of output files")
    parser.add_argument("--format", dest="file_format", choices=FORMATS, default="jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-ids", dest="with_ids", action="store_false", help='omit the "id" field'
    )
    args = parser.parse_args(argv)
    try:
        num_files, num_docs, text_bytes = write_corpus(
            args.output_dir,
            total_mb=args.mb,
            num_files=args.num_files,
            file_format=args.file_format,
            seed=args.seed,
            with_ids=args.with_ids,
        )
    except ValueError as err:
        parser.error(str(err))
    print(
        f"wrote {num_files} {args.file_format} files, {num_docs} docs, "
        f"{text_bytes / BYTES_PER_MB:.1f} MB of text to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
