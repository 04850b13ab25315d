"""Long-lived worker pools: a dispatcher as a service that many pipelines share.

Pipelines reach a pool through `PoolExecutor("name")` or, unchanged, through the environment
variable `DEPIO_POOL=name`. The modules, by concern:

- `registry`: the pools known on this machine (connection and key files under `$DEPIO_HOME/pools`),
- `service`: the pool itself (`PoolService`: its dispatcher and workers; `serve`, `start_detached`),
- `control`: one request to a running pool (`status`, `stop`),
- `executor`: the pipeline's side (`PoolExecutor`, `executor_from_environment`),
- `cli`: `depio pool start|status|stop` (`add_pool_commands`).

Names load with their module on first use (PEP 562): every `Pipeline.run()` looks for `DEPIO_POOL`,
and a run that uses no pool should not pay for importing the service, its command line and argparse.
"""
import importlib
from typing import Any

_WHERE = {"request": "control", "status": "control", "stop": "control",
          "PoolExecutor": "executor", "executor_from_environment": "executor",
          "POOL_ENV": "registry", "PoolInfo": "registry", "pools_dir": "registry", "resolve_pool": "registry",
          "PoolService": "service", "serve": "service", "start_detached": "service",
          "add_pool_commands": "cli"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'depio.pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_WHERE))
