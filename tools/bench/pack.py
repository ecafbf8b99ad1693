"""Measure packing: throughput (tokens/s, one process) and utilization per mode, beside peers.

Usage::

    python -m tools.bench.pack [--mb 20] [--seq-len 2048] [--batch-size 8] [--repeat 3]

Two document sets:

- ``corpus``: the bundled synthetic corpus (``tools/make_corpus.py``, ``--mb`` of text) tokenized
  with a byte-level BPE of 8,192 ids trained on its first documents (EOS appended, uint16 ids).
- ``long-tail``: random ids with log-normal lengths (median 400 tokens, sigma 1.6, capped at
  64 Ki tokens), so that many documents are longer than a row.

Per mode it times ``Packer.pack`` over ``(position, sample)`` pairs alone (``rows``) and with
``collate_rows`` into torch batches of ``--batch-size`` rows (``batches``), best of ``--repeat``.
Utilization is real tokens over the tokens of the batches (``pad_to_longest`` counts the width
each batch really has). Peers, on the same documents:

- ``DataCollatorWithFlattening`` (transformers): one ``[1, total]`` row per batch of documents,
  fed documents until a batch holds ``batch_size * seq_len`` tokens; no padding by design, but
  the shape changes every batch.
- TRL's best-fit decreasing (``trl.data_utils._pack_bfd``, strategy ``bfd_split``) when ``trl``
  imports (it needs ``datasets``: run this script with ``.venv-bench/bin/python`` after
  ``pip install --no-deps trl==1.16.0``); otherwise a reimplementation of its algorithm (segment
  tree over free space, split overflow) on plain lists, marked "reimpl.".
- LitData ``TokensLoader``: reimplemented (a reshape): all tokens of a chunk joined and cut into
  ``seq_len`` blocks, the chunk's tail dropped, with no document boundaries; reported are the
  tokens kept and the share of rows in which a document attends to another.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import shardloader
from shardloader.pack import PackConfig, Packer, collate_rows
from tools.make_corpus import generate_documents

LITDATA_CHUNK_BYTES = 64 << 20


def corpus_docs(mb: float) -> tuple[list[np.ndarray], list[str], shardloader.TextTokenizer]:
    texts = [doc.text for docs in generate_documents(total_mb=mb, num_files=4) for doc in docs]
    with tempfile.TemporaryDirectory() as tmp:
        shardloader.train_bpe_tokenizer(texts[:2000], tmp, vocab_size=8192)
        tok = shardloader.TextTokenizer(tmp)
    return [ids.astype(np.uint16) for ids in tok.encode_batch(texts)], texts, tok


def bench_text(texts: list[str], tok: shardloader.TextTokenizer, seq_len: int) -> float:
    """concat from text samples: the packer tokenizes (batched), so the tokenizer sets the pace."""
    samples = [(i, {"id": str(i), "sample_id": i, "text": t}) for i, t in enumerate(texts)]
    packer = Packer(PackConfig(seq_len=seq_len), tokenizer=tok)
    seconds, _ = best_time(lambda: sum(1 for _ in packer.pack(iter(samples))), 1)
    return packer.stats.num_input_tokens / seconds


def long_tail_docs(num_tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(400), 1.6, num_tokens // 400) + 1, 1 << 16)
    lengths = lengths.astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), num_tokens) + 1]
    flat = rng.integers(0, 32000, int(lengths.sum()), dtype=np.uint16)
    return np.split(flat, np.cumsum(lengths)[:-1])


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def bench_mode(
    docs: list[np.ndarray], config: PackConfig, batch_size: int, repeat: int
) -> dict[str, float]:
    samples = [(i, {"id": str(i), "sample_id": i, "input_ids": d}) for i, d in enumerate(docs)]
    num_tokens = sum(len(d) for d in docs)

    def rows_only() -> int:
        return sum(1 for _ in Packer(config).pack(iter(samples)))

    def batches() -> tuple[int, int]:
        capacity = real = 0
        pending = []
        for row in Packer(config).pack(iter(samples)):
            pending.append(row)
            if len(pending) == batch_size:
                batch = collate_rows(pending, config)
                capacity += batch["input_ids"].numel()
                real += sum(len(r.input_ids) for r in pending)
                pending = []
        if pending:
            batch = collate_rows(pending, config)
            capacity += batch["input_ids"].numel()
            real += sum(len(r.input_ids) for r in pending)
        return capacity, real

    rows_s, _ = best_time(rows_only, repeat)
    batch_s, (capacity, real) = best_time(batches, repeat)
    return {
        "rows_tps": num_tokens / rows_s,
        "batch_tps": num_tokens / batch_s,
        "utilization": real / capacity,
        "kept": real / num_tokens,
    }


def bench_flattening(docs: list[np.ndarray], budget: int, repeat: int) -> dict[str, float]:
    from transformers import DataCollatorWithFlattening

    collator = DataCollatorWithFlattening()
    groups, current, size = [], [], 0
    for d in docs:
        current.append({"input_ids": d})
        size += len(d)
        if size >= budget:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    num_tokens = sum(len(d) for d in docs)
    seconds, _ = best_time(lambda: [collator(g) for g in groups], repeat)
    widths = [sum(len(f["input_ids"]) for f in g) for g in groups]
    return {
        "batch_tps": num_tokens / seconds,
        "utilization": 1.0,
        "kept": 1.0,
        "widths": (min(widths), max(widths)),
    }


class _SegmentTree:
    """TRL's ``_SegmentTree`` (trl 1.16 ``data_utils.py``): the largest free space <= a bound."""

    def __init__(self, maxval: int) -> None:
        self.maxval = maxval
        self.tree_size = 1 << (maxval - 1).bit_length()
        self.tree = [0] * (2 * self.tree_size)

    def add(self, val: int) -> None:
        i = self.tree_size + val - 1
        self.tree[i] = val
        while i > 1:
            i >>= 1
            left, right = self.tree[i << 1], self.tree[(i << 1) + 1]
            self.tree[i] = left if left >= right else right

    def remove(self, val: int) -> None:
        i = self.tree_size + val - 1
        self.tree[i] = 0
        while i > 1:
            i >>= 1
            left, right = self.tree[i << 1], self.tree[(i << 1) + 1]
            self.tree[i] = left if left >= right else right

    def search(self, val: int) -> int:
        i = 1
        while i < self.tree_size:
            i = i << 1 if self.tree[i << 1] >= val else (i << 1) + 1
        return self.tree[i]


