"""Unit tests of the pool's parts (depio/pool/): the registry of connection files and the service's
binding (port 0 for a new pool, the earlier ports for a restarted one)."""
from __future__ import annotations

import os
import stat
import time

import pytest

from depio.pool import registry
from depio.pool.registry import PoolInfo, port_of, write_private
from depio.pool.service import PoolService


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPIO_HOME", str(tmp_path))
    monkeypatch.delenv("DEPIO_KEY", raising=False)
    return tmp_path


def test_connection_files_are_private_and_round_trip(home):
    info = PoolInfo("p", "tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002", "ab" * 16, "/k", pid=None)
    info.save()
    path = home / "pools" / "p.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert PoolInfo.load("p") == info
    assert not PoolInfo.load("p").running
    with pytest.raises(LookupError, match="no pool named 'q'"):
        PoolInfo.load("q")
    write_private(home / "x.key", "secret")
    assert stat.S_IMODE((home / "x.key").stat().st_mode) == 0o600


def test_port_of_and_pid_alive():
    assert port_of("tcp://127.0.0.1:5555") == 5555
    assert port_of("tcp://[::1]:7") == 7
    assert port_of("tcp://127.0.0.1:*") is None
    assert registry.pid_alive(os.getpid())
    assert not registry.pid_alive(None)


def test_a_new_pool_binds_port_zero_and_a_restarted_one_its_earlier_ports(home):
    service = PoolService("fresh")
    assert service.client_port is None and service.worker_port is None     # nothing picked ahead of the bind
    dispatcher = service._bind()
    try:
        client, worker = dispatcher.client_address, dispatcher.worker_address
        assert port_of(client) and port_of(worker) and client != worker
        assert (service.client_port, service.worker_port) == (port_of(client), port_of(worker))
    finally:
        dispatcher.stop("test over")
    PoolInfo("fresh", client, worker, service.key.hex(), "", pid=None).save()
    again = PoolService("fresh")
    assert (again.client_port, again.worker_port) == (port_of(client), port_of(worker))
    assert again.key == service.key
    deadline = time.monotonic() + 10
    while True:          # the stopped dispatcher's sockets close in ZeroMQ's I/O thread, a moment later
        try:
            dispatcher = again._bind()
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        assert (dispatcher.client_address, dispatcher.worker_address) == (client, worker)
    finally:
        dispatcher.stop("test over")


def test_a_running_pool_is_not_started_twice(home):
    PoolInfo("busy", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "ab" * 16, "", pid=os.getpid()).save()
    with pytest.raises(RuntimeError, match="already running"):
        PoolService("busy")
