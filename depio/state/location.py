"""Where the state store lives, and how many runs its history keeps: the environment's say.

    .depio/state.sqlite          next to .depio/logs/, relative to the directory the pipeline runs in

`DEPIO_STATE` moves the database file (a path; an existing folder gets `state.sqlite` inside) and
`DEPIO_STATE=off` turns it off. Without it, `DEPIO_LOG_DIR=DIR` puts it at `DIR/state.sqlite`, next to
the logs as in `.depio/` (so a moved log folder leaves no `.depio/` behind; like the logs' run
folders, it is then one folder per project); `DEPIO_LOG_DIR=off` leaves it in `.depio/`.
`DEPIO_LOG_KEEP` (default 20, as for log folders) is how many runs the history keeps.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

STATE_ENV = "DEPIO_STATE"
KEEP_ENV = "DEPIO_LOG_KEEP"              # shared with the log folders (depio/view/logs.py)
LOG_DIR_ENV = "DEPIO_LOG_DIR"
DEFAULT_STATE_PATH = os.path.join(".depio", "state.sqlite")
DEFAULT_LOG_DIR = os.path.join(".depio", "logs")
DEFAULT_KEEP = 20
STATE_FILE = "state.sqlite"
_OFF = ("off", "none", "0", "false", "no")


def state_path(env: Optional[Mapping[str, str]] = None) -> Optional[Path]:
    """Where the database is (None: the state is off)."""
    env = env if env is not None else os.environ
    value = env.get(STATE_ENV, "").strip()
    if value.lower() in _OFF and value:
        return None
    logs = env.get(LOG_DIR_ENV, "").strip()
    if not value and logs and logs.lower() not in _OFF:     # next to the logs, as .depio/ holds both
        value = os.path.join(logs, STATE_FILE)
    path = Path(os.path.abspath(os.path.expanduser(value or DEFAULT_STATE_PATH)))
    return path / STATE_FILE if path.is_dir() else path


def keep_runs(env: Optional[Mapping[str, str]] = None) -> int:
    try:
        return max(1, int((env if env is not None else os.environ).get(KEEP_ENV, DEFAULT_KEEP)))
    except ValueError:
        return DEFAULT_KEEP


__all__ = ["state_path", "keep_runs", "STATE_ENV", "KEEP_ENV", "LOG_DIR_ENV", "DEFAULT_STATE_PATH", "DEFAULT_LOG_DIR",
           "DEFAULT_KEEP", "STATE_FILE"]
