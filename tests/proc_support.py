"""A command under test as a real process: its console as it happens, signals, and the processes
it leaves behind.

Every process the command starts inherits ``BLOODCNN_TEST_PROBE=<unique value>`` from its
environment, also the ones re-parented to init after their parent died, so
:meth:`Command.leftovers` finds exactly what this command started (and nothing of other tests,
other engineers or a local Kubernetes).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

from bloodcnn import procs

PROBE = "BLOODCNN_TEST_PROBE"
SERVERS = ("weed", "raylet", "gcs_server")


def server_like(p: procs.Proc) -> bool:
    """SeaweedFS, Ray's GCS and raylet, and Ray's workers and agents (``ray::...``)."""
    return p.name in SERVERS or p.name.startswith("ray::")


class Command:
    def __init__(self, args: list[str], *, env: dict[str, str], cwd: str | Path):
        self.probe = f"probe-{secrets.token_hex(6)}"
        self.env = {**env, PROBE: self.probe}
        self.args = args
        self.out = ""  # stdout and stderr as written: bars redraw with \r
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.signalled_at: float | None = None
        self.proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(65536) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(1)
            if not chunk:
                break
            with self._lock:
                self.out += chunk.decode("utf-8", "replace")

    # ------------------------------------------------------------------ console

    def lines(self) -> list[str]:
        """Console lines as a terminal shows them at the end: the last redraw of each bar."""
        with self._lock:
            text = self.out
        return [line.split("\r")[-1].rstrip() for line in text.split("\n")]

    def wait_for(self, pattern: str, timeout_s: float) -> str:
        """Until ``pattern`` (a regex) shows on the console, bar redraws included."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                m = rx.search(self.out)
            if m:
                return m.group(0)
            if self.proc.poll() is not None:
                time.sleep(0.3)  # the reader's last chunk
                with self._lock:
                    m = rx.search(self.out)
                if m:
                    return m.group(0)
                raise AssertionError(f"{self.args[1:3]} exited with {self.proc.returncode} before "
                                     f"{pattern!r}:\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout_s:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines()[-n:])

    # ------------------------------------------------------------------ signals and exit

    def send(self, sig: int) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """(exit status, seconds from the first signal, or from the start, to the exit)."""
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"still running {timeout_s:.0f}s later:\n{self.tail()}") from None
        self._reader.join(5)
        return rc, time.monotonic() - (self.signalled_at or self.started)

    # ------------------------------------------------------------------ processes

    def processes(self) -> list[procs.Proc]:
        """Live processes started by this command (the command itself is not tagged)."""
        return procs.tagged(PROBE, self.probe)

    def leftovers_after(self, timeout_s: float) -> tuple[list[str], float]:
        """Wait until nothing this command started runs any more, at most ``timeout_s``;
        return (what is still running, seconds from the first signal until none was left)."""
        deadline = time.monotonic() + timeout_s
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.25)
            left = self.processes()
        since = time.monotonic() - (self.signalled_at or self.started)
        return [f"{procs.describe(p, 70)} (state {p.state}, ppid {p.ppid}, job tag "
                f"{procs.environ_value(p.pid, 'BLOODCNN_JOB_TAG')})" for p in left], since

    def kill_all(self) -> None:
        """Clean-up after a failed assertion: SIGKILL the command and what it started."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        procs.send(self.processes(), signal.SIGKILL)


def base_env() -> dict[str, str]:
    """This process's environment without its S3 server and any Ray address."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
