"""Handlers that misbehave on purpose, for the wrapper's error paths."""

import os
import time


def echo(inputs):
    return inputs


def boom(inputs):
    raise ValueError("boom")


def bad_output(inputs):
    return {"y": object()}


def scalar(inputs):
    # Ignores rows: fine unbatched, an error when batched.
    return 42


def slow(inputs):
    """Sleeps for the first element of input `seconds`, after writing its pid to PID_FILE."""
    seconds = inputs["seconds"]
    while isinstance(seconds, list) or hasattr(seconds, "shape") and seconds.shape:
        seconds = seconds[0]
    pid_file = os.environ.get("PID_FILE")
    if pid_file:
        with open(pid_file + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pid_file + ".tmp", pid_file)
    time.sleep(float(seconds))
    return inputs["seconds"]
