"""Bad input, failing handlers, dying workers and shutdown: each gets a clear status and
`{"error": ...}`, and nothing hangs."""

import os
import signal
import subprocess
import threading
import time

import pytest
import requests

ECHO = ("misc_handler:echo", "--model-name", "m")


def x_input(shape, data, datatype="FP32", name="x"):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


@pytest.mark.parametrize("body,status,message", [
    ("{not json", 400, "malformed JSON"),
    ('{"inputs": 3}', 400, "invalid request"),
    ('{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32"}]}', 400, "missing field `data`"),
    (x_input([2, 3], [1, 2, 3, 4, 5]), 400, "shape [2, 3] needs 6 elements but data has 5"),
    (x_input([2], [1, 2], "FP128"), 400, 'unknown datatype "FP128"'),
    (x_input([-2], [1, 2]), 400, "negative dimension"),
    (x_input([2], [1, "a"]), 400, "not a FP32 value"),
    (x_input([1], [300], "UINT8"), 400, "out of range for UINT8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                 {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}, 400, "appears twice"),
])
def test_v2_bad_input(wrapper, body, status, message):
    w = wrapper(*ECHO)
    kw = {"data": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = requests.post(w.url + "/v2/models/m/infer", timeout=10, **kw)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("body,message", [
    ("[1, 2", "malformed JSON"),
    ('{"inputs": [[1]]}', '"instances" array'),
    ('{"instances": 3}', '"instances" array'),
    ('{"instances": [[1, 2], [3]]}', "rectangular"),
    ('{"instances": [1, "a"]}', "mix value types"),
])
def test_v1_bad_input(wrapper, body, message):
    w = wrapper(*ECHO)
    r = requests.post(w.url + "/v1/models/m:predict", data=body, timeout=10)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_unknown_model_and_route(wrapper):
    w = wrapper(*ECHO)
    body = x_input([1], [1])
    for path in ["/v2/models/other/infer", "/v1/models/other:predict", "/v1/models/m:explain"]:
        r = w.post(path, body)
        assert r.status_code == 404, path
        assert "error" in r.json()
    assert 'model "other" not found' in w.post("/v2/models/other/infer", body).json()["error"]
    assert w.get("/v2/models/other").status_code == 404
    assert w.get("/nowhere").status_code == 404
    assert w.get("/v2/models/m/infer").status_code == 405


def test_oversize_body(wrapper):
    w = wrapper(*ECHO, "--max-body-bytes", "1000")
    big = x_input([300], [1.5] * 300)
    r = w.post("/v2/models/m/infer", big)
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]
    # Chunked, so no Content-Length to check up front: the limit applies while reading.
    import json
    data = json.dumps(big).encode()
    chunks = (data[i:i + 100] for i in range(0, len(data), 100))
    r = requests.post(w.url + "/v2/models/m/infer", data=chunks, timeout=10)
    assert r.status_code == 413, r.text
    assert w.post("/v2/models/m/infer", x_input([2], [1, 2])).status_code == 200
    assert w.metric('kinfer_wrapper_errors_total{kind="too_large"}') == 2


def test_echo_round_trips_datatypes(wrapper):
    w = wrapper(*ECHO)
    cases = [
        ("BOOL", [2], [True, False]),
        ("UINT8", [2], [0, 255]),
        ("INT16", [2, 1], [-3, 4]),
        ("INT32", [1, 2], [-7, 8]),
        ("INT64", [2], [-(2 ** 62), 2 ** 62]),
        ("UINT64", [1], [2 ** 64 - 1]),
        ("FP16", [2], [0.5, -1.25]),
        ("FP32", [2, 2], [0.1, 0.2, 0.3, 0.4]),
        ("FP64", [3], [0.1, 1e300, -2.5]),
        ("BYTES", [2], ["héllo", "world"]),
    ]
    for dt, shape, data in cases:
        r = w.post("/v2/models/m/infer", x_input(shape, data, dt))
        assert r.status_code == 200, (dt, r.text)
        [out] = r.json()["outputs"]
        assert (out["name"], out["datatype"], out["shape"], out["data"]) == ("x", dt, shape, data)


def test_worker_without_numpy_gets_nested_lists(wrapper):
    from conftest import HANDLERS
    w = wrapper("plain_echo:predict", "--model-name", "m",
                env={"PYTHONPATH": str(HANDLERS / "no_numpy")})
    r = w.post("/v2/models/m/infer", {"inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [1, 2, 3, 4]},
        {"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        {"name": "f", "shape": [1, 2], "datatype": "FP64", "data": [0.5, 1.5]},
    ]})
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["kind"]["data"] == ["list", "list", "list"]
    # Lists come back with derived datatypes: ints -> INT64, bools -> BOOL, floats -> FP64.
    assert (outs["x"]["datatype"], outs["x"]["shape"], outs["x"]["data"]) == ("INT64", [2, 2], [1, 2, 3, 4])
    assert (outs["b"]["datatype"], outs["b"]["data"]) == ("BOOL", [True, False])
    assert (outs["f"]["datatype"], outs["f"]["shape"]) == ("FP64", [1, 2])


def test_handler_raising_is_a_500_naming_the_exception(wrapper):
    w = wrapper("misc_handler:boom", "--model-name", "m")
    r = w.post("/v2/models/m/infer", x_input([1], [1]))
    assert r.status_code == 500
    assert r.json()["error"] == "the handler raised ValueError: boom"
    r = w.post("/v1/models/m:predict", {"instances": [1]})
    assert r.status_code == 500 and "ValueError: boom" in r.json()["error"]
    # The worker survives its handler's exceptions.
    assert w.metric("kinfer_wrapper_worker_restarts_total") == 0
    assert w.metric('kinfer_wrapper_errors_total{kind="handler"}') == 2


def test_unsupported_return_value_is_a_500(wrapper):
    w = wrapper("misc_handler:bad_output", "--model-name", "m")
    r = w.post("/v2/models/m/infer", x_input([1], [1]))
    assert r.status_code == 500
    assert "output 'y'" in r.json()["error"] and "object" in r.json()["error"]


def test_batched_outputs_must_have_a_row_per_input_row(wrapper):
    w = wrapper("misc_handler:scalar", "--model-name", "m")
    assert w.post("/v2/models/m/infer", x_input([1], [1])).json()["outputs"][0]["data"] == [42]
    w = wrapper("misc_handler:scalar", "--model-name", "m", "--max-batch-size", "4")
    r = w.post("/v2/models/m/infer", x_input([1], [1]))
    assert r.status_code == 500 and "one row per input row" in r.json()["error"]


def test_worker_killed_mid_request(wrapper, tmp_path):
    pid_file = tmp_path / "pid"
    w = wrapper("misc_handler:slow", "--model-name", "m", env={"PID_FILE": str(pid_file)})
    result = {}

    def call():
        result["r"] = w.post("/v2/models/m/infer", x_input([1], [30], "FP64", "seconds"))

    t = threading.Thread(target=call)
    t.start()
    deadline = time.time() + 10
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.02)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    t.join(10)
    assert not t.is_alive(), "the request hung"
    r = result["r"]
    assert r.status_code == 503
    assert "worker exited while running this request (killed by signal 9)" in r.json()["error"]
    # The worker comes back and serves again.
    w.wait_ready(30)
    pid_file.unlink()
    r = w.post("/v2/models/m/infer", x_input([1], [0], "FP64", "seconds"))
    assert r.status_code == 200, r.text
    assert w.metric("kinfer_wrapper_worker_restarts_total") == 1
    assert w.metric('kinfer_wrapper_errors_total{kind="worker_died"}') == 1


