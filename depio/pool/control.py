"""Talking to a running pool: one request and its answer over the pool's client socket
(`depio pool status`, `depio pool stop`)."""
from __future__ import annotations

import time
from typing import Any, Dict

import zmq

from ..runtime import protocol as P
from ..runtime.session import PeerSession
from .registry import PoolInfo, pid_alive, resolve_pool


def request(info: PoolInfo, msg: object, timeout: float = 5.0) -> object:
    """One request/answer with a pool's dispatcher over its client socket, in a session of its own
    (`depio.runtime.session`): a `StopRequest` goes after a `StatusRequest` has opened it, so that a
    captured stop, sent again, stops nothing."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    session = PeerSession()
    try:
        if "[" in info.client_address:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(info.client_address)
        for m in ([P.StatusRequest()] if isinstance(msg, P.StatusRequest) else [P.StatusRequest(), msg]):
            sock.send_multipart(P.encode(m, info.key_bytes, session.meta()))
            reply = _answer(sock, info, session, timeout)
            if isinstance(reply, P.Refused):
                return reply
        return reply
    finally:
        sock.close()


def _answer(sock: zmq.Socket, info: PoolInfo, session: PeerSession, timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        if not sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise TimeoutError(f"pool {info.name!r} at {info.client_address} did not answer within {timeout:g} s")
        reply, meta = P.decode_meta(sock.recv_multipart(), info.key_bytes, accept_refusal=True)
        if (meta == b"" and type(reply) is P.Refused) or session.check(meta, False) is None:
            return reply


def status(spec: str) -> Dict[str, Any]:
    """A pool's workers and clients, or just its last addresses when it does not run."""
    info = resolve_pool(spec)
    if "://" not in spec and not info.running:
        return {"name": info.name, "running": False, "client_address": info.client_address,
                "worker_address": info.worker_address}
    reply = request(info, P.StatusRequest())
    if isinstance(reply, P.Refused):
        raise RuntimeError(f"pool {info.name!r} refused the status request: {reply.reason}")
    data = dict(reply.snapshot)
    data.update(name=info.name, running=True, pid=info.pid, client_address=info.client_address,
                worker_address=info.worker_address)
    return data


def stop(spec: str, timeout: float = 20.0) -> str:
    """Ask a pool to stop and wait until its process is gone."""
    info = resolve_pool(spec)
    if "://" not in spec and not info.running:
        return f"pool {info.name!r} is not running"
    request(info, P.StopRequest("depio pool stop"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "://" in spec or not pid_alive(info.pid):
            return f"pool {info.name!r} stopped"
        time.sleep(0.05)
    raise TimeoutError(f"pool {info.name!r} (pid {info.pid}) did not stop within {timeout:g} s")
