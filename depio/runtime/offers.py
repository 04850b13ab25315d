"""What a worker holds for each of its slots (`Offer`): what a task running in one slot may use.

A local worker offers the machine (its CPUs and memory; GPUs from CUDA_VISIBLE_DEVICES or
`nvidia-smi -L`, shared out among the slots); a Slurm job's worker offers its allocation (SLURM_*
variables), also shared out. Apart from `resources` (what a task asks for), because every worker
imports this at start and nothing of the requests.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["Offer", "local_offer", "slurm_offer", "gpu_ids", "split_gpus"]


@dataclass(frozen=True)
class Offer:
    """What a worker holds for each of its slots. 0 / "" mean unknown or unlimited."""
    cpus: int = 1
    gpus: int = 0
    mem_mb: int = 0
    time_min: float = 0.0
    partition: str = ""          # "" : not in Slurm (partition and constraint do not apply)
    constraint: str = ""
    features: Tuple[str, ...] = ()
    pin: str = ""                # a per-task job's worker: takes only the task pinned to it

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["Offer"]:
        """The offer a `Register` carried (None: the worker said nothing, e.g. an older one)."""
        if not d:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["features"] = tuple(kw.get("features") or ())
        return cls(**kw)


def gpu_ids(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set (Slurm sets it for a job with GPUs),
    else those `nvidia-smi -L` lists, else none."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import shutil                  # here, not at the top: few machines have nvidia-smi, and
    if not shutil.which("nvidia-smi"):     # subprocess costs a worker ~4 ms of its start
        return []
    import subprocess
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def split_gpus(ids: List[str], slots: int) -> List[List[str]]:
    """The GPUs each slot sees: an even share when there are enough, else one each in turn."""
    if not ids:
        return [[] for _ in range(slots)]
    if len(ids) >= slots:
        per = len(ids) // slots
        return [ids[i * per:(i + 1) * per] for i in range(slots)]
    return [[ids[i % len(ids)]] for i in range(slots)]


def _cpus_here() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _mem_here_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1024 * 1024))
    except (ValueError, OSError, AttributeError):
        return 0


def local_offer(slots: int) -> Offer:
    """A local worker's offer per slot: the machine's CPUs and memory (its slots share them), and a
    share of its GPUs (as `split_gpus` hands them out)."""
    ids = gpu_ids()
    per_slot = len(split_gpus(ids, max(1, slots))[0]) if ids else 0
    return Offer(cpus=_cpus_here(), gpus=per_slot, mem_mb=_mem_here_mb())


def slurm_offer(slots: int, walltime_min: float = 0.0, constraint: str = "",
                env: Optional[Mapping[str, str]] = None) -> Offer:
    """A Slurm job's worker offer per slot, from its allocation (the SLURM_* variables of the job)."""
    env = os.environ if env is None else env
    slots = max(1, slots)
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or (env.get("SLURM_JOB_CPUS_PER_NODE") or "1").split("(")[0] or 1)
    ids = gpu_ids(env) if env.get("CUDA_VISIBLE_DEVICES") is not None else \
        [g for g in (env.get("SLURM_JOB_GPUS") or "").split(",") if g]
    mem = int(env.get("SLURM_MEM_PER_NODE") or 0) or int(env.get("SLURM_MEM_PER_CPU") or 0) * cpus
    return Offer(cpus=max(1, cpus // slots), gpus=len(split_gpus(ids, slots)[0]) if ids else 0,
                 mem_mb=mem // slots, time_min=walltime_min, partition=env.get("SLURM_JOB_PARTITION", ""),
                 constraint=constraint, features=tuple(f for f in re.split(r"[&,]", constraint) if f))
