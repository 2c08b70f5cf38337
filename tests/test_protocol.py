"""Unit tests of ddp.protocol: header validation, encoding, array frames, endpoints (no sockets)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ddp import protocol
from ddp.protocol import (ARRAY_TYPES, FROM_CLIENT, FROM_COORDINATOR, FROM_WORKER, MAX_HEADER, MAX_REPLY_HEADER,
                          TO_CLIENT, VERSION, ProtocolError, array_from_frame, decode, encode, is_loopback,
                          parse_endpoint)

JOB = "0123456789abcdef"
FP = "606073614bcc8902af0a8d88ebdfe575"

# one valid set of fields for every message type of the protocol
VALID = {
    # worker -> coordinator
    "hello": {"host": "0123456789abcdef", "cores": 2},
    "ready": {"job": JOB, "fingerprint": FP},
    "unable": {"job": JOB, "reason": "--data x.npz: no such file"},
    "grads": {"job": JOB, "step": 3, "task": 7, "n": 21, "loss": 12.5, "correct": 20, "weight": 21.0,
              "seconds": 0.25},
    "diverged": {"job": JOB, "step": 3, "task": 7},
    "heartbeat": {"job": JOB},
    "bye": {"job": JOB},
    "status": {},
    # client -> service
    "request": {"op": "status", "args": {"id": "3"}},
    # coordinator -> worker
    "job": {"job": JOB, "config": {"data": "spiral", "layers": [2, 64, 3]}, "fingerprint": FP,
            "heartbeat": 0.5, "timeout": 3, "pool": True},
    "idle": {"heartbeat": 0.5, "timeout": 3},
    "threads": {"threads": 1},
    "welcome": {"job": JOB, "step": 0},
    "refuse": {"reason": "your data differs"},
    "task": {"job": JOB, "step": 0, "task": 1, "lo": 0, "hi": 32},
    "rejoin": {},
    "stop": {"reason": "training finished"},
    "status_reply": {"status": {"state": "training", "workers": []}},
    # service -> client
    "reply": {"result": {"id": "3"}},
    "error": {"reason": "no job 9", "code": 2},
}
WORKER_ONLY = sorted(FROM_WORKER - FROM_COORDINATOR)
COORDINATOR_ONLY = sorted(FROM_COORDINATOR - FROM_WORKER)


def header(type_, **fields) -> bytes:
    """A raw header: the type's valid fields, overridden (or removed with ...) by `fields`."""
    msg = {"v": VERSION, "type": type_, **VALID[type_]}
    for k, v in fields.items():
        if v is ...:
            msg.pop(k, None)
        else:
            msg[k] = v
    return json.dumps(msg, allow_nan=True).encode()


def allowed_for(type_):
    for side in (FROM_WORKER, FROM_CLIENT, TO_CLIENT):
        if type_ in side:
            return side
    return FROM_COORDINATOR


def rejects(frame, allowed=FROM_WORKER, max_size=MAX_HEADER, match=None):
    with pytest.raises(ProtocolError, match=match) as info:
        decode(frame, allowed, max_size)
    assert str(info.value), "a ProtocolError must say what was wrong"
    return info.value


def test_the_table_covers_every_type():
    assert set(VALID) == FROM_WORKER | FROM_COORDINATOR | FROM_CLIENT | TO_CLIENT
    assert ARRAY_TYPES == {"grads", "task"}
    assert "heartbeat" in FROM_WORKER and "heartbeat" in FROM_COORDINATOR


# --- valid headers and encode ----------------------------------------------------------


@pytest.mark.parametrize("type_", sorted(VALID))
def test_decode_accepts_a_valid_header_of_each_type(type_):
    raw = header(type_)
    msg = decode(raw, allowed_for(type_), MAX_REPLY_HEADER)
    assert msg == {"v": VERSION, "type": type_, **VALID[type_]}


@pytest.mark.parametrize("type_", sorted(VALID))
def test_encode_round_trips_through_decode(type_):
    raw = encode(type_, **VALID[type_])
    assert isinstance(raw, bytes)
    assert json.loads(raw)["v"] == VERSION
    assert decode(raw, allowed_for(type_), MAX_REPLY_HEADER) == {"v": VERSION, "type": type_,
                                                                 **VALID[type_]}


@pytest.mark.parametrize("type_", WORKER_ONLY + ["heartbeat"])
def test_worker_headers_fit_the_coordinator_limit(type_):
    # what a worker sends is far below MAX_HEADER, even with the longest ids
    fields = {k: ("f" * 64 if k in ("job", "fingerprint") else v) for k, v in VALID[type_].items()}
    fields = {k: ((1 << 53) - 1 if isinstance(v, int) else v) for k, v in fields.items()}
    raw = encode(type_, **fields)
    assert len(raw) < MAX_HEADER // 4
    assert decode(raw, FROM_WORKER)["type"] == type_


