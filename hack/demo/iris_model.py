"""The demo's model code, as a data scientist writes it for kinfer.dev/handler: iris_model:predict.

The predictions are the real model's. The sleep stands in for GPU inference time, so that
requests stay in flight long enough for the load to show (the demo's nodes have no GPUs).
"""

import os
import pickle
import time

import numpy as np

model = None
INFERENCE_SECONDS = float(os.environ.get("DEMO_INFERENCE_SECONDS", "0.05"))


def load():
    global model
    with open(os.environ["MODEL_PATH"], "rb") as f:
        model = pickle.load(f)


def predict(inputs):
    rows = np.asarray(next(iter(inputs.values())), dtype=np.float64)
    time.sleep(INFERENCE_SECONDS)
    return model.predict(rows)
