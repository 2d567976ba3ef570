"""The process table, read from ``/proc`` (Linux): find what a job started and stop it.

Why an environment tag: the processes a job starts do not stay its descendants. Ray's agents
and workers are children of the raylet, and when the raylet dies they are re-parented to init;
a job killed with SIGKILL leaves SeaweedFS and Ray's agents behind as orphans. Every process
started below a job inherits its environment, though, so a variable set by the job before it
starts anything (``lifecycle.TAG_ENV``) names all of them, wherever they end up in the tree.

Only the standard library is used: the watchdog imports this module and must start fast.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable

PROC = "/proc"


@dataclass(frozen=True)
class Proc:
    """One process. ``(pid, start)`` names it even after the pid is reused."""

    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks after boot
    state: str  # R, S, D, Z, ...
    name: str  # the kernel's comm (15 chars), e.g. "weed", "raylet", "gcs_server", "ray::IDLE"

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def read(pid: int) -> Proc | None:
    """The process ``pid`` now, or None when there is none."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return Proc(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19]), state=fields[0], name=name)


def processes() -> list[Proc]:
    out = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            p = read(int(entry))
            if p is not None:
                out.append(p)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def environ_value(pid: int, var: str) -> str | None:
    """``var`` in the environment ``pid`` started with (None if unset or unreadable)."""
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = var.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def tagged(var: str, value: str | None = None, exclude: Iterable[int] = ()) -> list[Proc]:
    """Live (not zombie) processes whose environment has ``var`` (equal to ``value`` if given)."""
    skip = set(exclude) | {os.getpid()}
    out = []
    for p in processes():
        if p.pid in skip or p.zombie:
            continue
        found = environ_value(p.pid, var)
        if found is not None and (value is None or found == value):
            out.append(p)
    return out


def descendants(root: int, table: list[Proc] | None = None) -> list[Proc]:
    """Every process below ``root`` in the tree as it is now."""
    table = processes() if table is None else table
    children: dict[int, list[Proc]] = {}
    for p in table:
        children.setdefault(p.ppid, []).append(p)
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child.pid)
    return out


def alive(p: Proc) -> bool:
    """Is ``p`` still running (same pid and start time, not a zombie)?"""
    now = read(p.pid)
    return now is not None and now.start == p.start and not now.zombie


def send(procs: Iterable[Proc], sig: int) -> None:
    for p in procs:
        if alive(p):
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(procs: Iterable[Proc], timeout_s: float, poll_s: float = 0.1) -> list[Proc]:
    """Wait until none of ``procs`` is alive or ``timeout_s`` passed; return those left."""
    left = [p for p in procs if alive(p)]
    deadline = time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        time.sleep(poll_s)
        left = [p for p in left if alive(p)]
    return left


def stop(procs: Iterable[Proc], grace_s: float = 3.0) -> list[Proc]:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL. Returns the processes that were still
    alive when this was called (what it stopped)."""
    targets = [p for p in procs if alive(p)]
    if not targets:
        return []
    send(targets, signal.SIGTERM)
    left = wait_gone(targets, grace_s)
    if left:
        send(left, signal.SIGKILL)
        wait_gone(left, 2.0)
    return targets


def describe(p: Proc, width: int = 90) -> str:
    cmd = cmdline(p.pid) or p.name
    text = f"{p.pid} {cmd}"
    return text if len(text) <= width else text[: width - 3] + "..."
