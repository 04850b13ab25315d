"""Talking to Slurm: batched squeue (sacct only when needed) and scancel."""
from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from typing import Dict, Iterable, List, Tuple


from .states import _terminal

log = logging.getLogger("depio.slurm")

QUERY_INTERVAL = 30.0          # at most one periodic squeue per this many seconds per pipeline


def _expand_array(jid: str) -> List[str]:
    """'123_[0-2,5%2]' -> ['123_0', '123_1', '123_2', '123_5']; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(f"{m.group(1)}_{i}" for i in range(int(a), int(b) + 1))
        elif part:
            out.append(f"{m.group(1)}_{part}")
    return out


class SlurmQuery:
    """Asks Slurm about many jobs in one call; counts the calls (`queries`)."""

    def __init__(self) -> None:
        self.queries = 0
        self.sacct_calls = 0
        self.lock = threading.Lock()

    def states(self, ids: Iterable[str]) -> Dict[str, Tuple[str, str]]:
        """job id -> (raw state, reason). squeue first (it knows finished jobs for MinJobAge);
        sacct only for ids squeue does not know, and only when it works."""
        ids = sorted({str(i) for i in ids if i})
        if not ids:
            return {}
        with self.lock:
            self.queries += 1
        out: Dict[str, Tuple[str, str]] = {}
        try:
            r = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
                               capture_output=True, text=True, timeout=60)
            for line in r.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 2:
                    for jid in _expand_array(parts[0]):
                        out[jid] = (parts[1], parts[2] if len(parts) > 2 else "")
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("squeue failed: %s", e)
        # an array job's task may be listed under its raw id; ask for that too
        missing = [i for i in ids if i not in out]
        if missing and shutil.which("sacct"):
            with self.lock:
                self.sacct_calls += 1
            try:
                r = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,Reason"],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    for line in r.stdout.splitlines():
                        parts = line.strip().split("|")
                        if len(parts) >= 2 and parts[0] in missing:
                            out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
            except (OSError, subprocess.SubprocessError) as e:
                log.info("sacct failed (not needed): %s", e)
        return out


def scancel(ids: Iterable[str]) -> None:
    ids = sorted({str(i) for i in ids if i})
    if not ids:
        return
    try:
        subprocess.run(["scancel"] + ids, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        log.error("scancel %s failed: %s", " ".join(ids), e)


def wait_gone(query: SlurmQuery, ids: Iterable[str], timeout: float = 20.0) -> List[str]:
    """Wait until none of `ids` is pending or running in Slurm; returns those that still are."""
    ids = {str(i) for i in ids if i}
    deadline = time.monotonic() + timeout
    delay = 0.3
    while ids:
        st = query.states(ids)
        ids = {i for i in ids if i in st and not _terminal(st[i][0])}
        if not ids or time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(2.0, delay * 1.5)
    return sorted(ids)
