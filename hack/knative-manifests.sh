#!/usr/bin/env bash
# Collects what the local control plane applies to run Knative Serving, from the module
# cache of tests/knative (Knative's own YAML) and tests/knative/local.yaml (local settings).
# Usage: hack/knative-manifests.sh OUT_DIR
#   OUT_DIR/10-core/       namespace, ConfigMaps, webhook Secret, Services: before the components start
#   OUT_DIR/20-webhooks/   webhook configurations: after the webhook has started
set -euo pipefail
out=$(realpath -m "$1")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/tests/knative"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
serving=$(go list -m -f '{{.Dir}}' knative.dev/serving)
networking=$(go list -m -f '{{.Dir}}' knative.dev/networking)

rm -rf "$out.tmp" && mkdir -p "$out.tmp/10-core" "$out.tmp/20-webhooks"
cp "$serving/config/core/100-namespace.yaml" "$out.tmp/10-core/00-namespace.yaml"
for f in "$serving"/config/core/configmaps/*.yaml; do
  cp "$f" "$out.tmp/10-core/10-config-$(basename "$f")"
done
# A symlink into vendor/ in serving's repository, so it comes from the networking module.
cp "$networking/config/config-network.yaml" "$out.tmp/10-core/10-config-network.yaml"
cp "$serving/config/core/webhooks/secret.yaml" "$out.tmp/10-core/20-webhook-secret.yaml"
cp "$root/tests/knative/local.yaml" "$out.tmp/10-core/90-local.yaml"
cp "$serving"/config/core/webhooks/{defaulting,resource-validation,configmap-validation}.yaml "$out.tmp/20-webhooks/"
chmod -R u+w "$out.tmp"
rm -rf "$out" && mv "$out.tmp" "$out"