def test_encode_refuses_missing_or_extra_fields():
    with pytest.raises(AssertionError):
        encode("ready", job=JOB)
    with pytest.raises(AssertionError):
        encode("hello", job=JOB)


def test_decode_accepts_bytes_like_frames():
    raw = header("heartbeat")
    for frame in (raw, bytearray(raw), memoryview(raw)):
        assert decode(frame, FROM_WORKER) == {"v": VERSION, "type": "heartbeat", "job": JOB}


def test_float_fields_accept_ints_and_negative_numbers():
    # "float" is any finite JSON number (a loss may be 0, an int, or negative under some losses)
    assert decode(header("grads", loss=0), FROM_WORKER)["loss"] == 0
    assert decode(header("grads", loss=-1.5), FROM_WORKER)["loss"] == -1.5
    assert decode(header("grads", loss=1e308), FROM_WORKER)["loss"] == 1e308


@pytest.mark.parametrize("value", [0, 1, (1 << 53) - 1])
def test_int_fields_accept_the_range(value):
    assert decode(header("grads", step=value), FROM_WORKER)["step"] == value


@pytest.mark.parametrize("job", ["0", "f" * 64, "00ff"])
def test_id_fields_accept_lowercase_hex_up_to_64(job):
    assert decode(header("heartbeat", job=job), FROM_WORKER)["job"] == job


# --- not a JSON object -------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    b"", b"not json", b"{", b'{"v": 1, "type": "hello"', b"\x00\x01\x02", b"{'v': 1}",
    b'{"v": 1, "type": "hello"} trailing', b"[" * 2000 + b"]" * 2000,
], ids=["empty", "text", "open-brace", "truncated", "binary", "single-quotes", "trailing",
        "deep-nesting"])
def test_decode_rejects_non_json(frame):
    rejects(frame, match="not JSON")


@pytest.mark.parametrize("frame", [b'{"v": 1, "type": "hel\xfflo"}', b"\xff\xfe{}", b'"\xc3\x28"',
                                   b'{"v":1,"type":"hello","x":"\xed\xa0\x80"}'])
def test_decode_rejects_non_utf8(frame):
    rejects(frame, match="not JSON")


@pytest.mark.parametrize("frame", [b"[]", b'[{"v": 1, "type": "hello"}]', b"1", b'"hello"', b"null",
                                   b"true", b"3.5"])
def test_decode_rejects_non_object_json(frame):
    rejects(frame, match="not a JSON object")


def test_oversized_header_is_refused_before_parsing(monkeypatch):
    valid = header("heartbeat")
    padded = valid[:-1] + b" " * (MAX_HEADER - len(valid)) + b"}"
    assert len(padded) == MAX_HEADER
    assert decode(padded, FROM_WORKER)["job"] == JOB  # exactly the limit is fine
    too_big = valid[:-1] + b" " * (MAX_HEADER + 1 - len(valid)) + b"}"
    assert len(too_big) == MAX_HEADER + 1

    def no_parsing(*a, **kw):
        raise AssertionError("json.loads must not see an oversized header")

    monkeypatch.setattr(protocol.json, "loads", no_parsing)
    err = rejects(too_big, match="header of 4097 bytes")
    assert str(MAX_HEADER) in str(err)
    rejects(b"\xff" * (10 * MAX_HEADER), match="header of")
    rejects(b"x" * 10_000_000, match="header of 10000000 bytes")
    # the caller's max_size is the limit: a job reply may be larger than MAX_HEADER
    big_reply = header("status_reply", status={"pad": "x" * (2 * MAX_HEADER)})
    with pytest.raises(AssertionError, match="must not see"):
        decode(big_reply, FROM_COORDINATOR, MAX_REPLY_HEADER)
    rejects(big_reply, FROM_COORDINATOR, MAX_HEADER, match="header of")


def test_reply_limit_is_enforced_too():
    frame = header("status_reply", status={"pad": "x" * MAX_REPLY_HEADER})
    assert len(frame) > MAX_REPLY_HEADER
    rejects(frame, FROM_COORDINATOR, MAX_REPLY_HEADER, match="header of")


# --- version and type ----------------------------------------------------------------------


@pytest.mark.parametrize("v", [0, VERSION - 1, -1, VERSION + 1, str(VERSION), None, [VERSION], {"v": VERSION},
                               True, False, VERSION + 0.5],
                         ids=repr)
