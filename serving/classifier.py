"""``BloodClassifier``: batched model replicas with registry hot-swap.

Request path, per image: the ingress sends the (header-checked) upload bytes; a small
thread pool decodes them (simplejpeg for JPEGs, Pillow otherwise: the same pixels) and resizes with ``bloodcnn.preprocess.resize``
(exactly as training) while the previous batch runs; ``@serve.batch`` gathers up to
``max_batch_size`` images for at most ``batch_wait_timeout_s``; one forward pass runs the
batch in a worker thread, so the replica's event loop keeps accepting the next batch
meanwhile: OpenVINO at the precision the version's export gate chose (``serve.runtime``,
:mod:`bloodcnn.openvino_runtime`), or the compiled ``tf.function`` (fixed ``[None, S, S, 3]``
signature: traced once) for versions without that artifact.

Model lifecycle: ``reconfigure(user_config)`` (called by Serve at start and on every
``user_config`` change) resolves ``model_version`` (``production`` or pinned) in the
registry, fetches it (sha256 checked), loads it in safe mode, warms it up and only then
swaps it in with one attribute assignment. A background task re-resolves the version every
``version_poll_s`` seconds, so promoting a model in the registry reaches every replica
without a redeploy. A batch holds a reference to the model it started with, so in-flight
requests finish on the old model and none is dropped.

A replica with no model yet (empty registry, storage down) starts anyway and reports not
ready; it keeps retrying in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from bloodcnn import calibration
from bloodcnn.inference import ImageError, load_for_model, preprocess, decode_image, set_max_pixels
from bloodcnn.loaded_model import LoadedModel, load_version
from bloodcnn.registry import Registry
from serving.settings import ClassifierSettings

log = logging.getLogger("ray.serve")

#: how long a request waits for a model that is being loaded before it gets 503
LOAD_WAIT_S = float(os.environ.get("BLOODCNN_LOAD_WAIT_S", "30"))
#: retry interval while no model could be loaded, even when version polling is off
RETRY_WITHOUT_MODEL_S = 5.0
#: longest wait before retrying a version that failed to load
MAX_RETRY_S = 300.0
#: Serve batches may be cut while the model is busy; the BatchRunner merges them, so let
#: them all through (bounded by max_ongoing_requests anyway)
MAX_CONCURRENT_BATCHES = 256


class _QuietBatchWarning(logging.Filter):
    """Drop Serve's "max_batch_size * max_concurrent_batches > max_ongoing_requests" warning:
    concurrent batches are merged by BatchRunner, so the product is not a batch size."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


log.addFilter(_QuietBatchWarning())


def answer(probs: np.ndarray, cur: LoadedModel, s: ClassifierSettings, batch_size: int = 1,
            first: bool = True) -> dict:
    """One answer: :func:`bloodcnn.calibration.answer` (temperature, conformal set, uncertain
    flag; shared with batch scoring) plus the version and forward pass that gave it."""
    return {
        **calibration.answer(probs, cur.class_names, cur.meta.calibration, s.uncertain_rule,
                             s.uncertain_threshold),
        "model_version": cur.version,
        "batch_size": batch_size,
        "first_in_batch": first,
    }


def _cpu_share() -> int | None:
    """The replica's CPUs as Ray counts them (``num_cpus_per_replica``, rounded up), which caps
    OpenVINO's threads: replicas that autoscale onto one node then split its cores instead of
    each spreading over all of them (Ray sets ``OMP_NUM_THREADS`` from ``num_cpus`` the same way).
    None outside a Ray actor: all CPUs."""
    import math

    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, math.ceil(cpus)) if cpus else None


@dataclass
class _Item:
    x: np.ndarray  # float32 (S, S, 3) for the model that was current when decoded
    data: bytes  # the upload, in case a swap changed the input size meanwhile
    max_pixels: int


def _wrong_size(cur: LoadedModel, shape: tuple) -> dict:
    s = cur.image_size
    return {"error": {"code": "invalid_shape", "status": 400, "message":
                      f"model version {cur.version} takes pixels of shape [N, {s}, {s}, 3], "
                      f"not [N, {', '.join(str(d) for d in shape)}]"}}


