"""The wire protocol's trust rules: signatures before unpickling, version handshake, keys.

Unit tests need no process; the handshake tests run a real `depio-worker` (or one pretending to be of
another protocol version or runtime) against an in-process dispatcher on loopback.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from depio.runtime import protocol as P
from depio.runtime.client import DispatcherClient
from depio.runtime.dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


class Boom:
    """A pickle whose unpickling creates a file: proof that a body was (or was not) unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---------------------------------------------------------------- framing

def test_roundtrip_and_signature_covers_header_and_body():
    msg = P.RequestWork(3)
    frames = P.encode(msg, KEY)
    assert frames[0] == P.HEADER and len(frames) == 4 and len(frames[3]) == P.MAC_SIZE
    assert P.decode(frames, KEY) == msg
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, OTHER_KEY)
    assert e.value.kind == "signature"
    for i in (1, 2):      # the meta (connection, number) and the body are both signed
        tampered = list(frames)
        tampered[i] = frames[i][:-1] + bytes([frames[i][-1] ^ 1])
        with pytest.raises(P.ProtocolError) as e:
            P.decode(tampered, KEY)
        assert e.value.kind == "signature"


@pytest.mark.parametrize("frames, kind", [
    ([], "malformed"),
    ([b"x"], "malformed"),
    ([P.HEADER, b"body"], "malformed"),                       # unsigned: no MAC frame
    ([P.HEADER, b"body", b""], "signature"),                   # empty MAC
    ([P.HEADER, b"body", b"\0" * 32], "signature"),            # wrong MAC
    ([P.HEADER, b"body", b"\0" * 31], "signature"),            # truncated MAC
    ([b"depio/99", b"body", b"\0" * 32], "version"),
    ([b"http/1.1", b"body", b"\0" * 32], "malformed"),
    ([P.HEADER, b"a", b"b", b"c", b"d"], "malformed"),
    ([P.REFUSED_HEADER, b"go away"], "malformed"),             # unsigned refusal: not for the dispatcher
])
def test_bad_frames_are_rejected(frames, kind):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, KEY)
    assert e.value.kind == kind


def test_nothing_is_unpickled_before_the_signature_is_checked(tmp_path, monkeypatch):
    marker = tmp_path / "unpickled"
    body = pickle.dumps(Boom(str(marker)))
    loads = []
    real_loads = pickle.loads

    class CountingPickle:
        dumps = staticmethod(pickle.dumps)

        @staticmethod
        def loads(data, *a, **kw):
            loads.append(data)
            return real_loads(data, *a, **kw)

    monkeypatch.setattr(P, "pickle", CountingPickle)
    for frames in ([P.HEADER, body, P.sign(OTHER_KEY, P.HEADER + body)],
                   [P.HEADER, body, b""], [P.HEADER, body], [b"depio/99", body, P.sign(KEY, b"depio/99" + body)]):
        with pytest.raises(P.ProtocolError):
            P.decode(frames, KEY)
    assert loads == [] and not marker.exists()


@pytest.mark.parametrize("wire, kind", [
    ({"not": "a message"}, "unknown"),
    ((), "unknown"),
    ((999, "x"), "unknown"),                                        # no such tag
    ((P.MESSAGE_TYPES.index(P.TaskSpec), 1, 1), "unknown"),         # a payload type, not a message
    ((P.MESSAGE_TYPES.index(P.RequestWork), 1, 2, 3), "malformed"),  # too many fields
    ((P.MESSAGE_TYPES.index(P.RunTasks), [(1, ("too", "short"))]), "malformed"),
])
def test_signed_but_not_a_message_is_rejected(wire, kind):
    body = pickle.dumps(wire)
    with pytest.raises(P.ProtocolError) as e:
        P.decode([P.HEADER, body, P.sign(KEY, P.HEADER + body)], KEY)
    assert e.value.kind == kind


