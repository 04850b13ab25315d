"""Pools that many people can lean on (issue 16): where tasks run, stalls, limits, replays, malformed
messages, fair share, workers killed by a task, `depio logs`. Real pools, workers and pipelines on
loopback."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from conftest import ROOT, wait_for
from test_pool import Pool, depio, env_for, start_pipeline

from depio.runtime import protocol as P
from depio.runtime.session import PeerSession

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def pool_with(home: Path, name: str, *extra: str, local: int = 1, heartbeat: float = 1.0, env=None) -> Pool:
    p = Pool.__new__(Pool)
    p.home, p.name = home, name
    p.args = ["pool", "start", "--name", name, "--local", str(local), "--heartbeat", str(heartbeat), *extra]
    if env:
        os.environ.update(env)       # the pool's process inherits it through env_for
        try:
            p.start()
        finally:
            for k in env:
                os.environ.pop(k, None)
    else:
        p.start()
    return p


def run(home, script: Path, cwd: Path, timeout=60, **env):
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env_for(home, **env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- 1. where tasks run

def test_tasks_run_in_the_pipelines_folder_with_its_import_path(home, workdir):
    pool = pool_with(home, "cwd")          # started in `workdir`
    try:
        proj = workdir / "elsewhere" / "proj"
        (proj / "build").mkdir(parents=True)
        (proj / "build" / "input.txt").write_text("hello")
        (proj / "mylib.py").write_text("def shout(s):\n    return s.upper()\n")
        (proj / "pipe.py").write_text(textwrap.dedent("""
            import os, pathlib
            from depio import Pipeline, Task, ParallelExecutor
            from mylib import shout
            def step():
                pathlib.Path("build/out.txt").write_text(shout(pathlib.Path("build/input.txt").read_text()))
            p = Pipeline(ParallelExecutor(), quiet=True)
            p.add_task(Task("step", step, [], produces=[pathlib.Path("build/out.txt")], depends_on=[pathlib.Path("build/input.txt")]))
            code = p.run()
            print("cwd after", os.getcwd())
            exit(code)
        """))
        r = run(home, proj / "pipe.py", proj, DEPIO_POOL="cwd")
        assert r.returncode == 0, r.stdout + r.stderr
        assert (proj / "build" / "out.txt").read_text() == "HELLO"
    finally:
        pool.stop()


def test_a_working_directory_missing_on_the_workers_host_fails_the_task_saying_so(tmp_path):
    from depio.runtime.execution import FdCapture, run_spec
    spec = P.TaskSpec(0, 1, "t", b"d", b"")
    here, path = os.getcwd(), list(sys.path)
    r = run_spec(spec, {}, {}, FdCapture(), "w1", (str(tmp_path / "gone"), ("/nowhere",)))
    assert r.error and "does not exist on worker w1" in r.error["message"] and str(tmp_path / "gone") in r.error["message"]
    assert os.getcwd() == here and sys.path == path


# ---------------------------------------------------------------- 2. stalls

QUICK = """
import sys
from depio import Pipeline, Task
from depio.pool import PoolExecutor
def f(i):
    return i
p = Pipeline(PoolExecutor(sys.argv[1]), quiet=True)
for i in range(5):
    p.add_task(Task(f"f{i}", f, [i]))
