"""One command for every benchmark: ``python3 tools/bench.py [--quick] ...``.

A launcher for ``tools/bench/run.py`` (also ``python -m tools.bench`` from the repository root):
the benchmarks are the package ``tools.bench``, so this puts the repository root on the path.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