def test_ready_only_after_load(wrapper):
    w = wrapper("slow_load:predict", "--model-name", "m", wait_ready=False)
    assert w.get("/v2/health/live").status_code == 200
    r = w.get("/v2/health/ready")
    assert r.status_code == 503 and "loading" in r.json()["error"]
    assert w.get("/v1/models/m").json() == {"name": "m", "ready": False}
    r = w.post("/v2/models/m/infer", x_input([1], [1]))
    assert r.status_code == 503
    w.wait_ready(30)
    assert w.post("/v2/models/m/infer", x_input([1], [1])).status_code == 200


def test_failing_load_exits_with_the_error():
    from conftest import HANDLERS, WRAPPER, free_port
    import sys
    p = subprocess.run([str(WRAPPER), "--handler", "failing_load:predict", "--port", str(free_port()),
                        "--python", sys.executable], cwd=HANDLERS, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0
    assert "RuntimeError: weights not found" in p.stderr
    p = subprocess.run([str(WRAPPER), "--handler", "no_such_module:predict", "--port", str(free_port()),
                        "--python", sys.executable], cwd=HANDLERS, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "No module named 'no_such_module'" in p.stderr
    p = subprocess.run([str(WRAPPER), "--handler", "not a handler"], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "MODULE:FUNCTION" in p.stderr


@pytest.mark.parametrize("batching", [[], ["--max-batch-size", "8", "--max-batch-delay", "10ms"]])
def test_graceful_shutdown_finishes_requests_in_flight(wrapper, batching):
    w = wrapper("misc_handler:slow", "--model-name", "m", "--workers", "2", *batching)
    results = []

    def call():
        results.append(w.post("/v2/models/m/infer", x_input([1], [1.0], "FP64", "seconds")))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while w.metric("kinfer_wrapper_requests_in_flight") < 4 and time.time() < deadline:
        time.sleep(0.02)
    started = time.time()
    w.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # No new connections once draining.
    with pytest.raises(requests.ConnectionError):
        requests.get(w.url + "/v2/health/live", timeout=2)
    for t in threads:
        t.join(15)
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert w.proc.wait(15) == 0
    assert time.time() - started < 10
    log = w.stop()
    assert "stopped" in log


def test_worker_script_inline_without_a_writable_tmpdir(wrapper):
    # A read-only root filesystem: the script is passed with `python3 -c` instead.
    w = wrapper(*ECHO, env={"TMPDIR": "/dev/null"})
    r = w.post("/v2/models/m/infer", x_input([2], [1, 2]))
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [1, 2]
    assert "passing it inline" in w.stop()
