#!/usr/bin/env bash
# Tests for the HTTP wrapper: Rust unit tests, then the Python end-to-end suite against a real
# scikit-learn model. Creates the virtual environment at <repo>/.venv on first run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if ! "$venv/bin/python" -c "import sklearn, numpy, pytest, requests" 2>/dev/null; then
    echo "==> creating $venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet scikit-learn numpy pytest requests
fi

cd "$root"
echo "==> cargo test -p kinfer-wrapper"
cargo test --quiet -p kinfer-wrapper
echo "==> cargo build -p kinfer-wrapper"
cargo build --quiet -p kinfer-wrapper

echo "==> pytest build-templates/tests"
KINFER_WRAPPER="$root/target/debug/kinfer-wrapper" \
    "$venv/bin/python" -m pytest -q "$root/build-templates/tests" "$@"
