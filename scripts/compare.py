#!/usr/bin/env python
"""Compare the benchmark of two commits on this machine, interleaved, so that noise hits both alike.

    python scripts/compare.py BASE [HEAD] [--rounds 7] [--only noop10k,chain1k]

Each round runs `scripts/bench.py` once for BASE and once for HEAD (A, B, A, B, ...), each from a
checkout of its own (a `git worktree` in a temporary folder, removed afterwards). Printed per
workload: its main metric, the median of each series, B's change against A (positive = B slower),
and the noise floor: the spread between A's odd and even rounds, measured the same way. A change
within the noise floor is not a regression that this machine can see.

Both checkouts are byte-compiled first (`compileall`), as `pip install` does: otherwise, where
PYTHONDONTWRITEBYTECODE is set, every process compiles depio from source and the comparison
measures the compiler. `--from-source` skips that, to see what such a machine pays.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

from tabulate import tabulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_once(tree: str, only: str) -> Dict[str, Tuple[str, bool, float]]:
    """workload -> (metric, higher is better, value): each workload's target names its metric."""
    env = dict(os.environ, PYTHONPATH=tree, PYTHONHASHSEED="0")
    cmd = [sys.executable, os.path.join(tree, "scripts", "bench.py")] + (["--only", only] if only else [])
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    values = {}
    for line in out.stdout.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        metric, op = r["target"].split()[:2] if r.get("target") else (None, None)
        if metric in r:
            values[r["name"]] = (metric, op == ">=", float(r[metric]))
    return values


def slower_by(a: float, b: float, higher_is_better: bool) -> float:
    """How much slower b is than a, as a fraction (negative: faster)."""
    return (a / b - 1.0) if higher_is_better else (b / a - 1.0)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the commit to compare against (e.g. HEAD~3)")
    ap.add_argument("head", nargs="?", default="HEAD", help="the commit to judge [HEAD]")
    ap.add_argument("--rounds", type=int, default=7, help="runs of each commit, interleaved [7]")
    ap.add_argument("--only", default="", help="comma-separated workloads of scripts/bench.py [all]")
    ap.add_argument("--from-source", action="store_true",
                    help="do not byte-compile the checkouts (each process compiles what it imports)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="depio-compare-")
    trees = {}
    try:
        for label, rev in (("A", args.base), ("B", args.head)):
            trees[label] = os.path.join(tmp, label)
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", trees[label], rev], check=True)
            if not args.from_source:
                subprocess.run([sys.executable, "-m", "compileall", "-q", trees[label]], check=True)
        series: Dict[str, Dict[str, List[float]]] = {"A": {}, "B": {}}
        metrics: Dict[str, Tuple[str, bool]] = {}
        for r in range(args.rounds):
            for label in ("A", "B"):
                for name, (metric, higher, v) in bench_once(trees[label], args.only).items():
                    series[label].setdefault(name, []).append(v)
                    metrics[name] = (metric, higher)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        rows = []
        for name, a in series["A"].items():
            b = series["B"].get(name, [])
            if not b:
                continue
            metric, higher = metrics[name]
            ma, mb = statistics.median(a), statistics.median(b)
            odd, even = a[0::2], a[1::2]
            noise = abs(slower_by(statistics.median(odd), statistics.median(even), higher)) if even else float("nan")
            rows.append([name, metric, f"{ma:.4g}", f"{mb:.4g}", f"{100 * slower_by(ma, mb, higher):+.1f}%",
                         f"{100 * noise:.1f}%", len(a)])
        print(tabulate(rows, headers=["workload", "metric", f"A {args.base}", f"B {args.head}", "B slower by",
                                      "A vs A", "runs"]))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
