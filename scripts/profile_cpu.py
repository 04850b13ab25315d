#!/usr/bin/env python
"""Where the CPU of a bench workload goes, per thread of the pipeline process and per worker / slot
process (read from /proc while the run goes on, Linux only).

    python scripts/profile_cpu.py noop10k          # any run workload of scripts/bench.py
    python scripts/profile_cpu.py chain1k --n 500

Prints CPU seconds and microseconds per task for: each pipeline thread (main, scheduler actor,
dispatcher, client, ...), the worker processes and their slot processes. Run it in an empty
directory (the file workloads write there).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str):
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces: split after the closing parenthesis
    rest = data[data.rindex(")") + 2:].split()
    ppid = int(rest[1])
    cpu = (int(rest[11]) + int(rest[12])) / TICK      # utime + stime
    return ppid, cpu


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Keeps the last seen CPU of each thread of this process and of each descendant process."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True, name="cpu-sampler")
        self.interval = interval
        self.threads = {}          # tid -> cpu
        self.names = {}            # tid -> thread name
        self.procs = {}            # pid -> cpu
        self.roles = {}            # pid -> role
        self.stop_flag = False
        self.me = os.getpid()

    def sample(self) -> None:
        for t in threading.enumerate():
            if t.native_id is not None:
                self.names.setdefault(t.native_id, t.name)
        try:
            tids = os.listdir(f"/proc/{self.me}/task")
        except OSError:
            tids = []
        for tid in tids:
            s = _stat(f"/proc/{self.me}/task/{tid}/stat")
            if s:
                self.threads[int(tid)] = s[1]
        # descendants: walk /proc once
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                s = _stat(f"/proc/{entry}/stat")
                if s:
                    parents[int(entry)] = s
        frontier, seen = [self.me], set()
        while frontier:
            p = frontier.pop()
            for pid, (ppid, cpu) in parents.items():
                if ppid == p and pid not in seen:
                    seen.add(pid)
                    frontier.append(pid)
                    self.procs[pid] = cpu
                    if pid not in self.roles:
                        cmd = _cmdline(pid)
                        if ppid != self.me:
                            self.roles[pid] = "slot" if "-m worker" in cmd else "grandchild: " + cmd[:40]
                        else:
                            self.roles[pid] = "worker" if "-m worker" in cmd else cmd[:60] or "child"

    def run(self) -> None:
        while not self.stop_flag:
            self.sample()
            time.sleep(self.interval)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("--n", type=int, default=None)
    args = ap.parse_args()
    fn = bench.WORKLOADS[args.workload]
    s = Sampler()
    s.start()
    t0 = time.time()
    r = fn(args.n) if args.n else fn()
    wall = time.time() - t0
    s.stop_flag = True
    s.join()
    n = r.get("n", 1)
    print(f"{args.workload}: n={n} wall={wall:.2f}s run={r.get('seconds', 0):.2f}s "
          f"steady={r.get('steady_s', 0):.2f}s")
    by_name = defaultdict(float)
    for tid, cpu in s.threads.items():
        name = s.names.get(tid, "zmq I/O or other native threads")
        if name.startswith("depio-watch"):
            name = "depio-watch-*"
        by_name["pipeline: " + name] += cpu
    by_role = defaultdict(float)
    count = defaultdict(int)
    for pid, cpu in s.procs.items():
        by_role[s.roles.get(pid, "?")] += cpu
        count[s.roles.get(pid, "?")] += 1
    total = 0.0
    for name, cpu in sorted(by_name.items(), key=lambda kv: -kv[1]):
        total += cpu
        print(f"  {name:45s} {cpu:7.2f} s  {cpu * 1e6 / n:8.1f} us/task")
    for role, cpu in sorted(by_role.items(), key=lambda kv: -kv[1]):
        total += cpu
        print(f"  {role + f' (x{count[role]})':45s} {cpu:7.2f} s  {cpu * 1e6 / n:8.1f} us/task")
    print(f"  {'total':45s} {total:7.2f} s  {total * 1e6 / n:8.1f} us/task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
