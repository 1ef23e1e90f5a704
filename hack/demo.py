"""kinfer's demo, run by `make demo` inside `hack/with-cluster --kinfer`.

It tells the story with real objects on the local control plane: a model Service placed on a
GPU node by the webhook, a WarmPool filling, load read by the autoscaler plugin driving
Knative's KPA, and scale-from-zero with and without warm pods. Everything it prints comes from
the cluster or from the processes it runs; what the local control plane simulates is said at
the start and again at the end.
"""

import csv
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "demo-output")
NS = "demo"
SERVICE = "iris"
LOAD_TIME = "20s"
AUTOSCALER_URL = "ws://10.255.255.1:8080"
CONCURRENCY = 8
# Knative's autoscaler holds *:8080 in the cluster's network namespace, so the wrappers that
# stand in for the pods' containers serve on 18080 (the plugin scrapes that port here).
WRAPPER_PORT = 18080
START = time.monotonic()


def now():
    return time.monotonic() - START


def say(text=""):
    print(text, flush=True)


def step(title):
    say()
    say(f"=== [{now():6.1f}s] {title}")


def kubectl(*args, stdin=None, check=True):
    result = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result


def kjson(*args):
    return json.loads(kubectl(*args, "-o", "json").stdout)


def condition(pod, kind):
    return any(
        c["type"] == kind and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def ready(pod):
    return condition(pod, "Ready")


def loaded(pod):
    """A warm pod has loaded its model (its containers are ready); it is not Ready, and takes
    no traffic, until it is handed off: its readiness gate opens then."""
    return condition(pod, "ContainersReady")


def revision_pods(revision):
    """The revision's own pods: its ReplicaSet's, handed-off warm pods included. Warm pods
    still in the pool carry the revision label (they are built from its template) but are
    not the revision's until handed off."""
    return kjson("get", "pods", "-n", NS, "-l",
                 f"serving.knative.dev/revision={revision},kinfer.dev/pool-state!=warm")["items"]


def warm_pods():
    return kjson("get", "pods", "-n", NS, "-l", "kinfer.dev/pool-state=warm")["items"]


def replicas(revision):
    result = kubectl("get", "deployment", "-n", NS, f"{revision}-deployment",
                     "-o", "jsonpath={.spec.replicas}", check=False)
    return int(result.stdout or 0)


def wait(what, predicate, timeout=180, interval=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


class Timeline(threading.Thread):
    """Samples replicas, ready revision pods and warm pods twice a second, for the plot."""

    def __init__(self, revision):
        super().__init__(daemon=True)
        self.revision = revision
        self.samples = []
        self.marks = []
        self.stopped = threading.Event()

    def mark(self, label):
        self.marks.append((now(), label))

    def run(self):
        while not self.stopped.is_set():
            try:
                pods = revision_pods(self.revision)
                warm = warm_pods()
                self.samples.append((
                    now(),
                    replicas(self.revision),
                    sum(1 for p in pods if ready(p) and not p["metadata"].get("deletionTimestamp")),
                    sum(1 for p in warm if loaded(p)),
                ))
            except (RuntimeError, json.JSONDecodeError):
                pass
            self.stopped.wait(0.5)


class Backends(threading.Thread):
    """Runs a real kinfer-wrapper with the real model at each running revision pod's IP.

    The pods are KWOK's fakes: they have addresses but no processes. Binding a wrapper to the
    pod's address (added to this network namespace's loopback) makes the pod answer for real,
    so the autoscaler plugin scrapes real wrapper metrics from the pod IPs it discovers.
    """

    def __init__(self, revision):
        super().__init__(daemon=True)
        self.revision = revision
        self.procs = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def addresses(self):
        with self.lock:
            return list(self.procs)

    def run(self):
        while not self.stopped.is_set():
            try:
                live = {p["status"].get("podIP") for p in revision_pods(self.revision)
                        if p.get("status", {}).get("phase") == "Running"
                        and not p["metadata"].get("deletionTimestamp")}
            except RuntimeError:
                live = set(self.procs)
            live.discard(None)
            for ip in live - set(self.procs):
                self.launch(ip)
            for ip in set(self.procs) - live:
                self.stop_one(ip)
            self.stopped.wait(0.5)
        for ip in list(self.procs):
            self.stop_one(ip)

    def launch(self, ip):
        subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True)
        log = open(os.path.join(OUT, f"wrapper-{ip}.log"), "w")
        env = dict(os.environ, MODEL_PATH=os.path.join(OUT, "iris-model.pkl"),
                   PYTHONPATH=os.path.join(ROOT, "hack", "demo"))
        proc = subprocess.Popen(
            [os.path.join(ROOT, "target", "debug", "kinfer-wrapper"),
             "--handler", "iris_model:predict", "--model-name", "iris",
             "--address", ip, "--port", str(WRAPPER_PORT),
             "--python", os.path.join(ROOT, ".venv", "bin", "python")],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        # Serve only once the model has loaded (the wrapper's readiness).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{ip}:{WRAPPER_PORT}/v2/health/ready", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        with self.lock:
            self.procs[ip] = proc

    def stop_one(self, ip):
        with self.lock:
            proc = self.procs.pop(ip)
        proc.terminate()
        proc.wait(timeout=30)


class Load(threading.Thread):
    """Closed-loop clients sending real inference requests, spread over the live pods as a
    load balancer would."""

    def __init__(self, backends, clients):
        super().__init__(daemon=True)
        self.backends = backends
        self.clients = clients
        self.stopped = threading.Event()
        self.ok = 0
        self.errors = 0
        self.lock = threading.Lock()

    def client(self):
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                                       "data": [5.9, 3.0, 5.1, 1.8]}]}).encode()
        while not self.stopped.is_set():
            addresses = self.backends.addresses()
            if not addresses:
                time.sleep(0.1)
                continue
            ip = random.choice(addresses)
            request = urllib.request.Request(f"http://{ip}:{WRAPPER_PORT}/v2/models/iris/infer", data=body,
                                             headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    json.load(response)
                with self.lock:
                    self.ok += 1
            except (urllib.error.URLError, OSError, ValueError):
                with self.lock:
                    self.errors += 1
                time.sleep(0.05)

    def run(self):
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def poke(revision, seconds):
    """Knative's activator reports the first request for a scaled-to-zero revision to the
    KPA; this cluster has no activator, so kpa-poke sends that same report."""
    return subprocess.Popen(
        [os.path.join(ROOT, "target", "debug", "kpa-poke"), "--url", AUTOSCALER_URL,
         "--namespace", NS, "--revision", revision, "--concurrency", "1",
         "--seconds", str(seconds)])


def scale_from_zero(revision, timeline, label):
    """Time from the first request's report to the first Ready pod of the revision."""
    timeline.mark(f"first request ({label})")
    started = time.monotonic()
    reporter = poke(revision, 8)
    pod = wait("a Ready pod", lambda: next(
        (p for p in revision_pods(revision) if ready(p)), None), timeout=120, interval=0.1)
    elapsed = time.monotonic() - started
    reporter.wait()
    handed_off = pod["metadata"].get("labels", {}).get("kinfer.dev/pool-state") == "handed-off"
    say(f"  {label}: pod {pod['metadata']['name']} Ready {elapsed:.1f}s after the first request"
        f" ({'a handed-off warm pod' if handed_off else 'a cold pod that loaded its model'})")
    return elapsed


def wait_for_zero(revision, timeline):
    say("  waiting for the KPA to scale the revision to zero "
        "(stable window 6 s, then Knative's scale-to-zero grace period)")
    started = time.monotonic()
    wait("scale to zero", lambda: replicas(revision) == 0 and not revision_pods(revision),
         timeout=240, interval=0.5)
    timeline.mark("scaled to zero")
    say(f"  scaled to zero after {time.monotonic() - started:.0f}s")


def simulated():
    say("What the local control plane simulates (everything else is the real thing):")
    say("  - nodes and pods are KWOK fakes: GPU nodes advertise nvidia.com/gpu and GPU Feature")
    say("    Discovery labels, but there is no GPU and no container runtime;")
    say(f"  - a pod turns Ready {LOAD_TIME} after it starts (test.kinfer.dev/load-time), standing in")
    say("    for the model's load time; the model's answers come from real kinfer-wrapper")
    say("    processes bound to the pods' IPs, running the real model (plus 50 ms of sleep")
    say("    for GPU inference time);")
    say("  - Knative Serving (controller, autoscaler/KPA, webhook) is real; its networking layer")
    say("    is a test double and there is no activator, so the demo reports the first request")
    say("    to the KPA the way the activator would (kpa-poke).")


def service_yaml():
    return f"""apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: {SERVICE}
  namespace: {NS}
spec:
  template:
    metadata:
      annotations:
        kinfer.dev/accelerator: gpu
        kinfer.dev/model-memory: 40Gi
        kinfer.dev/handler: iris_model:predict
        kinfer.dev/autoscaling: requests
        autoscaling.knative.dev/target: "2"
        autoscaling.knative.dev/window: 6s
        autoscaling.knative.dev/min-scale: "0"
        test.kinfer.dev/load-time: {LOAD_TIME}
    spec:
      containers:
      - image: dev.local/iris-model
"""


def show_placement(revision):
    pod = revision_pods(revision)[0]
    spec = pod["spec"]
    user = next(c for c in spec["containers"] if c["name"] != "queue-proxy")
    node = kjson("get", "node", spec["nodeName"])
    labels = node["metadata"]["labels"]
    say(f"  pod {pod['metadata']['name']} runs on node {spec['nodeName']} "
        f"({labels.get('nvidia.com/gpu.product')}, {labels.get('nvidia.com/gpu.memory')} MiB GPU memory)")
    say(f"  user container limits: {user.get('resources', {}).get('limits')}"
        "   <- kinfer.dev/accelerator: gpu (gpu-count 1)")
    tolerations = [t for t in spec.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    say(f"  tolerations: {tolerations}   <- GPU nodes' taint, from kinfer-config")
    say(f"  runtimeClassName: {spec.get('runtimeClassName')}   <- from kinfer-config")
    terms = spec.get("affinity", {}).get("nodeAffinity", {}) \
        .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    expressions = [e for t in terms for e in t.get("matchExpressions", [])]
    say(f"  required node affinity: {expressions}   <- kinfer.dev/model-memory: 40Gi "
        "(so not the 24 GB node)")
    say(f"  init containers: {[c['name'] for c in spec.get('initContainers', [])]}, "
        f"user command: {user.get('command')} {user.get('args', [])}   <- kinfer.dev/handler")
    deployment = kjson("get", "deployment", "-n", NS, "-l",
                       f"serving.knative.dev/revision={revision}")["items"][0]
    placed = deployment["spec"]["template"]["metadata"]["labels"].get("kinfer.dev/placed")
    say(f"  all of it was set once, on Deployment {deployment['metadata']['name']}'s pod template "
        f"(kinfer.dev/placed: {placed}), so every pod of the revision starts without an "
        "admission call")


def plot(timeline, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in timeline.samples]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.step(t, [s[1] for s in timeline.samples], where="post", label="desired replicas (KPA)")
    ax.step(t, [s[2] for s in timeline.samples], where="post", label="ready revision pods")
    ax.step(t, [s[3] for s in timeline.samples], where="post", label="loaded warm pods",
            linestyle="--")
    for at, label in timeline.marks:
        ax.axvline(at, color="grey", linewidth=0.6)
        ax.text(at, ax.get_ylim()[1] * 0.98, label, rotation=90, fontsize=7,
                va="top", ha="right", color="grey")
    ax.set_xlabel("seconds since the demo started")
    ax.set_ylabel("pods")
    ax.set_title(f"kinfer demo: {SERVICE} (model load time {LOAD_TIME}, local control plane)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    os.makedirs(OUT, exist_ok=True)
    say("kinfer demo on the local control plane")
    simulated()
    kubectl("create", "namespace", NS)

    step("1. kn service create: a model Service on a GPU, with a handler "
         "(kn is not in the Go module proxy, so the same Service is applied as YAML)")
    say(service_yaml())
    bad = kubectl("apply", "-f", "-", stdin=service_yaml().replace(
        "kinfer.dev/accelerator: gpu", "kinfer.dev/accelerator: gpus"), check=False)
    say("  first with a typo, kinfer.dev/accelerator: gpus -- the webhook rejects it at once:")
    say("  " + bad.stderr.strip().replace("\n", "\n  "))
    started = time.monotonic()
    applied = kubectl("apply", "-f", "-", stdin=service_yaml())
    for line in applied.stderr.strip().splitlines():
        say(f"  {line}")
    kubectl("wait", f"ksvc/{SERVICE}", "-n", NS, "--for=condition=Ready", "--timeout=180s")
    revision = kjson("get", "ksvc", SERVICE, "-n", NS)["status"]["latestReadyRevisionName"]
    say(f"  Service Ready in {time.monotonic() - started:.1f}s (revision {revision}; "
        f"the pod's model load takes {LOAD_TIME})")
    say("  where the webhook placed it, and why:")
    show_placement(revision)

    timeline = Timeline(revision)
    timeline.start()
    backends = Backends(revision)
    backends.start()

    step("2. a WarmPool for the Service: two pods loaded ahead of demand")
    pool = {"apiVersion": "kinfer.dev/v1alpha1", "kind": "WarmPool",
            "metadata": {"name": SERVICE, "namespace": NS},
            "spec": {"configurationRef": {"name": SERVICE}, "minReady": 2, "maxReady": 2,
                     "sizing": "fixed"}}
    kubectl("apply", "-f", "-", stdin=json.dumps(pool))
    timeline.mark("WarmPool created")
    last = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        table = kubectl("get", "wp", "-n", NS).stdout.strip()
        if table != last:
            say(f"  [{now():6.1f}s]\n  " + table.replace("\n", "\n  "))
            last = table
        status = kjson("get", "wp", SERVICE, "-n", NS).get("status", {})
        if status.get("readyReplicas", 0) >= 2:
            break
        time.sleep(1)

    step(f"3. load: {CONCURRENCY} clients send real inference requests; the autoscaler plugin "
         "reads the wrappers' in-flight requests and feeds the KPA")
    say("  the revision may be at zero by now (nothing asked for it): the first requests wake it,")
    say("  which the activator would report to the KPA; the pool's warm pods take the traffic")
    timeline.mark("load starts")
    load = Load(backends, CONCURRENCY)
    load.start()
    wake = poke(revision, 6)
    peak = 0
    for _ in range(10):
        time.sleep(5)
        pods = revision_pods(revision)
        peak = max(peak, replicas(revision))
        say(f"  [{now():6.1f}s] desired replicas {replicas(revision)}, ready pods "
            f"{sum(1 for p in pods if ready(p))}, warm pods loaded "
            f"{sum(1 for p in warm_pods() if loaded(p))}, requests answered {load.ok} "
            f"(errors {load.errors})")
    load.stopped.set()
    wake.wait()
    timeline.mark("load stops")
    say(f"  the KPA scaled the revision up to {peak} pods on the plugin's reports")
    wait_for_zero(revision, timeline)

    step("4. scale from zero: first with the warm pool, then without it")
    wait("a loaded warm pod", lambda: any(loaded(p) for p in warm_pods()), timeout=120)
    warm = scale_from_zero(revision, timeline, "with the pool")
    wait_for_zero(revision, timeline)
    kubectl("delete", "wp", SERVICE, "-n", NS)
    timeline.mark("WarmPool deleted")
    wait("the warm pods to go", lambda: not warm_pods(), timeout=60)
    cold = scale_from_zero(revision, timeline, "without the pool")
    say()
    say("  time to a Ready pod after the first request")
    say("  | start                 | seconds |")
    say("  |-----------------------|---------|")
    say(f"  | cold (no warm pool)   | {cold:7.1f} |")
    say(f"  | warm (WarmPool)       | {warm:7.1f} |")
    say(f"  warm is {cold / warm:.1f}x faster (model load time {LOAD_TIME})")

    step("5. the plot")
    time.sleep(3)
    timeline.stopped.set()
    backends.stopped.set()
    timeline.join()
    backends.join(timeout=60)
    with open(os.path.join(OUT, "timeline.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seconds", "desired_replicas", "ready_revision_pods", "loaded_warm_pods"])
        writer.writerows(timeline.samples)
    png = os.path.join(OUT, "kinfer-demo.png")
    plot(timeline, png)
    say(f"  replicas and warm pods over time: {png} (data: {os.path.join(OUT, 'timeline.csv')})")
    say()
    simulated()
    say(f"demo finished in {now():.0f}s")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        sys.exit(1)
