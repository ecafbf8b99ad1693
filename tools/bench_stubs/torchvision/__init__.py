"""Stand-in for torchvision in the conversion benchmark process only.

``import streaming`` (mosaicml-streaming) imports ``streaming.vision``, which imports torchvision at
module level; PyPI's torchvision for torch 2.13 is a CUDA build that fails to import beside the CPU
torch wheel. Text benchmarks never touch the vision code, so an empty module is enough.
``tools.bench`` puts ``tools/bench_stubs`` on ``sys.path`` (and ``PYTHONPATH`` of its
workers); nothing else does.
"""

__version__ = "0.0.0+benchstub"
