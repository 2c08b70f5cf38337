"""The wire protocol between the ZeroMQ coordinator and its workers (no zmq here).

A message is one header frame and zero or one array frame:

    [header]            UTF-8 JSON object: "v" (protocol version), "type", fields of that type
    [header, array]     ... plus the raw little-endian bytes of a flat parameter-sized array

Nothing that arrives is trusted: the header's size is bounded before it is parsed,
JSON constants NaN/Infinity are refused, every field of the type is checked for
presence, type and range (unknown fields are refused too), and an array frame is
accepted only with the exact byte size the model needs. Nothing is ever unpickled.

worker → coordinator
    hello       {host, cores}                       join: send me a job (host: an opaque id shared
                                                    by the workers of one machine; cores: its cores)
    ready       {job, fingerprint}                  data loaded; its content fingerprint
    unable      {job, reason}                       cannot take this job (data, memory): why
    grads       {job, step, task, n, loss, correct, seconds} + Σ gradients of the task's rows
                                                    (seconds: the time it took to compute)
    diverged    {job, step, task}                   the task's loss is NaN/Inf (no array)
    heartbeat   {job}                               alive (sent while computing too; job "" when idle)
    bye         {job}                               leaving (Ctrl-C / SIGTERM on the worker)
    status      {}                                  any client: what is the coordinator doing?
client → service
    request     {op, args}                          a ddp-job command: submit, list, status, cancel, fetch
coordinator → worker
    job         {job, config, fingerprint, heartbeat, timeout, pool}
                                                    the job: config keys that fix data and model, and
                                                    the data's fingerprint; pool: a service's worker,
                                                    which stays (and says unable) when it cannot take it
    idle        {heartbeat, timeout}                a service's worker with no job: wait
    threads     {threads}                           BLAS threads for this worker's share of its host
    welcome     {job, step}                         data matches: a member from the next step on
    refuse      {reason}                            not admitted; the worker exits with the reason
    task        {job, step, task, lo, hi} + params  Σ gradients over rows [lo, hi) of step's batch
    heartbeat   {job}
    rejoin      {}                                  unknown worker (e.g. coordinator restarted): hello again
    stop        {reason}                            training over or coordinator shutting down: exit
    status_reply {status}                           the reply to status
service → client
    reply       {result}                            + the file's bytes for fetch of a model (a "file" frame)
    error       {reason, code}                      the request failed: one line, and the exit code
"""
from __future__ import annotations

import ipaddress
import json
import math

import numpy as np

VERSION = 3
MAX_HEADER = 4096            # bytes: any header a worker sends is far smaller
MAX_REPLY_HEADER = 1 << 20   # coordinator → worker headers (job config, status)
MAX_REQUEST = 1 << 16        # a client's request (a submitted job's config)
_MAX_INT = 1 << 53


class ProtocolError(ValueError):
    """A message that does not follow the protocol; `str()` says what was wrong."""


# field kinds: "id" hex string, "ref" an id or "", "int" non-negative integer, "float" finite
# number, "str" short string, "bool" true or false, "dict" JSON object
_SCHEMA = {
    # worker → coordinator
    "hello": {"host": "id", "cores": "int"},
    "ready": {"job": "id", "fingerprint": "id"},
    "unable": {"job": "id", "reason": "str"},
    "grads": {"job": "id", "step": "int", "task": "int", "n": "int", "loss": "float", "correct": "int",
              "weight": "float", "seconds": "float"},
    "diverged": {"job": "id", "step": "int", "task": "int"},
    "heartbeat": {"job": "ref"},
    "bye": {"job": "id"},
    "status": {},
    # client → service
    "request": {"op": "str", "args": "dict"},
    # coordinator → worker
    "job": {"job": "id", "config": "dict", "fingerprint": "id", "heartbeat": "float",
            "timeout": "float", "pool": "bool"},
    "idle": {"heartbeat": "float", "timeout": "float"},
    "threads": {"threads": "int"},
    "welcome": {"job": "id", "step": "int"},
    "refuse": {"reason": "str"},
    "task": {"job": "id", "step": "int", "task": "int", "lo": "int", "hi": "int"},
    "rejoin": {},
    "stop": {"reason": "str"},
    "status_reply": {"status": "dict"},
    # service → client
    "reply": {"result": "dict"},
    "error": {"reason": "str", "code": "int"},
}
# which types carry an array frame
ARRAY_TYPES = {"grads", "task"}
FROM_WORKER = {"hello", "ready", "unable", "grads", "diverged", "heartbeat", "bye", "status"}
FROM_CLIENT = {"request", "status"}
FROM_COORDINATOR = {"job", "idle", "threads", "welcome", "refuse", "task", "heartbeat", "rejoin", "stop",
                    "status_reply"}
