"""submitit parameters: upstream's defaults, per-task layers, the executor."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..runtime.resources import Resources, explicit_fields


TWO_DAYS_IN_MINUTES = 60 * 48
DEFAULT_PARAMS: Dict[str, Any] = {"slurm_time": TWO_DAYS_IN_MINUTES, "slurm_partition": "gpu", "slurm_mem": 32,
                                  "gpus_per_node": 0}


_GENERIC = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "name",
            "stderr_to_stdout"}


def sbatch_options(r: Resources) -> Dict[str, Any]:
    """What a request asks of Slurm besides CPUs and time (GPUs, memory, partition, constraint), in
    submitit's keywords: for a per-task job and for a pilot group alike."""
    out: Dict[str, Any] = {}
    if r.gpus:
        out["gres"] = f"gpu:{r.gpus}"
    if r.mem_mb:
        out["mem"] = f"{r.mem_mb}M"
    for name in ("partition", "constraint"):
        if getattr(r, name):
            out[name] = getattr(r, name)
    return out


def resource_parameters(resources: Any) -> Dict[str, Any]:
    """A task's explicit `resources=` as a per-task layer of submitit keywords (it wins over the
    task's Slurm parameters, as in routing): the job asks for what the task asks for."""
    fields = explicit_fields(resources)
    r = Resources(**fields)
    out = sbatch_options(r)
    if "cpus" in fields:
        out["cpus_per_task"] = r.cpus
    if r.time_min:
        out["time"] = max(1, int(-(-r.time_min // 1)))
    return out


def sbatch_parameters(*layers: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Merge parameter dicts (later ones win) in upstream's AutoExecutor spelling ("slurm_partition",
    "mem_gb", ...) into `submitit.SlurmExecutor.update_parameters` keywords; anything submitit does
    not know ("slurm_reservation") becomes an extra `#SBATCH --reservation=...` line."""
    from submitit.slurm import slurm as ss
    valid = set(ss._get_default_parameters())
    equiv = ss.SlurmExecutor._equivalence_dict()
    merged: Dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    out: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for k, v in merged.items():
        if k in ("slurm_additional_parameters", "additional_parameters"):
            extra.update(v or {})
            continue
        if k in _GENERIC:
            name = equiv.get(k, k)
            if k == "mem_gb":
                v = ss._convert_mem(v)
            out[name] = v
            continue
        name = k[len("slurm_"):] if k.startswith("slurm_") else k
        if name in valid:
            out[name] = v
        else:
            extra[name] = v
    if extra:
        out["additional_parameters"] = extra
    return out


def _minutes(value: Any) -> float:
    """Slurm's --time in minutes: 90, "90", "1:30:00", "2-00:00:00"."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [float(x) for x in text.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] + parts[1] / 60
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return days * 1440 + minutes


def _python_path_setup() -> List[str]:
    """Lines for the job script: the pipeline's import path, so jobs import depio and the user's modules."""
    prefixes = tuple({sys.prefix, sys.base_prefix})
    paths = [p for p in sys.path if p and not p.startswith(prefixes)]   # the job's python has its own
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in paths:
        paths.insert(0, here)
    joined = os.pathsep.join(paths).replace("'", "'\\''")
    return [f"export PYTHONPATH='{joined}'${{PYTHONPATH:+:$PYTHONPATH}}", "export PYTHONUNBUFFERED=1"]


def _slurm_executor(folder: Path, internal_executor=None):
    """A submitit executor that talks to Slurm: the user's (an AutoExecutor's Slurm executor) or a new
    `submitit.SlurmExecutor` (never AutoExecutor's guess, which depends on `srun` being on PATH)."""
    import submitit
    ex = internal_executor
    if ex is not None and isinstance(ex, submitit.AutoExecutor):
        ex = ex._executor
    if ex is None:
        ex = submitit.SlurmExecutor(folder=folder)
    return ex


class _Params:
    """Temporarily applies parameters to a submitit executor (its parameters are shared state)."""

    def __init__(self, ex, params: Dict[str, Any]):
        self.ex, self.params = ex, params

    def __enter__(self):
        self.saved = dict(self.ex.parameters)
        if self.params:
            if hasattr(self.ex, "_internal_update_parameters"):
                self.ex._internal_update_parameters(**self.params)
            else:
                self.ex.update_parameters(**self.params)
        return self.ex

    def __exit__(self, *exc):
        self.ex.parameters.clear()
        self.ex.parameters.update(self.saved)


def _job_stderr_tail(job, limit: int = 3000) -> str:
    try:
        text = Path(job.paths.stderr).read_text(errors="replace")
    except (OSError, AttributeError):
        return ""
    return text[-limit:]
