// Command k8senv is kinfer's local Kubernetes control plane: one multi-call binary that
// runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the
// upstream Go modules (each as its own process, never in one process: their signal handlers
// and global registries clash), plus `up`, which starts them all with KWOK-managed fake
// nodes and waits until the cluster is usable.
//
// Invoked as `kubectl` (through a symlink) it is kubectl.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/component-base/cli"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	// As in the upstream mains: JSON logging and client-go metrics registration.
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
)

const usage = `k8senv: kinfer's local Kubernetes control plane (Kubernetes from the Go module proxy).

Usage:
  k8senv up --dir DIR [--kwok PATH] [--crds DIR]...   start a whole cluster, write DIR/ready, run until SIGTERM
  k8senv etcd --data-dir DIR --client-url URL --peer-url URL
  k8senv kube-apiserver|kube-controller-manager|kube-scheduler|kubectl [ARGS...]
`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name != "kubectl" {
		if len(args) == 0 {
			fmt.Fprint(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	os.Args = append([]string{name}, args...)
	switch name {
	case "up":
		os.Exit(runUp(args))
	case "etcd":
		os.Exit(runEtcd(args))
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubectl":
		command := kubectlcmd.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "k8senv: unknown command %q\n\n%s", name, usage)
		os.Exit(2)
	}
}
