#!/usr/bin/env python
"""depio benchmark suite (issue 6).

    python scripts/bench.py                      # every workload once
    python scripts/bench.py --only noop10k,chain1k --repeat 3
    python scripts/bench.py --list
    python scripts/bench.py --pool                # the run workloads again, on a warm local pool

Each workload runs in a fresh subprocess (so peak RSS and CPU figures do not mix) with a fresh
temporary working directory, 2 local workers x 1 slot unless said otherwise. The parent prints one
JSON line per workload (the median over `--repeat` runs) with:

    name, n, seconds, the workload's metric (tasks_per_s, ms_per_hop, efficiency, ...),
    rss_peak_mb (pipeline process, ru_maxrss), cpu_scheduler_s (the pipeline process),
    cpu_workers_s (reaped children: workers and their slots), vs_zmq (rate as a ratio of the raw
    pyzmq baseline measured in the same run), target / target_status (met | missed).

`--pool` starts a local pool (`depio pool start --local 2 --slots 1`, its own DEPIO_HOME) and runs
the workloads that use workers against it (`PoolExecutor`): the same runtime without starting and
stopping worker processes in each run. Its lines say `"mode": "pool"`.

Timing bases: `seconds` is the wall time of the measured call (`Pipeline.run()` for the run
workloads, so it includes starting and stopping the workers). `steady_*` fields measure from the
first task's start to the last task's end (no startup, no teardown); `target_status_steady` judges
the target on that basis as well.

Workload functions are defined here; children run this file as __main__, so cloudpickle sends
them to the workers by value.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

WORKERS = 2
SLOTS = 1


# ---------------------------------------------------------------- task functions (run in workers)

def noop(i):
    return i


def sleeper(i, seconds=0.05):
    time.sleep(seconds)
    return None


def stamp(i):
    """Startup probe: returns when it ran (the worker's clock is this machine's clock)."""
    return time.time()


# ---------------------------------------------------------------- measuring helpers

def _rusage():
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def _rss_peak_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform.startswith("linux") else kb / 2 ** 20


POOL_ENV = "DEPIO_BENCH_POOL"      # set by --pool for the children: the pool's name


def _executor():
    if os.environ.get(POOL_ENV):
        from depio import PoolExecutor
        return PoolExecutor(os.environ[POOL_ENV])
    from depio import ParallelExecutor
    return ParallelExecutor(workers=WORKERS, slots_per_worker=SLOTS)


def _run_pipeline(p) -> Dict[str, Any]:
    """Run a pipeline; wall time of run(), CPU of this process and of reaped children, task timings."""
    cpu_s0, cpu_c0 = _rusage()
    t0 = time.time()
    code = p.run()
    t1 = time.time()
    cpu_s1, cpu_c1 = _rusage()
    starts = [t.start_time for t in p.tasks if t.start_time is not None]
    ends = [t.end_time for t in p.tasks if t.end_time is not None]
    out = {"exit_code": code, "seconds": t1 - t0, "cpu_scheduler_s": cpu_s1 - cpu_s0,
           "cpu_workers_s": cpu_c1 - cpu_c0}
    if starts and ends:
        out["startup_s"] = min(starts) - t0
        out["steady_s"] = max(ends) - min(starts)
        out["teardown_s"] = t1 - max(ends)
    bad = [t for t in p.tasks if not t.is_in_successful_terminal_state]
    if bad:
        out["failed_tasks"] = len(bad)
        out["first_failure"] = f"{bad[0].label}: {bad[0].reason}"
    return out


# ---------------------------------------------------------------- workloads (run in a child)

def w_noop10k(n: int = 10_000) -> Dict[str, Any]:
    from depio import Pipeline, Task
    p = Pipeline(_executor(), quiet=True)
    for i in range(n):
        p.add_task(Task("noop", noop, [i]))
    r = _run_pipeline(p)
    r["n"] = n
    r["tasks_per_s"] = n / r["seconds"]
    if "steady_s" in r:
        r["steady_tasks_per_s"] = n / r["steady_s"]
    return r


def w_chain1k(n: int = 1_000) -> Dict[str, Any]:
    from depio import Pipeline, Task
    p = Pipeline(_executor(), quiet=True)
    prev = None
    for i in range(n):
        prev = p.add_task(Task("hop", noop, [i], depends_on=[prev] if prev is not None else None))
    r = _run_pipeline(p)
    r["n"] = n
    r["ms_per_hop"] = r["seconds"] * 1000 / n
    if "steady_s" in r:
        r["steady_ms_per_hop"] = r["steady_s"] * 1000 / (n - 1)
    return r


def w_fan5k(n: int = 5_000) -> Dict[str, Any]:
    from depio import Pipeline, Task
    p = Pipeline(_executor(), quiet=True)
    src = p.add_task(Task("source", noop, [-1]))
    mids = [p.add_task(Task("fan", noop, [i], depends_on=[src])) for i in range(n)]
    p.add_task(Task("sink", noop, [-2], depends_on=mids))
    r = _run_pipeline(p)
    total = n + 2
    r["n"] = total
    r["tasks_per_s"] = total / r["seconds"]
    if "steady_s" in r:
        r["steady_tasks_per_s"] = total / r["steady_s"]
    return r


def w_sleep(n: int = 200, seconds: float = 0.05) -> Dict[str, Any]:
    from depio import Pipeline, Task
    p = Pipeline(_executor(), quiet=True)
    for i in range(n):
        p.add_task(Task("sleep", sleeper, [i, seconds]))
    r = _run_pipeline(p)
    ideal = n * seconds / (WORKERS * SLOTS)
    r["n"] = n
    r["ideal_s"] = ideal
    r["efficiency"] = ideal / r["seconds"]
    if "steady_s" in r:
        r["steady_efficiency"] = ideal / r["steady_s"]
    return r


def w_startup() -> Dict[str, Any]:
    from depio import Pipeline, Task
    p = Pipeline(_executor(), quiet=True)
    p.add_task(Task("stamp", stamp, [0]))
    r = _run_pipeline(p)
    t = p.tasks[0]
    r["n"] = 1
    # startup_s (set by _run_pipeline) = the task's start time (taken in the slot) - run() call
    r["startup_ms"] = r.get("startup_s", float("nan")) * 1000
    r["ran_at_ms"] = ((t.result or 0) - (t.start_time or 0)) * 1000   # slot start -> function entry
    return r


# file tasks for build100k / uptodate10k / memory100k (decorated, annotated products)
from depio import Dependency, Product, task  # noqa: E402  (module level: the annotations must resolve)


@task("produce")
def produce(i: int, out: Annotated[Path, Product], inp: Annotated[Path, Dependency] = None):
    out.write_text(str(i))


def _build(n: int, with_files: bool = False):
    """n decorated tasks, each with one product; task i > 0 reads the product of task i // 10 (a tree)."""
    from depio import Pipeline
    p = Pipeline(_executor(), quiet=True)
    out = Path("out")
    if with_files:
        out.mkdir(exist_ok=True)
    for i in range(n):
        prod = out / f"{i}.txt"
        dep = out / f"{i // 10}.txt" if i else None
        p.add_task(produce(i, prod, dep))
    return p


