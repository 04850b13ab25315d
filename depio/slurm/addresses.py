"""Where jobs connect back to, and how the run's key reaches them."""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import uuid
from pathlib import Path
from typing import List, Optional


ADDRESS_ENV = "DEPIO_ADDRESS"


def _interface_addresses() -> List[str]:
    """IPv4 addresses of this host's interfaces, read locally (ioctl), loopback last."""
    import fcntl
    import struct
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        found.append(socket.inet_ntoa(packed[20:24]))
    return sorted(found, key=lambda ip: ipaddress.ip_address(ip).is_loopback)


def default_host() -> str:
    """An address compute nodes can reach: the host name's address unless it is loopback, else the
    first non-loopback interface address (looked up locally, nothing is sent), else loopback."""
    try:
        ip = socket.gethostbyname(socket.getfqdn())
        if not ipaddress.ip_address(ip).is_loopback:
            return ip
    except (OSError, ValueError):
        pass
    try:
        addresses = _interface_addresses()
    except (OSError, ImportError):
        addresses = []
    return addresses[0] if addresses else "127.0.0.1"


def bind_address(address: Optional[str] = None) -> str:
    """A ZeroMQ bind address from `address`, `$DEPIO_ADDRESS` or `default_host()`:
    "10.0.0.5" -> "tcp://10.0.0.5:*"; "tcp://host:5555" stays."""
    a = (address or os.environ.get(ADDRESS_ENV) or "").strip() or default_host()
    if "://" not in a:
        if ":" in a and not a.startswith("[") and a.count(":") == 1:
            a = f"tcp://{a}"
        elif a.count(":") > 1 and not a.startswith("["):       # bare IPv6
            a = f"tcp://[{a}]:*"
        else:
            a = f"tcp://{a}:*"
    host = a.split("://", 1)[1]
    if not re.search(r":(\d+|\*)$", host):
        a += ":*"
    return a


def write_key_file(folder: Path, key: bytes) -> Path:
    """The key in a fresh file only its owner can read (created 0600, never widened)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".depio-key-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return path


def _remove(path: Optional[Path]) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass
