"""Long-lived worker pools: a dispatcher as a service that many pipelines share.

Pipelines reach a pool through `PoolExecutor("name")` or, unchanged, through the environment
variable `DEPIO_POOL=name`. The modules, by concern:

- `registry`: the pools known on this machine (connection and key files under `$DEPIO_HOME/pools`),
- `service`: the pool itself (`PoolService`: its dispatcher and workers; `serve`, `start_detached`),
- `control`: one request to a running pool (`status`, `stop`),
- `executor`: the pipeline's side (`PoolExecutor`, `executor_from_environment`),
- `cli`: `depio pool start|status|stop` (`add_pool_commands`).
"""
from .control import request, status, stop
from .executor import PoolExecutor, executor_from_environment
from .registry import POOL_ENV, PoolInfo, pools_dir, resolve_pool
from .service import PoolService, serve, start_detached
from .cli import add_pool_commands

__all__ = ["POOL_ENV", "PoolExecutor", "PoolInfo", "PoolService", "add_pool_commands", "executor_from_environment",
           "pools_dir", "request", "resolve_pool", "serve", "start_detached", "status", "stop"]
