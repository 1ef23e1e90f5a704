#!/usr/bin/env bash
# The demo run by `make demo` inside hack/with-cluster. For now it shows the local control
# plane: the Kubernetes version, the fake nodes with their GPU capacity and labels, and the
# API groups installed (Knative Serving, Istio networking).
set -euo pipefail
echo "== Kubernetes"
kubectl version
echo
echo "== Nodes (fake, managed by KWOK; GPU capacity and GPU Feature Discovery labels)"
kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.memory \
  -o custom-columns='NAME:.metadata.name,READY:.status.conditions[?(@.type=="Ready")].status,CPU:.status.allocatable.cpu,MEMORY:.status.allocatable.memory,GPUS:.status.allocatable.nvidia\.com/gpu,GPU-PRODUCT:.metadata.labels.nvidia\.com/gpu\.product,GPU-MEMORY-MIB:.metadata.labels.nvidia\.com/gpu\.memory,TAINTS:.spec.taints[*].key'
echo
echo "== RuntimeClasses"
kubectl get runtimeclass
echo
echo "== API groups"
kubectl api-versions | sort
