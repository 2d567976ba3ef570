"""One registered version loaded for inference: fetched (sha256-checked), on the runtime its
OpenVINO export gate chose or on TensorFlow, warmed up. Serving replicas and batch-scoring actors
load versions this same way, so both answer with the same runtime and precision."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bloodcnn.registry import ModelMetadata, Registry

log = logging.getLogger("ray.serve")


@dataclass
class LoadedModel:
    """One immutable, warmed-up model version; swapped in as a whole.

    ``predictor`` is TensorFlow's compiled function or OpenVINO's (``runtime``); the Keras
    model, which Grad-CAM needs, is loaded on first use when OpenVINO serves.
    """

    meta: ModelMetadata
    source: tuple[str, str]
    predictor: Any
    path: Path
    runtime: str = "tensorflow"
    runtime_reason: str = ""
    requested_runtime: str = "auto"
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    _model: Any = None
    _gradcam: Any = None
    _gradcam_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def model(self):
        """The Keras model (safe mode, from the sha256-checked file fetched at load)."""
        with self._gradcam_lock:
            if self._model is None:
                from bloodcnn.model import load_model

                self._model = load_model(self.path)
            return self._model

    def gradcam(self):
        model = self.model
        with self._gradcam_lock:
            if self._gradcam is None:
                from bloodcnn.inference import GradCam

                gc = GradCam(model, self.image_size)
                gc.heatmap(np.zeros((self.image_size, self.image_size, 3), np.float32))  # trace once
                self._gradcam = gc
            return self._gradcam


def _warmup_sizes(max_batch_size: int) -> list[int]:
    sizes = {1, max_batch_size}
    b = 2
    while b < max_batch_size:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def _check_shapes(meta: ModelMetadata, outputs: int, input_size: int) -> None:
    if outputs != len(meta.class_names):
        raise ValueError(f"model {meta.version} has {outputs} outputs but {len(meta.class_names)} class names")
    if input_size != meta.image_size:
        raise ValueError(f"model {meta.version} takes {input_size} px, metadata says {meta.image_size}")


def _openvino_predictor(registry: Registry, meta: ModelMetadata, cache_dir: str | Path, precision: str,
                        threads: int | None = None):
    from bloodcnn.openvino_runtime import OpenVinoPredictor, compile_model

    xml = registry.fetch_runtime(meta, cache_dir)
    compiled = compile_model(xml, precision, threads)
    out, inp = compiled.outputs[0].get_partial_shape(), compiled.inputs[0].get_partial_shape()
    _check_shapes(meta, int(out[1].get_length()), int(inp[1].get_length()))
    return OpenVinoPredictor(compiled, meta.image_size, precision)


def load_version(
    registry: Registry, version: str, cache_dir: str | Path, max_batch_size: int, source: tuple[str, str],
    runtime: str = "auto", threads: int | None = None,
) -> LoadedModel:
    """Fetch (sha256-checked), load, compile and warm up one version. Blocking.

    ``runtime`` (``serve.runtime``) picks OpenVINO at the precision the version's gate chose,
    or TensorFlow; an OpenVINO artifact that fails to load falls back to TensorFlow, logged.
    A version evaluated with flip averaging (``meta.test_time_augmentation``) is served with it too.
    ``threads`` caps OpenVINO's threads (a batch-scoring actor's CPU share); None: all CPUs.
    """
    from bloodcnn.inference import Predictor, with_tta
    from bloodcnn.model import load_model
    from bloodcnn.openvino_runtime import serving_precision

    t0 = time.perf_counter()
    path, meta = registry.fetch(version, cache_dir)
    precision, why = serving_precision(meta.runtime, runtime)
    predictor = model = None
    if precision is not None:
        try:
            predictor = _openvino_predictor(registry, meta, cache_dir, precision, threads)
        except Exception as exc:  # noqa: BLE001 - TensorFlow can still serve the version
            why = f"the OpenVINO artifact did not load ({type(exc).__name__}: {exc})"
            log.warning("model %s: %s; serving it with TensorFlow", meta.version, why)
    if predictor is None:
        model = load_model(path)
        _check_shapes(meta, int(model.output_shape[-1]), int(model.input_shape[1]))
        predictor = Predictor(model, meta.image_size)
    predictor = with_tta(predictor, meta.test_time_augmentation)
    predictor.warmup(_warmup_sizes(max_batch_size))
    loaded = LoadedModel(
        meta=meta, source=source, predictor=predictor, path=path, _model=model,
        runtime=f"openvino-{precision}" if model is None else "tensorflow", runtime_reason=why,
        requested_runtime=runtime,
        load_seconds=time.perf_counter() - t0,
    )
    log.info("model %s runs on %s: %s", meta.version, loaded.runtime, why)
    return loaded