def w_build100k(n: int = 100_000) -> Dict[str, Any]:
    from depio.runtime.graph import pickle_payloads
    rss0 = _rss_now_mb()
    # what the user's own argument objects cost (two Paths per task), for reference: part of `add_s`
    ta = time.perf_counter()
    out = Path("out")
    _args = [(out / f"{i}.txt", out / f"{i // 10}.txt" if i else None) for i in range(n)]
    args_s = time.perf_counter() - ta
    del _args
    cpu0, _ = _rusage()
    t0 = time.perf_counter()
    p = _build(n)
    t1 = time.perf_counter()
    g = p._solve_order()
    t2 = time.perf_counter()
    pickle_payloads(g)                 # what validate() adds (run() always validates)
    t3 = time.perf_counter()
    cpu1, _ = _rusage()
    return {"n": n, "seconds": t2 - t0, "add_s": t1 - t0, "user_args_s": args_s, "resolve_s": t2 - t1, "pickle_s": t3 - t2,
            "validate_total_s": t3 - t0, "tasks_per_s": n / (t2 - t0), "cpu_scheduler_s": cpu1 - cpu0,
            "cpu_workers_s": 0.0, "rss_start_mb": rss0, "rss_end_mb": _rss_now_mb()}


def w_uptodate10k(n: int = 10_000) -> Dict[str, Any]:
    p = _build(n, with_files=True)
    for i in range(n):
        Path("out", f"{i}.txt").write_text(str(i))
    r = _run_pipeline(p)
    skipped = sum(1 for t in p.tasks if t._status.name == "SKIPPED")
    r["n"] = n
    r["skipped"] = skipped
    r["tasks_per_s"] = n / r["seconds"]
    r.pop("startup_s", None), r.pop("steady_s", None), r.pop("teardown_s", None)
    return r