code = p.run()
print("REASONS", [t.reason for t in p.tasks])
exit(code)
"""


def test_a_stopped_service_gets_its_workers_back(home, workdir):
    pool = pool_with(home, "stall", local=1, heartbeat=0.2)
    try:
        pool.wait_workers(1)
        os.kill(pool.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(2.0)      # the stall itself (workers give a silent pool up after 0.6 s)
        finally:
            os.kill(pool.proc.pid, signal.SIGCONT)
        wait_for(lambda: len(pool.status()["workers"]) == 1, 30, "a worker to be registered", interval=0.2)
        (workdir / "q.py").write_text(QUICK)
        r = subprocess.run([sys.executable, "q.py", "stall"], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        pool.stop()


def test_a_pipeline_on_a_pool_without_workers_fails_with_the_reason(home, workdir):
    pool = pool_with(home, "empty", "--no-worker-limit", "1", local=0, heartbeat=0.2)
    try:
        (workdir / "q.py").write_text(QUICK)
        r = subprocess.run([sys.executable, "q.py", "empty"], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode != 0
        assert "no worker" in r.stdout and "limit 1 s" in r.stdout, r.stdout + r.stderr
    finally:
        pool.stop()


@pytest.mark.timeout(60)
def test_the_view_says_while_a_pool_has_no_worker(home, workdir):
    """Before the limit lets the pipeline go, its progress lines say why nothing runs."""
    pool = pool_with(home, "idle", "--no-worker-limit", "8", local=0, heartbeat=0.2)
    try:
        (workdir / "q.py").write_text(QUICK.replace("quiet=True", "quiet=False"))
        r = subprocess.run([sys.executable, "q.py", "idle"], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode != 0
        waiting = [line for line in r.stdout.splitlines() if "the pool has no worker yet" in line]
        assert waiting, r.stdout + r.stderr
    finally:
        pool.stop()


# ---------------------------------------------------------------- 3. limits

def test_huge_frames_from_a_stranger_are_not_held_and_a_too_big_task_fails_saying_so(home, workdir):
    pool = pool_with(home, "big", local=1, env={"DEPIO_MAX_MESSAGE": "1M"})
    try:
        pool.wait_workers(1)
        before = rss_kb(pool.proc.pid)
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(pool.info["client_address"])
        blob = bytes(200 << 20)
        for _ in range(3):
            s.send_multipart([P.HEADER, blob, b"x" * 32], copy=False)
        time.sleep(1.0)     # let it arrive (nothing to wait on: it must be dropped unseen)
        s.close()
        ctx.term()
        assert pool.status()["workers"], "the pool still serves"
        assert rss_kb(pool.proc.pid) - before < 100_000, (before, rss_kb(pool.proc.pid))
        (workdir / "b.py").write_text(textwrap.dedent("""
            from depio import Pipeline, Task
            from depio.pool import PoolExecutor
            def f(data):
                return len(data)
            p = Pipeline(PoolExecutor("big"), quiet=True)
            big = p.add_task(Task("bigone", f, [b"x" * (2 << 20)]))
            small = p.add_task(Task("small", f, [b"x"]))
            code = p.run()
            print("BIG", big.reason)
            print("SMALL", small.result, small._status.name, small.reason)
        """))
        r = run(home, workdir / "b.py", workdir, DEPIO_MAX_MESSAGE="1M")
        assert "SMALL 1" in r.stdout, r.stdout + r.stderr
        assert "bigone" in r.stdout and "message size limit of 1 MiB" in r.stdout, r.stdout + r.stderr
    finally:
        pool.stop()


# ---------------------------------------------------------------- 4. a waiting worker

def test_a_worker_waiting_for_its_pool_sleeps_and_says_so_once(home, workdir):
    key = workdir / "k"
    assert depio(home, "key", str(key)).returncode == 0
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    ctx.term()
    w = subprocess.Popen([sys.executable, "-m", "worker", "--connect", f"tcp://127.0.0.1:{port}", "--key-file",
                          str(key), "--reconnect", "60", "--heartbeat", "0.2"], env=env_for(home),
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)        # start-up
        cpu0, t0 = cpu_seconds(w.pid), time.monotonic()
        time.sleep(3.0)        # what is measured: a span of waiting, whatever the machine's speed
        used = cpu_seconds(w.pid) - cpu0
        assert used < 0.2 * (time.monotonic() - t0), f"{used:.2f} s of CPU while waiting"
    finally:
        w.send_signal(signal.SIGTERM)
        _, err = w.communicate(timeout=20)
    assert err.count("waiting for the dispatcher") == 1, err


# ---------------------------------------------------------------- 5. replays, 6. malformed messages

def connect(addr):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(addr)
    return s


def ask(sock, key, session, msg, timeout=5.0):
    sock.send_multipart(P.encode(msg, key, session.meta()))
    if not sock.poll(timeout * 1000):
        return None
    reply, meta = P.decode_meta(sock.recv_multipart(), key, accept_refusal=True)
    assert session.check(meta, False) is None
    return reply


def test_replayed_messages_are_refused_and_counted(home):
    pool = pool_with(home, "replay", local=0)
    try:
        key, addr = bytes.fromhex(pool.info["key"]), pool.info["client_address"]
        s1, session = connect(addr), PeerSession()
        assert isinstance(ask(s1, key, session, P.StatusRequest()), P.StatusReply)
        stop = P.encode(P.StopRequest("captured"), key, session.meta())     # captured, never sent here
        s2 = connect(addr)                                                 # another connection
        s2.send_multipart(stop)
        s1.send_multipart(P.encode(P.StatusRequest(), key, session.meta()[:32] + (1).to_bytes(8, "little")))
        wait_for(lambda: pool.status()["bad_messages"].get("replay", 0) >= 2, 10, "both replays to be counted")
        assert pool.proc.poll() is None, "the replayed stop stopped the pool"
        s1.close()
        s2.close()
    finally:
        pool.stop()


def test_a_malformed_submit_is_that_clients_error_and_the_pool_serves_on(home, workdir):
    pool = pool_with(home, "bad", local=1)
    try:
        pool.wait_workers(1)
        key, addr = bytes.fromhex(pool.info["key"]), pool.info["client_address"]
        s, session = connect(addr), PeerSession()
        assert isinstance(ask(s, key, session, P.ClientHello("rogue")), P.ClientWelcome)
        s.send_multipart(P.encode(P.Submit((P.TaskSpec(0, 1, "t", b"never sent", b""),), {}), key, session.meta()))
        refused = wait_for(lambda: next((m for m in iter(lambda: _next(s, key), None) if isinstance(m, P.Refused)),
                                        None), 10, "the refusal")
        assert "never sent" in refused.reason
        s.close()
        (workdir / "q.py").write_text(QUICK)
        r = subprocess.run([sys.executable, "q.py", "bad"], cwd=workdir, env=env_for(home), capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
        assert pool.status()["bad_messages"].get("rejected") == 1
    finally:
        pool.stop()
    log = (home / "bad.out").read_text()
    assert "dispatcher failed" not in log and "starting a replacement" not in log, log


def _next(sock, key):
    if not sock.poll(200):
        return None
    return P.decode_meta(sock.recv_multipart(), key, accept_refusal=True)[0]


# ---------------------------------------------------------------- 7. fair share by slots

def test_short_tasks_get_a_slot_while_long_ones_hold_the_others(home, workdir):
    pool = pool_with(home, "t", local=2)
    try:
        pool.wait_workers(2)
        c = start_pipeline(home, workdir, 4, 2.0, workdir / "c.json")
        wait_for(lambda: sum(x["running"] for x in pool.status()["clients"]) >= 2, 30, "C's tasks to run",
                 interval=0.05)
        a = start_pipeline(home, workdir, 30, 0.02, workdir / "a.json")
        for proc in (a, c):
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
        end = {x: max(e for _, e in json.loads((workdir / f"{x}.json").read_text())["spans"]) for x in "ac"}
        assert end["a"] < end["c"] - 1.0, end
    finally:
        pool.stop()


# ---------------------------------------------------------------- 8. a task that kills its worker

def test_a_task_that_kills_its_worker_fails_after_the_loss_budget(home, workdir):
    pool = pool_with(home, "kill", local=2, heartbeat=0.2)
    try:
        pool.wait_workers(2)
        (workdir / "k.py").write_text(textwrap.dedent("""
            import os, signal
            from depio import Pipeline, Task
            from depio.pool import PoolExecutor
            def killer():
                os.kill(os.getppid(), signal.SIGKILL)     # the slot's parent: its worker
            p = Pipeline(PoolExecutor("kill", heartbeat=0.2), quiet=True)
            t = p.add_task(Task("killer", killer))
            code = p.run()
            print("REASON", t.reason)
            exit(code)
        """))
        r = run(home, workdir / "k.py", workdir, timeout=90)
        assert r.returncode != 0
        assert "killer" in r.stdout.split("REASON", 1)[1], r.stdout
    finally:
        pool.stop()
    log = (home / "kill.out").read_text()
    assert log.count("killed by signal 9") <= 2, log


# ---------------------------------------------------------------- 9. depio logs, names in the table

def test_logs_find_names_with_slashes_and_accents_and_a_closed_pipe_is_quiet(home, workdir):
    run_dir = workdir / ".depio" / "logs" / "r1"
    run_dir.mkdir(parents=True)
    (workdir / ".depio" / "logs" / "latest").symlink_to("r1")
    (run_dir / "3-a_b_c.out").write_text("".join(f"line {i}\n" for i in range(20000)))
    (run_dir / "4-donn_es.err").write_text("accents\n")
    env = env_for(home)
    for name, text in (("a/b/c", "line 1"), ("données", "accents")):
        r = subprocess.run([sys.executable, "-m", "depio.cli", "logs", name], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and text in r.stdout, r.stderr
    r = subprocess.run(f"{sys.executable} -m depio.cli logs a/b/c | head -1; echo rc=${{PIPESTATUS[0]}}",
                       shell=True, executable="/bin/bash", cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=30)
    assert "rc=0" in r.stdout and "Broken pipe" not in r.stderr and "Error" not in r.stderr, r.stdout + r.stderr


def test_control_characters_in_task_names_are_escaped_in_the_table():
    from depio import Task
    from depio.view.table import task_rows

    row = task_rows([Task("a\nb\tc\0d", print)], color=False)[0]
    assert row[1] == "a\\nb\\tc\\x00d"
