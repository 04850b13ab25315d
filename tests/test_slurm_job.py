"""The function a Slurm job runs (depio/slurm/job.py), without Slurm: it starts the worker of
worker/slurm_job.py as a command (depio does not import the worker), which connects back with the key
from a mode-600 file and ends when it is idle or its dispatcher goes away."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from depio.runtime import protocol as P
from depio.runtime.dispatcher import Dispatcher
from depio.slurm.addresses import write_key_file
from depio.slurm.job import WORKER_JOB_MODULE, job_command, run_pilot, run_task_job

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def dispatcher():
    d = Dispatcher(P.new_key(), "tcp://127.0.0.1:*", heartbeat=0.2, liveness=3, remote_clients=False)
    d.start()
    saved = signal.getsignal(signal.SIGUSR2)       # the job function sets SIGUSR2 to ignored
    yield d
    signal.signal(signal.SIGUSR2, saved)
    d.stop("test over")


def _seen_workers(d: Dispatcher, names: list, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        names.extend(w["name"] for w in d.snapshot()["workers"] if w["name"] not in names)


def test_the_command_names_the_key_file_not_the_key(tmp_path):
    key = P.new_key()
    path = write_key_file(tmp_path, key)
    cmd = job_command("tcp://10.0.0.1:5", str(path), name="tok", walltime_s=600.0, warning_s=90)
    assert cmd[1:3] == ["-m", WORKER_JOB_MODULE]
    assert key.hex() not in " ".join(cmd) and str(path) in cmd
    assert cmd[cmd.index("--name") + 1] == "tok" and float(cmd[cmd.index("--warning") + 1]) == 90.0
    assert "--idle-timeout" not in cmd


def test_a_pilot_connects_back_and_leaves_when_idle(dispatcher, tmp_path):
    key_file = write_key_file(tmp_path, dispatcher.key)
    names: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_seen_workers, args=(dispatcher, names, stop), daemon=True)
    watcher.start()
    try:
        code = run_pilot(dispatcher.worker_address, str(key_file), slots=2, heartbeat=0.2, idle_timeout=1.0)
    finally:
        stop.set()
        watcher.join()
    assert code == 0
    assert any(n.startswith("pilot-") for n in names), names


def test_a_task_job_ends_when_its_pipeline_is_gone(dispatcher, tmp_path):
    key_file = write_key_file(tmp_path, dispatcher.key)

    def stop_when_registered() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(w["name"] == "tok-1" for w in dispatcher.snapshot()["workers"]):
            time.sleep(0.02)
        dispatcher.stop("pipeline finished")

    threading.Thread(target=stop_when_registered, daemon=True).start()
    t0 = time.monotonic()
    run_task_job(dispatcher.worker_address, str(key_file), "tok-1", heartbeat=0.2, liveness=3)
    assert time.monotonic() - t0 < 30
