#!/usr/bin/env bash
# Set up .venv-bench, the virtualenv of tools/bench_convert.py: shardloader (editable) beside pinned
# peers (Mosaic Streaming, LitData, WebDataset), all on the CPU build of torch 2.13.0.
#
#   bash tools/bench_setup.sh                 # create or update .venv-bench (skips if up to date)
#   .venv-bench/bin/python tools/bench_convert.py
#
# Kept apart from .venv because the peers' requirements clash with ours: mosaicml-streaming 0.13
# asks for numpy<2.2, transformers<5, torchvision and five cloud SDKs; litdata 0.2.76 asks for
# torchvision. PyPI's torchvision for torch 2.13 is a CUDA build that does not import beside the CPU
# torch, so both peers are installed with --no-deps plus the modules they really import, and a stub
# torchvision (tools/bench_stubs) goes on sys.path of the Mosaic benchmark process only.
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
)
# What streaming and litdata import at module level, given that their own requirements are skipped.
PEER_IMPORTS=(
    "brotli==1.2.1"
    "python-snappy==0.7.3"
    "zstd==1.5.7.2"
    "xxhash==3.8.2"
    "catalogue==2.0.10"
    "pillow==13.0.0"
    "boto3==1.44.5"
    "lightning-utilities==0.15.3"
    "filelock==4.2.12"
    "requests==2.34.2"
)
STAMP="$VENV/.bench-setup"

"$PYTHON" - <<'PY' || { echo "bench_setup.sh: needs Python 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)
PY

want="$(printf '%s\n' "$TORCH_PIN" "${PEER_PINS[@]}" "${PEER_IMPORTS[@]}")"
if [ -f pyproject.toml ]; then
    want="$want"$'\n'"pyproject $(sha256sum pyproject.toml | cut -d' ' -f1)"
fi

check_imports() {
    PYTHONPATH="$ROOT/tools/bench_stubs" "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
import litdata, streaming, tokenizers, webdataset  # noqa: F401
from streaming.base.util import merge_index  # noqa: F401
for name in ("torch", "mosaicml-streaming", "litdata", "webdataset", "tokenizers", "pyarrow"):
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
"${PIP[@]}" -c "$CONSTRAINTS" "webdataset==1.0.2"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps "mosaicml-streaming==0.13.0" "litdata==0.2.76"
"${PIP[@]}" -c "$CONSTRAINTS" "${PEER_IMPORTS[@]}"

echo "== checking imports"
check_imports
echo "$want" > "$STAMP"
echo "$VENV is ready: $VENV/bin/python tools/bench_convert.py"