def test_every_message_survives_the_wire_form():
    spec = P.TaskSpec(3, 1, "t", b"d" * 16, b"args", ("out.txt",), ("in.txt",), 2.5)
    result = P.TaskResult(3, 1, 1.0, 2.0, "out", "err", None, b"v", "w1")
    lost = P.TaskLost(3, 1, "worker gone")
    for msg in (P.RunTasks(((7, spec),), {b"d" * 16: b"fn"}), P.Submit((spec, spec), {}),
                P.WorkerReport(((7, 1.5),), ((7, result),), 4), P.ClientReport(((3, 1, 1.5, "w1"),), (result,), (lost,)),
                P.Register("w", "h", 1, 2), P.Heartbeat(), P.CancelTasks(None, "x"), P.StatusReply({"a": [1]})):
        assert P.decode(P.encode(msg, KEY), KEY) == msg


def test_plain_refusal_only_where_asked_for():
    frames = P.refusal("protocol mismatch: x")
    assert P.decode(frames, KEY, accept_refusal=True) == P.Refused("protocol mismatch: x")
    with pytest.raises(P.ProtocolError):
        P.decode(frames, KEY)


# ---------------------------------------------------------------- keys

@pytest.mark.parametrize("address, loopback", [
    ("tcp://127.0.0.1:*", True), ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True), ("tcp://lo:*", True), ("inproc://x", True), ("ipc:///tmp/x", True),
    ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False), ("tcp://[::]:5555", False),
    ("tcp://10.1.2.3:5555", False), ("tcp://eth0:5555", False), ("tcp://node17:5555", False),
    ("127.0.0.1:5555", False),
])
def test_is_loopback(address, loopback):
    assert P.is_loopback(address) is loopback


def _key_file(path: Path, mode: int, key: bytes = KEY) -> Path:
    path.write_text(key.hex() + "\n")
    os.chmod(path, mode)
    return path


def test_load_key_checks_file_mode(tmp_path, monkeypatch):
    monkeypatch.delenv(P.KEY_ENV, raising=False)
    assert P.load_key(str(_key_file(tmp_path / "ok.key", 0o600))) == KEY
    with pytest.raises(P.KeyRequiredError, match="chmod 600"):
        P.load_key(str(_key_file(tmp_path / "open.key", 0o644)))
    with pytest.raises(P.KeyRequiredError, match="depio key"):
        P.load_key(str(tmp_path / "missing.key"))
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    os.chmod(bad, 0o600)
    with pytest.raises(P.KeyRequiredError, match="hex"):
        P.load_key(str(bad))
    assert P.load_key() is None
    monkeypatch.setenv(P.KEY_ENV, OTHER_KEY.hex())
    assert P.load_key() == OTHER_KEY


def test_non_loopback_bind_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(P.KEY_ENV, raising=False)
    fresh = P.key_for_bind("tcp://127.0.0.1:*", "inproc://clients")
    assert len(fresh) == 32 and fresh != P.key_for_bind("tcp://127.0.0.1:*")
    with pytest.raises(P.KeyRequiredError) as e:
        P.key_for_bind("tcp://0.0.0.0:5555")
    text = str(e.value)
    assert "tcp://0.0.0.0:5555" in text and "depio key" in text and P.KEY_ENV in text
    with pytest.raises(P.KeyRequiredError, match="chmod 600"):
        P.key_for_bind("tcp://*:5555", key_file=str(_key_file(tmp_path / "open.key", 0o640)))
    assert P.key_for_bind("tcp://*:5555", key_file=str(_key_file(tmp_path / "k.key", 0o600))) == KEY
    assert P.key_for_bind("tcp://*:5555", key=OTHER_KEY) == OTHER_KEY
    monkeypatch.setenv(P.KEY_ENV, OTHER_KEY.hex())
    assert P.key_for_bind("tcp://10.0.0.5:5555") == OTHER_KEY


# ---------------------------------------------------------------- handshake with real workers

