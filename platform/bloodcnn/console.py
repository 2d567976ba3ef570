"""The user's console: stage lines and progress bars, apart from the logs.

By default (a CLI command) lines and bars go to stderr and nothing is redirected. The main job
calls :func:`capture`: file descriptors 1 and 2 then point at a log file, so TensorFlow's C++
messages, Ray's and Serve's driver logs and anything a library prints land there, and only
:func:`say` and :func:`bar` reach the terminal (through a copy of the original stdout). With
``verbose`` the log file's content is also copied to the terminal.

Lines are at most :data:`WIDTH` columns and carry no colour.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterable

WIDTH = 100

_out: IO[str] | None = None  # where say() and bar() write; None = sys.stderr
_err: IO[str] | None = None  # error lines; None = sys.stderr
_tty = False


def out() -> IO[str]:
    return _out or sys.stderr


def err() -> IO[str]:
    return _err or sys.stderr


def width() -> int:
    stream = out()
    try:
        if stream.isatty():
            return max(40, min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns))
    except (AttributeError, ValueError, OSError):
        pass
    return WIDTH


def fit(text: str, columns: int | None = None) -> str:
    """``text`` cut to the console width (each line)."""
    columns = columns or width()
    return "\n".join(line if len(line) <= columns else line[: columns - 3] + "..." for line in text.split("\n"))


def say(text: str = "") -> None:
    """One or more lines for the user (safe while a progress bar is shown)."""
    from tqdm import tqdm

    tqdm.write(fit(text), file=out())
    out().flush()


def error(text: str) -> None:
    """An error for the user: long lines wrapped at :data:`WIDTH` (never inside a word or a URL)."""
    import textwrap

    lines = []
    for line in text.rstrip("\n").split("\n"):
        indent = line[: len(line) - len(line.lstrip())]
        lines += textwrap.wrap(line, WIDTH, subsequent_indent=indent + "  ", break_long_words=False,
                               break_on_hyphens=False) or [""]
    stream = err()
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        disable: bool = False, leave: bool = True, **kwargs: Any):
    """A tqdm bar on the console: rate and ETA, at most :data:`WIDTH` columns, no colour."""
    from tqdm import tqdm

    stream = out()
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):
        interactive = False
    kwargs.setdefault("mininterval", 0.5 if interactive else 5.0)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, leave=leave, file=stream,
                ncols=width(), dynamic_ncols=False, colour=None, **kwargs)


def rel(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter lines)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        home = Path.home()
        try:
            return "~/" + str(p.resolve().relative_to(home))
        except ValueError:
            return str(p)


class Capture:
    """fds 1 and 2 -> ``log_path`` (and, with ``verbose``, the terminal too); see :func:`capture`."""

    def __init__(self, log_path: Path, verbose: bool):
        self.log_path = log_path
        self.verbose = verbose
        self._saved: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._pipe_w: int | None = None

    def start(self) -> "Capture":
        global _out, _err, _tty
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = (os.dup(1), os.dup(2))
        _out = io.TextIOWrapper(io.FileIO(os.dup(self._saved[0]), "w"), encoding="utf-8",
                                errors="replace", line_buffering=True, write_through=True)
        _err = io.TextIOWrapper(io.FileIO(os.dup(self._saved[1]), "w"), encoding="utf-8",
                                errors="replace", line_buffering=True, write_through=True)
        if self.verbose:
            r, w = os.pipe()
            self._pipe_w = w
            terminal = self._saved[0]

            def tee() -> None:
                while True:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        break
                    os.write(log_fd, chunk)
                    try:
                        os.write(terminal, chunk)
                    except OSError:
                        pass
                os.close(r)
                os.close(log_fd)

            self._thread = threading.Thread(target=tee, name="bloodcnn-tee", daemon=True)
            self._thread.start()
            os.dup2(w, 1)
            os.dup2(w, 2)
        else:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        return self

    def console_fd(self) -> int:
        """The terminal's stdout (for a signal handler's last words)."""
        return self._saved[0] if self._saved else 1

    def stop(self) -> None:
        """Give fds 1 and 2 back to the terminal."""
        global _out, _err
        if self._saved is None:
            return
        for stream in (sys.stdout, sys.stderr, _out, _err):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        if self._pipe_w is not None:
            os.close(self._pipe_w)  # the tee ends when no one else holds the pipe
            self._pipe_w = None
            if self._thread is not None:
                self._thread.join(2.0)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        _out = _err = None


def capture(log_path: str | Path, verbose: bool = False) -> Capture:
    return Capture(Path(log_path), verbose).start()
