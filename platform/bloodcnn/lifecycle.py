"""Signals and leftovers for the commands that start servers (the main job, ``bloodcnn train``).

A :class:`Guard` makes three promises for the process that holds it:

* **Signals**: SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so ``finally``
  blocks stop what was started; the exit status is 128 + the signal (130, 143). A second signal
  while stopping (a second Ctrl-C) forces the stop: SIGKILL to everything the job started, then
  ``os._exit``. Ray replaces the SIGTERM handler in ``ray.init`` and Ray Train the SIGINT handler
  in ``fit()``, so call :func:`reinstall` after those (the training job runs ``fit()`` in a thread,
  where Ray Train installs none).
* **Leftovers**: every process started after :meth:`Guard.start` carries ``BLOODCNN_JOB_TAG`` in
  its environment; :meth:`Guard.sweep` stops whichever of them is still alive (Ray leaves its
  dashboard and runtime-env agents running when the raylet goes first).
* **SIGKILL**: a watchdog process (``bloodcnn.watchdog``) notices within 0.25 s that the job is
  gone and stops the tagged processes, so none outlives the job by more than ~5 s.
  (``PR_SET_PDEATHSIG`` is not used: it fires when the *thread* that started a child ends, which
  broke restarting SeaweedFS from a helper thread.)

``BLOODCNN_TEST_PAUSE=<stage>`` makes :func:`pause_point` hold the job at that stage so the tests
can signal it there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bloodcnn import procs

TAG_ENV = "BLOODCNN_JOB_TAG"
PAUSE_ENV = "BLOODCNN_TEST_PAUSE"
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: "Guard | None" = None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else 130


def interruption(exc: BaseException | None) -> Interrupted | None:
    """The ``Interrupted`` that ``exc`` wraps, if any. A signal can land in code that turns the
    exception it raises into another one: Python re-raises an exception from a descriptor's
    ``__set_name__`` as a RuntimeError, so a Ctrl-C while a module defines its classes (Ray Data's,
    imported during prepare) arrives as "Error calling __set_name__ ..."."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class Guard:
    """See the module docstring. ``with Guard("train") as g:`` = ``start()`` + ``install()``,
    and on the way out ``sweep()`` + ``restore()``."""

    def __init__(self, name: str = "bloodcnn", *, on_force: Callable[[str], None] | None = None):
        self.name = name
        self.tag = f"{name}-{os.getpid()}-{secrets.token_hex(4)}"
        self.signum: int | None = None
        self.stopping = False
        self.watchdog: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}
        self._on_force = on_force
        self._saved_tag: str | None = None

    # ------------------------------------------------------------------ set-up

    def start(self, log_path: str | Path | None = None) -> "Guard":
        """Tag this process's future children and start the watchdog."""
        self._saved_tag = os.environ.get(TAG_ENV)
        os.environ[TAG_ENV] = self.tag
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.watchdog = subprocess.Popen(
                [sys.executable, "-m", "bloodcnn.watchdog", str(os.getpid()), TAG_ENV, self.tag],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )
        finally:
            if log_path:
                out.close()
        return self

    def install(self) -> "Guard":
        """Take over SIGINT and SIGTERM (main thread only; elsewhere a no-op)."""
        global _active
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)
        _active = self
        return self

    def ensure_installed(self) -> list[str]:
        """Put our handlers back; returns the signals whose Python handler had been replaced.
        Installed again either way: C++ code (Ray's core worker) may have replaced the process's
        handler behind Python's back."""
        fixed = []
        if threading.current_thread() is not threading.main_thread():
            return fixed
        for sig in SIGNALS:
            if signal.getsignal(sig) != self._on_signal:
                fixed.append(signal.Signals(sig).name)
            signal.signal(sig, self._on_signal)
        return fixed

    def restore(self) -> None:
        global _active
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if _active is self:
            _active = None
        if os.environ.get(TAG_ENV) == self.tag:
            if self._saved_tag is None:
                os.environ.pop(TAG_ENV, None)
            else:
                os.environ[TAG_ENV] = self._saved_tag

    def __enter__(self) -> "Guard":
        return self.start().install()

    def __exit__(self, *exc) -> None:
        self.stopping = True
        try:
            self.sweep()
        finally:
            self.restore()

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame) -> None:
        if self.stopping or self.signum is not None:
            self.force(signum)
        self.signum = signum
        raise Interrupted(signum)

    def begin_stop(self) -> None:
        """From here on a signal forces the stop instead of raising."""
        self.stopping = True

    def force(self, signum: int) -> None:
        """SIGKILL everything this job started and exit now with 128 + ``signum``."""
        left = self.leftovers()
        procs.send(left, signal.SIGKILL)
        message = f"\n==> forced stop ({signal.Signals(signum).name} again): killed {len(left)} process(es)\n"
        if self._on_force is not None:
            try:
                self._on_force(message)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        else:
            os.write(2, message.encode())
        os._exit(128 + signum)

    # ------------------------------------------------------------------ leftovers

    def leftovers(self) -> list[procs.Proc]:
        """Live processes started by this job (the watchdog excluded)."""
        exclude = [self.watchdog.pid] if self.watchdog is not None else []
        return procs.tagged(TAG_ENV, self.tag, exclude=exclude)

    def sweep(self, grace_s: float = 2.0, budget_s: float = 6.0) -> list[procs.Proc]:
        """Stop whatever this job started that is still running; returns what was stopped."""
        stopped: list[procs.Proc] = []
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            left = self.leftovers()
            if not left:
                break
            stopped += procs.stop(left, grace_s=grace_s)
        return stopped


