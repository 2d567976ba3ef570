"""Steady background load for the serving tests: threads that keep posting single-image
predictions and record every outcome, so a test can assert that nothing failed while replicas
scaled, died or switched model versions."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import httpx


class Outcome(NamedTuple):
    t: float  # time.monotonic() when the answer came
    status: int  # HTTP status, -1 for a transport error
    version: str | None  # model version that answered (200 only)
    detail: str | None  # predicted class (200) or the start of the error


class PredictLoad:
    """``workers`` threads, each sending one prediction after another until the ``with`` ends."""

    def __init__(self, url: str, workers: int, images: list[bytes]):
        self.url = url
        self.images = images
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=60) as client:
            n = i
            while not self.stop_event.is_set():
                n += 1
                try:
                    r = client.post(f"{self.url}/v1/predict",
                                    files=[("file", ("x.png", self.images[n % len(self.images)], "image/png"))])
                    if r.status_code == 200:
                        res = r.json()["results"][0]
                        outcome = Outcome(time.monotonic(), 200, res["model_version"], res["class"])
                    else:
                        outcome = Outcome(time.monotonic(), r.status_code, None, r.text[:200])
                except httpx.HTTPError as exc:
                    outcome = Outcome(time.monotonic(), -1, None, repr(exc)[:200])
                with self.lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> "PredictLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if o.status != 200]


def wait_for(cond, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``cond`` until it is true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
