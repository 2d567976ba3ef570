"""OpenVINO inference for registered versions: export, a precision gate, and a predictor.

OpenVINO runs MobileNetV2 on this kind of CPU at 1.5-2.8x TensorFlow's ``tf.function`` in
float32 (same answers to 1e-5) and 3-5x in bfloat16 on AMX, where it may change a few answers.
So every precision the CPU offers is tried on the validation split against the Keras model,
and the fastest one that agrees with Keras on >= 99.9% of the argmaxes, without losing
accuracy, is kept. The trials and the choice go into the version's metadata
(:class:`RuntimeInfo`); a version whose artifact failed the gate is served by TensorFlow.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field

log = logging.getLogger("bloodcnn.openvino")

#: the folder, inside a registry version, that holds the IR (model.xml + model.bin)
RUNTIME_DIR = "openvino"
IR_FILES = ("model.xml", "model.bin")
MIN_AGREEMENT = 0.999


class PrecisionTrial(BaseModel):
    precision: str = Field(description="OpenVINO INFERENCE_PRECISION_HINT: f32 or bf16")
    agreement: float = Field(description="share of validation images with the same argmax as Keras")
    max_prob_diff: float = Field(description="largest |p_openvino - p_keras| over all images and classes")
    accuracy: float
    images_per_s: float = Field(description="batch 32, this process's threads, median of interleaved runs")
    passed: bool


class RuntimeInfo(BaseModel):
    """Stored in a version's metadata: which files, which precision, and the evidence for it."""

    format: str = "openvino"
    openvino_version: str
    files: dict[str, str] = Field(description="path inside the version -> sha256")
    precision: str | None = Field(description="the chosen precision; None when none passed the gate")
    reason: str
    keras_accuracy: float
    keras_images_per_s: float
    min_agreement: float
    validated_on: str = "val"
    num_examples: int
    trials: list[PrecisionTrial]

    @property
    def xml(self) -> str:
        return f"{RUNTIME_DIR}/model.xml"


def candidate_precisions() -> list[str]:
    """f32 always; bf16 where the CPU has it (AVX512-BF16 or AMX)."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["f32"] + (["bf16"] if "BF16" in caps else [])


def convert(model, image_size: int):
    """The Keras classifier as an OpenVINO model with a free batch dimension."""
    import openvino as ov
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    forward = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    return ov.convert_model(forward.get_concrete_function())


def compile_model(model_or_xml, precision: str, threads: int | None = None):
    """Compile for this CPU. ``threads`` below the machine's CPUs also turns thread pinning off:
    OpenVINO pins each process's threads from core 0, so two 1-thread processes would share one core."""
    import openvino as ov

    props = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        props["INFERENCE_NUM_THREADS"] = int(threads)
        if int(threads) < (os.cpu_count() or 1):
            props["ENABLE_CPU_PINNING"] = False
    core = ov.Core()
    source = str(model_or_xml) if isinstance(model_or_xml, (str, Path)) else model_or_xml
    return core.compile_model(source, "CPU", props)


class OpenVinoPredictor:
    """Same interface as :class:`bloodcnn.inference.Predictor`: ``predict([B,S,S,3]) -> [B,C]``.

    One infer request, guarded by a lock: callers (the serving BatchRunner, a batch-scoring
    actor) run one forward pass at a time anyway, and OpenVINO spreads it over its threads.
    """

    runtime = "openvino"

    def __init__(self, compiled, image_size: int, precision: str):
        self.image_size = int(image_size)
        self.precision = precision
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        with self._lock:
            out = self._request.infer({0: np.ascontiguousarray(batch)})
            return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its buffer

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for n in sorted(set(int(b) for b in batch_sizes if b >= 1)):
            self.predict(np.zeros((n, self.image_size, self.image_size, 3), np.float32))