@contextlib.contextmanager
def guarded_local_ray(name: str) -> Iterator[Guard | None]:
    """For a command that starts a local Ray unless ``$RAY_ADDRESS`` names a cluster: a
    :class:`Guard` around it, and on the way out ``ray.shutdown()`` and a sweep."""
    if os.environ.get("RAY_ADDRESS"):
        yield None
        return
    guard = Guard(name).start()
    guard.install()
    try:
        yield guard
    finally:
        guard.begin_stop()
        try:
            if "ray" in sys.modules:
                import ray

                done = threading.Event()

                def shutdown() -> None:
                    try:
                        ray.shutdown()
                    finally:
                        done.set()

                threading.Thread(target=shutdown, daemon=True).start()
                done.wait(10)
            guard.sweep()
        finally:
            guard.restore()


def active() -> Guard | None:
    return _active


def reinstall() -> list[str]:
    """After ``ray.init`` / Ray Train: our signal handlers back (if a guard is active)."""
    return _active.ensure_installed() if _active is not None else []


def keep_handlers_in_ray() -> None:
    """Call before ``ray.init()``: while a guard is active, Ray's ``set_sigterm_handler`` (used by
    ``ray.init`` and by its local node, whose handlers end the process with ``sys.exit``) leaves
    our SIGTERM handler in place, so a SIGTERM during Ray's start-up is ours too (exit 143 after a
    clean stop) rather than a bare ``SystemExit(15)``."""
    import ray._private.utils as ray_utils

    if getattr(ray_utils.set_sigterm_handler, "_bloodcnn", False):
        return  # already wrapped
    ray_set = ray_utils.set_sigterm_handler

    def set_sigterm_handler(handler):
        if _active is None:
            ray_set(handler)

    set_sigterm_handler._bloodcnn = True
    ray_utils.set_sigterm_handler = set_sigterm_handler


def pause_point(stage: str, say: Callable[[str], None] | None = None) -> None:
    """Hold here forever (until a signal) when ``$BLOODCNN_TEST_PAUSE`` names ``stage``."""
    if os.environ.get(PAUSE_ENV) != stage:
        return
    (say or (lambda m: print(m, file=sys.stderr, flush=True)))(f"    paused at stage {stage!r} ({PAUSE_ENV})")
    while True:
        time.sleep(1)
