"""``python -m bloodcnn.watchdog PARENT_PID VAR VALUE``: stop a job's servers once the job is gone.

A job (``jobs/main.py``, ``bloodcnn train``) starts this before it starts any server. It waits
until PARENT_PID exits, however that happens (SIGKILL and the OOM killer included), then stops
every process whose environment holds ``VAR=VALUE``, and every descendant of the job it saw in
its last look at the process tree (every 2 s; Ray's agents lose their place in the tree when the
raylet dies first): SIGTERM, 2 s, SIGKILL, again until two scans find none (at most ~8 s). After
a clean exit there is nothing left to stop and it just exits.

It runs in a session of its own, so a Ctrl-C in the terminal does not reach it, and it ignores
SIGINT. Standard library only (through ``bloodcnn.procs``): it starts in well under a second.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from bloodcnn import procs

POLL_S = 0.25
SNAPSHOT_S = 2.0
SWEEP_S = 8.0


def sweep(var: str, value: str, known: dict[int, procs.Proc] | None = None,
          budget_s: float = SWEEP_S) -> list[procs.Proc]:
    """Stop every process tagged ``var=value`` (but this one) and those of ``known`` that still
    run; again until two scans in a row find nothing. Returns what it stopped."""
    known = dict(known or {})
    stopped: list[procs.Proc] = []
    deadline = time.monotonic() + budget_s
    empty = 0
    while time.monotonic() < deadline and empty < 2:
        left = {p.pid: p for p in procs.tagged(var, value)}
        left.update({pid: p for pid, p in known.items() if pid not in left and procs.alive(p)})
        if not left:
            empty += 1
            time.sleep(0.3)
            continue
        empty = 0
        stopped += procs.stop(list(left.values()), grace_s=2.0)
        known = {}
    return stopped


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    parent, var, value = int(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    me = os.getpid()
    known: dict[int, procs.Proc] = {}  # the job's descendants as last seen: re-parented ones too
    next_snapshot = 0.0
    while os.getppid() == parent:  # re-parented the moment the parent exits
        now = time.monotonic()
        if now >= next_snapshot:
            live = {p.pid: p for p in procs.descendants(parent) if p.pid != me and not p.zombie}
            known = {**{pid: p for pid, p in known.items() if procs.alive(p)}, **live}
            next_snapshot = now + SNAPSHOT_S
        time.sleep(POLL_S)
    t0 = time.monotonic()
    stopped = sweep(var, value, known)
    if stopped:
        names = ", ".join(sorted({p.name for p in stopped}))
        print(f"bloodcnn watchdog: job {parent} is gone; stopped {len(stopped)} process(es) it left "
              f"({names}) in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
