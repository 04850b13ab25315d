"""The pools known on this machine: their connection files under `$DEPIO_HOME/pools` (default
`~/.depio/pools`).

`<name>.json` holds a pool's addresses, pid and key, readable only by its owner; `<name>.key` holds
the key alone for `depio-worker --key-file`. Both survive a stop, so a restarted pool binds the same
addresses with the same key and hand-started workers (`--reconnect`) come back by themselves.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..runtime import protocol as P

POOL_ENV = "DEPIO_POOL"


def pools_dir() -> Path:
    """The per-user folder of connection files, created private (0700)."""
    path = Path(os.environ.get("DEPIO_HOME", "~/.depio")).expanduser() / "pools"
    if not path.is_dir():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, without a moment where it is readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def pid_alive(pid: Optional[int]) -> bool:
    """Whether `pid` runs on this host (a zombie does not count: the pool is gone, its parent late)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


def port_of(address: str) -> Optional[int]:
    """The port of `tcp://host:port`, None if it has none (or `*`)."""
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


@dataclass
class PoolInfo:
    """The connection file of a pool."""
    name: str
    client_address: str
    worker_address: str
    key: str                       # hex
    key_file: str
    pid: Optional[int] = None
    host: str = field(default_factory=platform.node)
    started: Optional[float] = None
    log_file: str = ""

    @staticmethod
    def path_for(name: str) -> Path:
        return pools_dir() / f"{name}.json"

    def save(self) -> None:
        write_private(self.path_for(self.name), json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, name: str) -> "PoolInfo":
        path = cls.path_for(name) if not name.endswith(".json") else Path(name)
        try:
            P.check_key_file(str(path))
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LookupError(f"no pool named {name!r}: start one with `depio pool start --name {name}` "
                              f"(looked for {path})") from None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @property
    def running(self) -> bool:
        return self.pid is not None and self.host == platform.node() and pid_alive(self.pid)

    @property
    def key_bytes(self) -> bytes:
        return P.key_from_hex(self.key)


def resolve_pool(spec: str, key_file: Optional[str] = None) -> PoolInfo:
    """A pool by name, by connection-file path, or by client address (key from `key_file` or $DEPIO_KEY)."""
    if "://" in spec:
        key = P.load_key(key_file)
        if key is None:
            raise P.KeyRequiredError(f"pool address {spec} given without a key: pass a key file or set "
                                     f"${P.KEY_ENV}")
        return PoolInfo(spec, spec, "", key.hex(), key_file or "")
    return PoolInfo.load(spec)
