"""Jobs left behind by a killed pipeline.

Every job a run submits carries a mark in its `--comment` (in its job name if the user set a comment;
unmarked if the user set both): `depio:<host>:<pid>:<start>:<run id>`, the pipeline's host, process
id, the process's start time (so that a reused pid is told apart) and an identity of the script and
the submitit folder. A run of the same script in the same folder
looks for live jobs with its identity before it submits anything: if their pipeline's process is
gone (same host, and that pid is not alive or started at another time), they are orphans of a
killed run, working on the same products, and are cancelled (and waited for) first. Jobs of a
pipeline that still runs, or of one on another host (which cannot be checked from here), are never
touched. Either way the run says so in one line.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .query import SlurmQuery, scancel, wait_gone

log = logging.getLogger("depio.slurm")

MARK = "depio"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def run_identity(folder: Path) -> str:
    """The same script in the same folder (and submitit folder): the same identity."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "<interactive>"
    text = f"{script}\0{os.getcwd()}\0{Path(folder).resolve()}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def job_mark(folder: Path) -> str:
    """This pipeline's mark for its jobs' `--comment`."""
    pid = os.getpid()
    return f"{MARK}:{platform.node().split('.')[0]}:{pid}:{_start_time(pid) or 0}:{run_identity(folder)}"


def with_mark(params: Dict[str, object], mark: str) -> Dict[str, object]:
    """submitit parameters with the mark in the job's comment, or in its name when the user set a
    comment (the user's own values are never changed)."""
    extra = params.get("additional_parameters") or {}
    out = dict(params)
    if not (params.get("comment") or "comment" in extra):
        out["comment"] = mark
    elif not (params.get("job_name") or "job_name" in extra or "job-name" in extra):
        out["job_name"] = mark
    return out


def _parse(comment: str) -> Optional[Tuple[str, int, str, str]]:
    for part in comment.split(";"):
        bits = part.split(":")
        if len(bits) == 5 and bits[0] == MARK and bits[2].isdigit():
            return bits[1], int(bits[2]), bits[3], bits[4]
    return None


def _alive(host: str, pid: int, start: str) -> Optional[bool]:
    """Whether the pipeline that marked a job still runs (None: another host, cannot tell)."""
    if host != platform.node().split(".")[0]:
        return None
    now = _start_time(pid)
    return bool(now) and (start == "0" or now == start)


def cancel_orphans(folder: Path, query: SlurmQuery) -> str:
    """Cancel the live jobs of an earlier, dead run of this script in this folder and wait until
    Slurm no longer runs them. Returns the line to show ("" when there were none)."""
    me = run_identity(folder)
    user = os.environ.get("USER") or ""
    args = ["squeue", "-h", "-r", "-t", "pending,running,suspended,configuring", "-o", "%i|%k;%j"] + (["-u", user] if user else [])
    with query.lock:
        query.queries += 1            # counted with the run's other questions to Slurm
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.info("squeue failed: %s", e)
        return ""
    dead: List[str] = []
    alive: Dict[Tuple[str, int, bool], int] = {}      # (host, pid, checked) -> jobs
    for line in out.splitlines():
        jid, _, comment = line.partition("|")
        mark = _parse(comment)
        if mark is None or mark[3] != me or mark[1] == os.getpid() and mark[0] == platform.node().split(".")[0]:
            continue
        state = _alive(mark[0], mark[1], mark[2])
        if state is False:
            dead.append(jid.strip())
        else:
            who = (mark[0], mark[1], state is True)
            alive[who] = alive.get(who, 0) + 1
    notes = []
    if dead:
        scancel(dead)
        left = wait_gone(query, dead, 30.0)
        notes.append(f"cancelled {len(dead)} Slurm job(s) of an earlier run of this script whose pipeline is gone "
                     f"({', '.join(sorted(dead)[:5])}{' ...' if len(dead) > 5 else ''})"
                     + (f"; still listed: {', '.join(left)}" if left else ""))
    for (host, pid, checked), n in alive.items():
        how = "that is still running" if checked else "on another host (not checked from here)"
        notes.append(f"left alone {n} Slurm job(s) of another run of this script {how} (host {host}, pid {pid})")
    return "; ".join(notes)
