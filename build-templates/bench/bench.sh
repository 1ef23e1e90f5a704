#!/usr/bin/env bash
# Benchmarks kinfer-wrapper against KServe's Python ModelServer (same scikit-learn function,
# same machine). Not part of `make test`. Extra arguments go to bench.py (see --help).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"

if ! "$venv/bin/python" -c "import kserve, sklearn, numpy, requests" 2>/dev/null; then
    echo "==> creating $venv (kserve, scikit-learn)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kserve scikit-learn numpy requests
fi
echo "==> cargo build --release -p kinfer-wrapper"
(cd "$root" && cargo build --quiet --release -p kinfer-wrapper)
cd "$here"
exec "$venv/bin/python" bench.py --wrapper "$root/target/release/kinfer-wrapper" "$@"
