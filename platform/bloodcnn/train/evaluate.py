"""Test-split evaluation: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, ROC-AUC.

It runs once, in the driver, with the model wrapped in a compiled ``tf.function``.
``evaluate_registered`` re-runs it for a registered version (or a ``.keras`` file) and writes
``metrics.json`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bloodcnn import storage
from bloodcnn.config import AppConfig

log = logging.getLogger("bloodcnn.train")


class EvaluationError(RuntimeError):
    pass


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Metrics from integer labels and class probabilities ``[N, C]``.

    ROC-AUC is one-vs-rest per class; a class without positives (or without negatives) in
    ``y_true`` has no AUC (``None``) and is left out of the macro mean.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    labels = list(range(len(class_names)))
    if probs.ndim != 2 or probs.shape != (len(y_true), len(class_names)):
        raise EvaluationError(f"probabilities of shape {probs.shape} do not fit {len(y_true)} labels x {len(class_names)} classes")
    if len(y_true) == 0:
        raise EvaluationError("no examples to evaluate")
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    aucs: list[float | None] = []
    for c in labels:
        positives = y_true == c
        if positives.all() or not positives.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(positives, probs[:, c])))
    defined = [a for a in aucs if a is not None]
    # classes that occur in the labels or the predictions (sklearn's default for macro averages)
    present = (support > 0) | (np.bincount(y_pred, minlength=len(labels))[: len(labels)] > 0)
    return {
        "num_examples": int(len(y_true)),
        "class_names": list(class_names),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "weighted_f1": float(np.average(f1, weights=support)) if support.sum() else 0.0,
        "roc_auc_ovr_macro": float(np.mean(defined)) if defined else None,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "roc_auc": aucs[i],
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def predict_split(
    predictor,
    cfg: AppConfig,
    *,
    split: str = "test",
    batch_size: int = 64,
    manifest=None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, probabilities) for every example of ``split``, answered by ``predictor``
    (``bloodcnn.inference.Predictor``, wrapped by ``with_tta`` as serving wraps it), in one pass
    with a progress bar on ``bloodcnn.console`` when ``progress``."""
    from bloodcnn import console
    from bloodcnn.data.reader import load_manifest, make_dataset

    data = make_dataset(cfg.train.dataset, split, batch_size=batch_size, image_size=predictor.image_size,
                        storage_config=cfg.storage, manifest=manifest)
    labels, probs = [], []
    total = None
    if progress:
        m = manifest or load_manifest(cfg.train.dataset, cfg.storage)
        total = m.splits[split].total if split in m.splits else None
    with console.bar(desc=f"evaluating ({split} split)", total=total, unit="img", disable=not progress) as bar:
        for images, onehot in data:
            probs.append(predictor.predict(images.numpy()))
            labels.append(np.argmax(onehot.numpy(), axis=1))
            bar.update(len(labels[-1]))
    if not probs:
        raise EvaluationError(f"split {split!r} of {cfg.train.dataset} is empty")
    return np.concatenate(labels), np.concatenate(probs)


def evaluate_model(
    model,
    cfg: AppConfig,
    *,
    class_names: list[str],
    split: str = "test",
    image_size: int | None = None,
    manifest=None,
    progress: bool = False,
    calibrate: bool = False,
    test_time_augmentation: str = "none",
):
    """The metrics of ``split``; with ``calibrate``, ``(report, Calibration | None)``: temperature and
    conformal sets fitted on the validation split (``report["calibration"]`` has the figures on
    ``split``, before and after); None when there is no validation split to fit on."""
    from bloodcnn import calibration
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.inference import Predictor, with_tta

    manifest = manifest or load_manifest(cfg.train.dataset, cfg.storage)
    if list(manifest.class_names) != list(class_names):
        raise EvaluationError(
            f"the model's classes {class_names} differ from the dataset's {manifest.class_names} ({cfg.train.dataset})"
        )
    # traced once for both splits; answers as the version is served (one pass, or the flip mean)
    predictor = with_tta(Predictor(model, image_size or cfg.train.image_size), test_time_augmentation)
    y_true, probs = predict_split(predictor, cfg, split=split, manifest=manifest, progress=progress)
    report = classification_metrics(y_true, probs, class_names)
    report.update(split=split, dataset=cfg.train.dataset, dataset_version=manifest.dataset_version,
                  test_time_augmentation=test_time_augmentation)
    if not calibrate:
        return report
    if "val" not in manifest.splits or not manifest.splits["val"].total:
        log.warning("no validation split in %s: the version gets no calibration", cfg.train.dataset)
        return report, None
    y_val, p_val = predict_split(predictor, cfg, split="val", manifest=manifest, progress=progress)
    c = cfg.registry.calibration
    fitted, report["calibration"] = calibration.evaluate(p_val, y_val, probs, y_true, alpha=c.alpha, score=c.score,
                                                         prior_sigma=c.temperature_prior_sigma,
                                                         referral_share=c.referral_share)
    report["calibration"].update(fitted_on="val", evaluated_on=split)
    return report, fitted


