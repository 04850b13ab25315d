"""What a task asks for (`Resources`) and what a worker holds (`Offer`), so that a GPU task never
lands on a CPU-only worker.

A task's request comes from its Slurm parameters (`slurm_cpus_per_task`, `slurm_gpus_per_task`,
`slurm_gres="gpu:2"`, `slurm_mem`, `slurm_time`, `slurm_partition`, `slurm_constraint`, and
submitit's `cpus_per_task`, `gpus_per_node`, `mem_gb`, `timeout_min`) and from an explicit
`resources=` (a dict with `cpus`, `gpus`, `mem_mb`/`mem_gb`, `time_min`, `partition`, `constraint`,
or a `Resources`), which wins. Most tasks ask for nothing special: their request is `DEFAULT`, and
on the wire their spec carries no shape at all (`shape_of` gives None), so routing costs them
nothing.

A worker's offer is per slot: what one task running in one of its slots may use. A local worker
offers the machine (its CPUs; GPUs from CUDA_VISIBLE_DEVICES or `nvidia-smi -L`, shared out among
the slots); a Slurm job's worker offers its allocation (SLURM_* variables), also shared out.
Partition and constraint only bind workers that run in Slurm: a local run ignores them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["Resources", "Offer", "DEFAULT", "PIN", "request_of", "fits", "shape_of", "from_shape", "pinned_shape",
           "local_offer", "slurm_offer", "gpu_ids", "split_gpus", "parse_mem_mb"]


@dataclass(frozen=True)
class Resources:
    """A task's request, per task. 0 / "" mean: no particular ask."""
    cpus: int = 1
    gpus: int = 0
    mem_mb: int = 0
    time_min: float = 0.0
    partition: str = ""
    constraint: str = ""

    def describe(self) -> str:
        parts = [f"{self.cpus} CPU(s)", f"{self.gpus} GPU(s)"]
        if self.mem_mb:
            parts.append(f"{self.mem_mb} MB memory")
        if self.time_min:
            parts.append(f"{self.time_min:g} min")
        if self.partition:
            parts.append(f"partition {self.partition}")
        if self.constraint:
            parts.append(f"constraint {self.constraint}")
        return ", ".join(parts)


DEFAULT = Resources()


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


def fits(request: Resources, offer: Optional[Offer]) -> bool:
    """Whether a task asking `request` may run in one slot of a worker offering `offer`. A worker
    that said nothing (None) takes only tasks that ask for nothing special."""
    if request is DEFAULT or request == DEFAULT:
        return True
    if offer is None:
        return False
    if request.gpus > offer.gpus or request.cpus > max(offer.cpus, 1):
        return False
    if request.mem_mb and offer.mem_mb and request.mem_mb > offer.mem_mb:
        return False
    if request.time_min and offer.time_min and request.time_min > offer.time_min:
        return False
    if offer.partition:                     # in Slurm: where it runs matters too
        if request.partition and request.partition != offer.partition:
            return False
        if request.constraint and request.constraint != offer.constraint:
            wanted = [f for f in re.split(r"[&,]", request.constraint) if f]
            if not all(f in offer.features for f in wanted):
                return False
    return True


# ---------------------------------------------------------------- a task's request

def parse_mem_mb(value: Any) -> int:
    """Slurm's --mem in MB: 32 (MB), "500M", "4G", "1T"."""
    if value is None or value == "":
        return 0
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", str(value).upper())
    if not m:
        return 0
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(float(m.group(1)) * factor)


def _minutes(value: Any) -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    text, days = str(value).strip(), 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(x) for x in text.split(":")]
    minutes = parts[0] if len(parts) == 1 else (parts[0] + parts[1] / 60 if len(parts) == 2 else
                                                 parts[0] * 60 + parts[1] + parts[2] / 60)
    return days * 1440 + minutes


