#!/usr/bin/env bash
# Pod-creation latency through the real apiserver with and without kinfer's webhook
# (p50/p99 and their ratio; goal within 1.1x). Not part of `make test`.
#
#   webhook/bench/pod_latency.sh [N]      N Pods per variant, default 200
#
# Builds benches/pod_latency.rs and a release kinfer-webhook, starts the local control plane
# with kinfer (hack/with-cluster --kinfer), replaces the debug webhook it started with the
# release one (same address, Service and configurations), runs the bench, and prints the
# webhook's own admission time. KINFER_BENCH_DEBUG_WEBHOOK=1 keeps the debug build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if [[ ${1:-} == --inside ]]; then
  exe=$2 n=$3
  metrics() { curl -s 127.0.0.1:9401/metrics | grep -E '^kinfer_webhook_admission(s_total|_duration_seconds_(sum|count))'; }
  if [[ ${KINFER_BENCH_DEBUG_WEBHOOK:-} != 1 ]]; then
    kill "$KINFER_WEBHOOK_PID"
    while kill -0 "$KINFER_WEBHOOK_PID" 2>/dev/null; do sleep 0.1; done
    log=$KINFER_CLUSTER_DIR/logs/kinfer-webhook-release.log
    "$root/target/release/kinfer-webhook" --namespace kinfer-system --listen 10.255.255.1:9443 \
      --admin-addr 127.0.0.1:9401 --log info,kinfer_webhook::server=debug >"$log" 2>&1 &
    trap 'kill $!' EXIT
    for _ in $(seq 150); do curl -sf 127.0.0.1:9401/readyz >/dev/null && break; sleep 0.2; done
    echo "webhook: release build"
  else
    log=$KINFER_CLUSTER_DIR/logs/kinfer-webhook.log
    echo "webhook: debug build"
  fi
  "$exe" "$n"
  echo "the webhook's own view (all admissions, warm-up included):"
  metrics | sed 's/^/  /'
  echo "  TLS connections accepted (client's ALPN choice): $(grep -c 'TLS connection' "$log" || true)" \
    "$(grep -o 'alpn=[^ ]*' "$log" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
  # The apiserver's view: its mean time per call of each kinfer webhook (request encoding,
  # the call, patch decoding and application) and per Pod create (warm-up and the
  # namespace's own Pods included).
  kubectl get --raw /metrics >"$KINFER_CLUSTER_DIR/apiserver-metrics.txt"
  awk '
    /^apiserver_admission_webhook_admission_duration_seconds_(sum|count)\{name="(pods|deployments).kinfer.dev"/ {
      match($1, /name="[a-z.]*"/); w = substr($1, RSTART + 6, RLENGTH - 7)
      if ($1 ~ /_sum/) ws[w] += $2; else wc[w] += $2 }
    /^apiserver_request_duration_seconds_(sum|count)\{.*resource="pods",scope="resource",subresource="",verb="POST"/ {
      if ($1 ~ /_sum/) ps += $2; else pc += $2 }
    END {
      print "the apiserver'"'"'s view:"
      for (w in wc) printf "  %s: %d calls, mean %.2f ms per call\n", w, wc[w], wc[w] ? ws[w] / wc[w] * 1000 : 0
      printf "  POST pods: %d, mean %.2f ms (all variants)\n", pc, pc ? ps / pc * 1000 : 0
    }' "$KINFER_CLUSTER_DIR/apiserver-metrics.txt"
  if [[ -n ${KINFER_BENCH_APISERVER_METRICS:-} ]]; then
    cp "$KINFER_CLUSTER_DIR/apiserver-metrics.txt" "$KINFER_BENCH_APISERVER_METRICS"
  fi
  exit 0
fi

n=${1:-200}
# Build first, outside the cluster's lifetime (and run the binary itself, so a cargo lock
# held by another build cannot stall the measurement).
if [[ ${KINFER_BENCH_DEBUG_WEBHOOK:-} != 1 ]]; then
  cargo build --manifest-path "$root/Cargo.toml" --release --quiet -p kinfer-webhook
fi
exe=$(cargo bench --manifest-path "$root/Cargo.toml" -p kinfer-webhook --bench pod_latency \
  --no-run --message-format=json-render-diagnostics |
  sed -n 's/.*"executable":"\([^"]*pod_latency[^"]*\)".*/\1/p' | tail -n 1)
if [[ -z $exe ]]; then
  echo "pod_latency.sh: could not find the bench executable" >&2
  exit 1
fi
KINFER_COMPONENTS=${KINFER_COMPONENTS:-webhook} \
  exec "$root/hack/with-cluster" --kinfer "${BASH_SOURCE[0]}" --inside "$exe" "$n"
