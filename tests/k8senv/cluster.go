package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// fakeNode describes one KWOK node of the local cluster.
type fakeNode struct {
	name      string
	gpus      int
	gpuMemMiB int
	product   string
}

// The topology every test relies on: two plain CPU nodes and two GPU nodes that model an
// 80 GB and a 24 GB card, labelled as GPU Feature Discovery labels real nodes.
var fakeNodes = []fakeNode{
	{name: "cpu-node-1"},
	{name: "cpu-node-2"},
	{name: "gpu-node-80g", gpus: 8, gpuMemMiB: 81920, product: "NVIDIA-A100-SXM4-80GB"},
	{name: "gpu-node-24g", gpus: 8, gpuMemMiB: 24576, product: "NVIDIA-A10G"},
}

type cluster struct {
	kube   kubernetes.Interface
	apiext apiextclient.Interface
}

func newCluster(kubeconfig string) (*cluster, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.QPS, cfg.Burst = 100, 200
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	apiext, err := apiextclient.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &cluster{kube: kube, apiext: apiext}, nil
}

func (n fakeNode) object() *corev1.Node {
	resources := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("32"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	labels := map[string]string{
		"kubernetes.io/hostname": n.name,
		"kubernetes.io/os":       "linux",
		"kubernetes.io/arch":     "amd64",
		"type":                   "kwok",
	}
	var taints []corev1.Taint
	if n.gpus > 0 {
		resources["nvidia.com/gpu"] = *resource.NewQuantity(int64(n.gpus), resource.DecimalSI)
		labels["nvidia.com/gpu.present"] = "true"
		labels["nvidia.com/gpu.product"] = n.product
		labels["nvidia.com/gpu.memory"] = fmt.Sprint(n.gpuMemMiB)
		labels["nvidia.com/gpu.count"] = fmt.Sprint(n.gpus)
		taints = append(taints, corev1.Taint{Key: "nvidia.com/gpu", Value: "present", Effect: corev1.TaintEffectNoSchedule})
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:        n.name,
			Labels:      labels,
			Annotations: map[string]string{"kwok.x-k8s.io/node": "fake"},
		},
		Spec: corev1.NodeSpec{Taints: taints},
		Status: corev1.NodeStatus{
			Capacity:    resources,
			Allocatable: resources,
			Phase:       corev1.NodeRunning,
		},
	}
}

func (c *cluster) createNodes(ctx context.Context) error {
	for _, n := range fakeNodes {
		if _, err := c.kube.CoreV1().Nodes().Create(ctx, n.object(), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating node %s: %w", n.name, err)
		}
	}
	return nil
}

func (c *cluster) createRuntimeClass(ctx context.Context) error {
	rc := &nodev1.RuntimeClass{ObjectMeta: metav1.ObjectMeta{Name: "nvidia"}, Handler: "nvidia"}
	if _, err := c.kube.NodeV1().RuntimeClasses().Create(ctx, rc, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating RuntimeClass nvidia: %w", err)
	}
	return nil
}

// installCRDs creates every CustomResourceDefinition found in the YAML files of dirs
// (other kinds in those files are skipped) and waits until all are Established.
func (c *cluster) installCRDs(ctx context.Context, dirs []string) error {
	var names []string
	for _, dir := range dirs {
		files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
		if err != nil {
			return err
		}
		sort.Strings(files)
		for _, file := range files {
			crds, err := readCRDs(file)
			if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			for _, crd := range crds {
				_, err := c.apiext.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{})
				if err != nil && !apierrors.IsAlreadyExists(err) {
					return fmt.Errorf("creating CRD %s from %s: %w", crd.Name, file, err)
				}
				names = append(names, crd.Name)
			}
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for _, name := range names {
		for {
			crd, err := c.apiext.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, name, metav1.GetOptions{})
			if err == nil && crdEstablished(crd) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("CRD %s not established after 60s (last error: %v)", name, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	fmt.Fprintf(os.Stderr, "k8senv: %d CRDs established\n", len(names))
	return nil
}

func crdEstablished(crd *apiextv1.CustomResourceDefinition) bool {
	for _, cond := range crd.Status.Conditions {
		if cond.Type == apiextv1.Established && cond.Status == apiextv1.ConditionTrue {
			return true
		}
	}
	return false
}

func readCRDs(file string) ([]*apiextv1.CustomResourceDefinition, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var crds []*apiextv1.CustomResourceDefinition
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return crds, nil
		}
		if err != nil {
			return nil, err
		}
		var meta metav1.TypeMeta
		if err := utilyaml.Unmarshal(doc, &meta); err != nil {
			return nil, err
		}
		if meta.Kind != "CustomResourceDefinition" {
			continue
		}
		crd := &apiextv1.CustomResourceDefinition{}
		if err := utilyaml.Unmarshal(doc, crd); err != nil {
			return nil, err
		}
		crds = append(crds, crd)
	}
}

func (c *cluster) waitNodesReady(ctx context.Context, sup *supervisor) error {
	var notReady []string
	err := pollUntil(ctx, sup, 60*time.Second, "the nodes to be Ready (see the kwok log)", func() (bool, error) {
		nodes, err := c.kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, nil
		}
		notReady = nil
		for _, n := range nodes.Items {
			if !nodeReady(&n) {
				notReady = append(notReady, n.Name)
			}
		}
		return len(nodes.Items) >= len(fakeNodes) && len(notReady) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("%w; not Ready: %s", err, strings.Join(notReady, ", "))
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, cond := range n.Status.Conditions {
		if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// waitServiceAccount waits for the controller manager to create the namespace's default
// ServiceAccount: pods cannot be created before it exists.
func (c *cluster) waitServiceAccount(ctx context.Context, sup *supervisor, namespace string) error {
	return pollUntil(ctx, sup, 60*time.Second, "ServiceAccount "+namespace+"/default", func() (bool, error) {
		_, err := c.kube.CoreV1().ServiceAccounts(namespace).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}
