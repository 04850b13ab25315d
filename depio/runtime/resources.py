"""What a task asks for (`Resources`), matched against what a worker holds (`Offer`, in `offers`), so
that a GPU task never lands on a CPU-only worker.

A task's request comes from its Slurm parameters (`slurm_cpus_per_task`, `slurm_gpus_per_task`,
`slurm_gres="gpu:2"`, `slurm_mem`, `slurm_time`, `slurm_partition`, `slurm_constraint`, and
submitit's `cpus_per_task`, `gpus_per_node`, `mem_gb`, `timeout_min`) and from an explicit
`resources=` (a dict with `cpus`, `gpus`, `mem_mb`/`mem_gb`, `time_min`, `partition`, `constraint`,
or a `Resources`), which wins. Most tasks ask for nothing special: their request is `DEFAULT`, and
on the wire their spec carries no shape at all (`shape_of` gives None), so routing costs them
nothing.

Partition and constraint only bind workers that run in Slurm: a local run ignores them.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

# what a worker holds has a module of its own (a worker imports only that); reached from here too
from .offers import Offer, gpu_ids, local_offer, slurm_offer, split_gpus  # noqa: F401

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
