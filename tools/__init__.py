"""Developer tools: the benchmarks (``tools.bench``) and the synthetic corpus (``make_corpus``)."""
