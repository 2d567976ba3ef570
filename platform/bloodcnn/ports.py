"""Free local TCP ports that stay free until the server that asked for one binds it.

Why not ``bind(("127.0.0.1", 0))``: that hands out a port from the kernel's ephemeral range, the
same range every outgoing connection takes its local port from. A Ray cluster opens hundreds of
connections, so a port chosen that way and bound seconds or minutes later can already be the
local end of one of them ("Failed to bind to address"). These ports come from below that range
and above Ray's worker ports (10002-19999), where nothing is handed out on its own.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20_000  # above Ray's default worker port range
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(twin_offset: int = 0, taken: set[int] | None = None) -> int:
    """A port on 127.0.0.1 that is free now and outside the ephemeral range.

    ``twin_offset``: the port ``+ twin_offset`` must be free (and outside the range) too, for
    servers that open a second listener there (SeaweedFS' gRPC port is its port + 10000).
    ``taken``: ports already chosen for the same server; both new ports are added to it."""
    taken = set() if taken is None else taken
    top = _ephemeral_start() - twin_offset
    if top <= LOWEST:
        raise RuntimeError(f"no ports below the ephemeral range ({_RANGE_FILE}) for offset {twin_offset}")
    for _ in range(500):
        port = random.randrange(LOWEST, top)
        pair = {port, port + twin_offset}
        if pair & taken or not all(_bindable(p) for p in pair):
            continue
        taken.update(pair)
        return port
    raise RuntimeError(f"no free port between {LOWEST} and {top}")