def _state_bytes() -> int:
    db = Path(".depio", "state.sqlite")
    return sum(f.stat().st_size for f in (db, Path(str(db) + "-wal")) if f.exists())


def _timed_run(n: int, mode) -> float:
    """Seconds of one full `run()` of the 100,000-file tree in `mode` (every task expected skipped)."""
    p = _build(n)
    for t in p.tasks:
        t.buildmode = mode
    r = _run_pipeline(p)
    skipped = sum(1 for t in p.tasks if t._status.name == "SKIPPED")
    if skipped != n or r["exit_code"] != 0:
        raise RuntimeError(f"{mode.name}: {skipped} of {n} skipped, exit code {r['exit_code']}")
    return r["seconds"]


def w_uptodate100k(n: int = 100_000, rounds: int = 2) -> Dict[str, Any]:
    """Issue 17: a run that makes n file tasks (recording each in the state store: its size after that
    run), then full runs that skip all n, IF_MISSING and IF_CHANGED interleaved on a warm state (the
    product hashes memoised: the files are older than the racy window when the warm-up run reads them)."""
    from depio import BuildMode
    p = _build(n, with_files=True)
    for t in p.tasks:
        t.buildmode = BuildMode.IF_CHANGED
    made = _run_pipeline(p)
    if made.get("failed_tasks"):
        raise RuntimeError(f"the first run failed: {made.get('first_failure')}")
    store_mb = _state_bytes() / 2 ** 20
    time.sleep(2.1)                          # the racy window: only then are the new files' hashes memoised
    warm_up = _timed_run(n, BuildMode.IF_CHANGED)
    missing, changed = [], []
    for _ in range(rounds):
        missing.append(_timed_run(n, BuildMode.IF_MISSING))
        changed.append(_timed_run(n, BuildMode.IF_CHANGED))
    m, c = statistics.median(missing), statistics.median(changed)
    return {"n": n, "seconds": m, "seconds_if_missing": m, "seconds_if_changed": c, "changed_vs_missing": c / m,
            "if_missing_all": missing, "if_changed_all": changed, "cold_if_changed_s": warm_up,
            "first_run_s": made["seconds"], "store_mb_after_first_run": store_mb, "store_mb_end": _state_bytes() / 2 ** 20,
            "tasks_per_s": n / m}


