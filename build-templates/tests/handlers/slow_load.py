import time


def load():
    time.sleep(2)


def predict(inputs):
    return inputs
