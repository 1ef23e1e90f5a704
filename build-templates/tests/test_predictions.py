"""The wrapper's answers equal the scikit-learn model's own, over v2 and v1, with batching
off and on."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

BATCHING = {
    "unbatched": [],
    "batched": ["--max-batch-size", "16", "--max-batch-delay", "20ms"],
    "batched-2-workers": ["--max-batch-size", "16", "--max-batch-delay", "5ms", "--workers", "2"],
}


def v2_body(rows, datatype="FP64"):
    rows = np.asarray(rows)
    return {"id": "req", "inputs": [{"name": "x", "shape": list(rows.shape),
                                     "datatype": datatype, "data": rows.ravel().tolist()}]}


# Slices of varying size, so batches mix requests of different row counts.
def slices(n):
    i, size = 0, 1
    while i < n:
        yield i, min(i + size, n)
        i, size = i + size, size % 5 + 1


@pytest.mark.parametrize("mode", list(BATCHING))
def test_v2_predictions_match_sklearn(wrapper, iris_model, mode):
    model, x, path = iris_model
    w = wrapper("sk_handler:predict", "--model-name", "iris", *BATCHING[mode], env={"MODEL_PATH": path})

    def call(bounds):
        lo, hi = bounds
        r = w.post("/v2/models/iris/infer", v2_body(x[lo:hi]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == "iris" and body["id"] == "req"
        [out] = body["outputs"]
        assert out["name"] == "output-0" and out["datatype"] == "INT64"
        assert out["shape"] == [hi - lo]
        return out["data"]

    with ThreadPoolExecutor(16) as pool:
        got = [v for part in pool.map(call, list(slices(len(x)))) for v in part]
    assert got == model.predict(x).tolist()
    if mode != "unbatched":
        # Concurrent requests really were combined.
        assert w.metric("kinfer_wrapper_batch_size_count") < w.metric("kinfer_wrapper_batch_size_sum")


@pytest.mark.parametrize("mode", list(BATCHING))
def test_v1_predictions_match_sklearn(wrapper, iris_model, mode):
    model, x, path = iris_model
    w = wrapper("sk_handler:predict", "--model-name", "iris", *BATCHING[mode], env={"MODEL_PATH": path})

    def call(bounds):
        lo, hi = bounds
        r = w.post("/v1/models/iris:predict", {"instances": x[lo:hi].tolist()})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    with ThreadPoolExecutor(16) as pool:
        got = [v for part in pool.map(call, list(slices(len(x)))) for v in part]
    assert got == model.predict(x).tolist()


def test_several_outputs_and_float32(wrapper, iris_model):
    model, x, path = iris_model
    w = wrapper("sk_handler:predict_both", "--model-name", "iris", env={"MODEL_PATH": path})
    r = w.post("/v2/models/iris/versions/1/infer", v2_body(x[:5], "FP32"))
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    x32 = x[:5].astype(np.float32)
    assert outs["label"]["data"] == model.predict(x32).tolist()
    assert outs["proba"]["shape"] == [5, 3] and outs["proba"]["datatype"] == "FP64"
    np.testing.assert_allclose(np.reshape(outs["proba"]["data"], (5, 3)), model.predict_proba(x32))

    # Only the requested output comes back.
    body = v2_body(x[:2])
    body["outputs"] = [{"name": "proba"}]
    r = w.post("/v2/models/iris/infer", body)
    assert [o["name"] for o in r.json()["outputs"]] == ["proba"]
    body["outputs"] = [{"name": "nope"}]
    r = w.post("/v2/models/iris/infer", body)
    assert r.status_code == 400 and "nope" in r.json()["error"]

    # v1 with several outputs: one object per row.
    r = w.post("/v1/models/iris:predict", {"instances": x[:2].tolist()})
    preds = r.json()["predictions"]
    assert [p["label"] for p in preds] == model.predict(x[:2]).tolist()
    np.testing.assert_allclose([p["proba"] for p in preds], model.predict_proba(x[:2]))


def test_metadata_health_and_metrics(wrapper, iris_model):
    _, x, path = iris_model
    w = wrapper("sk_handler:predict", "--model-name", "iris", "--model-version", "3", env={"MODEL_PATH": path})
    assert w.get("/v2").json()["name"] == "kinfer-wrapper"
    assert w.get("/v2/health/live").status_code == 200
    assert w.get("/v2/health/ready").status_code == 200
    assert w.get("/v2/models/iris").json()["versions"] == ["3"]
    assert w.get("/v2/models/iris/ready").status_code == 200
    assert w.get("/v2/models/iris/versions/3/ready").status_code == 200
    assert w.get("/v2/models/iris/versions/4/ready").status_code == 404
    assert w.get("/v2/models/other/ready").status_code == 404
    assert w.get("/v1/models").json() == {"models": ["iris"]}
    assert w.get("/v1/models/iris").json() == {"name": "iris", "ready": True}
    assert w.post("/v2/models/iris/versions/3/infer", v2_body(x[:1])).status_code == 200
    assert w.post("/v2/models/iris/versions/4/infer", v2_body(x[:1])).status_code == 404
    text = w.get("/metrics").text
    for name in ["kinfer_wrapper_requests_in_flight", "kinfer_wrapper_queue_depth",
                 "kinfer_wrapper_batch_size_bucket", "kinfer_wrapper_request_duration_seconds_bucket",
                 "kinfer_wrapper_errors_total", "kinfer_wrapper_workers_ready 1"]:
        assert name in text, name
    assert w.metric('kinfer_wrapper_requests_total{code="200",protocol="v2"}') == 1
    assert w.metric('kinfer_wrapper_requests_total{code="404",protocol="v2"}') == 1
    assert w.metric("kinfer_wrapper_errors_total") == 1  # the version-4 request


def test_lone_request_pays_no_batching_delay(wrapper, iris_model):
    import time
    _, x, path = iris_model
    w = wrapper("sk_handler:predict", "--model-name", "iris", "--max-batch-size", "32",
                "--max-batch-delay", "2s", env={"MODEL_PATH": path})
    w.post("/v2/models/iris/infer", v2_body(x[:1]))  # warm up
    started = time.time()
    for i in range(5):
        assert w.post("/v2/models/iris/infer", v2_body(x[i:i + 1])).status_code == 200
    # Nobody else is sending, so no batch waits for company.
    assert time.time() - started < 1.5
