package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Fixed ports are safe: every cluster runs in its own network namespace.
const (
	etcdClientURL = "http://127.0.0.1:2379"
	etcdPeerURL   = "http://127.0.0.1:2380"
	apiserverPort = 6443
	kcmPort       = 10257
	schedulerPort = 10259
	serviceCIDR   = "10.96.0.0/16"
	podCIDR       = "10.244.0.0/16"
)

//go:embed stages/stages.yaml
var kwokStages []byte

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// runUp starts a whole cluster, writes DIR/ready once it is usable and runs until SIGTERM
// or SIGINT, or until a component dies; then it stops every component, newest first.
func runUp(args []string) int {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory: credentials, kubeconfig, etcd data, component logs")
	kwok := fs.String("kwok", "", "path of the kwok binary (default: next to this binary)")
	var crdDirs stringList
	fs.Var(&crdDirs, "crds", "directory of CRD YAML files to install and wait for (repeatable)")
	knativeBin := fs.String("knative-bin", "", "directory with the Knative Serving binaries; empty: no Knative")
	knativeManifests := fs.String("knative-manifests", "", "directory of Knative manifests (hack/knative-manifests.sh)")
	_ = fs.Parse(args)
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "up: --dir is required")
		return 2
	}
	if *kwok == "" {
		self, _ := os.Executable()
		*kwok = filepath.Join(filepath.Dir(self), "kwok")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	sup := &supervisor{
		logDir: filepath.Join(*dir, "logs"),
		pidDir: filepath.Join(*dir, "pids"),
		died:   make(chan string, 8),
	}
	err := bringUp(ctx, sup, *dir, *kwok, crdDirs, *knativeBin, *knativeManifests)
	if err == nil {
		select {
		case <-ctx.Done():
		case name := <-sup.died:
			err = fmt.Errorf("%s exited unexpectedly; see %s", name, filepath.Join(sup.logDir, name+".log"))
		}
	}
	sup.stopAll()
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "k8senv up:", err)
		return 1
	}
	return 0
}

func bringUp(ctx context.Context, sup *supervisor, dir, kwok string, crdDirs []string, knativeBin, knativeManifests string) error {
	start := time.Now()
	step := func(what string) { fmt.Fprintf(os.Stderr, "k8senv: %-40s %6.1fs\n", what, time.Since(start).Seconds()) }
	p := pki{dir: filepath.Join(dir, "pki")}
	if err := p.generate(net.ParseIP("10.96.0.1")); err != nil {
		return fmt.Errorf("generating credentials: %w", err)
	}
	kubeconfig := filepath.Join(dir, "admin.kubeconfig")
	server := fmt.Sprintf("https://127.0.0.1:%d", apiserverPort)
	if err := p.writeKubeconfig(kubeconfig, server); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}

	if err := sup.start(self, "etcd", "--data-dir", filepath.Join(dir, "etcd"), "--client-url", etcdClientURL, "--peer-url", etcdPeerURL); err != nil {
		return err
	}
	if err := waitHTTP(ctx, sup, etcdClientURL+"/health", nil, 60*time.Second); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	step("etcd healthy")

	if err := sup.start(self, "kube-apiserver",
		"--etcd-servers="+etcdClientURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", apiserverPort),
		"--tls-cert-file="+p.path("apiserver.crt"),
		"--tls-private-key-file="+p.path("apiserver.key"),
		"--client-ca-file="+p.path("ca.crt"),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+p.path("sa.pub"),
		"--service-account-signing-key-file="+p.path("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true",
		// No kube-proxy or real node network here: keep 127.0.0.1 out of the kubernetes Endpoints.
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		// Webhook Services resolve to their endpoints, not to ClusterIPs nothing here routes.
		"--enable-aggregator-routing=true",
	); err != nil {
		return err
	}
	adminTLS, err := p.adminTLS()
	if err != nil {
		return err
	}
	if err := waitHTTP(ctx, sup, server+"/readyz", adminTLS, 120*time.Second); err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	step("kube-apiserver ready")

	common := []string{"--kubeconfig=" + kubeconfig, "--leader-elect=false", "--bind-address=127.0.0.1",
		"--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"}
	if err := sup.start(self, "kube-controller-manager", append(common,
		fmt.Sprintf("--secure-port=%d", kcmPort),
		"--root-ca-file="+p.path("ca.crt"),
		"--service-account-private-key-file="+p.path("sa.key"),
		"--cluster-signing-cert-file="+p.path("ca.crt"),
		"--cluster-signing-key-file="+p.path("ca.key"),
		"--use-service-account-credentials=true",
		"--authentication-kubeconfig="+kubeconfig,
		"--authorization-kubeconfig="+kubeconfig,
	)...); err != nil {
		return err
	}
	if err := sup.start(self, "kube-scheduler", append(common,
		fmt.Sprintf("--secure-port=%d", schedulerPort),
		"--authentication-kubeconfig="+kubeconfig,
		"--authorization-kubeconfig="+kubeconfig,
	)...); err != nil {
		return err
	}

	c, err := newCluster(kubeconfig)
	if err != nil {
		return err
	}
	if err := c.createNodes(ctx); err != nil {
		return err
	}
	if err := c.createRuntimeClass(ctx); err != nil {
		return err
	}
	stagesPath := filepath.Join(dir, "kwok-stages.yaml")
	if err := os.WriteFile(stagesPath, kwokStages, 0o644); err != nil {
		return err
	}
	if err := sup.start(kwok,
		"kwok",
		"--kubeconfig="+kubeconfig,
		"--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
		"--cidr="+podCIDR,
		"--node-ip=10.240.0.1",
		"--node-lease-duration-seconds=40",
		"--config="+stagesPath,
	); err != nil {
		return err
	}
	if err := c.installCRDs(ctx, crdDirs); err != nil {
		return err
	}
	step("CRDs established")
	if err := c.waitNodesReady(ctx, sup); err != nil {
		return err
	}
	if err := c.waitServiceAccount(ctx, sup, "default"); err != nil {
		return err
	}
	for _, hz := range []string{fmt.Sprintf("https://127.0.0.1:%d/healthz", kcmPort), fmt.Sprintf("https://127.0.0.1:%d/healthz", schedulerPort)} {
		if err := waitHTTP(ctx, sup, hz, &tls.Config{InsecureSkipVerify: true}, 60*time.Second); err != nil {
			return err
		}
	}
	step("nodes Ready, controllers healthy")
	if knativeBin != "" {
		if err := startKnative(ctx, sup, c, kubeconfig, knativeBin, knativeManifests); err != nil {
			return err
		}
		step("Knative Serving ready")
	}
	return os.WriteFile(filepath.Join(dir, "ready"), []byte(kubeconfig+"\n"), 0o644)
}

