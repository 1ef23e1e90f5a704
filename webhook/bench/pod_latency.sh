#!/usr/bin/env bash
# Pod-creation latency through the real apiserver with and without kinfer's webhook
# (p50/p99 and their ratio; goal within 1.1x). Not part of `make test`.
#
#   webhook/bench/pod_latency.sh [N]      N Pods per variant, default 200
#
# Starts the local control plane with kinfer (hack/with-cluster --kinfer) and runs the
# benches/pod_latency.rs bench against it. Run from anywhere.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
n=${1:-200}
# Build first, outside the cluster's lifetime.
cargo bench --manifest-path "$root/Cargo.toml" -p kinfer-webhook --bench pod_latency --no-run --quiet
exec "$root/hack/with-cluster" --kinfer \
  cargo bench --manifest-path "$root/Cargo.toml" -p kinfer-webhook --bench pod_latency --quiet -- "$n"