def w_record10k(pairs: int = 20) -> Dict[str, Any]:
    """Issue 17: what recording a run in the state store costs `noop10k`. Runs of noop10k with the store
    on and off, in adjacent pairs (the order alternating), each in a fresh process, in one folder whose
    store exists (as in a project after its first run); the cost is the median of the pairs' ratios,
    since the noise of a shared machine hits both runs of a pair alike (with `--repeat`, of every run's
    pairs together); per phase, the median difference."""
    work = tempfile.mkdtemp(prefix="depio-bench-record-")
    on_env = {k: v for k, v in os.environ.items() if k != "DEPIO_STATE"}
    off_env = dict(on_env, DEPIO_STATE="off")
    try:
        _noop_in(work, on_env)                   # the store is made here, not in a measured run
        runs: Dict[str, List[Dict[str, Any]]] = {"on": [], "off": []}
        for k in range(pairs):
            order = [("on", on_env), ("off", off_env)]
            for label, env in (order if k % 2 == 0 else order[::-1]):
                runs[label].append(_noop_in(work, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pairs_ = list(zip(runs["on"], runs["off"]))
    ratios = [on["seconds"] / off["seconds"] for on, off in pairs_]
    out = {"n": runs["on"][0]["n"], "pairs": pairs, "state_cost": statistics.median(ratios) - 1,
           "state_cost_all": sorted(round(r - 1, 4) for r in ratios)}
    for key in ("seconds", "cpu_scheduler_s", "cpu_workers_s"):       # the runs with the store on; then off
        out[key] = statistics.median(r[key] for r in runs["on"])
        out[f"{key}_off"] = statistics.median(r[key] for r in runs["off"])
    for phase in ("startup_s", "steady_s", "teardown_s", "cpu_scheduler_s"):
        out[f"{phase[:-2]}_on_minus_off_ms"] = statistics.median(on[phase] - off[phase] for on, off in pairs_) * 1000
    return out


def _noop_in(work: str, env: Dict[str, str]) -> Dict[str, Any]:
    r = run_child("noop10k", 120, env, work=work)
    if "error" in r or r.get("failed_tasks"):
        raise RuntimeError(f"noop10k failed: {r.get('error') or r.get('first_failure')}")
    return r


def w_memory100k(n: int = 100_000) -> Dict[str, Any]:
    rss0 = _rss_now_mb()
    t0 = time.perf_counter()
    cpu0, _ = _rusage()
    p = _build(n)
    p.validate()                       # resolved, and payloads pickled as run() would
    cpu1, _ = _rusage()
    t1 = time.perf_counter()
    rss1 = _rss_now_mb()
    return {"n": n, "seconds": t1 - t0, "rss_start_mb": rss0, "rss_end_mb": rss1,
            "rss_delta_mb": rss1 - rss0, "bytes_per_task": (rss1 - rss0) * 2 ** 20 / n,
            "cpu_scheduler_s": cpu1 - cpu0, "cpu_workers_s": 0.0, "tasks": len(p.tasks)}


# ---------------------------------------------------------------- raw pyzmq baseline

def _zmq_echo(address: str) -> None:
    """The other process: a DEALER that unpickles each message and answers with a pickled reply."""
    import cloudpickle
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    s.send(cloudpickle.dumps(("hello", 0)))
    while True:
        msg = cloudpickle.loads(s.recv())
        if msg[0] == "stop":
            break
        s.send(cloudpickle.dumps(("done", msg[1], msg[1])))
    s.close()
    ctx.term()


def w_zmq_baseline(n1: int = 5_000, n100: int = 20_000, inflight: int = 100) -> Dict[str, Any]:
    import cloudpickle
    import zmq
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.bind("tcp://127.0.0.1:*")
    address = r.getsockopt(zmq.LAST_ENDPOINT).decode()
    cpu_s0, cpu_c0 = _rusage()
    peer = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--zmq-echo", address])
    try:
        ident, hello = r.recv_multipart()
        payload = ("run", 0, "noop", b"\x00" * 16, (1,))
        # warm up
        for i in range(200):
            r.send_multipart([ident, cloudpickle.dumps(payload[:1] + (i,) + payload[2:])])
            cloudpickle.loads(r.recv_multipart()[1])
        # 1 in flight: latency
        t0 = time.perf_counter()
        for i in range(n1):
            r.send_multipart([ident, cloudpickle.dumps(payload[:1] + (i,) + payload[2:])])
            cloudpickle.loads(r.recv_multipart()[1])
        t1 = time.perf_counter()
        # `inflight` in flight: throughput
        sent = got = 0
        while sent < min(inflight, n100):
            r.send_multipart([ident, cloudpickle.dumps(payload[:1] + (sent,) + payload[2:])])
            sent += 1
        while got < n100:
            cloudpickle.loads(r.recv_multipart()[1])
            got += 1
            if sent < n100:
                r.send_multipart([ident, cloudpickle.dumps(payload[:1] + (sent,) + payload[2:])])
                sent += 1
        t2 = time.perf_counter()
        r.send_multipart([ident, cloudpickle.dumps(("stop", 0))])
        peer.wait(10)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        r.close()
        ctx.term()
    cpu_s1, cpu_c1 = _rusage()
    return {"n": n1 + n100, "seconds": t2 - t0, "rt1_ms": (t1 - t0) * 1000 / n1, "rt1_per_s": n1 / (t1 - t0),
            "rt100_per_s": n100 / (t2 - t1), "rt100_us": (t2 - t1) * 1e6 / n100, "inflight": inflight,
            "cpu_scheduler_s": cpu_s1 - cpu_s0, "cpu_workers_s": cpu_c1 - cpu_c0}


WORKLOADS: Dict[str, Callable[[], Dict[str, Any]]] = {
    "zmq_baseline": w_zmq_baseline,
    "noop10k": w_noop10k,
    "chain1k": w_chain1k,
    "fan5k": w_fan5k,
    "sleep": w_sleep,
    "startup": w_startup,
    "build100k": w_build100k,
    "uptodate10k": w_uptodate10k,
    "uptodate100k": w_uptodate100k,
    "record10k": w_record10k,
    "memory100k": w_memory100k,
}

# (metric, comparison, goal, steady metric or None)
TARGETS = {
    "noop10k": ("tasks_per_s", ">=", 10_000, "steady_tasks_per_s"),
    "chain1k": ("ms_per_hop", "<=", 0.5, "steady_ms_per_hop"),
    "fan5k": ("tasks_per_s", ">=", 8_000, "steady_tasks_per_s"),
    "sleep": ("efficiency", ">=", 0.98, "steady_efficiency"),
    "startup": ("startup_ms", "<=", 300, None),
    "build100k": ("seconds", "<=", 1.5, None),
    "uptodate10k": ("seconds", "<=", 0.5, None),
    "uptodate100k": ("changed_vs_missing", "<=", 1.5, None),      # issue 17: IF_CHANGED at most 1.5x IF_MISSING
    "record10k": ("state_cost", "<=", 0.05, None),                # issue 17: recording costs noop10k under 5%
    "memory100k": ("rss_peak_mb", "<=", 250, None),
}

# which baseline figure each rate is compared with: (metric, baseline metric, kind)
#   rate: metric / baseline rate; latency: metric (ms) / baseline round trip (ms)
RATIOS = {
    "noop10k": ("tasks_per_s", "rt100_per_s", "rate"),
    "fan5k": ("tasks_per_s", "rt100_per_s", "rate"),
    "chain1k": ("ms_per_hop", "rt1_ms", "latency"),
    "startup": ("startup_ms", "rt1_ms", "latency"),
    "build100k": ("tasks_per_s", "rt100_per_s", "rate"),
    "uptodate10k": ("tasks_per_s", "rt100_per_s", "rate"),
}


RUN_WORKLOADS = ("noop10k", "chain1k", "fan5k", "sleep", "startup")   # the ones that use workers


class LocalPool:
    """A pool of WORKERS x SLOTS local workers in a private DEPIO_HOME, for --pool."""

    def __init__(self, env: Dict[str, str]):
        self.home = tempfile.mkdtemp(prefix="depio-bench-home-")
        self.env = dict(env, DEPIO_HOME=self.home)
        self.env.pop("DEPIO_POOL", None)

    def _cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "depio.cli", "pool", *args, "--name", "bench"],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def __enter__(self) -> Dict[str, str]:
        try:
            return self._start()
        except BaseException:
            self.__exit__()          # a pool that started but never got its workers is stopped too
            raise

    def _start(self) -> Dict[str, str]:
        r = self._cli("start", "--local", str(WORKERS), "--slots", str(SLOTS), "--detach")
        if r.returncode != 0:
            raise RuntimeError(f"cannot start the bench pool: {r.stdout}{r.stderr}")
        code = ("import sys, time; from depio.pool import status\n"
                "deadline = time.time() + 30\n"
                "while len(status('bench')['workers']) < int(sys.argv[1]):\n"
                "    assert time.time() < deadline, 'the pool workers did not register'\n"
                "    time.sleep(0.05)\n")
        subprocess.run([sys.executable, "-c", code, str(WORKERS)], env=self.env, check=True, timeout=60)
        return dict(self.env, **{POOL_ENV: "bench"})

    def __exit__(self, *exc: object) -> None:
        try:
            self._cli("stop")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------- child entry

def child(name: str) -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    r = WORKLOADS[name]()
    r["rss_peak_mb"] = _rss_peak_mb()
    sys.stdout.write("BENCH-RESULT " + json.dumps(r) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- parent

def run_child(name: str, timeout: float, env: Dict[str, str], work: Optional[str] = None) -> Dict[str, Any]:
    """One run of a workload in a fresh process, in `work` (kept) or a fresh folder (removed)."""
    keep = work is not None
    work = work or tempfile.mkdtemp(prefix=f"depio-bench-{name}-")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name]
    try:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)       # the child's own session: it and the workers it started
            out, err = proc.communicate()
            return {"error": f"timed out after {timeout:g} s", "stderr": err[-2000:]}
        for line in out.splitlines():
            if line.startswith("BENCH-RESULT "):
                return json.loads(line[len("BENCH-RESULT "):])
        return {"error": f"exit code {proc.returncode}, no result", "stderr": err[-2000:]}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def median_result(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out: Dict[str, Any] = {}
    for k in ok[0]:
        vals = [r[k] for r in ok if k in r]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = statistics.median(vals)
        else:
            out[k] = vals[0]
    for k in ok[0]:           # a metric given with its samples (`state_cost` and `state_cost_all`): the
        base = k[:-4]         # median of every run's samples together, not the median of the runs' medians
        if k.endswith("_all") and base in out and all(isinstance(r.get(k), list) for r in ok):
            pooled = sorted(v for r in ok for v in r[k])
            out[k], out[base] = pooled, statistics.median(pooled)
    if len(ok) > 1:
        out["runs"] = len(ok)
        out["seconds_all"] = [round(r["seconds"], 4) for r in ok]
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    return out


def judge(value: Optional[float], op: str, goal: float) -> Optional[str]:
    if value is None:
        return None
    return "met" if (value >= goal if op == ">=" else value <= goal) else "missed"


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4) if abs(v) < 100 else round(v, 1)
    return v


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated workloads (see --list)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per workload; the median is printed [1]")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per child run [120]")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--pool", action="store_true",
                    help=f"run the workloads that use workers ({', '.join(RUN_WORKLOADS)}) on a warm local pool")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--zmq-echo", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.zmq_echo:
        _zmq_echo(args.zmq_echo)
        return 0
    if args.child:
        child(args.child)
        return 0
    if args.list:
        for name in WORKLOADS:
            print(name)
        return 0
    names = list(WORKLOADS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    if args.pool and not args.only:
        names = list(RUN_WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
    # the baseline is always measured in the same run (first), for the ratios
    show_baseline = "zmq_baseline" in names
    if any(n in RATIOS for n in names) and not show_baseline:
        names = ["zmq_baseline"] + names
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONHASHSEED", "0")
    started = time.time()
    with LocalPool(env) if args.pool else contextlib.nullcontext() as pool_env:
        missed = _run_all(names, args, env, pool_env, show_baseline)
    print(json.dumps({"name": "_summary", "workloads": len(names), "targets_missed": missed,
                      "wall_s": round(time.time() - started, 1), "python": sys.version.split()[0],
                      "cpus": os.cpu_count(), "repeat": args.repeat, "mode": "pool" if args.pool else "cold"}),
          flush=True)
    return 0


def _run_all(names: List[str], args: argparse.Namespace, env: Dict[str, str], pool_env: Optional[Dict[str, str]],
             show_baseline: bool) -> int:
    """Run and print each workload (the baseline first); the number of targets missed."""
    baseline: Dict[str, Any] = {}
    missed = 0
    for name in names:
        child_env = pool_env if pool_env is not None and name in RUN_WORKLOADS else env
        runs = [run_child(name, args.timeout, child_env) for _ in range(max(1, args.repeat))]
        r = median_result(runs)
        if name == "zmq_baseline":
            baseline = r
            if not show_baseline:
                continue
        line: Dict[str, Any] = {"name": name}
        if pool_env is not None and name in RUN_WORKLOADS:
            line["mode"] = "pool"
        line.update(r)
        if name in RATIOS and "error" not in r and baseline and "error" not in baseline:
            metric, base, kind = RATIOS[name]
            if metric in r and base in baseline:
                line["vs_zmq"] = r[metric] / baseline[base]
                line["vs_zmq_basis"] = f"{metric} / zmq {base}"
        if name in TARGETS:
            metric, op, goal, steady = TARGETS[name]
            line["target"] = f"{metric} {op} {goal}"
            line["target_status"] = judge(r.get(metric), op, goal) if "error" not in r else "error"
            if steady is not None:
                line["target_status_steady"] = judge(r.get(steady), op, goal)
            if line["target_status"] != "met":
                missed += 1
        print(json.dumps({k: _round(v) for k, v in line.items()}), flush=True)
    return missed


if __name__ == "__main__":
    sys.exit(main())
