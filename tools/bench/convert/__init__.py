"""Conversion benchmark: shardloader against WebDataset, Mosaic Streaming and LitData, in one run.

What is measured, on one generated JSONL corpus (``tools/make_corpus.py``, 256 MB in 32 files by
default, cached under ``.bench/``) with the same number of processes ``N`` for every system:

- **text**: JSONL -> text shards. ``shardloader convert --format arrow`` and ``--format tar``
  (both ``--compression zstd``, which tar shards need asked for); WebDataset ``ShardWriter`` (a
  ``multiprocessing.Pool`` of N, one writer per process over its share of the input files; plain
  tar, as WebDataset has no zstd writer); Mosaic ``MDSWriter`` (N writers over a split of the
  files, zstd, then ``merge_index``); LitData ``optimize`` (a generator fn per input file,
  ``num_workers=N``, zstd, ``reorder_files=False``). Rate: MB/s of input (uncompressed JSONL
  bytes) and documents/s.
- **tokens**: JSONL -> token-id shards with a byte-level BPE tokenizer (vocab 8192, trained here on
  a sample of the corpus). ``shardloader convert --tokenizer``; Mosaic ``MDSWriter`` with an
  ``ndarray:uint16`` column; LitData ``optimize`` with ``TokensLoader`` (``compression_level=
  "chunk"``, the only zstd mode it accepts with that loader). The bound is the tokenizer alone: N
  processes that read their share of the files, parse JSON and encode batches of 1,000 documents,
  writing nothing. ``bound`` uses the fastest batch encoder the library has
  (``encode_batch_fast``, as shardloader does) and ``bound-encode-batch`` plain ``encode_batch``;
  the ratio column is against the faster one. Rate: tokens/s, where tokens means the text tokens
  of the corpus (the bound's count, without EOS) for every system, so all rates share a numerator.

- **chat**: JSONL conversations (the text corpus's documents, each cut into a system turn and two
  user/assistant exchanges, `tools.bench.convert.chat`) -> token shards rendered with a chat
  template. ``shardloader convert --tokenizer DIR`` with a tokenizer directory that holds the
  default ChatML-like template (``train_bpe_tokenizer(chat_template=True)``): each conversation is
  rendered (one Jinja render per prefix), tokenized with offsets and stored as ``input_ids`` plus
  ``loss_spans``. The bound is the tokenizer alone on the same conversations: their turn contents
  joined by newlines, encoded as for **tokens** (no template, no markup, no offsets). Rate:
  tokens/s, numerator the bound's token count, so the ratio is the bound's time over ours. No peer
  renders chat templates, so none runs here.

Every measurement runs in a fresh subprocess (``python -m tools.bench.convert.jobs``), into a fresh
output folder that is deleted afterwards. The time is wall time from just after the library's
import until its output, index or manifest included, is complete; the whole subprocess time
(interpreter start and imports too) is kept in the JSON as ``process_s``. Systems run interleaved,
repeat by repeat (``--repeats``, 3 by default); the table shows the median rate with [min-max]. The
input files are read once before the first measurement so that every system starts from the page
cache. Every job's sample count is checked against the corpus.

Run it (on 2 cores the default run takes 20-25 minutes, nearly all of it tokenizing)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python -m tools.bench.convert            # 256 MB, 3 repeats, N = cores
    .venv-bench/bin/python -m tools.bench.convert --quick    # 32 MB, 1 repeat: a smoke test
    .venv-bench/bin/python -m tools.bench.convert --systems webdataset,mosaic --tasks text
    .venv-bench/bin/python -m tools.bench.convert --tasks chat --quick
    .venv-bench/bin/python -m tools.bench.convert --from-json .bench/results-convert.json

Other work on the machine skews the rates: each job records the share of CPU that other processes
used meanwhile, and the verdicts give best-of-N ratios beside the median ones.

``shardloader-arrow-1mib`` is ``shardloader-arrow`` with ``--batch-bytes 1MiB``: the speed and size
the default's 128 KiB record batches (the shuffle's blocks) trade away. Its output column is set
beside the smallest zstd peer's (Mosaic's or LitData's; WebDataset writes plain tar).

Targets (from the issue): shardloader's text conversion at least 1.5x the fastest peer, with output
at most 5% above the smallest zstd peer's; conversion
with tokenization at least 80% of the tokenizer-alone bound (the chat case is held to the same
line). Results go to
``.bench/results-convert.json`` (``--out``); job logs to ``.bench/logs/``.

The package: ``jobs`` (one conversion, in its own subprocess), ``report`` (medians, ratios, the
table and verdicts), ``chat`` (the chat corpus and tokenizer), ``__main__`` (the command line).
"""

SHARD_BYTES = 1 << 26  # 64 MiB shards or chunks for every system
ENCODE_BATCH_DOCS = 1000
TEXT_SYSTEMS = (
    "shardloader-arrow",
    "shardloader-arrow-1mib",
    "shardloader-tar",
    "webdataset",
    "mosaic",
    "litdata",
)
# shardloader's systems: (format, extra convert arguments). The 1 MiB variant shows the trade the
# default's 128 KiB record batches make for shuffle quality: bigger batches compress better
# (each batch is compressed alone) and cost less per byte, but a shuffle block is a batch.
SHARDLOADER_SYSTEMS = {
    "shardloader-arrow": ("arrow", ()),
    "shardloader-arrow-1mib": ("arrow", ("--batch-bytes", "1MiB")),
    "shardloader-tar": ("tar", ()),
}
ZSTD_PEERS = ("mosaic", "litdata")  # the peers whose text output is zstd, as ours is
TARGET_SIZE_RATIO = 1.05  # text output at most 5% above the smallest zstd peer's
TOKEN_SYSTEMS = ("bound", "bound-encode-batch", "shardloader-arrow", "mosaic", "litdata")
CHAT_SYSTEMS = ("bound", "bound-encode-batch", "shardloader-arrow", "shardloader-tar")
TASKS = ("text", "tokens", "chat")
PEERS = ("webdataset", "mosaic", "litdata")
BOUNDS = ("bound", "bound-encode-batch")
TARGET_TEXT_RATIO = 1.5
TARGET_TOKEN_RATIO = 0.8
