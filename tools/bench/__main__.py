"""``python -m tools.bench``: the same as ``python3 tools/bench.py``."""

import sys

from tools.bench.run import main

sys.exit(main())
