"""The subprocess side of ``tools.bench.stream``: write each system's dataset, or time one pass.

Runs in ``.venv-bench`` (``tools/bench_setup.sh``), one process per call, so that every pass
starts with a fresh interpreter and its peak RSS (``ru_maxrss``) is its own::

    python -m tools.bench.peers_stream prepare SPEC.json   # write one system's copy of the corpus
    python -m tools.bench.peers_stream pass SPEC.json      # one shuffled pass through a DataLoader

``SPEC.json`` is written by ``tools.bench.stream``; the result goes to ``spec["result"]``.

Every system is read the way its documentation shows, with its own shuffle on, through a
``torch.utils.data.DataLoader`` (for shardloader its subclass ``ShardLoader``, which also records
what the loop consumed, unless the spec says otherwise) with the same ``batch_size`` and the same
collate function:
``collate_text`` (a list of the texts) or ``collate_tokens`` (one flat tensor of all the token ids
of the batch, so that one object per batch crosses from a worker to the main process). Packed
rows (task ``packed``) are each system's own batches: shardloader's ``ShardLoader`` collate of
``PackConfig`` rows (a dict of ``[8, 2048]`` tensors), LitData's stacked ``TokensLoader`` blocks.

- shardloader: ``ShardDataset`` over Arrow shards (zstd), ``StreamConfig(seed, shuffle=True)``.
- mosaic: ``StreamingDataset`` over MDS (zstd) written by one ``MDSWriter``; ``remote`` is the
  dataset (a local folder or ``s3://``) and ``local`` a fresh folder per pass, because reading
  compressed shards with only ``local=`` decompresses them beside the shards and keeps the copies.
  ``predownload=2048`` and ``batch_size`` are passed (without ``predownload`` its iterator sleeps
  7 ms whenever it is ``predownload`` samples ahead, ~1,000 samples/s).
- litdata: ``StreamingDataset`` over ``optimize`` output (zstd chunks); tokens through
  ``TokensLoader(block_size)``, which yields fixed blocks of the concatenated token stream. From
  local disk it reads a hard-linked copy of the dataset (made by the parent): with ``TokensLoader``
  it decompresses each whole-chunk ``chunk-*.zstd.bin`` into ``chunk-*.bin`` in the input folder
  itself and deletes the compressed file, even with a ``cache_dir`` (its index still names the
  ``.zstd.bin``, so the same folder served over S3 then fails with ``NoSuchKey``).
- webdataset: ``WebDataset(urls, shardshuffle=100).shuffle(1000).decode()`` over plain tar shards
  written by ``ShardWriter`` (Python 3.11's ``tarfile`` reads no zstd). WebDataset has no ``s3://``
  handler: one that opens the URL with fsspec (like every other system here, s3fs) is added to
  ``webdataset.gopen.gopen_schemes``.
- hf: ``datasets.load_dataset("parquet", streaming=True).shuffle(seed, buffer_size=1000)`` over
  Parquet files (zstd, row groups of 1,000 rows) written by pyarrow; token ids come as Python
  lists (its default format: ``with_format("numpy")`` is ~3x slower).
  ``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` is set to 0: otherwise a shuffled pass over
  Parquet ends with a 5 s sleep.
- memmap (bound): nanoGPT's ``get_batch``: a ``np.memmap`` of all token ids (uint16) re-opened per
  batch, ``batch_size`` random windows of ``block_size`` tokens stacked into an int64 tensor, as
  many batches as cover the corpus's tokens once.
- decode (bound): every text shard of shardloader's copy read and decoded by pyarrow on 2 threads,
  each text made a Python ``str``: no shuffle, no sample dicts, no checksums, no DataLoader.
- raw-get (bound): ``fsspec`` ``cat`` of all of shardloader's shard files from the S3 server at
  once (s3fs issues the GETs concurrently); no decoding.

The package: ``writers`` (each system's copy of the corpus: `prepare`), ``readers`` (each
system's shuffled dataset: `make_dataset`), ``passes`` (one timed pass: `run_pass`),
``__main__`` (the command line).
"""

from tools.bench.peers_stream.passes import run_pass
from tools.bench.peers_stream.readers import make_dataset
from tools.bench.peers_stream.writers import prepare

__all__ = ["make_dataset", "prepare", "run_pass"]