func (p pki) adminTLS() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(p.path("admin.crt"), p.path("admin.key"))
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(p.path("ca.crt"))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}, nil
}

// waitHTTP polls url until it answers 200, the deadline passes or a component dies.
func waitHTTP(ctx context.Context, sup *supervisor, url string, tlsConfig *tls.Config, timeout time.Duration) error {
	return waitHTTPHeader(ctx, sup, url, "", "", tlsConfig, timeout)
}

// supervisor runs the components as child processes, each logging to its own file and
// with its current PID in pids/NAME.pid (tests signal components through it).
type supervisor struct {
	logDir string
	pidDir string
	procs  []*proc
	died   chan string
	// stopping is set once shutdown begins, so expected exits are not reported as deaths.
	stopping atomic.Bool
}

type proc struct {
	name string
	mu   sync.Mutex
	cmd  *exec.Cmd // the current process; replaced when a restartable component restarts
	// done is closed once the component has exited for good.
	done chan struct{}
}

func (p *proc) current() *exec.Cmd {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd
}

func (s *supervisor) start(path, name string, args ...string) error {
	return s.launch(path, name, nil, false, args...)
}

// startEnv starts a component with extra environment variables.
func (s *supervisor) startEnv(path, name string, env []string, args ...string) error {
	return s.launch(path, name, env, false, args...)
}

// startRestartable starts a component that is restarted whenever it exits, as the kubelet
// restarts a Deployment's container: Knative's components, so that tests can restart one
// (SIGTERM through its PID file) the way a rollout does. Other components' deaths end the
// cluster, loudly.
func (s *supervisor) startRestartable(path, name string, env []string, args ...string) error {
	return s.launch(path, name, env, true, args...)
}

func (s *supervisor) launch(path, name string, env []string, restart bool, args ...string) error {
	p := &proc{name: name, done: make(chan struct{})}
	log, err := s.spawn(p, path, env, args, os.O_TRUNC)
	if err != nil {
		return err
	}
	s.procs = append(s.procs, p)
	go func() {
		for {
			err := p.current().Wait()
			log.Close()
			if !restart || s.stopping.Load() {
				break
			}
			fmt.Fprintf(os.Stderr, "k8senv: %s exited (%v); restarting it\n", name, err)
			time.Sleep(200 * time.Millisecond)
			if s.stopping.Load() {
				break
			}
			if log, err = s.spawn(p, path, env, args, os.O_APPEND); err != nil {
				fmt.Fprintf(os.Stderr, "k8senv: restarting %s: %v\n", name, err)
				break
			}
		}
		close(p.done)
		if !s.stopping.Load() {
			s.died <- name
		}
	}()
	return nil
}

// spawn starts the component's process and records its PID; the caller closes the log.
func (s *supervisor) spawn(p *proc, path string, env, args []string, logMode int) (*os.File, error) {
	for _, dir := range []string{s.logDir, s.pidDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, err
		}
	}
	log, err := os.OpenFile(filepath.Join(s.logDir, p.name+".log"), os.O_CREATE|os.O_WRONLY|logMode, 0o644)
	if err != nil {
		return nil, err
	}
	argv := args
	if filepath.Base(path) != p.name {
		argv = append([]string{p.name}, args...)
	}
	cmd := exec.Command(path, argv...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), env...)
	// Its own process group, so a Ctrl-C at the terminal reaches only `up`, which then
	// stops the components in order; and killed with `up` if `up` itself is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("starting %s: %w", p.name, err)
	}
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	pidFile := filepath.Join(s.pidDir, p.name+".pid")
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644); err != nil {
		return nil, err
	}
	if s.stopping.Load() {
		// Shutdown began while it was starting: stopAll may have signalled its predecessor.
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	return log, nil
}

// stopAll stops the components newest first: kwok and the controllers before the
// apiserver, the apiserver before etcd.
func (s *supervisor) stopAll() {
	s.stopping.Store(true)
	for i := len(s.procs) - 1; i >= 0; i-- {
		p := s.procs[i]
		_ = p.current().Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			fmt.Fprintf(os.Stderr, "k8senv: %s did not stop in 5s, killing it\n", p.name)
			_ = p.current().Process.Kill()
			<-p.done
		}
	}
}
