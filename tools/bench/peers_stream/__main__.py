"""``python -m tools.bench.peers_stream prepare|pass SPEC.json``: run it, write the result JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tools.bench.peers_stream.passes import run_pass
from tools.bench.peers_stream.writers import prepare


def main(argv: list[str]) -> int:
    """``prepare SPEC`` or ``pass SPEC``: run it and write the result JSON to ``spec["result"]``."""
    command, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    if command == "prepare":
        started = time.perf_counter()
        result = prepare(spec)
        result["prepare_s"] = time.perf_counter() - started
    elif command == "pass":
        result = run_pass(spec)
    else:
        raise SystemExit(f"unknown command {command!r}; use prepare or pass")
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
