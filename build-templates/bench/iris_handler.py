"""The function both servers run: a scikit-learn classifier on one iris row per request."""

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