def _images_per_s(predict, x: np.ndarray, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(x)
        rates.append(len(x) / (time.perf_counter() - t0))
    return rates


def export(model, image_size: int, batches: Iterable[tuple[np.ndarray, np.ndarray]], out_dir: str | Path, *,
           min_agreement: float = MIN_AGREEMENT, precisions: Sequence[str] | None = None,
           timing_rounds: int = 5) -> RuntimeInfo:
    """Write ``out_dir/openvino/model.{xml,bin}`` and gate each precision on ``batches``.

    ``batches``: (images float32 [B,S,S,3] as the model takes them, integer labels [B]), the
    validation split. Returns the :class:`RuntimeInfo` to store with the version.
    """
    import openvino as ov

    from bloodcnn.inference import Predictor
    from bloodcnn.registry import sha256_file

    precisions = list(precisions or candidate_precisions())
    target = Path(out_dir) / RUNTIME_DIR
    target.mkdir(parents=True, exist_ok=True)
    ov.save_model(convert(model, image_size), target / "model.xml", compress_to_fp16=False)
    # gate the files as saved, exactly what serving will load
    compiled = {p: OpenVinoPredictor(compile_model(target / "model.xml", p), image_size, p) for p in precisions}
    keras = Predictor(model, image_size)
    labels, ref, got, timing_x = [], [], {p: [] for p in precisions}, None
    for x, y in batches:
        x = np.asarray(x, np.float32)
        labels.append(np.asarray(y))
        ref.append(keras.predict(x))
        for p, pred in compiled.items():
            got[p].append(pred.predict(x))
        if timing_x is None or len(timing_x) < 32:
            timing_x = x if timing_x is None else np.concatenate([timing_x, x])[:32]
    if not labels:
        raise ValueError("no validation images to gate the OpenVINO export on")
    y = np.concatenate(labels)
    ref_p = np.concatenate(ref)
    keras_acc = float((ref_p.argmax(1) == y).mean())
    # interleaved timing rounds on one batch of up to 32, so a noisy neighbour hits every candidate alike
    rates = {"keras": [], **{p: [] for p in precisions}}
    for _ in range(timing_rounds):
        rates["keras"] += _images_per_s(keras.predict, timing_x, 1)
        for p, pred in compiled.items():
            rates[p] += _images_per_s(pred.predict, timing_x, 1)
    trials = []
    for p in precisions:
        probs = np.concatenate(got[p])
        agreement = float((probs.argmax(1) == ref_p.argmax(1)).mean())
        acc = float((probs.argmax(1) == y).mean())
        trials.append(PrecisionTrial(
            precision=p, agreement=agreement, max_prob_diff=float(np.abs(probs - ref_p).max()), accuracy=acc,
            images_per_s=round(statistics.median(rates[p]), 1),
            passed=agreement >= min_agreement and acc >= keras_acc,
        ))
    passed = [t for t in trials if t.passed]
    keras_rate = statistics.median(rates["keras"])
    if passed:
        best = max(passed, key=lambda t: t.images_per_s)
        reason = (f"{best.precision}: the fastest that passed ({best.images_per_s:.0f} img/s vs Keras "
                  f"{keras_rate:.0f}; agreement {best.agreement:.4f}, accuracy {best.accuracy:.4f} vs {keras_acc:.4f})")
    else:
        best = None
        reason = "no precision passed the gate: " + "; ".join(
            f"{t.precision} agreement {t.agreement:.4f} (min {min_agreement}), accuracy {t.accuracy:.4f} "
            f"(Keras {keras_acc:.4f})" for t in trials)
    return RuntimeInfo(
        openvino_version=ov.get_version(), files={f"{RUNTIME_DIR}/{f}": sha256_file(target / f) for f in IR_FILES},
        precision=best.precision if best else None, reason=reason, keras_accuracy=keras_acc,
        keras_images_per_s=round(keras_rate, 1), min_agreement=min_agreement, num_examples=int(len(y)),
        trials=trials,
    )


def split_batches(cfg, split: str, image_size: int, manifest=None, batch_size: int = 32):
    """(images, integer labels) of a prepared split, unaugmented, as the evaluation reads it."""
    from bloodcnn.data.reader import make_dataset

    data = make_dataset(cfg.train.dataset, split, batch_size=batch_size, image_size=image_size,
                        storage_config=cfg.storage, manifest=manifest)
    for images, onehot in data:
        yield images.numpy(), np.argmax(onehot.numpy(), axis=1)


def export_for_registration(model_path: str | Path, cfg, image_size: int, out_dir: str | Path,
                            manifest=None) -> RuntimeInfo | None:
    """The export a new version gets (``registry.export``); None, with the reason logged, when it
    is turned off, there is no validation split to gate on, or OpenVINO fails: TensorFlow then
    serves the version, as it does versions from before this artifact existed.

    It runs in a child process: with OpenVINO's thread pool and Ray's in one process, the
    training driver died of SIGSEGV when a signal stopped it later (tests/test_main_job.py).
    """
    import subprocess
    import sys
    import tempfile

    from bloodcnn.data.reader import load_manifest

    if cfg.registry.export.runtime == "none":
        return None
    manifest = manifest or load_manifest(cfg.train.dataset, cfg.storage)
    if "val" not in manifest.splits or not manifest.splits["val"].total:
        log.warning("no validation split in %s: no OpenVINO export (TensorFlow serves this version)",
                    cfg.train.dataset)
        return None
    with tempfile.TemporaryDirectory(prefix="bloodcnn-export-") as tmp:
        config, info = Path(tmp) / "config.json", Path(tmp) / "runtime.json"
        config.write_text(cfg.model_dump_json())
        cmd = [sys.executable, "-m", "bloodcnn.openvino_runtime", str(model_path), str(config), str(image_size),
               str(out_dir), str(info)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not info.is_file():
            log.warning("OpenVINO export failed (exit %s): TensorFlow serves this version\n%s", proc.returncode,
                        proc.stderr[-3000:])
            return None
        result = RuntimeInfo.model_validate_json(info.read_text())
    log.info("OpenVINO export: %s", result.reason)
    return result


def _main(argv: list[str]) -> int:
    """``python -m bloodcnn.openvino_runtime MODEL CONFIG_JSON IMAGE_SIZE OUT_DIR INFO_JSON``."""
    from bloodcnn.config import AppConfig
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.model import load_model

    model_path, config, image_size, out_dir, info = argv
    cfg = AppConfig.model_validate_json(Path(config).read_text())
    size = int(image_size)
    manifest = load_manifest(cfg.train.dataset, cfg.storage)
    result = export(load_model(model_path), size, split_batches(cfg, "val", size, manifest), out_dir,
                    min_agreement=cfg.registry.export.min_agreement)
    tmp = Path(info).with_suffix(".tmp")
    tmp.write_text(result.model_dump_json())
    tmp.replace(info)
    return 0


def serving_precision(info: RuntimeInfo | None, wanted: str = "auto") -> tuple[str | None, str]:
    """(OpenVINO precision, or None for TensorFlow; why) for ``serve.runtime`` = ``wanted``."""
    if wanted == "tensorflow":
        return None, "serve.runtime is tensorflow"
    if info is None:
        return None, "the version has no OpenVINO artifact"
    if info.precision:
        return info.precision, info.reason
    if wanted == "openvino":
        return "f32", f"serve.runtime is openvino, so f32 although {info.reason}"
    return None, info.reason


class ExportError(RuntimeError):
    pass


def export_registered(cfg, ref: str, *, force: bool = False):
    """``bloodcnn models export VERSION``: give an existing version its OpenVINO artifact, gated on
    the validation split of ``cfg.train.dataset`` (which must be the dataset it was trained on)."""
    import tempfile

    from bloodcnn.data.reader import load_manifest
    from bloodcnn.model import load_model
    from bloodcnn.registry import Registry

    registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
    meta = registry.get(registry.resolve(ref))
    if meta.runtime is not None and not force:
        raise ExportError(f"{meta.model_name}/{meta.version} already has an OpenVINO artifact "
                          f"({meta.runtime.precision or 'gate failed'}); --force replaces it")
    manifest = load_manifest(cfg.train.dataset, cfg.storage)
    if manifest.dataset_version != meta.dataset_version:
        raise ExportError(f"{meta.model_name}/{meta.version} was trained on dataset {meta.dataset_version}, but "
                          f"{cfg.train.dataset} is {manifest.dataset_version}: point train.dataset at its dataset")
    if "val" not in manifest.splits or not manifest.splits["val"].total:
        raise ExportError(f"{cfg.train.dataset} has no validation split to gate the export on")
    with tempfile.TemporaryDirectory(prefix="bloodcnn-export-") as tmp:
        path, meta = registry.fetch(meta.version, tmp)
        model = load_model(path)
        info = export(model, meta.image_size, split_batches(cfg, "val", meta.image_size, manifest),
                      Path(tmp) / "export", min_agreement=cfg.registry.export.min_agreement)
        return registry.set_runtime(meta.version, info, Path(tmp) / "export")


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
