"""What the cluster is like, asked once per run: its partitions (and the default one), its nodes
(CPUs, memory, GPUs, features) and `MaxArraySize`. Used to submit to a partition that exists, to
split arrays Slurm would refuse, and to fail a task at once that no node could ever run.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..runtime.resources import Resources

log = logging.getLogger("depio.slurm")

DEFAULT_MAX_ARRAY_SIZE = 1001      # Slurm's own default


def notice(line: str) -> None:
    """One line for whoever watches a process without a view (a pool's log): stderr. A pipeline's
    Slurm backends say it through `Backend.notice` instead, so that its view shows it."""
    print(f"depio: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int
    partitions: Tuple[str, ...]
    features: Tuple[str, ...]


def _run(args: List[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        log.info("%s failed: %s", args[0], e)
        return ""
    return r.stdout if r.returncode == 0 else ""


def _gres_gpus(gres: str) -> int:
    """"gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:1" -> GPUs on the node."""
    n = 0
    for item in gres.split(","):
        item = item.split("(")[0]
        if item.startswith("gpu"):
            last = item.split(":")[-1]
            n += int(last) if last.isdigit() else 1
    return n


class Cluster:
    """Slurm's configuration, read lazily and once (`scontrol`, `sinfo`); safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._max_array: Optional[int] = None
        self._partitions: Optional[Dict[str, bool]] = None     # name -> is the default
        self._nodes: Optional[List[Node]] = None

    def max_array_size(self) -> int:
        """Slurm refuses an array index >= MaxArraySize: arrays are split below it."""
        with self._lock:
            if self._max_array is None:
                m = re.search(r"^MaxArraySize\s*=\s*(\d+)", _run(["scontrol", "show", "config"]), re.M)
                self._max_array = int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE
            return self._max_array

    def partitions(self) -> Dict[str, bool]:
        """Partition name -> whether it is the default (empty if Slurm did not answer)."""
        with self._lock:
            if self._partitions is None:
                parts: Dict[str, bool] = {}
                for line in _run(["sinfo", "-h", "-o", "%P"]).split():
                    parts[line.rstrip("*")] = line.endswith("*") or parts.get(line.rstrip("*"), False)
                self._partitions = parts
            return self._partitions

    def default_partition(self) -> str:
        return next((p for p, default in self.partitions().items() if default), "")

    def nodes(self) -> List[Node]:
        with self._lock:
            if self._nodes is None:
                nodes = []
                for line in _run(["scontrol", "-o", "show", "node"]).splitlines():
                    f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                    if "NodeName" not in f:
                        continue
                    feats = f.get("AvailableFeatures", "")
                    nodes.append(Node(f["NodeName"], int(f.get("CPUTot", 0) or 0), int(f.get("RealMemory", 0) or 0),
                                      _gres_gpus(f.get("Gres", "")),
                                      tuple(p for p in f.get("Partitions", "").split(",") if p),
                                      tuple(x for x in feats.split(",") if x and x != "(null)")))
                self._nodes = nodes
            return self._nodes

    def effective_partition(self, requested: str) -> str:
        """The partition a job goes to: $SBATCH_PARTITION wins over the script, then the request,
        then the cluster's default."""
        return os.environ.get("SBATCH_PARTITION") or requested or self.default_partition()

    def too_big(self, request: Resources) -> Optional[str]:
        """Why no node of the request's partition could ever run it (None: some node could, or
        Slurm did not say: then Slurm decides)."""
        nodes = self.nodes()
        if not nodes:
            return None
        part = self.effective_partition(request.partition)
        mine = [n for n in nodes if not part or part in n.partitions]
        if not mine:
            return None          # an unknown partition: sbatch says so, naming it
        wanted = [x for x in re.split(r"[&,]", request.constraint) if x]

        def fits(n: Node) -> bool:
            return (n.cpus >= request.cpus and n.gpus >= request.gpus and (not request.mem_mb or n.mem_mb >= request.mem_mb)
                    and all(x in n.features for x in wanted))
        if any(fits(n) for n in mine):
            return None
        best = max(mine, key=lambda n: (n.gpus, n.cpus, n.mem_mb))
        return (f"asks for {request.describe()}, more than any node of partition {part or '(default)'} has "
                f"(largest: {best.cpus} CPUs, {best.gpus} GPUs, {best.mem_mb} MB memory"
                + (f", features {','.join(best.features)}" if best.features else "") + ")")

    def partition_exists(self, name: str) -> Optional[bool]:
        """Whether Slurm knows partition `name` (None: Slurm did not answer)."""
        parts = self.partitions()
        return None if not parts else name in parts

    def missing_default_partition(self, name: str, say: Callable[[str], None] = notice) -> bool:
        """Whether the built-in default partition `name` ("gpu", upstream's) should be dropped so that
        jobs go to the cluster's default one: it does not exist here and $SBATCH_PARTITION does not
        decide anyway. Says so in one line (`say`: the run's backend, whose view shows it)."""
        if not name or os.environ.get("SBATCH_PARTITION") or self.partition_exists(name) is not False:
            return False
        say(f"this cluster has no partition {name!r} (the built-in default): submitting to its default "
               f"partition {self.default_partition() or '(none)'!r}")
        return True
