#!/usr/bin/env bash
# Set up the project's virtualenv and run the demo or the test suite.
#
#   bash tools/dev.sh demo    # set up, then run examples/quickstart.sh on a small generated corpus
#   bash tools/dev.sh test    # set up, lint (ruff, mypy), then run the whole test suite (what CI runs)
#   bash tools/dev.sh lint    # set up, then only ruff check, ruff format --check and mypy
#   bash tools/dev.sh setup   # only set up .venv
#
# Needs only python3 (>= 3.10) with venv. torch==2.13.0 (CPU) is installed first unless the venv
# already has a torch >= 2.4, so pip never resolves a newer (CUDA) torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    if ! python - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
    then
        echo "== installing torch==2.13.0 (CPU)"
        python -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    local stamp="$VENV/.shardloader-installed"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "== installing shardloader[dev,s3] (editable)"
        python -m pip install -q --disable-pip-version-check -e ".[dev,s3]"
        echo "$want" > "$stamp"
    fi
}

lint() {
    echo "== ruff check"
    ruff check shardloader tests tools examples
    echo "== ruff format --check"
    ruff format --check shardloader tests tools examples
    echo "== mypy"
    mypy
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        bash examples/quickstart.sh "$@"
        ;;
    lint)
        setup
        lint
        ;;
    test)
        setup
        lint
        set +e
        python -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "pytest collected no tests: that is a failure, not a pass" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash tools/dev.sh {demo|test|lint|setup} [args...]" >&2
        exit 2
        ;;
esac
