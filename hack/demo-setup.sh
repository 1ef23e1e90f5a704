#!/usr/bin/env bash
# Prepares `make demo` on a fresh machine: the Python environment (scikit-learn for the model,
# matplotlib for the plot), the HTTP wrapper and the activator stand-in, and the trained model.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.venv
if ! "$venv/bin/python" -c "import sklearn, numpy, matplotlib, requests" 2>/dev/null; then
  echo "demo: preparing $venv (scikit-learn, matplotlib)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet scikit-learn numpy matplotlib requests pytest
fi
cargo build --manifest-path "$root/Cargo.toml" --quiet -p kinfer-wrapper -p kinfer-tests --bin kinfer-wrapper --bin kpa-poke
mkdir -p "$root/demo-output"
"$venv/bin/python" "$root/hack/demo/train.py" "$root/demo-output/iris-model.pkl"
