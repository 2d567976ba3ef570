"""Test-time augmentation (``train.test_time_augmentation: flips``): a version evaluated with the
mean of each image's four flips answers that way everywhere: evaluation, serving on OpenVINO and
on TensorFlow, and Grad-CAM's answer.

A small model (conftest.small_model_registry: 32 px, ImageNet backbone, random head, so that flips
change its answers) is registered on the session's real SeaweedFS S3 for the synthetic dataset.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_model_registry

from bloodcnn import cli
from bloodcnn.inference import FlipAveraging, flip_views, with_tta
from bloodcnn.loaded_model import load_version
from bloodcnn.openvino_runtime import split_batches
from bloodcnn.train.evaluate import evaluate_registered


def _keras_flip_mean(model, x):
    """The reference: each flip predicted on its own by Keras, then averaged."""
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    return np.mean([model.predict(np.ascontiguousarray(v), verbose=0) for v in views], axis=0)


@pytest.fixture(scope="module")
def setup(s3_server, synthetic_dataset, weights_file, tmp_path_factory):
    versions = {v: {"promote": False, "test_time_augmentation": tta} for v, tta in (("flips", "flips"), ("plain", "none"))}
    cfg, registry, model = small_model_registry("tta", synthetic_dataset, weights_file, 5, versions)
    xs, ys = zip(*split_batches(cfg, "test", 32))
    return cfg, registry, model, np.concatenate(xs), np.concatenate(ys), tmp_path_factory.mktemp("tta")


def test_flip_views_order_and_refusals():
    x = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    v = flip_views(x)
    assert v.shape == (8, 3, 3, 3)
    np.testing.assert_array_equal(v[:2], x)
    np.testing.assert_array_equal(v[2:4], np.flip(x, axis=2))  # left-right
    np.testing.assert_array_equal(v[4:6], np.flip(x, axis=1))  # up-down
    np.testing.assert_array_equal(v[6:], np.flip(x, axis=(1, 2)))
    with pytest.raises(ValueError, match="unknown test_time_augmentation 'rot'"):
        with_tta(object(), "rot")


def test_served_answers_are_the_mean_of_the_flips_on_both_runtimes(setup, monkeypatch, capsys):
    cfg, registry, model, x, _, cache = setup
    expected = _keras_flip_mean(model, x)
    plain = model.predict(x, verbose=0)
    assert (expected.argmax(1) != plain.argmax(1)).any() or np.abs(expected - plain).max() > 1e-3, \
        "the flips must change this model's answers, or the test cannot tell them apart"
    source = (registry.root, "bloodcnn")
    tf_served = load_version(registry, "flips", cache, 8, source)
    assert tf_served.runtime == "tensorflow" and isinstance(tf_served.predictor, FlipAveraging)
    got = np.concatenate([tf_served.predictor.predict(x[i:i + 8]) for i in range(0, len(x), 8)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Grad-CAM's heatmap is of the image itself; the answer the API gives with it is the predictor's
    png, probs = tf_served.gradcam().explain(x[0])
    assert png.startswith(b"\x89PNG") and np.allclose(probs, plain[0], atol=1e-5)
    # a version without it answers with one forward pass
    assert not isinstance(load_version(registry, "plain", cache, 8, source).predictor, FlipAveraging)
    # OpenVINO: the exported artifact is the plain network; the flips are averaged around it
    monkeypatch.setenv("BLOODCNN__REGISTRY__URI", cfg.registry.uri)
    monkeypatch.setenv("BLOODCNN__TRAIN__DATASET", cfg.train.dataset)
    assert cli.main(["models", "export", "flips"]) == 0
    capsys.readouterr()
    ov = load_version(registry, "flips", cache / "ov", 8, source, runtime="openvino")
    assert ov.runtime.startswith("openvino") and isinstance(ov.predictor, FlipAveraging)
    served = np.concatenate([ov.predictor.predict(x[i:i + 8]) for i in range(0, len(x), 8)])
    tolerance = 1e-4 if ov.runtime == "openvino-f32" else 0.05
    np.testing.assert_allclose(served, expected, atol=tolerance)


def test_evaluation_uses_the_versions_setting(setup):
    cfg, _, model, x, y, _ = setup
    flips = evaluate_registered(cfg, "flips")
    plain = evaluate_registered(cfg, "plain")
    assert flips["test_time_augmentation"] == "flips" and plain["test_time_augmentation"] == "none"
    assert flips["accuracy"] == pytest.approx((_keras_flip_mean(model, x).argmax(1) == y).mean())
    assert plain["accuracy"] == pytest.approx((model.predict(x, verbose=0).argmax(1) == y).mean())
