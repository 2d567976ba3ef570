"""Training progress, from the Ray Train workers to the driver's console.

Rank 0's Keras callback (:func:`worker_callback`) sends its step count a few times a second to a
small actor (:class:`ProgressBoard`, 0 CPUs) that the driver created and passed in the train
loop config; the driver polls it (:class:`DriverView`) and draws one bar per epoch: images done,
img/s and ETA from the workers' counts, the step and what the workers are doing (training,
validating, saving the checkpoint), and at the end of the epoch its loss and accuracy.
"""

from __future__ import annotations

import time
from typing import Any

REPORT_EVERY_S = 0.5


class ProgressBoard:
    """The actor: the latest state from the workers and the events (epoch ends) in order."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []

    def update(self, state: dict[str, Any]) -> None:
        self.state = state

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def poll(self, since: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return self.state, self.events[since:]


def create_board():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


def worker_callback(board, *, steps: int, global_batch: int, total_epochs: int, phase: str):
    """A tf_keras callback for rank 0 that reports to ``board`` (fire and forget)."""
    import tf_keras as keras

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.last = 0.0

        def _send(self, step: int, stage: str, force: bool = False) -> None:
            now = time.monotonic()
            if not force and now - self.last < REPORT_EVERY_S:
                return
            self.last = now
            try:
                board.update.remote({
                    "epoch": self.epoch + 1, "epochs": total_epochs, "phase": phase, "step": step,
                    "steps": steps, "images": step * global_batch, "batch": global_batch, "stage": stage,
                    "time": time.time(),
                })
            except Exception:  # noqa: BLE001 - progress must never stop training
                pass

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self._send(0, "training", force=True)

        def on_train_batch_end(self, batch, logs=None):
            self._send(batch + 1, "training", force=batch + 1 == steps)

        def on_test_begin(self, logs=None):
            self._send(steps, "validating", force=True)

        def on_epoch_end(self, epoch, logs=None):
            self._send(steps, "saving checkpoint", force=True)

    return Progress()


def epoch_done(board, row: dict[str, Any], total_epochs: int) -> None:
    """Rank 0, after the epoch's checkpoint was reported: its metrics for the console."""
    try:
        board.event.remote({"kind": "epoch", "epochs": total_epochs, **row})
    except Exception:  # noqa: BLE001
        pass


class DriverView:
    """Bars on the driver's console, fed by :meth:`poll` (call it every ~0.5 s)."""

    def __init__(self, board, show: bool = True) -> None:
        self.board = board
        self.show = show
        self.seen = 0
        self.bar = None
        self.bar_epoch = None
        self.images = 0
        self.waiting = None
        self.first_report: float | None = None
        self.epochs: list[dict[str, Any]] = []

    def _wait_bar(self) -> None:
        from bloodcnn import console

        if self.show and self.waiting is None and self.bar is None and self.first_report is None:
            self.waiting = console.bar(desc="starting the training workers", total=None, unit="s",
                                       leave=False, bar_format="{desc} ({elapsed})", mininterval=1.0)

    def poll(self, timeout_s: float = 5.0) -> None:
        import ray

        self._wait_bar()
        try:
            state, events = ray.get(self.board.poll.remote(self.seen), timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a slow or gone board: try again next time
            if self.waiting is not None:
                self.waiting.refresh()
            return
        self.seen += len(events)
        for event in events:
            self._finish(event)
        if state is not None and (self.bar_epoch is None or state["epoch"] >= self.bar_epoch):
            done_epochs = {e["epoch"] for e in self.epochs}
            if state["epoch"] not in done_epochs:
                self._show(state)
        elif self.waiting is not None:
            self.waiting.refresh()

    def _reported(self) -> bool:
        """Notes the workers' first report and ends the waiting line; True when bars are shown."""
        if self.first_report is None:
            self.first_report = time.monotonic()
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
        return self.show

    def _show(self, state: dict[str, Any]) -> None:
        from bloodcnn import console

        if not self._reported():
            return
        if self.bar_epoch != state["epoch"]:
            self._close()
            self.bar = console.bar(desc=f"epoch {state['epoch']}/{state['epochs']}",
                                   total=state["steps"] * state["batch"], unit="img", unit_scale=False)
            self.bar_epoch = state["epoch"]
            self.images = 0
        delta = state["images"] - self.images
        if delta > 0:
            self.bar.update(delta)
            self.images = state["images"]
        self.bar.set_postfix_str(f"step {state['step']}/{state['steps']} {state['stage']}", refresh=True)

    def _finish(self, event: dict[str, Any]) -> None:
        from bloodcnn import console

        self.epochs.append(event)
        if not self._reported():
            return
        if self.bar is None or self.bar_epoch != event["epoch"]:  # the epoch ended between two polls
            self._close()
            self.bar = console.bar(desc=f"epoch {event['epoch']}/{event['epochs']}", total=None, unit="img")
            self.bar_epoch = event["epoch"]
        elif self.bar.total and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)
        val = event.get("val_accuracy")
        metrics = f"loss {event['loss']:.3f} acc {event['accuracy']:.3f}" + (
            f" val {val:.3f}" if val is not None else "")
        self.bar.set_postfix_str(metrics, refresh=True)
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close()
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
