"""Temperature scaling and split-conformal sets on synthetic outputs whose truth is known.

The "model" draws each image's logits from a known distribution and reports them at a known
over-confidence (logits multiplied by 3): the fitted temperature must undo it, and sets fitted on
one draw must cover fresh draws at the promised rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bloodcnn import calibration as cal

C = 4


def draw(n: int, rng: np.random.Generator, overconfidence: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated probabilities softmax(z), reported as softmax(overconfidence * z)."""
    z = rng.normal(0, 1.5, size=(n, C))
    z[np.arange(n), rng.integers(0, C, n)] += 2.0
    true_p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(C, p=p) for p in true_p])
    reported = np.exp(overconfidence * z)
    return reported / reported.sum(1, keepdims=True), labels


def test_temperature_undoes_a_known_overconfidence_and_lowers_ece_and_nll():
    rng = np.random.default_rng(0)
    probs, labels = draw(4000, rng)
    t = cal.fit_temperature(probs, labels)
    assert t == pytest.approx(3.0, rel=0.08)
    scaled = cal.apply_temperature(probs, t)
    assert (scaled.argmax(1) == probs.argmax(1)).all()  # no answer changes
    before, after = cal.calibration_metrics(probs, labels), cal.calibration_metrics(scaled, labels)
    assert after["ece"] < 0.03 < before["ece"]
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]


def test_a_calibrated_model_keeps_a_temperature_near_one():
    probs, labels = draw(4000, np.random.default_rng(1), overconfidence=1.0)
    assert cal.fit_temperature(probs, labels) == pytest.approx(1.0, abs=0.08)


def test_a_validation_split_without_errors_keeps_the_temperature_near_one():
    """480 confident answers (mean top probability ~0.99, as the ALL models give), all right: the
    plain NLL falls all the way to the search bound (T = 0.05); the prior holds T near 1."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, C, 480)
    z = rng.normal(0, 1, (480, C))
    z[np.arange(480), labels] += rng.normal(8, 1.5, 480)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert (probs.argmax(1) == labels).all() and probs.max(1).mean() > 0.98
    assert cal.fit_temperature(probs, labels, prior_sigma=0) == pytest.approx(0.05, rel=0.01)
    assert 0.6 < cal.fit_temperature(probs, labels) < 1.0


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_conformal_sets_cover_fresh_data_at_the_promised_rate(score, alpha):
    """Coverage over 200 calibration/test draws: the mean is >= 1 - alpha (the guarantee is in
    expectation), and within the binomial spread of it."""
    rng = np.random.default_rng(2)
    coverages, sizes = [], []
    for _ in range(200):
        cp, cl = draw(500, rng)
        tp, tl = draw(500, rng)
        c = cal.fit(cp, cl, alpha=alpha, score=score)
        sets = cal.prediction_sets(cal.apply_temperature(tp, c.temperature), c.qhat, score)
        m = cal.set_metrics(sets, tp, tl)
        coverages.append(m["coverage"])
        sizes.append(m["mean_set_size"])
    mean = float(np.mean(coverages))
    assert mean >= 1 - alpha - 0.002, mean
    if score == "lac":  # continuous scores: also at most 1 - alpha + 1/(n+1), not trivially all classes
        assert mean <= 1 - alpha + 1 / 501 + 0.004, mean
        assert np.mean(sizes) < C
    # (non-randomised APS ties at score 1 when the truth ranks last, as it does here on >1% of the
    # noisy labels, so at alpha 0.01 its sets may rightly be every class)


def draw_accurate(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A confident, calibrated model right on ~99% of the images, as the ALL models are: the
    conformal quantile at alpha 0.01 leaves ~98.5% of its answers a single class."""
    z = rng.normal(0, 1, (n, C))
    z[np.arange(n), rng.integers(0, C, n)] += rng.normal(9, 2.5, n)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return probs, np.array([rng.choice(C, p=p) for p in probs])