class BatchRunner:
    """One forward pass at a time, in its own thread; merges whatever is waiting.

    Ray Serve forms a new ``@serve.batch`` batch as soon as the previous one is handed
    over, not when the model is free, so while a 224 px batch runs (~0.3 s on 2 cores)
    it keeps cutting small batches every ``batch_wait_timeout_s``. Every batch that queued
    up during a forward pass is concatenated into the next one (up to ``max_images``
    images, same model version), so the compiled function always sees the largest batch
    available and the CPU never idles between batches.
    """

    def __init__(self, executor: ThreadPoolExecutor, max_images: int):
        self.executor = executor
        self.max_images = max_images
        self.calls = 0
        self._pending: list[tuple[Any, np.ndarray, asyncio.Future]] = []
        self._busy = False

    async def run(self, model: "LoadedModel", x: np.ndarray) -> tuple[np.ndarray, int, bool]:
        """-> (probabilities for ``x``, images in the forward pass, whether ``x`` came first in it)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((model, x, fut))
        if not self._busy:
            self._busy = True
            loop.create_task(self._drain())
        return await fut

    def _take(self) -> tuple[Any, list]:
        model = self._pending[0][0]
        take, rest, n = [], [], 0
        for entry in self._pending:
            if entry[0] is model and (not take or n + len(entry[1]) <= self.max_images):
                take.append(entry)
                n += len(entry[1])
            else:
                rest.append(entry)
        self._pending = rest
        return model, take

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                model, take = self._take()
                x = take[0][1] if len(take) == 1 else np.concatenate([e[1] for e in take])
                try:
                    probs = await loop.run_in_executor(self.executor, model.predictor.predict, x)
                except Exception as exc:
                    for _, _, f in take:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                self.calls += 1
                i = 0
                for k, (_, xe, f) in enumerate(take):
                    if not f.done():  # a cancelled request (client went away) is skipped
                        f.set_result((probs[i:i + len(xe)], len(x), k == 0))
                    i += len(xe)
        finally:
            self._busy = False


@serve.deployment(name="BloodClassifier", max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
class BloodClassifier:
    def __init__(self, storage: dict | None = None, cache_dir: str | None = None):
        from bloodcnn.config import StorageConfig

        self._storage = StorageConfig.model_validate(storage) if storage else None
        self._own_cache = cache_dir is None
        self._cache_root = Path(cache_dir or tempfile.mkdtemp(prefix="bloodcnn-serve-"))
        self._settings: ClassifierSettings | None = None
        self._current: LoadedModel | None = None
        self._loading = False
        self._loaded_event: asyncio.Event | None = None
        self._load_lock: asyncio.Lock | None = None
        self._last_error: str | None = None
        self._failures: dict[tuple, tuple[int, float]] = {}  # (source, version) -> (attempts, next try)
        self._last_check: float = 0.0
        self._poll_task: asyncio.Task | None = None
        # decode/resize overlaps with inference; inference and Grad-CAM get one thread each
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bloodcnn-decode")
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bloodcnn-infer")
        self._explain_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bloodcnn-explain")
        self._runner = BatchRunner(self._infer_pool, 32)

    def __del__(self):
        # Serve calls this when the replica stops (downscale, redeploy, shutdown)
        for pool in (getattr(self, "_decode_pool", None), getattr(self, "_infer_pool", None),
                     getattr(self, "_explain_pool", None)):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "_own_cache", False):
            shutil.rmtree(self._cache_root, ignore_errors=True)

    # ------------------------------------------------------------------ lifecycle

    def _primitives(self) -> None:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
            self._loaded_event = asyncio.Event()

    async def reconfigure(self, user_config: dict) -> None:
        self._primitives()
        new = ClassifierSettings.model_validate(user_config or {})
        old, self._settings = self._settings, new
        set_max_pixels(new.max_pixels)
        self.infer_batch.set_max_batch_size(new.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(new.batch_wait_timeout_s)
        self._runner.max_images = new.max_batch_size
        source_changed = old is None or (old.registry_uri, old.model_name, old.model_version, old.runtime) != (
            new.registry_uri, new.model_name, new.model_version, new.runtime,
        )
        log.info(
            "BloodClassifier config: model %s/%s@%s, batch %d/%.3fs, poll %.1fs",
            new.registry_uri, new.model_name, new.model_version, new.max_batch_size,
            new.batch_wait_timeout_s, new.version_poll_s,
        )
        if source_changed or self._current is None:
            await self.refresh(force=source_changed)
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    def _registry(self, s: ClassifierSettings) -> Registry:
        return Registry(s.registry_uri, s.model_name, self._storage)

    async def refresh(self, force: bool = False) -> bool:
        """Resolve the configured version; load and swap it in if it is new. True if swapped.

        A version that failed to load (corrupt file, code in the model, storage error) is
        retried with exponential backoff, from one poll interval up to ``MAX_RETRY_S``, so a
        bad promotion does not re-download the file on every poll; ``force`` retries now.
        """
        self._primitives()
        async with self._load_lock:
            s = self._settings
            if s is None:
                return False
            source = (s.registry_uri, s.model_name)
            registry = self._registry(s)
            self._last_check = time.time()
            try:
                version = await asyncio.to_thread(registry.resolve, s.model_version)
            except Exception as exc:  # no production model yet, storage unreachable, ...
                self._note_error(f"cannot resolve model {s.model_name}@{s.model_version}: {exc}")
                return False
            cur = self._current
            if (cur is not None and cur.version == version and cur.source == source
                    and cur.requested_runtime == s.runtime):
                self._last_error = None  # in sync with the registry again
                return False
            key = (source, version)
            failed = self._failures.get(key)
            if failed is not None and not force and time.monotonic() < failed[1]:
                return False  # still backing off; last_error keeps the reason
            self._loading = True
            try:
                loaded = await asyncio.to_thread(
                    load_version, registry, version, self._cache_root, s.max_batch_size, source, s.runtime,
                    _cpu_share(),
                )
            except Exception as exc:
                count = failed[0] + 1 if failed else 1
                delay = min(MAX_RETRY_S, max(s.version_poll_s, 1.0) * 2 ** (count - 1))
                self._failures[key] = (count, time.monotonic() + delay)
                self._note_error(f"cannot load model {s.model_name}/{version}: {type(exc).__name__}: {exc}"
                                 f" (attempt {count}; next try in {delay:.0f}s)")
                return False
            finally:
                self._loading = False
            self._failures.pop(key, None)
            previous, self._current = self._current, loaded  # the swap: one assignment
            self._last_error = None
            self._loaded_event.set()
            log.info(
                "BloodClassifier now serving %s/%s (%d px, loaded in %.1fs)%s",
                s.model_name, version, loaded.image_size, loaded.load_seconds,
                f", replacing {previous.version}" if previous else "",
            )
            if loaded.runtime == "tensorflow":  # the Keras model is loaded anyway: trace Grad-CAM now
                self._explain_pool.submit(loaded.gradcam)
            if previous is not None and previous.path.parent != loaded.path.parent:
                self._forget(previous)
            return True

    def _forget(self, previous: LoadedModel) -> None:
        """Remove an old version's cached file once no batch can still need it (files only)."""
        try:
            shutil.rmtree(previous.path.parent, ignore_errors=True)
        except Exception:  # pragma: no cover - best effort
            pass

    def _note_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning(message)
        self._last_error = message

    async def _poll_loop(self) -> None:
        while True:
            s = self._settings
            interval = s.version_poll_s if s else RETRY_WITHOUT_MODEL_S
            if interval <= 0:
                if self._current is not None:
                    return  # polling disabled and a model is loaded
                interval = RETRY_WITHOUT_MODEL_S
            elif self._current is None:
                interval = min(interval, RETRY_WITHOUT_MODEL_S)
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # never let the poller die
                log.exception("model refresh failed")

    async def _model_or_none(self) -> LoadedModel | None:
        cur = self._current
        if cur is not None:
            return cur
        self._primitives()
        if self._loading:
            try:
                await asyncio.wait_for(self._loaded_event.wait(), LOAD_WAIT_S)
            except asyncio.TimeoutError:
                pass
        return self._current

    # ------------------------------------------------------------------ requests

    def _not_ready(self) -> dict:
        reason = self._last_error or "the model is still loading"
        return {"error": {"code": "not_ready", "message": f"no model loaded yet: {reason}", "status": 503}}

    async def _model_and_input(self, data: bytes) -> tuple[LoadedModel, np.ndarray] | dict:
        """The current model and the image decoded (in the thread pool) for its input size,
        or an error dict when no model is loaded or the image is bad."""
        cur = await self._model_or_none()
        if cur is None:
            return self._not_ready()
        loop = asyncio.get_running_loop()
        try:
            x, _ = await loop.run_in_executor(
                self._decode_pool, load_for_model, data, cur.image_size, self._settings.max_pixels
            )
        except ImageError as exc:
            return {"error": exc.to_dict()}
        return cur, x

    async def predict(self, data: bytes) -> dict:
        """One uploaded image -> result dict, or ``{"error": {...}}`` for a bad image / no model."""
        got = await self._model_and_input(data)
        if isinstance(got, dict):
            return got
        return await self.infer_batch(_Item(x=got[1], data=data, max_pixels=self._settings.max_pixels))

    async def predict_pixels(self, x: np.ndarray) -> dict:
        """One image already in model-input form (float32 (S, S, 3), RGB 0..255, resized by the
        client): the v2 API's FP32 input. Same batches as :meth:`predict`, without the decode."""
        cur = await self._model_or_none()
        if cur is None:
            return self._not_ready()
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (cur.image_size, cur.image_size, 3):
            return _wrong_size(cur, x.shape)
        return await self.infer_batch(_Item(x=x, data=b"", max_pixels=self._settings.max_pixels))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, max_concurrent_batches=MAX_CONCURRENT_BATCHES)
    async def infer_batch(self, items: list[_Item]) -> list[dict]:
        cur = self._current  # the model this whole batch runs on, even if a swap happens now
        out: list[dict | None] = [None] * len(items)
        xs, where = [], []
        for i, it in enumerate(items):
            if it.x.shape[0] != cur.image_size:  # a swap changed the input size since decoding
                if not it.data:  # client pixels (predict_pixels): nothing to decode again
                    out[i] = _wrong_size(cur, it.x.shape)
                    continue
                it.x = preprocess(decode_image(it.data, it.max_pixels), cur.image_size)
            xs.append(it.x)
            where.append(i)
        if xs:
            probs, tf_batch, first_part = await self._runner.run(cur, np.stack(xs))
            s = self._settings
            for k, (i, p) in enumerate(zip(where, probs)):
                out[i] = answer(p, cur, s, batch_size=tf_batch, first=first_part and k == 0)
        return out

    async def explain(self, data: bytes) -> dict:
        """Grad-CAM overlay PNG plus the prediction for one image."""
        got = await self._model_and_input(data)
        if isinstance(got, dict):
            return got
        cur, x = got

        def run():
            gc = cur.gradcam()
            png, probs = gc.explain(x)
            if cur.meta.test_time_augmentation != "none":  # the heatmap is the image's; the answer is /predict's
                probs = cur.predictor.predict(x)[0]
            return png, probs, gc.layer_name

        png, probs, layer = await asyncio.get_running_loop().run_in_executor(self._explain_pool, run)
        result = answer(probs, cur, self._settings)
        return {"png": png, "result": result, "layer": layer}

    # ------------------------------------------------------------------ status

    async def status(self) -> dict:
        cur = self._current
        return {
            "ready": cur is not None,
            "loading": self._loading,
            "model_version": cur.version if cur else None,
            "last_error": self._last_error,
            "forward_passes": self._runner.calls,
            "pid": os.getpid(),
        }

    async def model_card(self, fmt: str = "html") -> dict | None:
        """The served version's model card from the registry; None for a version without one."""
        cur, s = self._current, self._settings
        name = f"model_card.{'html' if fmt == 'html' else 'md'}"
        if cur is None or s is None or name not in cur.meta.artifacts:
            return None
        registry = Registry(cur.source[0], cur.source[1], self._storage)
        data = await asyncio.to_thread(registry.read_artifact, cur.version, name)
        return {"version": cur.version, "text": data.decode()}

    async def model_info(self) -> dict | None:
        cur = self._current
        if cur is None:
            return None
        m = cur.meta
        s = self._settings
        return {
            "model_name": m.model_name,
            "version": m.version,
            "requested_version": s.model_version if s else None,
            "created_at": m.created_at,
            "dataset_version": m.dataset_version,
            "class_names": m.class_names,
            "image_size": m.image_size,
            "preprocessing": m.preprocessing,
            "test_time_augmentation": m.test_time_augmentation,
            "metrics": m.metrics,
            "code_version": m.code_version,
            "model_sha256": m.model_sha256,
            "runtime": cur.runtime,
            "runtime_reason": cur.runtime_reason,
            "loaded_at": cur.loaded_at,
            "uncertain_threshold": s.uncertain_threshold if s else None,
            "calibration": m.calibration.model_dump() if m.calibration else None,
            "model_card": "v1/models/current/card" if "model_card.html" in m.artifacts else None,
            "uncertainty_rule": ("conformal" if m.calibration and s and s.uncertain_rule == "conformal"
                                 else "threshold"),
        }
