"""Echo without numpy: with numpy blocked, tensors arrive as nested lists."""


def predict(inputs):
    out = {}
    for name, value in inputs.items():
        assert isinstance(value, list) or not hasattr(value, "shape"), type(value)
        out[name] = value
    out["kind"] = [type(v).__name__ for v in inputs.values()]
    return out
