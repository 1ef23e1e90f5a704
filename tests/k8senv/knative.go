package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// knativeAddr is the address the Knative components serve on: an address on lo that
// hack/with-cluster creates in the cluster's network namespace. Endpoints may not hold
// loopback addresses, and the apiserver reaches webhooks through their endpoints.
const knativeAddr = "10.255.255.1"

// knativeWebhookConfigs are the webhook configurations Knative's webhook fills in.
var knativeWebhookConfigs = struct{ mutating, validating []string }{
	mutating:   []string{"webhook.serving.knative.dev"},
	validating: []string{"validation.webhook.serving.knative.dev", "config.webhook.serving.knative.dev"},
}

// startKnative applies Knative's namespace and ConfigMaps, starts its controller, autoscaler
// and webhook as local processes, registers the webhook and waits until each serves.
func startKnative(ctx context.Context, sup *supervisor, c *cluster, kubeconfig, binDir, manifests string) error {
	if err := kubectlApply(ctx, kubeconfig, filepath.Join(manifests, "10-core")); err != nil {
		return err
	}
	env := func(name string, profilingPort int, extra ...string) []string {
		return append([]string{
			"KUBECONFIG=" + kubeconfig,
			"SYSTEM_NAMESPACE=knative-serving",
			"POD_NAME=" + name + "-local",
			"CONFIG_LOGGING_NAME=config-logging",
			"CONFIG_OBSERVABILITY_NAME=config-observability",
			// Each component has a profiling server; they share one network namespace.
			fmt.Sprintf("PROFILING_PORT=%d", profilingPort),
		}, extra...)
	}
	components := []struct {
		name, binary string
		env          []string
	}{
		{"knative-webhook", "knative-webhook", env("webhook", 8008, "WEBHOOK_NAME=webhook", "WEBHOOK_PORT=8443")},
		{"knative-controller", "kinfer-knative-controller", env("controller", 8009)},
		{"knative-autoscaler", "knative-autoscaler", env("autoscaler", 8010, "POD_IP="+knativeAddr)},
	}
	for _, comp := range components {
		if err := sup.startRestartable(filepath.Join(binDir, comp.binary), comp.name, comp.env); err != nil {
			return err
		}
	}
	// The stat server answers kubelet probes without upgrading to a websocket.
	if err := waitHTTPHeader(ctx, sup, "http://"+knativeAddr+":8080/", "K-Kubelet-Probe", "probe", nil, 90*time.Second); err != nil {
		return fmt.Errorf("knative autoscaler: %w", err)
	}
	if err := kubectlApply(ctx, kubeconfig, filepath.Join(manifests, "20-webhooks")); err != nil {
		return err
	}
	if err := c.waitWebhookCABundles(ctx, sup); err != nil {
		return err
	}
	// Admission works end to end once a Knative object passes the defaulting webhook.
	return c.waitKnativeAdmission(ctx, sup)
}

func kubectlApply(ctx context.Context, kubeconfig, dir string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, self, "kubectl", "--kubeconfig", kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("kubectl apply -f %s: %w\n%s", dir, err, out)
	}
	return nil
}

func (c *cluster) waitWebhookCABundles(ctx context.Context, sup *supervisor) error {
	return pollUntil(ctx, sup, 90*time.Second, "Knative's webhook configurations to get a caBundle", func() (bool, error) {
		for _, name := range knativeWebhookConfigs.mutating {
			cfg, err := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, name, metav1.GetOptions{})
			if err != nil || len(cfg.Webhooks) == 0 || len(cfg.Webhooks[0].ClientConfig.CABundle) == 0 {
				return false, nil
			}
		}
		for _, name := range knativeWebhookConfigs.validating {
			cfg, err := c.kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(ctx, name, metav1.GetOptions{})
			if err != nil || len(cfg.Webhooks) == 0 || len(cfg.Webhooks[0].ClientConfig.CABundle) == 0 {
				return false, nil
			}
		}
		return true, nil
	})
}

// waitKnativeAdmission dry-runs the creation of a Knative Service until the webhook admits it.
func (c *cluster) waitKnativeAdmission(ctx context.Context, sup *supervisor) error {
	body := []byte(`{"apiVersion":"serving.knative.dev/v1","kind":"Service","metadata":{"name":"admission-check","namespace":"default"},"spec":{"template":{"spec":{"containers":[{"image":"dev.local/check"}]}}}}`)
	var last error
	err := pollUntil(ctx, sup, 60*time.Second, "Knative's webhook to admit a Service", func() (bool, error) {
		last = c.kube.CoreV1().RESTClient().Post().
			AbsPath("/apis/serving.knative.dev/v1/namespaces/default/services").
			Param("dryRun", "All").
			Body(body).
			Do(ctx).Error()
		return last == nil, nil
	})
	if err != nil {
		return fmt.Errorf("%w (last error: %v)", err, last)
	}
	return nil
}

func waitHTTPHeader(ctx context.Context, sup *supervisor, url, header, value string, tlsConfig *tls.Config, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	return pollUntil(ctx, sup, timeout, url, func() (bool, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false, err
		}
		if header != "" {
			req.Header.Set(header, value)
		}
		resp, err := client.Do(req)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// pollUntil calls check every 200 ms until it returns true, fails, the timeout passes or a
// component dies.
func pollUntil(ctx context.Context, sup *supervisor, timeout time.Duration, what string, check func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := check()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s", timeout, what)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case name := <-sup.died:
			return fmt.Errorf("%s exited; see %s", name, filepath.Join(sup.logDir, name+".log"))
		case <-time.After(200 * time.Millisecond):
		}
	}
}
