"""Benchmarks of shardloader against its peers, run as modules from the repository root.

``python3 tools/bench.py`` (or ``python -m tools.bench``) runs every part and gathers the results;
each part also runs alone, in ``.venv-bench`` (``bash tools/bench_setup.sh``)::

    .venv-bench/bin/python -m tools.bench.convert     # conversion: MB/s, tokens/s, output bytes
    .venv-bench/bin/python -m tools.bench.stream      # streaming: samples/s, tokens/s, RSS
    .venv-bench/bin/python -m tools.bench.pack        # packing [8 x 2048] rows in memory
    .venv-bench/bin/python -m tools.bench.splits      # ranks x workers: lost, duplicated ids
    .venv-bench/bin/python -m tools.bench.shuffle     # shuffle quality and cost
    .venv-bench/bin/python -m tools.bench.mix         # weighted mixes: exactness, resume
    python -m tools.bench.plan                        # plan_epoch time and memory
    python -m tools.bench.manifest                    # manifest size, parse time, memory

``harness`` holds what the parts share (corpus, job environment, tables, verdicts, results JSON);
``peers_stream`` is the subprocess side of ``stream`` and ``splits``. Nothing here is imported on
``import shardloader``.
"""
