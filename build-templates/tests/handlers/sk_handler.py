"""A scikit-learn classifier served through kinfer-wrapper (the model is pickled by the test)."""

import os
import pickle

import numpy as np

model = None


def load():
    global model
    with open(os.environ["MODEL_PATH"], "rb") as f:
        model = pickle.load(f)


def predict(inputs):
    x = np.asarray(next(iter(inputs.values())), dtype=np.float64)
    return model.predict(x)


def predict_both(inputs):
    x = np.asarray(next(iter(inputs.values())), dtype=np.float64)
    return {"label": model.predict(x), "proba": model.predict_proba(x)}
