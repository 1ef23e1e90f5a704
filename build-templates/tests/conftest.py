"""Fixtures: start kinfer-wrapper on a free port with a handler from ./handlers."""

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
HANDLERS = HERE / "handlers"
ROOT = HERE.parent.parent
WRAPPER = Path(os.environ.get("KINFER_WRAPPER", ROOT / "target" / "debug" / "kinfer-wrapper"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Wrapper:
    """One kinfer-wrapper process; `url` is its base address."""

    def __init__(self, handler, *flags, env=None, wait_ready=True):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("KINFER_PYTHON", sys.executable)
        self.proc = subprocess.Popen(
            [str(WRAPPER), "--handler", handler, "--port", str(self.port),
             "--address", "127.0.0.1", *flags],
            cwd=HANDLERS, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.wait_live()
        if wait_ready:
            self.wait_ready()

    def wait_live(self, timeout=30):
        self._wait(lambda r: True, "/v2/health/live", timeout)

    def wait_ready(self, timeout=60):
        self._wait(lambda r: r.status_code == 200, "/v2/health/ready", timeout)

    def _wait(self, ok, path, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("wrapper exited:\n" + self.proc.stdout.read())
            try:
                if ok(requests.get(self.url + path, timeout=1)):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise TimeoutError("wrapper not up at %s%s" % (self.url, path))

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=30, **kw)

    def post(self, path, body=None, **kw):
        if body is not None:
            kw["json"] = body
        return requests.post(self.url + path, timeout=30, **kw)

    def metric(self, name):
        """Sum of every sample of `name` (all label sets)."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read()


@pytest.fixture
def wrapper():
    started = []

    def start(handler, *flags, **kw):
        w = Wrapper(handler, *flags, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def iris_model(tmp_path_factory):
    """A logistic regression trained on the bundled iris dataset, pickled for the handler."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=1000).fit(x, y)
    path = tmp_path_factory.mktemp("model") / "iris.pkl"
    with open(path, "wb") as f:
        pickle.dump(model, f)
    return model, x, str(path)
