"""kinfer-wrapper's Python worker: imports the user's module, calls load(), then runs the
handler for each message the wrapper sends. Standard library only; numpy is used when the
image has it. The protocol is described in ipc.rs.

Usage: python3 kinfer_worker.py MODULE FUNCTION
"""

import array
import gc
import importlib
import json
import os
import struct
import sys
import traceback

try:
    import numpy as np
except ImportError:  # the contract then hands the handler nested lists
    np = None

# numpy dtype string -> array module typecode, for images without numpy.
ARRAY_CODES = {"b1": "B", "u1": "B", "u2": "H", "u4": "I", "u8": "Q",
               "i1": "b", "i2": "h", "i4": "i", "i8": "q", "f4": "f", "f8": "d"}

# (numpy kind, itemsize) -> (datatype, wire dtype) for outputs.
NP_OUT = {("b", 1): ("BOOL", "b1"),
          ("u", 1): ("UINT8", "u1"), ("u", 2): ("UINT16", "u2"),
          ("u", 4): ("UINT32", "u4"), ("u", 8): ("UINT64", "u8"),
          ("i", 1): ("INT8", "i1"), ("i", 2): ("INT16", "i2"),
          ("i", 4): ("INT32", "i4"), ("i", 8): ("INT64", "i8"),
          ("f", 2): ("FP16", "f4"), ("f", 4): ("FP32", "f4"), ("f", 8): ("FP64", "f8")}


class OutputError(Exception):
    """The handler returned something that is not a tensor."""


def nest(flat, shape):
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def decode_inputs(header, blob):
    inputs = {}
    offset = 0
    for spec in header["inputs"]:
        shape, wire = spec["shape"], spec["wire"]
        if wire == "str":
            flat = spec["data"]
            value = np.array(flat, dtype=object).reshape(shape) if np is not None else nest(flat, shape)
        else:
            raw = blob[offset:offset + spec["nbytes"]]
            offset += spec["nbytes"]
            if np is not None:
                value = np.frombuffer(raw, dtype="<" + wire if wire != "b1" else "?").reshape(shape)
                if spec["datatype"] == "FP16":
                    value = value.astype(np.float16)
            else:
                # frombytes, since array(code, memoryview) would read the bytes as items.
                typed = array.array(ARRAY_CODES[wire])
                typed.frombytes(raw)
                flat = typed.tolist()
                if wire == "b1":
                    flat = [bool(x) for x in flat]
                value = nest(flat, shape)
        inputs[spec["name"]] = value
    return inputs


def flatten(value, shape, flat, depth=0):
    """Walks nested lists, recording the shape on first sight and checking it after."""
    if isinstance(value, (list, tuple)) or (np is not None and isinstance(value, np.ndarray)):
        if depth == len(shape):
            shape.append(len(value))
        elif depth > len(shape) or shape[depth] != len(value):
            raise OutputError("nested lists are not rectangular")
        for item in value:
            flatten(item, shape, flat, depth + 1)
    else:
        if depth != len(shape):
            raise OutputError("nested lists are not rectangular")
        if np is not None and isinstance(value, np.generic):
            value = value.item()
        flat.append(value)