def _gpus(value: Any) -> int:
    """"2", 2, "a100:2", "gpu:a100:2" -> 2."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    last = str(value).split(",")[0].split(":")[-1]
    return int(last) if last.isdigit() else 1


def _from_slurm(params: Mapping[str, Any]) -> Dict[str, Any]:
    """A request's fields from Slurm parameters in either spelling ("slurm_x" or submitit's)."""
    p = {(k[len("slurm_"):] if k.startswith("slurm_") else k): v for k, v in params.items()}
    out: Dict[str, Any] = {}
    if p.get("cpus_per_task"):
        out["cpus"] = int(p["cpus_per_task"])
    for name in ("gpus_per_task", "gpus_per_node", "gpus"):
        if p.get(name):
            out["gpus"] = _gpus(p[name])
            break
    else:
        for item in str(p.get("gres") or "").split(","):       # "gpu:2", "gpu:a100:2", "gpu"
            if item.startswith("gpu"):
                out["gpus"] = _gpus(item) if ":" in item else 1
                break
    if p.get("mem"):
        out["mem_mb"] = parse_mem_mb(p["mem"])
    elif p.get("mem_gb"):
        out["mem_mb"] = int(float(p["mem_gb"]) * 1024)
    elif p.get("mem_per_cpu"):
        out["mem_mb"] = parse_mem_mb(p["mem_per_cpu"]) * int(out.get("cpus", 1))
    for name in ("time", "timeout_min"):
        if p.get(name):
            out["time_min"] = _minutes(p[name])
            break
    for name in ("partition", "constraint"):
        if p.get(name):
            out[name] = str(p[name])
    return out


def explicit_fields(value: Any) -> Dict[str, Any]:
    """A task's `resources=` (a dict or a `Resources`) as request fields, checked: only what it names."""
    if isinstance(value, Resources):
        return dataclasses.asdict(value)
    out: Dict[str, Any] = {}
    for k, v in dict(value).items():
        if k in ("cpus", "gpus"):
            out[k] = int(v)
        elif k in ("mem_mb", "mem"):
            out["mem_mb"] = parse_mem_mb(v)
        elif k == "mem_gb":
            out["mem_mb"] = int(float(v) * 1024)
        elif k in ("time_min", "time"):
            out["time_min"] = _minutes(v)
        elif k in ("partition", "constraint"):
            out[k] = str(v or "")
        else:
            raise ValueError(f"unknown resource {k!r} (known: cpus, gpus, mem_mb, mem_gb, time_min, "
                             f"partition, constraint)")
    return out


def request_of(task: Any, base: Optional[Mapping[str, Any]] = None) -> Resources:
    """A task's request: `base` (an executor's Slurm parameters), then the task's own Slurm
    parameters, then its explicit `resources=` (later ones win). `DEFAULT` itself when nothing
    special is asked, so that callers can test `is DEFAULT`."""
    fields: Dict[str, Any] = {}
    if base:
        fields.update(_from_slurm(base))
    own = getattr(task, "_slurm_parameters", False)    # a Task's, without making its empty dict
    if own is False:
        own = getattr(task, "slurm_parameters", None)
    if own:
        fields.update(_from_slurm(own))
    explicit = getattr(task, "resources", None)
    if explicit:
        fields.update(explicit_fields(explicit))
    if not fields:
        return DEFAULT
    r = Resources(**fields)
    return DEFAULT if r == DEFAULT else r


PIN = "pin"


def pinned_shape(token: str) -> tuple:
    """The shape of a task that only the worker with `Offer(pin=token)` may take."""
    return (PIN, token)


def shape_of(request: Resources) -> Optional[tuple]:
    """A request as it travels in a `TaskSpec` (None: the default, which every worker fits)."""
    return None if request is DEFAULT or request == DEFAULT else dataclasses.astuple(request)


def from_shape(shape: Optional[tuple]) -> Resources:
    return DEFAULT if shape is None else Resources(*shape)


# ---------------------------------------------------------------- what a worker holds

def gpu_ids(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set (Slurm sets it for a job with GPUs),
    else those `nvidia-smi -L` lists, else none."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import shutil                  # here, not at the top: every worker imports this module and
    import subprocess              # subprocess costs ~5 ms of its start-up; few ask nvidia-smi
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]
    return []


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