def test_a_referral_share_flags_that_share_of_fresh_answers_and_keeps_the_coverage():
    """With a 3% referral share, about 3% of fresh answers are flagged in all (the conformal ones, then
    the least confident, which hold two classes), sets only grow (so the coverage guarantee stands),
    and the single-class answers left are more often right than with the conformal quantile alone."""
    rng = np.random.default_rng(5)
    shares, plain, referred, floors = [], [], [], []
    for _ in range(50):
        (cp, cl), (tp, tl) = draw_accurate(500, rng), draw_accurate(500, rng)
        base = cal.fit(cp, cl, alpha=0.01)
        c = cal.fit(cp, cl, alpha=0.01, referral_share=0.03)
        assert base.min_confidence == 0.0 <= c.min_confidence < 1 and c.qhat == base.qhat
        floors.append(c.min_confidence)
        scaled = cal.apply_temperature(tp, c.temperature)
        before = cal.prediction_sets(scaled, c.qhat)
        after = cal.prediction_sets(scaled, c.qhat, min_confidence=c.min_confidence)
        assert (after >= before).all()
        unsure = scaled.max(1) < c.min_confidence
        assert (after[unsure].sum(1) >= 2).all() and (after[~unsure] == before[~unsure]).all()
        shares.append(1 - cal.set_metrics(after, scaled, tl)["single_set_share"])
        plain.append(cal.set_metrics(before, scaled, tl))
        referred.append(cal.set_metrics(after, scaled, tl))
    topped_up = np.array(floors) > 0  # the draws whose conformal sets alone flagged under 3% of val
    assert topped_up.mean() > 0.5
    assert np.mean(np.array(shares)[topped_up]) == pytest.approx(0.03, abs=0.005)
    assert np.mean([m["coverage"] for m in referred]) >= np.mean([m["coverage"] for m in plain]) >= 0.985
    assert (np.mean([m["single_set_accuracy"] for m in referred])
            > np.mean([m["single_set_accuracy"] for m in plain]) + 0.001)


def test_the_referral_floor_tops_up_the_conformal_flags_to_the_share():
    top = 0.5 + 0.005 * np.arange(100)  # 0.500 .. 0.995
    probs = np.stack([top, 1 - top, np.zeros(100), np.zeros(100)], axis=1)
    # qhat 0.45: a class is in the set from p 0.55 on, so the 10 answers under it have empty sets
    assert (cal.prediction_sets(probs, 0.45).sum(1) != 1).sum() == 10
    floor = cal.referral_floor(probs, 0.45, "lac", 0.15)
    assert floor == pytest.approx(top[15])  # 5 more: the least confident single-class answers
    assert (cal.prediction_sets(probs, 0.45, min_confidence=floor).sum(1) != 1).sum() == 15
    assert cal.referral_floor(probs, 0.45, "lac", 0.10) == 0.0  # the conformal sets flag enough already
    assert cal.referral_floor(probs, 0.45, "lac", 0.0) == 0.0


def test_lac_sets_are_no_larger_than_aps_sets_on_average():
    rng = np.random.default_rng(3)
    cp, cl = draw(2000, rng)
    tp, tl = draw(2000, rng)
    size = {}
    for score in ("lac", "aps"):
        c = cal.fit(cp, cl, alpha=0.05, score=score)
        size[score] = cal.prediction_sets(cal.apply_temperature(tp, c.temperature), c.qhat, score).sum(1).mean()
    assert size["lac"] <= size["aps"] + 1e-9, size


def test_too_few_calibration_images_for_alpha_give_every_class():
    probs, labels = draw(50, np.random.default_rng(4))
    assert cal.conformal_quantile(cal.scores(probs, labels), 0.01) == math.inf  # needs n >= 99
    c = cal.fit(probs, labels, alpha=0.01)
    assert c.qhat == 1.0
    for score in ("lac", "aps"):
        assert cal.prediction_sets(probs, 1.0, score).all()


def test_the_quantile_is_the_finite_sample_corrected_one():
    s = np.arange(1, 100) / 100.0  # 99 scores 0.01 .. 0.99
    assert cal.conformal_quantile(s, 0.1) == pytest.approx(0.90)  # ceil(100 * 0.9) = 90th smallest
    assert cal.conformal_quantile(s, 0.01) == pytest.approx(0.99)


