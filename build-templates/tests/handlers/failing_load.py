def load():
    raise RuntimeError("weights not found")


def predict(inputs):
    return inputs