def _model_input_size(model) -> int:
    shape = model.input_shape
    if isinstance(shape, list):
        shape = shape[0]
    return int(shape[1])


def evaluate_registered(cfg: AppConfig, model_ref: str, *, output: str | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """Re-run the test-split evaluation of a stored model.

    ``model_ref``: a registry version, ``production``, ``latest``, or a local / ``s3://`` ``.keras``
    file. The dataset is ``cfg.train.dataset``; the version's test-time augmentation applies (for a
    ``.keras`` file, ``train.test_time_augmentation``). ``metrics.json`` and ``confusion_matrix.png`` go to
    ``output`` (a folder or ``s3://`` prefix); by default next to a ``.keras`` file, or for a
    registry version into ``<registry>/<model>/<version>/evaluation/`` (the files registered
    with the version are left untouched). Returns the metrics with an ``output`` section.
    """
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.model import load_model
    from bloodcnn.registry import Registry
    from bloodcnn.train.plots import confusion_matrix_png

    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):  # share a GPU with whatever else runs there
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass
    manifest = load_manifest(cfg.train.dataset, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="bloodcnn-eval-") as tmp:
        if model_ref.endswith(".keras"):
            path = model_ref
            if storage.is_s3(model_ref):
                path = str(Path(tmp) / "model.keras")
                storage.store_for(model_ref, cfg.storage).download_file(model_ref, path)
            elif not Path(model_ref).is_file():
                raise EvaluationError(f"model file not found: {model_ref}")
            class_names = list(manifest.class_names)
            tta = cfg.train.test_time_augmentation
            out = output or (model_ref.rsplit("/", 1)[0] if "/" in model_ref else ".")
            source = {"model": model_ref}
        else:
            registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
            local, meta = registry.fetch(model_ref, tmp)
            path = str(local)
            class_names = list(meta.class_names)
            tta = meta.test_time_augmentation
            if meta.dataset_version != manifest.dataset_version:
                log.warning("model %s was trained on dataset %s; evaluating on %s (%s)", meta.version,
                            meta.dataset_version, manifest.dataset_version, cfg.train.dataset)
            out = output or storage.join(registry.root, meta.version, "evaluation")
            source = {"model": f"{meta.model_name}/{meta.version}", "ref": model_ref,
                      "trained_on": meta.dataset_version}
        model = load_model(path)
        report = evaluate_model(model, cfg, class_names=class_names, image_size=_model_input_size(model),
                                manifest=manifest, progress=progress, test_time_augmentation=tta)
        report.update(source)
        metrics_uri = storage.join(out, "metrics.json")
        cm_uri = storage.join(out, "confusion_matrix.png")
        report["output"] = {"metrics": metrics_uri, "confusion_matrix": cm_uri}
        png = confusion_matrix_png(report["confusion_matrix"], class_names, None,
                                   title=f"{source['model']}: {report['split']} split")
        if storage.is_s3(out):
            storage.store_for(out, cfg.storage).ensure_container(out)
        storage.write_bytes(metrics_uri, json.dumps(report, indent=2).encode(), cfg.storage)
        storage.write_bytes(cm_uri, png, cfg.storage)
    log.info("evaluated %s on %d %s images: accuracy=%.4f macro_f1=%.4f -> %s", source["model"],
             report["num_examples"], report["split"], report["accuracy"], report["macro_f1"], metrics_uri)
    return report