def trl_bfd_reimplemented(docs: Sequence[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """TRL's ``_pack_bfd(on_seq_length_overflow="split")`` on lists instead of Arrow tables."""
    pieces = [d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    lengths = sorted(((len(p), i) for i, p in enumerate(pieces) if len(p)), reverse=True)
    tree = _SegmentTree(seq_len)
    tree.add(seq_len)
    space_to_bin: dict[int, deque[dict[str, Any]]] = defaultdict(deque)
    bins: list[dict[str, Any]] = []
    for length, idx in lengths:
        space = tree.search(length)
        if space < seq_len:
            row = space_to_bin[space].popleft()
        else:
            row = {"ids": [], "length": 0}
            bins.append(row)
        row["ids"].append(idx)
        row["length"] += length
        if space < seq_len and not space_to_bin[space]:
            tree.remove(space)
        space -= length
        space_to_bin[space].append(row)
        if space > 0:
            tree.add(space)
    return [np.concatenate([pieces[i] for i in b["ids"]]) for b in bins]


def bench_trl(
    docs: list[np.ndarray], seq_len: int, buffer_size: int, repeat: int
) -> dict[str, Any]:
    num_tokens = sum(len(d) for d in docs)
    buffers = [docs[i : i + buffer_size] for i in range(0, len(docs), buffer_size)]
    try:
        import pyarrow as pa
        from trl.data_utils import _pack_bfd

        tables = [pa.table({"input_ids": [d.tolist() for d in b]}) for b in buffers]

        def run() -> list[int]:
            out = [_pack_bfd(t, seq_len, on_seq_length_overflow="split") for t in tables]
            return [len(x) for t in out for x in t.column("input_ids").to_pylist()]

        label = "TRL 1.16 _pack_bfd (bfd_split)"
    except ImportError:

        def run() -> list[int]:
            return [len(r) for b in buffers for r in trl_bfd_reimplemented(b, seq_len)]

        label = "TRL-style BFD (reimpl.)"
    seconds, lengths = best_time(run, repeat)
    return {
        "label": label,
        "batch_tps": num_tokens / seconds,
        "utilization": sum(lengths) / (len(lengths) * seq_len),
        "kept": sum(lengths) / num_tokens,
    }


def bench_litdata(docs: list[np.ndarray], seq_len: int, repeat: int) -> dict[str, float]:
    """LitData TokensLoader: per chunk ``num_blocks = tokens // block_size``; no boundaries."""
    num_tokens = sum(len(d) for d in docs)
    chunk_tokens = LITDATA_CHUNK_BYTES // 2  # uint16 tokens per chunk
    doc_id = np.repeat(np.arange(len(docs)), [len(d) for d in docs])

    def run() -> tuple[int, int, int]:
        flat = np.concatenate(docs)
        kept = mixed = rows = 0
        for start in range(0, len(flat), chunk_tokens):
            chunk = flat[start : start + chunk_tokens]
            blocks = len(chunk) // seq_len
            chunk.reshape(-1)[: blocks * seq_len].reshape(blocks, seq_len)
            owners = doc_id[start : start + blocks * seq_len].reshape(blocks, seq_len)
            mixed += int((owners[:, 0] != owners[:, -1]).sum())
            kept += blocks * seq_len
            rows += blocks
        return kept, mixed, rows

    seconds, (kept, mixed, rows) = best_time(run, repeat)
    return {
        "batch_tps": num_tokens / seconds,
        "utilization": 1.0,
        "kept": kept / num_tokens,
        "mixed_rows": mixed / max(rows, 1),
    }


def describe(docs: list[np.ndarray], seq_len: int) -> str:
    lengths = np.array([len(d) for d in docs])
    return (
        f"{len(docs):,} documents, {int(lengths.sum()):,} tokens, median {int(np.median(lengths))},"
        f" p99 {int(np.percentile(lengths, 99)):,}, max {int(lengths.max()):,},"
        f" {float((lengths > seq_len).mean()):.1%} longer than seq_len"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--long-tail-tokens", type=int, default=5_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--buffer-size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    results: dict[str, Any] = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    seq_len, batch_size = args.seq_len, args.batch_size

    modes = {
        "concat": PackConfig(seq_len=seq_len),
        "bfd": PackConfig(seq_len=seq_len, mode="bfd", buffer_size=args.buffer_size),
        "pad": PackConfig(seq_len=seq_len, mode="pad"),
        "pad, grouped, to longest": PackConfig(
            seq_len=seq_len,
            mode="pad",
            group_by_length=True,
            pad_to_longest=True,
            buffer_size=args.buffer_size,
        ),
    }
    docs, texts, tok = corpus_docs(args.mb)
    datasets = {"corpus": docs, "long-tail": long_tail_docs(args.long_tail_tokens)}
    print(f"seq_len {seq_len}, batch {batch_size} rows, bfd buffer {args.buffer_size} documents")
    header = f"{'system':<36} {'rows Mtok/s':>11} {'batches Mtok/s':>14} {'util.':>7} {'kept':>7}"
    for name, docs in datasets.items():
        print(f"\n{name}: {describe(docs, seq_len)}")
        print(header)
        table = results.setdefault("datasets", {}).setdefault(name, {})
        for mode, config in modes.items():
            r = bench_mode(docs, config, batch_size, args.repeat)
            table[f"shardloader {mode}"] = r
            print(
                f"{'shardloader ' + mode:<36} {r['rows_tps'] / 1e6:>11.1f}"
                f" {r['batch_tps'] / 1e6:>14.1f} {r['utilization']:>7.2%} {r['kept']:>7.2%}"
            )
        flat = bench_flattening(docs, batch_size * seq_len, args.repeat)
        table["DataCollatorWithFlattening"] = flat
        print(
            f"{'DataCollatorWithFlattening':<36} {'':>11} {flat['batch_tps'] / 1e6:>14.1f}"
            f" {flat['utilization']:>7.2%} {flat['kept']:>7.2%}"
            f"   shape [1, {flat['widths'][0]:,}..{flat['widths'][1]:,}]"
        )
        trl = bench_trl(docs, seq_len, args.buffer_size, args.repeat)
        table[trl["label"]] = trl
        print(
            f"{trl['label']:<36} {trl['batch_tps'] / 1e6:>11.1f} {'':>14}"
            f" {trl['utilization']:>7.2%} {trl['kept']:>7.2%}"
        )
        lit = bench_litdata(docs, seq_len, args.repeat)
        table["LitData TokensLoader cut (reimpl.)"] = lit
        print(
            f"{'LitData TokensLoader cut (reimpl.)':<36} {lit['batch_tps'] / 1e6:>11.1f} {'':>14}"
            f" {lit['utilization']:>7.2%} {lit['kept']:>7.2%}"
            f"   {lit['mixed_rows']:.0%} of rows mix documents"
        )
        if name == "corpus":
            tps = bench_text(texts[: len(texts) // 4], tok, seq_len)
            print(f"{'shardloader concat, from text':<36} {tps / 1e6:>11.1f}   (tokenizer-bound)")
    print(f"\nbest of {args.repeat} runs per figure; Mtok/s = input tokens per second")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=_plain))
        print(f"wrote {args.out}")


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and tuples in the results."""
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


if __name__ == "__main__":
    main()
