# kinfer: `make demo` runs the main job on the local control plane; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

KUBERNETES_VERSION ?= v1.37.2
KWOK_VERSION ?= v0.8.0
BIN := tests/bin
GO_ENV := GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
K8S_LDFLAGS := -s -w \
  -X k8s.io/component-base/version.gitVersion=$(KUBERNETES_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=37 \
  -X k8s.io/component-base/version.gitTreeState=clean
# Integration tests share one cluster; each test uses its own namespace.
INTEGRATION_THREADS ?= 4

.PHONY: help
help:
	@echo "make demo   bring up the local control plane and show what it runs"
	@echo "make test   lint, unit tests, then integration tests on the local control plane"
	@echo "make tools  build the local control plane (Kubernetes, KWOK, CRDs) under $(BIN)/"
	@echo "make build  build the Rust workspace"

KNATIVE := $(BIN)/knative
KNATIVE_SRC := tests/knative/go.mod tests/knative/go.sum $(wildcard tests/knative/*.go)

.PHONY: tools
tools: $(BIN)/k8senv $(BIN)/kubectl $(BIN)/kwok $(BIN)/crds/.done \
  $(KNATIVE)/kinfer-knative-controller $(KNATIVE)/knative-autoscaler $(KNATIVE)/knative-webhook \
  $(KNATIVE)/manifests/.done

$(BIN)/k8senv: tests/k8senv/go.mod tests/k8senv/go.sum $(wildcard tests/k8senv/*.go) tests/k8senv/stages/stages.yaml
	@mkdir -p $(BIN)
	@echo "building the local control plane (Kubernetes $(KUBERNETES_VERSION)); a cold build takes several minutes" >&2
	cd tests/k8senv && $(GO_ENV) go build -trimpath -ldflags "$(K8S_LDFLAGS)" -o ../bin/k8senv .

$(BIN)/kubectl: $(BIN)/k8senv
	ln -sf k8senv $@

$(BIN)/kwok:
	@mkdir -p $(BIN)
	GOBIN=$(CURDIR)/$(BIN) $(GO_ENV) go install -trimpath -ldflags "-s -w" sigs.k8s.io/kwok/cmd/kwok@$(KWOK_VERSION)

$(BIN)/crds/.done: hack/crds.sh $(wildcard manifests/crds/*.yaml)
	hack/crds.sh $(BIN)/crds
	mkdir -p $(BIN)/crds/kinfer && cp manifests/crds/*.yaml $(BIN)/crds/kinfer/
	touch $@

# Knative Serving v0.50.0 (Knative 1.23): the autoscaler and the webhook unchanged, the
# controller through tests/knative (see its main.go for why).
$(KNATIVE)/kinfer-knative-controller: $(KNATIVE_SRC)
	@mkdir -p $(KNATIVE)
	cd tests/knative && $(GO_ENV) go build -trimpath -ldflags "-s -w" -o ../bin/knative/kinfer-knative-controller .

$(KNATIVE)/knative-%: $(KNATIVE_SRC)
	@mkdir -p $(KNATIVE)
	cd tests/knative && $(GO_ENV) go build -trimpath -ldflags "-s -w" -o ../bin/knative/knative-$* knative.dev/serving/cmd/$*

$(KNATIVE)/manifests/.done: hack/knative-manifests.sh tests/knative/local.yaml tests/knative/go.mod
	hack/knative-manifests.sh $(KNATIVE)/manifests
	touch $@

.PHONY: build
build:
	cargo build --workspace --all-targets --locked

.PHONY: lint
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

.PHONY: unit
unit:
	cargo test --workspace --locked --exclude kinfer-tests

# The HTTP wrapper's tests: real Python workers and a real scikit-learn model.
.PHONY: wrapper-test
wrapper-test:
	bash build-templates/test.sh

.PHONY: integration
integration: tools
	cargo test -p kinfer-tests --locked --no-run
	KINFER_COMPONENTS=webhook hack/with-cluster --kinfer \
	  cargo test -p kinfer-tests --locked --offline -- --test-threads=$(INTEGRATION_THREADS)

# The install manifests, applied to a cluster of their own, each component under its own
# ServiceAccount.
.PHONY: install-test
install-test: tools
	cargo build --bins --locked
	cargo test -p kinfer-tests --locked --no-run
	hack/with-cluster cargo test -p kinfer-tests --locked --offline --test install_manifests -- --ignored

.PHONY: test
test: lint unit wrapper-test integration install-test

.PHONY: demo
demo: tools
	hack/demo-setup.sh
	hack/with-cluster --kinfer .venv/bin/python hack/demo.py
