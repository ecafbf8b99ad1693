"""Shuffle quality: shardloader's epoch order beside Mosaic Streaming's and WebDataset's shuffles.

Every order here is a pure function of the shard sizes (no shard is read), built with each
system's own code:

- **shardloader**: `shardloader.plan.plan_epoch` as ``ShardDataset`` plans with its defaults
  over a dataset convert made (``StreamConfig()``: seed 0, ``"drop"``, ``shuffle_unit="auto"``
  resolving to blocks, windows of at most ``shuffle_bytes`` = 64 MiB decoded). The corpus is
  modelled as documents of 2,621 bytes (about the mean of the stream benchmark's corpus), so
  convert's default record batches (128 KiB) hold 51 of them; each shard is cut into such
  blocks (the last one shorter), the plan gets every block's decoded size and shard
  (``unit_bytes``, ``unit_groups``: each shard's blocks are spread over the epoch), and a
  window holds at most 502 blocks = 25,602 documents. Worker ``w`` reads
  ``plan.workers[w].sample_ids()``; ids stay global, so the metrics count shards. Rows with
  ``shuffle_bytes`` of 16 and 256 MiB, and whole shards (``shuffle_unit="shard"``: 4 shards a
  window, the default before blocks; and 16) for comparison. Before measuring, the script
  converts a tiny corpus and checks that a real ``ShardDataset`` under a real ``DataLoader``
  yields exactly the reconstructed order, in whole shards and in blocks (record batches of 256
  bytes, windows of 3 of them: `check_shard_dataset`).
- **Mosaic Streaming** 0.13 (``StreamingDataset(shuffle=True)`` with its defaults): shuffle
  ``py1e``, seed 9176, ``num_canonical_nodes`` = physical nodes (one node of ``W`` ranks here),
  ``shuffle_block_size = max(4_000_000 // num_canonical_nodes, 1 << 18)``, batching ``random``,
  partition ``relaxed``. As in ``streaming.base.batching.random``: ``get_partitions`` (shape nodes
  x ranks x workers x batches x batch) mapped through ``get_shuffle``; ``-1`` (padding) skipped.
- **WebDataset** 1.0.2: ``WebDataset(urls, shardshuffle=True, nodesplitter=split_by_node,
  detshuffle=True, seed=s).compose(detshuffle(1000, seed=s))``: shards split by rank, then by
  worker (``split_by_node``/``split_by_worker``), the worker's shard list through a shuffle buffer
  of 100 (``shardshuffle=True`` becomes 100), each shard's samples in tar order, then the sample
  buffer of 1,000 (``initial=100``, as ``.shuffle(1000)``). ``detshuffle`` seeds
  ``random.Random(seed + epoch)``; plain ``.shuffle(1000)`` seeds from pid and time. A second row
  shuffles the whole shard list (buffer = number of shards) to separate the two buffers' effects.
  `check_webdataset_epochs` runs ``detshuffle`` under a real DataLoader: it counts epochs in the
  worker's copy of the pipeline, so without ``persistent_workers`` every epoch repeats epoch 0.
- **uniform permutation** (the ideal) and **no shuffle** (manifest order; the worst), each rank
  taking a contiguous block.

What a rank's training loop sees with ``DataLoader(num_workers=K, batch_size=B)`` over an
``IterableDataset`` is the workers' batches taken round-robin (worker 0's first B ids, worker 1's
first B, ...), exhausted workers skipped (`interleave_batches`). Rank 0 is measured, for
``world_size`` 1 and 8, in that loop order and in worker 0's own order.

Metrics: the fraction of consecutive samples from the same shard; Spearman's |rho| between
position and sample id (ids rank-transformed, so a rank's subset counts like a whole epoch); the
mean number of distinct shards in consecutive windows of 1,000 samples; Mosaic Streaming's own
metric ("gap entropy", `metrics.mosaic_entropy`, as ``get_entropy_shuffle_quality`` in its
``simulation/core/shuffle_quality.py``): the harmonic mean of the Shannon entropies (bits) of the
absolute gaps between consecutive sample ids and between consecutive samples' shard indices, not
normalized, on the measured order with global ids (so it compares only within one corpus and
world size; the uniform row is the ceiling there, no shuffle scores 0); determinism (the same
seed and epoch twice must give the same order, asserted where the system promises it; the
fraction of positions that change from epoch 0 to 1); and the cost of making rank 0's whole
epoch order (wall time, then peak traced memory from `tracemalloc` in a second run).

Run it (under a minute on 2 cores, ~0.8 GB peak RSS)::

    bash tools/bench_setup.sh
    .venv-bench/bin/python -m tools.bench.shuffle
    .venv-bench/bin/python -m tools.bench.shuffle --quick          # smaller corpora, no check
    .venv-bench/bin/python -m tools.bench.shuffle --cost-shards 100000   # cost at 100M samples

Results go to ``.bench/shuffle.json`` (``--out``).

The package: ``orders`` (each system's order), ``metrics`` (quality metrics and shard-size
corpora), ``runs`` (quality, determinism, cost), ``checks`` (against real DataLoaders),
``report`` (tables), ``__main__`` (the command line).
"""