TO_CLIENT = {"reply", "error"}


def _no_constants(name: str):
    raise ProtocolError(f"JSON constant {name} is not allowed")


def _check_field(name: str, kind: str, value) -> None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INT
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind in ("id", "ref"):
        ok = isinstance(value, str) and (0 < len(value) or kind == "ref") and len(value) <= 64 \
            and all(c in "0123456789abcdef" for c in value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str) and len(value) <= 4096
    else:
        ok = isinstance(value, dict)
    if not ok:
        raise ProtocolError(f"field {name!r} is not a valid {kind}: {str(value)[:40]!r}")


def encode(type_: str, **fields) -> bytes:
    assert set(fields) == set(_SCHEMA[type_]), (type_, fields)
    return json.dumps({"v": VERSION, "type": type_, **fields}, separators=(",", ":")).encode()


def decode(frame: bytes, allowed: set[str], max_size: int = MAX_HEADER) -> dict:
    """The validated header as a dict, or ProtocolError. `allowed`: the types this side accepts."""
    if len(frame) > max_size:
        raise ProtocolError(f"header of {len(frame)} bytes (at most {max_size})")
    try:
        msg = json.loads(bytes(frame).decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"header is not JSON ({str(e)[:60]})")
    if not isinstance(msg, dict):
        raise ProtocolError("header is not a JSON object")
    if type(msg.get("v")) is not int or msg["v"] != VERSION:  # not 1.0, not true
        raise ProtocolError(f"protocol version {str(msg.get('v'))[:20]!r}, expected {VERSION}")
    type_ = msg.get("type")
    if not isinstance(type_, str) or type_ not in allowed:
        raise ProtocolError(f"unexpected message type {str(type_)[:20]!r}")
    schema = _SCHEMA[type_]
    extra = set(msg) - set(schema) - {"v", "type"}
    if extra:
        raise ProtocolError(f"unknown field(s) {sorted(extra)[:3]} in {type_}")
    for name, kind in schema.items():
        if name not in msg:
            raise ProtocolError(f"{type_} without field {name!r}")
        _check_field(name, kind, msg[name])
    return msg


def wire_dtype(dtype) -> np.dtype:
    """The little-endian dtype arrays travel in."""
    return np.dtype(dtype).newbyteorder("<")


def array_from_frame(buf, dtype, count: int) -> np.ndarray:
    """A read-only view of an array frame after checking its exact size (no copy)."""
    dt = wire_dtype(dtype)
    nbytes = memoryview(buf).nbytes
    if nbytes != count * dt.itemsize:
        raise ProtocolError(f"array frame of {nbytes} bytes, expected {count * dt.itemsize} "
                            f"({count} × {dt.name})")
    array = np.frombuffer(buf, dtype=dt, count=count)
    array.flags.writeable = False  # even when the frame's memory is writable
    return array


def parse_endpoint(endpoint: str) -> tuple[str, str]:
    """(transport, host) of tcp://HOST:PORT or ipc://PATH; ValueError with the reason."""
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return "ipc", ""
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint[len("tcp://"):].rpartition(":")
        if sep and host and (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
            return "tcp", host.strip("[]")
    raise ValueError("expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc:///path/to/socket")


def is_loopback(endpoint: str) -> bool:
    """True when only processes on this host can reach the endpoint: ipc://, a literal
    loopback address (127.0.0.0/8, ::1) or the name `localhost`.

    Any other name is "not loopback", whatever it resolves to now: the check reads no DNS,
    so a name like `127.evil.example` cannot pass it, and what libzmq resolves at bind
    time (or later, after a DNS change) cannot differ from what was checked.
    """
    transport, host = parse_endpoint(endpoint)
    if transport == "ipc" or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, an interface, `*`: not a literal address
        return False
