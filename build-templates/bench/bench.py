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
    results = {}
    print("CPUs: %d; %gs per point; one Python process per server; p99 target %g ms"
          % (os.cpu_count(), a.duration, a.p99_target_ms))
    for name in servers(0):
        port = free_port()
        proc = start(servers(port)[name], port, env, log)
        try:
            url = "http://127.0.0.1:%d/v2/models/iris/infer" % port
            answers = [requests.post(url, data=b, headers=JSON, timeout=10).json() for b in bodies]
            if "outputs" not in answers[0]:
                raise RuntimeError("%s: unexpected answer %r" % (name, answers[0]))
            got = [r["outputs"][0]["data"][0] for r in answers]
            assert got == expected, "%s answers differ from model.predict" % name
            reqs = loadgen.build_requests("127.0.0.1", port, "/v2/models/iris/infer", bodies)
            sweep = []
            for c in levels:
                r = loadgen.run(loadgen.closed_loop("127.0.0.1", port, reqs, c, a.duration))
                r["concurrency"] = c
                sweep.append(r)
                print("  %-15s c=%-3d %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d"
                      % (name, c, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]))
            results[name] = {"sweep": sweep, "port": port, "proc": proc}
        except BaseException:
            stop(proc)
            raise
        stop(proc)

    def best_under_target(sweep):
        ok = [r for r in sweep if r["p99_ms"] <= a.p99_target_ms and r["errors"] == 0]
        return max(ok, key=lambda r: r["rps"]) if ok else None

    for name, r in results.items():
        r["best"] = best_under_target(r["sweep"])
    kserve_best = results["kserve"]["best"]
    rate = a.rate or (0.7 * kserve_best["rps"] if kserve_best else 100.0)

    print("\nfixed load: %.0f req/s open-loop for %gs" % (rate, a.duration))
    for name in results:
        port = free_port()
        proc = start(servers(port)[name], port, env, log)
        try:
            reqs = loadgen.build_requests("127.0.0.1", port, "/v2/models/iris/infer", bodies)
            loadgen.run(loadgen.closed_loop("127.0.0.1", port, reqs, 4, 0.5, warmup=0.2))  # warm up
            r = loadgen.run(loadgen.open_loop("127.0.0.1", port, reqs, rate, a.duration))
        finally:
            stop(proc)
        results[name]["fixed"] = r
        print("  %-15s %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d"
              % (name, r["rps"], r["p50_ms"], r["p99_ms"], r["errors"]))

    print("\nthroughput at p99 <= %g ms, and p99 at %.0f req/s:" % (a.p99_target_ms, rate))
    print("  %-15s %12s %10s %12s %14s %14s" % ("server", "req/s", "(at c=)", "p99 ms", "x KServe req/s", "p99 vs KServe"))
    kf = results["kserve"]["fixed"]["p99_ms"]
    for name, r in results.items():
        best = r["best"]
        tput = best["rps"] if best else float("nan")
        ratio = tput / kserve_best["rps"] if best and kserve_best else float("nan")
        print("  %-15s %12.0f %10s %12.2f %14.2f %14.2f" % (
            name, tput, best["concurrency"] if best else "-", r["fixed"]["p99_ms"], ratio, r["fixed"]["p99_ms"] / kf))
    if a.json:
        for r in results.values():
            r.pop("proc", None)
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