def test_decode_rejects_wrong_version(v):
    rejects(header("hello", v=v), match="protocol version")


def test_decode_rejects_missing_version():
    rejects(header("hello", v=...), match="protocol version")


def test_decode_rejects_float_version():
    rejects(header("hello", v=1.0), match="protocol version")


@pytest.mark.parametrize("type_", ["hellox", "HELLO", "", "grad", 1, None, ["hello"], {"t": 1}, True],
                         ids=repr)
def test_decode_rejects_unknown_type(type_):
    rejects(json.dumps({"v": VERSION, "type": type_}).encode(), match="unexpected message type")


def test_decode_rejects_missing_type():
    rejects(json.dumps({"v": VERSION}).encode(), match="unexpected message type")


@pytest.mark.parametrize("type_", COORDINATOR_ONLY)
def test_coordinator_types_are_refused_from_a_worker(type_):
    raw = header(type_)
    assert decode(raw, FROM_COORDINATOR, MAX_REPLY_HEADER)["type"] == type_
    rejects(raw, FROM_WORKER, match="unexpected message type")


@pytest.mark.parametrize("type_", WORKER_ONLY)
def test_worker_types_are_refused_from_a_coordinator(type_):
    raw = header(type_)
    assert decode(raw, FROM_WORKER)["type"] == type_
    rejects(raw, FROM_COORDINATOR, MAX_REPLY_HEADER, match="unexpected message type")


def test_allowed_set_is_the_callers():
    raw = header("status")
    assert decode(raw, {"status"})["type"] == "status"
    rejects(raw, {"hello"}, match="unexpected message type")
    rejects(raw, set(), match="unexpected message type")


# --- fields -----------------------------------------------------------------------------------

FIELDS = sorted((t, f) for t, fields in VALID.items() for f in fields)


@pytest.mark.parametrize("type_,field", FIELDS)
def test_decode_rejects_a_missing_field(type_, field):
    rejects(header(type_, **{field: ...}), allowed_for(type_), MAX_REPLY_HEADER,
            match=f"without field '{field}'")


@pytest.mark.parametrize("type_", sorted(VALID))
def test_decode_rejects_an_unknown_extra_field(type_):
    rejects(header(type_, extra=1), allowed_for(type_), MAX_REPLY_HEADER, match="unknown field")


def test_decode_rejects_another_types_field():
    rejects(header("hello", job=JOB), match="unknown field")
    rejects(header("heartbeat", step=1), match="unknown field")


INT_FIELDS = [("grads", "step"), ("grads", "task"), ("grads", "n"), ("grads", "correct"),
              ("diverged", "step"), ("diverged", "task")]


@pytest.mark.parametrize("type_,field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, False, -1, -(1 << 60), 1 << 53, (1 << 53) + 1, 1 << 64,
                                   10 ** 100, 1.0, 2.5, "3", None, [1], {"a": 1}],
                         ids=lambda v: repr(v)[:20])
def test_decode_rejects_bad_ints(type_, field, value):
    rejects(header(type_, **{field: value}), match=f"field '{field}' is not a valid int")


@pytest.mark.parametrize("type_,field", [("welcome", "step"), ("task", "lo"), ("task", "hi")])
@pytest.mark.parametrize("value", [True, -5, 1 << 53, 0.0])
def test_decode_rejects_bad_ints_from_the_coordinator(type_, field, value):
    rejects(header(type_, **{field: value}), FROM_COORDINATOR, match="is not a valid int")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("type_,field", [("grads", "loss"), ("grads", "step"), ("heartbeat", "job")])
def test_decode_rejects_json_constants(constant, type_, field):
    raw = header(type_, **{field: 0}).replace(b'"%s": 0' % field.encode(),
                                              b'"%s": %s' % (field.encode(), constant.encode()))
    assert constant.encode() in raw
    rejects(raw, match=f"JSON constant {constant} is not allowed")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_decode_rejects_json_constants_anywhere(constant):
    # also where no field is checked: in an unknown field, or nested in the coordinator's config
    raw = b'{"v": 1, "type": "hello", "x": [%s]}' % constant.encode()
    rejects(raw, match="JSON constant")
    job = header("job", config={"lr": 0}).replace(b'"lr": 0', b'"lr": ' + constant.encode())
    rejects(job, FROM_COORDINATOR, MAX_REPLY_HEADER, match="JSON constant")


