"""kinfer-wrapper vs KServe's Python ModelServer, same function, same machine.

Prints, per server: throughput at a fixed p99 (the best closed-loop throughput whose p99 stays
under --p99-target-ms) and p99 at a fixed load (open-loop, the same request rate for all),
then the ratios against KServe.
"""

import argparse
import json
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import loadgen

JSON = {"content-type": "application/json"}
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, env, log):
    # Logs go to a file: an unread pipe would fill up and stall the server.
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited; see %s" % (cmd[0], log.name))
        try:
            if requests.get("http://127.0.0.1:%d/v2/health/ready" % port, timeout=1).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("%s not ready" % cmd)


def cpu_seconds(pid):
    """User+system CPU of a process and all its descendants (the wrapper's Python workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, total, grew = {pid}, 0, True
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    return sum(stats[p][1] for p in tree if p in stats) / ticks


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wrapper", default=str(ROOT / "target" / "release" / "kinfer-wrapper"))
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--p99-target-ms", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=0, help="fixed load in req/s (default: 70%% of KServe's throughput at the p99 target)")
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median is reported")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    tmp = Path(tempfile.mkdtemp())
    with open(tmp / "iris.pkl", "wb") as f:
        pickle.dump(model, f)
    env = dict(os.environ, MODEL_PATH=str(tmp / "iris.pkl"), KINFER_PYTHON=sys.executable, KINFER_LOG="warn")
    log = open(tmp / "servers.log", "w")
    print("server logs: %s" % log.name)
    bodies = [json.dumps({"id": str(i), "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": row.tolist()}]}).encode()
              for i, row in enumerate(x)]
    expected = model.predict(x).tolist()

    def servers(port):
        wrapper = [a.wrapper, "--handler", "iris_handler:predict", "--model-name", "iris",
                   "--port", str(port), "--address", "127.0.0.1"]
        return {
            "kserve": [sys.executable, "kserve_server.py", "--port", str(port)],
            "kinfer": wrapper,
            "kinfer-batched": wrapper + ["--max-batch-size", "32", "--max-batch-delay", "1ms"],
        }

    levels = [int(c) for c in a.concurrency.split(",")]
    names = list(servers(0))
    print("CPUs: %d; %gs per point, %d repeats (servers interleaved, medians shown); "
          "one Python process per server; p99 target %g ms"
          % (os.cpu_count(), a.duration, a.repeats, a.p99_target_ms))

    def with_server(name, fn):
        port = free_port()
        proc = start(servers(port)[name], port, env, log)
        try:
            reqs = loadgen.build_requests("127.0.0.1", port, "/v2/models/iris/infer", bodies)
            return fn(port, reqs, proc.pid)
        finally:
            stop(proc)

    def check(name):
        def fn(port, reqs, pid):
            url = "http://127.0.0.1:%d/v2/models/iris/infer" % port
            answers = [requests.post(url, data=b, headers=JSON, timeout=10).json() for b in bodies]
            if "outputs" not in answers[0]:
                raise RuntimeError("%s: unexpected answer %r" % (name, answers[0]))
            got = [r["outputs"][0]["data"][0] for r in answers]
            assert got == expected, "%s answers differ from model.predict" % name
        with_server(name, fn)

    def sweep(port, reqs, pid):
        loadgen.run(loadgen.closed_loop("127.0.0.1", port, reqs, 4, 0.5, warmup=0.2))  # warm up
        points = []
        for c in levels:
            cpu0 = cpu_seconds(pid)
            r = loadgen.run(loadgen.closed_loop("127.0.0.1", port, reqs, c, a.duration))
            # Server CPU per request: a capacity measure that other load on the machine barely moves.
            r["cpu_us"] = (cpu_seconds(pid) - cpu0) / max(r["sent"], 1) * 1e6
            points.append(r)
        return points

    def median_point(runs):
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    for name in names:
        check(name)
    print("all servers answer exactly model.predict on the 150 iris rows")

    sweeps = {name: [] for name in names}
    for _ in range(a.repeats):
        for name in names:
            sweeps[name].append(with_server(name, sweep))
    results = {}
    for name in names:
        points = [median_point([run[i] for run in sweeps[name]]) for i in range(len(levels))]
        for c, r in zip(levels, points):
            r["concurrency"] = c
            print("  %-15s c=%-3d %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  server CPU %6.0f us/req  errors %d"
                  % (name, c, r["rps"], r["p50_ms"], r["p99_ms"], r["cpu_us"], r["errors"]))
        ok = [r for r in points if r["p99_ms"] <= a.p99_target_ms and r["errors"] == 0]
        results[name] = {"sweep": points, "best": max(ok, key=lambda r: r["rps"]) if ok else None}

    kserve_best = results["kserve"]["best"]
    rate = a.rate or (0.7 * kserve_best["rps"] if kserve_best else 100.0)

    def fixed(port, reqs, pid):
        loadgen.run(loadgen.closed_loop("127.0.0.1", port, reqs, 4, 0.5, warmup=0.2))  # warm up
        return loadgen.run(loadgen.open_loop("127.0.0.1", port, reqs, rate, a.duration))

    fixed_runs = {name: [] for name in names}
    for _ in range(a.repeats):
        for name in names:
            fixed_runs[name].append(with_server(name, fixed))
    print("\nfixed load: %.0f req/s open-loop for %gs (p99 of each repeat, then the median)" % (rate, a.duration))
    for name in names:
        r = median_point(fixed_runs[name])
        results[name]["fixed"] = r
        print("  %-15s %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d   p99s: %s"
              % (name, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"],
                 " ".join("%.2f" % x["p99_ms"] for x in fixed_runs[name])))

    print("\nthroughput at p99 <= %g ms (closed loop), and p99 at %.0f req/s (open loop):" % (a.p99_target_ms, rate))
    print("  %-15s %10s %8s %10s %10s %16s %16s" % (
        "server", "req/s", "(at c=)", "its p99", "p99@load", "req/s vs KServe", "p99@load vs KServe"))
    kf = results["kserve"]["fixed"]["p99_ms"]
    for name, r in results.items():
        best = r["best"]
        print("  %-15s %10.0f %8s %10.2f %10.2f %15.2fx %15.2fx" % (
            name, best["rps"] if best else float("nan"), best["concurrency"] if best else "-",
            best["p99_ms"] if best else float("nan"), r["fixed"]["p99_ms"],
            best["rps"] / kserve_best["rps"] if best and kserve_best else float("nan"),
            r["fixed"]["p99_ms"] / kf))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
