"""KServe's own Python ModelServer running the same function as kinfer-wrapper."""

import argparse
import logging
import sys
import uuid

import kserve
import numpy as np
from kserve import InferOutput, InferRequest, InferResponse

import iris_handler


class Iris(kserve.Model):
    def __init__(self, name):
        super().__init__(name)
        self.load()

    def load(self):
        iris_handler.load()
        self.ready = True
        return True

    def predict(self, payload, headers=None):
        if isinstance(payload, InferRequest):
            out = iris_handler.predict({i.name: i.as_numpy() for i in payload.inputs})
            tensor = InferOutput(name="output-0", shape=list(out.shape), datatype="INT64")
            tensor.set_data_from_numpy(np.asarray(out, dtype=np.int64), binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=[tensor])
        out = iris_handler.predict({"input-0": np.asarray(payload["instances"])})
        return {"predictions": out.tolist()}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    a, _ = p.parse_known_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv at import time and in start()
    server = kserve.ModelServer(http_port=a.port, workers=a.workers, enable_grpc=False,
                                enable_latency_logging=False)
    # Per-request access logs would cost KServe throughput that kinfer-wrapper does not pay.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).disabled = True
    server.start([Iris("iris")])