@pytest.mark.parametrize("literal", [b"1e999", b"-1e999", b"1E400"])
def test_decode_rejects_overflowing_floats(literal):
    raw = header("grads", loss=0).replace(b'"loss": 0', b'"loss": ' + literal)
    assert json.loads(raw)["loss"] in (float("inf"), float("-inf"))  # what Python makes of it
    rejects(raw, match="'loss' is not a valid float")
    raw = header("job").replace(b'"heartbeat": 0.5', b'"heartbeat": ' + literal)
    rejects(raw, FROM_COORDINATOR, MAX_REPLY_HEADER, match="'heartbeat' is not a valid float")
    raw = header("grads", step=0).replace(b'"step": 0', b'"step": ' + literal)
    rejects(raw, match="'step' is not a valid int")


@pytest.mark.parametrize("value", [True, False, "1.0", None, [1.0], {}], ids=repr)
def test_decode_rejects_bad_floats(value):
    rejects(header("grads", loss=value), match="'loss' is not a valid float")


@pytest.mark.parametrize("field", ["job", "fingerprint"])
@pytest.mark.parametrize("value", ["", "f" * 65, "0123456789ABCDEF", "xyz", "12 34", "0x12", "-1",
                                   "ab\u0663", "ab\x00", 123, None, True, ["ab"], {"ab": 1}],
                         ids=lambda v: repr(v)[:20])
def test_decode_rejects_bad_ids(field, value):
    rejects(header("ready", **{field: value}), match=f"'{field}' is not a valid id")


@pytest.mark.parametrize("type_", ["refuse", "stop"])
def test_decode_strings_have_a_length_limit(type_):
    ok = header(type_, reason="r" * 4096)
    assert decode(ok, FROM_COORDINATOR, MAX_REPLY_HEADER)["reason"] == "r" * 4096
    rejects(header(type_, reason="r" * 4097), FROM_COORDINATOR, MAX_REPLY_HEADER,
            match="'reason' is not a valid str")
    rejects(header(type_, reason=5), FROM_COORDINATOR, MAX_REPLY_HEADER, match="not a valid str")


@pytest.mark.parametrize("value", [[], "config", 1, None, True], ids=repr)
def test_decode_rejects_non_object_dict_fields(value):
    rejects(header("job", config=value), FROM_COORDINATOR, MAX_REPLY_HEADER,
            match="'config' is not a valid dict")
    rejects(header("status_reply", status=value), FROM_COORDINATOR, MAX_REPLY_HEADER,
            match="'status' is not a valid dict")


def test_error_messages_are_bounded():
    # the reason quotes at most a short prefix of what was sent (it ends up in log lines)
    err = rejects(header("ready", job="x" * 3000))
    assert len(str(err)) < 200
    err = rejects(json.dumps({"v": "9" * 3000, "type": "hello"}).encode())
    assert len(str(err)) < 200
    err = rejects(json.dumps({"v": 1, "type": "t" * 3000}).encode())
    assert len(str(err)) < 200


def test_truncated_valid_headers_are_all_rejected():
    raw = encode("grads", job=JOB, step=1, task=2, n=3, loss=0.5, correct=1, weight=3.0, seconds=0.5)
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError):
            decode(raw[:cut], FROM_WORKER)


# --- array frames -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_array_from_frame_is_a_read_only_zero_copy_view(dtype):
    count = 4547
    values = np.arange(count, dtype=np.dtype(dtype).newbyteorder("<"))
    buf = values.tobytes()
    arr = array_from_frame(buf, dtype, count)
    assert arr.shape == (count,)
    assert arr.dtype == protocol.wire_dtype(dtype)
    assert arr.dtype.byteorder in ("<", "=", "|")
    np.testing.assert_array_equal(arr, values)
    assert not arr.flags.writeable
    assert np.shares_memory(arr, np.frombuffer(buf, dtype=np.uint8))  # no copy
    with pytest.raises(ValueError):
        arr[0] = 1.0


def _zmq_frame(payload: bytes):
    """A zmq.Frame, the type the coordinator and worker receive (copy=False); no socket needed:
    its .buffer is the same writable memoryview a received frame has."""
    zmq = pytest.importorskip("zmq")
    return zmq.Frame(payload)


def test_array_from_frame_on_a_zmq_frame_is_zero_copy():
    values = np.linspace(-1, 1, 10_000)
    frame = _zmq_frame(values.astype("<f8").tobytes())
    arr = array_from_frame(frame.buffer, np.float64, values.size)
    np.testing.assert_array_equal(arr, values)
    assert np.shares_memory(arr, np.frombuffer(frame.buffer, np.uint8))
    with pytest.raises(ProtocolError):
        array_from_frame(frame.buffer, np.float64, values.size + 1)


