#!/usr/bin/env bash
# Collects the CRDs the local control plane installs, from the Go module proxy:
# Knative Serving's (with the networking and caching CRDs it needs) and Istio's
# networking.istio.io CRDs. Usage: hack/crds.sh OUT_DIR
set -euo pipefail
out=$1
serving_version=${KNATIVE_SERVING_VERSION:-v0.50.0}
istio_api_version=${ISTIO_API_VERSION:-v1.32.0}
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

module_dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }
module_gomod() { go mod download -json "$1" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p'; }
# The version of a dependency as serving's go.mod pins it.
pinned() { awk -v m="$1" '$1 == m { print $2; exit }' "$2"; }

serving=$(module_dir "knative.dev/serving@$serving_version")
serving_mod=$(module_gomod "knative.dev/serving@$serving_version")
networking=$(module_dir "knative.dev/networking@$(pinned knative.dev/networking "$serving_mod")")
caching=$(module_dir "knative.dev/caching@$(pinned knative.dev/caching "$serving_mod")")
istio=$(module_dir "istio.io/api@$istio_api_version")

rm -rf "$out.tmp" && mkdir -p "$out.tmp/knative" "$out.tmp/istio"
# Serving's own CRDs; six of its config files are symlinks into vendor/, which module zips
# drop, so those come from the networking and caching modules themselves.
cp "$serving"/config/core/300-resources/*.yaml "$out.tmp/knative/"
cp "$networking"/config/{certificate,domain-claim,ingress,serverlessservice}.yaml "$out.tmp/knative/"
cp "$caching"/config/image.yaml "$out.tmp/knative/"
# Only the networking.istio.io group: the rest of Istio is not modelled here.
awk 'BEGIN { RS = "\n---\n"; ORS = "\n---\n" } /group: networking\.istio\.io/' \
  "$istio"/kubernetes/customresourcedefinitions.gen.yaml > "$out.tmp/istio/networking.istio.io.yaml"
chmod -R u+w "$out.tmp"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "crds: $(ls "$out"/knative | wc -l) Knative files, $(grep -c '^kind: CustomResourceDefinition' "$out/istio/networking.istio.io.yaml") Istio CRDs" >&2
