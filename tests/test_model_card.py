"""The model card rendered for a version: its sections from a real (synthetic) manifest and report."""

from __future__ import annotations

import numpy as np

from bloodcnn import calibration, model_card
from bloodcnn.data.manifest import Manifest, SplitInfo

NAMES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def _manifest() -> Manifest:
    splits = {s: SplitInfo(counts=dict(zip(NAMES, c)), augmented=a, total=sum(c) + a, shards=[])
              for s, c, a in (("train", (70, 140, 135, 110), 910), ("val", (15, 30, 29, 24), 0),
                              ("test", (15, 30, 29, 24), 0))}
    return Manifest(dataset_version="ds-0123", created_at="2026-12-02T00:00:00Z", source="../shared/data/x",
                    class_names=NAMES, class_folders=["Benign", "Early", "Pre", "Pro"], seed=42, splits=splits,
                    config={}, scanned=700, near_duplicate_groups=12, images=[])


def _report(calibrated: bool, referral_share: float = 0.0) -> dict:
    cm = [[14, 1, 0, 0], [1, 29, 0, 0], [0, 0, 29, 0], [0, 0, 0, 24]]
    report = {"num_examples": 98, "accuracy": 96 / 98, "macro_f1": 0.975, "roc_auc_ovr_macro": 0.999,
              "per_class": {n: {"precision": 0.97, "recall": 0.96, "f1": 0.965, "support": sum(cm[i])}
                            for i, n in enumerate(NAMES)}, "confusion_matrix": cm}
    if calibrated:
        rng = np.random.default_rng(0)
        p = rng.dirichlet([8, 1, 1, 1], size=200)
        y = np.zeros(200, dtype=int)
        report["calibration"] = calibration.evaluate(p, y, p, y, alpha=0.01, referral_share=referral_share)[1]
    return report


def _meta(calibrated: bool) -> dict:
    return {"model_name": "bloodcnn", "version": "v20261202-000000-abcdef", "created_at": "2026-12-02T00:00:00Z",
            "dataset_version": "ds-0123", "class_names": NAMES, "image_size": 224, "code_version": "abc123",
            "metrics": _report(calibrated),
            "config": {"train": {"epochs": 2, "fine_tune_epochs": 8, "fine_tune_blocks": 8, "learning_rate": 1e-3,
                                 "fine_tune_learning_rate": 1e-4, "lr_schedule": "cosine", "batch_size": 32,
                                 "num_workers": 1, "class_weighting": "balanced", "augment_online": True,
                                 "seed": 0}}}


def test_card_covers_data_recipe_metrics_calibration_use_and_failures():
    md, html = model_card.render(_meta(True), _manifest())
    text = md.decode()
    assert text.startswith("# Model card: bloodcnn v20261202-000000-abcdef")
    for heading in ("## Intended use", "## Data", "## Recipe", "## Performance on the test split",
                    "## Calibration and prediction sets", "## Known failure modes"):
        assert heading in text, heading
    assert "not a diagnosis" in text
    assert "700 files scanned" in text and "12 near-duplicate groups" in text and "seed 42" in text
    assert "| train | 70 | 140 | 135 | 110 | 455 | 910 |" in text
    assert "top 8 blocks unfrozen" in text and "accuracy **0.9796**" in text
    assert "3 flips" not in text  # a version answering with one forward pass says nothing of flips
    flips = model_card.render_markdown({**_meta(True), "test_time_augmentation": "flips"}, None)
    assert "the mean probabilities of the image and its 3 flips" in flips
    assert "| Benign | 14 | 1 | 0 | 0 |" in text  # confusion matrix row
    assert "T = " in text and "coverage" in text and "alpha 0.01" in text
    assert "flagged too" not in text  # no referral share
    referred = model_card.render_markdown({**_meta(True), "metrics": _report(True, referral_share=0.2)}, None)
    floor = _report(True, referral_share=0.2)["calibration"]["min_confidence"]
    assert floor > 0 and f"under a top probability of {floor:.3f}" in referred and "20.0% of the validation" in referred
    assert "- 1 x Benign taken for Early Pre-B" in text and "- 1 x Early Pre-B taken for Benign" in text
    assert "Benign and Early Pre-B cells look alike" in text
    assert "not flagged is likely right, not certain" in text
    page = html.decode()
    assert page.startswith("<!doctype html>") and "<table>" in page and "<h2>Known failure modes</h2>" in page


def test_card_of_a_version_without_calibration_says_so():
    text = model_card.render_markdown(_meta(False), None)
    assert "has no calibration" in text and "uncertain_threshold" in text