WORKER_AS = {
    "normal": "",
    "protocol99": "import depio.runtime.protocol as P; P.PROTOCOL_VERSION = 99; P.HEADER = b'depio/99'",
    "cloudpickle99": "import cloudpickle; cloudpickle.__version__ = '99.0.0'",
    "python3.99": "import sys; sys.version_info = (3, 99, 0, 'final', 0)",
}


def start_worker(address: str, key_hex: str, pretend: str = "normal", extra=()) -> subprocess.Popen:
    code = (WORKER_AS[pretend] + "\nimport sys\nfrom worker.main import main\nsys.exit(main(sys.argv[1:]))")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(P.KEY_ENV, None)
    if key_hex:
        env[P.KEY_ENV] = key_hex
    return subprocess.Popen([sys.executable, "-c", code, "--connect", address, "--slots", "1",
                             "--heartbeat", "0.5", *extra],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture
def dispatcher():
    d = Dispatcher(KEY, "tcp://127.0.0.1:*", heartbeat=0.5, liveness=3).start()
    d._ready.wait(5)
    yield d
    d.stop("test over")


def finish(proc: subprocess.Popen, timeout: float = 20) -> tuple:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.timeout(60)
def test_worker_with_the_right_key_registers(dispatcher):
    proc = start_worker(dispatcher.worker_address, KEY.hex())
    try:
        deadline = time.monotonic() + 20
        while len(dispatcher.workers) == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert [w["pid"] for w in dispatcher.snapshot()["workers"]] == [proc.pid]
    finally:
        dispatcher.stop("test over")      # Shutdown: the worker exits 0
        code, err = finish(proc)
    assert code == 0, err


@pytest.mark.timeout(60)
def test_worker_with_a_wrong_key_is_refused_on_both_sides(dispatcher):
    proc = start_worker(dispatcher.worker_address, OTHER_KEY.hex())
    code, err = finish(proc)
    assert code == 3
    assert "do not share the same key" in err, err
    assert len(dispatcher.workers) == 0
    assert dispatcher.bad_messages.get("signature", 0) >= 1
    assert any("do not share the same key" in r for r in dispatcher.refusals)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pretend, words", [
    ("protocol99", ["protocol mismatch", "depio/99", P.HEADER.decode()]),
    ("cloudpickle99", ["runtime differs", "cloudpickle 99"]),
    ("python3.99", ["runtime differs", "python 3.99"]),
])
def test_worker_of_another_version_is_refused_on_both_sides(dispatcher, pretend, words):
    proc = start_worker(dispatcher.worker_address, KEY.hex(), pretend)
    code, err = finish(proc)
    assert code == 3, err
    for w in words:
        assert w in err, err
    assert len(dispatcher.workers) == 0
    assert any(words[0] in r for r in dispatcher.refusals), list(dispatcher.refusals)


@pytest.mark.timeout(60)
def test_worker_refuses_a_key_file_others_can_read(tmp_path):
    key_file = _key_file(tmp_path / "k.key", 0o644)
    proc = start_worker("tcp://127.0.0.1:1", "", extra=["--key-file", str(key_file)])
    code, err = finish(proc)
    assert code == 2 and "chmod 600" in err, err


@pytest.mark.timeout(60)
def test_worker_without_a_key_says_how_to_make_one():
    proc = start_worker("tcp://127.0.0.1:1", "")
    code, err = finish(proc)
    assert code == 2 and "depio key" in err, err


@pytest.mark.timeout(30)
def test_pipeline_with_a_wrong_key_is_refused(dispatcher):
    client = DispatcherClient(dispatcher.client_address, OTHER_KEY, "rogue pipeline", lambda m: None,
                              lambda r: None, connect_timeout=10).start()
    try:
        with pytest.raises(ConnectionError, match="same key"):
            client.wait_welcome()
    finally:
        client.close(timeout=2)
    assert len(dispatcher.clients) == 0
