"""Trains the demo's model (a scikit-learn classifier on the bundled iris data) and pickles it."""

import pickle
import sys

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

features, labels = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=500).fit(features, labels)
with open(sys.argv[1], "wb") as f:
    pickle.dump(model, f)
print(f"demo: trained iris model, training accuracy {model.score(features, labels):.3f}")