@pytest.mark.parametrize("kind", ["zmq-frame", "bytearray"])
def test_array_from_frame_is_read_only_for_writable_buffers(kind):
    payload = np.arange(100, dtype="<f8").tobytes()
    buf = _zmq_frame(payload).buffer if kind == "zmq-frame" else bytearray(payload)
    arr = array_from_frame(buf, np.float64, 100)
    assert not arr.flags.writeable


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("delta", [-1, 1, -8, 8, -1000])
def test_array_from_frame_rejects_off_by_some_sizes(dtype, delta):
    count = 1000
    size = count * np.dtype(dtype).itemsize + delta
    with pytest.raises(ProtocolError, match=f"array frame of {size} bytes"):
        array_from_frame(b"\0" * size, dtype, count)


def test_array_from_frame_rejects_empty_and_wrong_dtype_sizes():
    with pytest.raises(ProtocolError):
        array_from_frame(b"", np.float64, 1)
    # float32 bytes for a float64 model: right element count, wrong byte size
    with pytest.raises(ProtocolError, match="expected 800"):
        array_from_frame(np.zeros(100, np.float32).tobytes(), np.float64, 100)
    assert array_from_frame(b"", np.float64, 0).size == 0


def test_wire_dtype_is_little_endian():
    assert protocol.wire_dtype(">f8") == np.dtype("<f8")
    assert protocol.wire_dtype(np.float32) == np.dtype("<f4")
    big = np.arange(5, dtype=">f8")
    arr = array_from_frame(big.astype("<f8").tobytes(), ">f8", 5)
    np.testing.assert_array_equal(arr, np.arange(5))


# --- endpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint,parsed,loopback", [
    ("tcp://127.0.0.1:5555", ("tcp", "127.0.0.1"), True),
    ("tcp://127.3.4.5:5555", ("tcp", "127.3.4.5"), True),
    ("tcp://localhost:1", ("tcp", "localhost"), True),
    ("tcp://[::1]:5", ("tcp", "::1"), True),
    ("tcp://127.0.0.1:65535", ("tcp", "127.0.0.1"), True),
    ("tcp://127.0.0.1:*", ("tcp", "127.0.0.1"), True),
    ("tcp://0.0.0.0:5555", ("tcp", "0.0.0.0"), False),
    ("tcp://*:5555", ("tcp", "*"), False),
    ("tcp://[::]:5555", ("tcp", "::"), False),
    ("tcp://10.1.2.3:80", ("tcp", "10.1.2.3"), False),
    ("tcp://192.168.0.1:5555", ("tcp", "192.168.0.1"), False),
    ("tcp://eth0:5555", ("tcp", "eth0"), False),
    ("tcp://example.com:5555", ("tcp", "example.com"), False),
    ("ipc:///tmp/x", ("ipc", ""), True),
    ("ipc://relative.sock", ("ipc", ""), True),
    # names are never resolved for the check: one that merely starts like a loopback
    # address may resolve anywhere (issue 12, item 3)
    ("tcp://127.attacker:5600", ("tcp", "127.attacker"), False),
    ("tcp://127.0.0.1.nip.io:5600", ("tcp", "127.0.0.1.nip.io"), False),
    ("tcp://127.example.com:5600", ("tcp", "127.example.com"), False),
    ("tcp://localhost.example.com:5600", ("tcp", "localhost.example.com"), False),
    ("tcp://127.1:5600", ("tcp", "127.1"), False),            # not a literal address in full
    ("tcp://[::ffff:127.0.0.1]:5600", ("tcp", "::ffff:127.0.0.1"), False),
    ("tcp://[::1]:*", ("tcp", "::1"), True),
    ("tcp://127.255.255.254:5600", ("tcp", "127.255.255.254"), True),
    ("tcp://128.0.0.1:5600", ("tcp", "128.0.0.1"), False),
    ("tcp://lo:5600", ("tcp", "lo"), False),                  # an interface name
])
def test_parse_endpoint_and_is_loopback(endpoint, parsed, loopback):
    assert parse_endpoint(endpoint) == parsed
    assert is_loopback(endpoint) is loopback


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000",
    "tcp://127.0.0.1:65536", "tcp://127.0.0.1:-1", "tcp://127.0.0.1:http", "tcp://:5555",
    "tcp://", "tcp://[::1]", "http://127.0.0.1:5555", "udp://127.0.0.1:5555",
    "inproc://x", "ipc://", "", "127.0.0.1:5555", "TCP://127.0.0.1:5555", " tcp://127.0.0.1:5555",
])
def test_parse_endpoint_rejects_bad_forms(endpoint):
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        parse_endpoint(endpoint)
    with pytest.raises(ValueError):
        is_loopback(endpoint)