def encode_value(name, value):
    """Returns (header entry, bytes) for one output."""
    if np is not None and isinstance(value, np.generic):
        value = np.asarray(value)
    if np is not None and isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        datatype, wire = NP_OUT.get((value.dtype.kind, value.dtype.itemsize), ("FP64", "f8"))
        raw = np.ascontiguousarray(value, dtype="<" + wire if wire != "b1" else "?").tobytes()
        return ({"name": name, "datatype": datatype, "shape": list(value.shape),
                 "wire": wire, "nbytes": len(raw)}, raw)
    shape, flat = [], []
    if np is not None and isinstance(value, np.ndarray) and value.dtype.kind not in "OUS":
        raise OutputError("numpy dtype %s is not supported" % value.dtype)
    flatten(value, shape, flat)
    if flat and all(isinstance(x, bool) for x in flat):
        return ({"name": name, "datatype": "BOOL", "shape": shape, "wire": "b1",
                 "nbytes": len(flat)}, bytes(flat))
    if all(isinstance(x, (bytes, str)) for x in flat) and flat:
        strings = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in flat]
        return ({"name": name, "datatype": "BYTES", "shape": shape, "wire": "str",
                 "data": strings}, b"")
    if all(isinstance(x, int) for x in flat):
        try:
            raw = array.array("q", flat).tobytes()
        except OverflowError:
            raise OutputError("an integer does not fit in INT64")
        return ({"name": name, "datatype": "INT64", "shape": shape, "wire": "i8",
                 "nbytes": len(raw)}, raw)
    if all(isinstance(x, (int, float)) for x in flat):
        raw = array.array("d", flat).tobytes()
        return ({"name": name, "datatype": "FP64", "shape": shape, "wire": "f8",
                 "nbytes": len(raw)}, raw)
    kinds = sorted({type(x).__name__ for x in flat})
    raise OutputError("values of type %s are not numbers, booleans or strings" % ", ".join(kinds))


def encode_outputs(result):
    items = result.items() if isinstance(result, dict) else [("output-0", result)]
    entries, blobs = [], []
    for name, value in items:
        if not isinstance(name, str):
            raise OutputError("output names must be strings, got %r" % (name,))
        try:
            entry, raw = encode_value(name, value)
        except OutputError as e:
            raise OutputError("output %r: %s" % (name, e))
        entries.append(entry)
        blobs.append(raw)
    header = json.dumps({"outputs": entries}, separators=(",", ":")).encode()
    return b"".join([b"O", struct.pack("<I", len(header)), header] + blobs)


class Pipe:
    def __init__(self, rfd, wfd):
        self.r = os.fdopen(rfd, "rb", buffering=1 << 16)
        self.w = os.fdopen(wfd, "wb", buffering=0)

    def read(self):
        head = self.r.read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack("<I", head)
        buf = bytearray(n)  # writable, so numpy arrays built on it are too
        if self.r.readinto(buf) != n:
            return None
        return buf

    def write(self, msg):
        self.w.write(struct.pack("<I", len(msg)) + msg)


def send_json(pipe, kind, obj):
    pipe.write(kind + json.dumps(obj).encode())


def describe(e):
    return "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__


def main():
    module_name, function_name = sys.argv[1], sys.argv[2]
    # The protocol owns the original stdin/stdout; user code's prints go to stderr and its
    # reads see /dev/null, so neither can corrupt a frame.
    pipe = Pipe(os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    # The module comes from PYTHONPATH or the working directory, not this script's folder.
    sys.path[0] = os.getcwd()
    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, function_name, None)
        if not callable(handler):
            raise AttributeError("module %r has no function %r" % (module_name, function_name))
        load = getattr(module, "load", None)
        if callable(load):
            load()
    except BaseException as e:
        traceback.print_exc()
        send_json(pipe, b"E", {"error": describe(e)})
        return 1
    # The loaded model lives for the whole process: keep it out of the garbage collector's
    # scans, which would otherwise add pauses to requests.
    gc.collect()
    gc.freeze()
    send_json(pipe, b"R", {"pid": os.getpid(), "numpy": np is not None})
    while True:
        msg = pipe.read()
        if msg is None:
            return 0  # the wrapper closed the pipe: shut down
        (hlen,) = struct.unpack_from("<I", msg, 1)
        header = json.loads(bytes(msg[5:5 + hlen]))
        blob = memoryview(msg)[5 + hlen:]
        try:
            out = encode_outputs(handler(decode_inputs(header, blob)))
        except OutputError as e:
            out = b"X" + json.dumps({"error": "the handler returned an unsupported value: %s" % e}).encode()
        except Exception as e:
            traceback.print_exc()
            out = b"X" + json.dumps({"error": describe(e)}).encode()
        pipe.write(out)


if __name__ == "__main__":
    sys.exit(main())