def test_evaluate_reports_before_after_sets_and_a_risk_coverage_curve():
    rng = np.random.default_rng(5)
    cp, cl = draw(800, rng)
    tp, tl = draw(800, rng)
    c, report = cal.evaluate(cp, cl, tp, tl, alpha=0.05)
    assert report["temperature"] == c.temperature and report["qhat"] == c.qhat
    assert report["after"]["ece"] < report["before"]["ece"]
    assert len(report["reliability_after"]) == 15
    assert sum(b["count"] for b in report["reliability_after"]) == 800
    curve = report["risk_coverage"]
    shares = [r["single_set_share"] for r in curve]
    assert shares == sorted(shares)  # a larger alpha answers more images with one class ...
    accs = [r["single_set_accuracy"] for r in curve if r["single_set_accuracy"] is not None]
    assert accs[0] >= accs[-1]  # ... and is wrong more often on them
    assert report["conformal"]["coverage"] >= 0.9


# ---- serving: the answer of a calibrated version and of one from before calibration -----------
def _answer(calibration: dict | None, probs, rule: str = "conformal") -> dict:
    from pathlib import Path

    from bloodcnn.registry import ModelMetadata
    from bloodcnn.loaded_model import LoadedModel
    from serving.classifier import answer
    from serving.settings import ClassifierSettings

    meta = ModelMetadata(model_name="m", version="v1", created_at="2026-12-02T00:00:00Z", dataset_version="d",
                         class_names=["Benign", "Early Pre-B", "Pre-B", "Pro-B"], image_size=64,
                         model_sha256="0" * 64, calibration=calibration)
    cur = LoadedModel(meta=meta, source=("s3://r", "m"), predictor=None, path=Path("."))
    s = ClassifierSettings(registry_uri="s3://r", model_name="m", uncertain_rule=rule, uncertain_threshold=0.6)
    return answer(np.asarray(probs), cur, s)


def test_a_calibrated_version_answers_with_its_set_and_the_conformal_rule():
    c = {"temperature": 2.0, "alpha": 0.05, "score": "lac", "qhat": 0.85, "calibration_examples": 500}
    r = _answer(c, [0.85, 0.1, 0.04, 0.01])
    scaled = cal.apply_temperature(np.array([[0.85, 0.1, 0.04, 0.01]]), 2.0)[0]
    assert r["probabilities"]["Benign"] == pytest.approx(scaled[0])  # temperature-scaled
    assert r["prediction_set"] == ["Benign", "Early Pre-B"]  # p >= 0.15 after scaling (0.60, 0.21, 0.13, 0.07)
    assert r["uncertain"] and r["uncertainty_rule"] == "conformal"
    sure = _answer(c, [0.999, 0.0005, 0.0003, 0.0002])
    assert sure["prediction_set"] == ["Benign"] and not sure["uncertain"]
    # under the version's referral floor, a single-class set gets the runner-up too
    floored = _answer({**c, "min_confidence": 0.9999}, [0.999, 0.0005, 0.0003, 0.0002])
    assert floored["prediction_set"] == ["Benign", "Early Pre-B"] and floored["uncertain"]
    # the threshold rule on the same version: the set is still reported
    t = _answer(c, [0.85, 0.1, 0.04, 0.01], rule="threshold")
    assert t["uncertainty_rule"] == "threshold" and t["prediction_set"] == r["prediction_set"]
    assert t["uncertain"] == (t["confidence"] < 0.6)


def test_a_version_from_before_calibration_keeps_the_threshold_rule():
    r = _answer(None, [0.55, 0.25, 0.15, 0.05])
    assert r["prediction_set"] is None and r["uncertainty_rule"] == "threshold"
    assert r["uncertain"] and r["probabilities"]["Benign"] == pytest.approx(0.55)
    assert not _answer(None, [0.75, 0.15, 0.05, 0.05])["uncertain"]
