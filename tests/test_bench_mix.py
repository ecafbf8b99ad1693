"""Smoke test of ``tools.bench.mix``: its quick run of shardloader's mixture, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_shardloader_run(tmp_path: Path) -> None:
    """The quick run measures every column for shardloader and writes its results file."""
    out = tmp_path / "results-mix.json"
    command = [sys.executable, "-m", "tools.bench.mix", "--quick", "--configs", "shardloader"]
    done = subprocess.run(
        [*command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| shardloader | Mixture, total=N | 1 |" in done.stdout
    report = json.loads(out.read_text())
    (result,) = report["results"]
    for world in result["worlds"].values():
        assert "error" not in world
        assert world["num_batches"] == report["total"] // report["global_batch"]
    resumed = [v for v in result["resume"].values() if not v.startswith("not run")]
    assert resumed, result["resume"]
    assert all(verdict.startswith("yes") for verdict in resumed), result["resume"]
    assert report["mix_overhead"]["ratio"] > 0
