"""Fast checks of the training pieces that need no Ray cluster: metrics, plots, gates, the plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bloodcnn.config import load_config
from bloodcnn.train.evaluate import EvaluationError, classification_metrics
from bloodcnn.train.plots import confusion_matrix_png, training_curves_png

CLASSES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def _onehot_probs(pred: list[int], confidence: float = 0.9) -> np.ndarray:
    probs = np.full((len(pred), 4), (1 - confidence) / 3)
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    m = classification_metrics(y, _onehot_probs(list(y)), CLASSES)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["roc_auc_ovr_macro"] == 1.0
    assert m["confusion_matrix"] == np.diag([2, 2, 2, 2]).tolist()
    assert all(c["support"] == 2 and c["roc_auc"] == 1.0 for c in m["per_class"].values())


def test_metrics_match_sklearn_and_hand_counts():
    from sklearn.metrics import f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + 2.0 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs, CLASSES)
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["roc_auc_ovr_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    cm = np.asarray(m["confusion_matrix"])
    assert cm.sum() == 200 and np.trace(cm) == (pred == y).sum()
    assert cm[1].sum() == m["per_class"]["Early Pre-B"]["support"]


def test_class_missing_from_the_test_split():
    """A class with no test images has no ROC-AUC and does not dilute macro-F1 unless predicted."""
    y = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y, _onehot_probs([0, 0, 1, 1, 2, 2]), CLASSES)
    assert m["per_class"]["Pro-B"]["roc_auc"] is None and m["per_class"]["Pro-B"]["support"] == 0
    assert m["macro_f1"] == 1.0 and m["roc_auc_ovr_macro"] == 1.0
    # predicting the absent class is a mistake that macro-F1 counts (as sklearn does)
    m2 = classification_metrics(y, _onehot_probs([0, 0, 1, 1, 2, 3]), CLASSES)
    from sklearn.metrics import f1_score

    assert m2["macro_f1"] == pytest.approx(f1_score(y, [0, 0, 1, 1, 2, 3], average="macro"))
    assert m2["macro_f1"] < 1.0


def test_bad_shapes_are_refused():
    with pytest.raises(EvaluationError):
        classification_metrics(np.array([0, 1]), np.ones((3, 4)) / 4, CLASSES)
    with pytest.raises(EvaluationError):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 4)), CLASSES)


def test_plots_are_png(tmp_path):
    png = confusion_matrix_png([[3, 1, 0, 0], [0, 4, 0, 0], [0, 0, 0, 0], [1, 0, 0, 5]], CLASSES,
                               tmp_path / "cm.png", title="t")
    assert png[:4] == b"\x89PNG" and (tmp_path / "cm.png").read_bytes() == png
    history = [
        {"epoch": 1, "phase": "head", "loss": 1.2, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.6, "images_per_s": 50},
        {"epoch": 2, "phase": "head", "loss": 0.8, "accuracy": 0.7, "val_loss": None, "val_accuracy": None, "images_per_s": 60},
        {"epoch": 3, "phase": "fine_tune", "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.8},
    ]
    assert training_curves_png(history, 2, tmp_path / "curves.png")[:4] == b"\x89PNG"
    assert training_curves_png([], None)[:4] == b"\x89PNG"


def test_gates():
    from bloodcnn.train.job import gates_passed

    cfg = load_config(environ={}, overrides={"registry": {"gates": {"min_accuracy": 0.8, "min_macro_f1": 0.9}}})
    assert gates_passed({"accuracy": 0.95, "macro_f1": 0.93}, cfg) == (True, [])
    ok, reasons = gates_passed({"accuracy": 0.95, "macro_f1": 0.85}, cfg)
    assert not ok and reasons == ["macro_f1 0.8500 < 0.9"]
    assert not gates_passed({}, cfg)[0]


def test_plan_splits_shards_and_steps(synthetic_dataset, weights_file):
    """Equal steps on all workers = ceil(min examples per worker / batch); bad worker counts fail."""
    from bloodcnn.data.manifest import DatasetError
    from bloodcnn.data.reader import examples_per_worker, load_manifest
    from bloodcnn.train.job import TrainingError, fingerprint, plan_training

    def cfg(**train):
        base = {"dataset": synthetic_dataset, "weights": str(weights_file), "image_size": 64, "batch_size": 8}
        return load_config(environ={}, overrides={"train": {**base, **train}})

    manifest = load_manifest(synthetic_dataset)
    plan = plan_training(cfg(num_workers=2), check_weights_file=False)
    per_worker = examples_per_worker(manifest, "train", 2)
    assert plan.train_examples_per_worker == per_worker
    assert plan.steps_per_epoch == math.ceil(min(per_worker) / 8)
    assert plan.val_steps >= 1 and plan.class_names == manifest.class_names
    assert plan.run_name == "bloodcnn-train" and plan.weights == str(weights_file.resolve())
    assert plan_training(cfg(), run_name="other", check_weights_file=False).run_name == "other"
    # the fingerprint ignores where and how patiently a run goes, not what it trains
    assert fingerprint(cfg(max_failures=5, storage_path="/x"), "ds") == fingerprint(cfg(), "ds")
    assert fingerprint(cfg(epochs=9), "ds") != fingerprint(cfg(), "ds")
    assert fingerprint(cfg(), "ds-other") != fingerprint(cfg(), "ds")
    with pytest.raises(DatasetError, match="fewer than"):
        plan_training(cfg(num_workers=10_000), check_weights_file=False)
    with pytest.raises(TrainingError, match="invalid run name"):
        plan_training(cfg(), run_name="../escape", check_weights_file=False)


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    from bloodcnn.train.loop import _learning_rate

    rate = _learning_rate(1e-4, "cosine", steps=1000, warmup_steps=100)
    lr = [float(rate(step)) for step in (0, 50, 100, 550, 1000)]
    assert lr[0] == pytest.approx(1e-6) and lr[1] == pytest.approx(5.05e-5)
    assert lr[2] == pytest.approx(1e-4) and lr[3] == pytest.approx(5e-5, rel=1e-3) and lr[4] == 0.0
    head = _learning_rate(1e-3, "cosine", steps=100, warmup_steps=0)
    assert float(head(0)) == pytest.approx(1e-3) and float(head(100)) == 0.0
    assert _learning_rate(1e-3, "constant", steps=100, warmup_steps=10) == 1e-3
    # a phase shorter than its warm-up still ends decayed, not at the peak
    short = _learning_rate(1e-3, "cosine", steps=4, warmup_steps=10)
    assert float(short(4)) == 0.0
