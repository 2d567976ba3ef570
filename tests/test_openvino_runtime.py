"""OpenVINO export at registration, the precision gate, and serving on the chosen runtime.

A small model (32 px, ImageNet backbone, random head, so each image gets its own answer) is
registered on the session's real SeaweedFS S3 for the synthetic dataset, exported with
``bloodcnn models export``, and loaded the way the serving replicas and batch scoring load it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from conftest import small_model_registry

from bloodcnn import cli, storage
from bloodcnn.data.reader import load_manifest
from bloodcnn.loaded_model import load_version
from bloodcnn.openvino_runtime import MIN_AGREEMENT, export, serving_precision, split_batches


@pytest.fixture(scope="module")
def setup(s3_server, synthetic_dataset, weights_file, tmp_path_factory):
    versions = {"exported": {"promote": True}, "old": {"promote": False}, "gate-failed": {"promote": False}}
    cfg, registry, model = small_model_registry("openvino", synthetic_dataset, weights_file, 3, versions)
    return cfg, registry, model, tmp_path_factory.mktemp("serve-cache")


def _split(cfg, split):
    xs, ys = zip(*split_batches(cfg, split, 32))
    return np.concatenate(xs), np.concatenate(ys)


def test_models_export_gates_each_precision_and_records_the_choice(setup, monkeypatch, capsys):
    cfg, registry, model, _ = setup
    monkeypatch.setenv("BLOODCNN__REGISTRY__URI", cfg.registry.uri)
    monkeypatch.setenv("BLOODCNN__TRAIN__DATASET", cfg.train.dataset)
    assert cli.main(["models", "export", "exported"]) == 0
    out = capsys.readouterr().out
    assert "f32" in out and "exported bloodcnn/exported" in out
    rt = registry.get("exported").runtime
    assert rt.min_agreement == MIN_AGREEMENT and rt.validated_on == "val"
    assert rt.num_examples == load_manifest(cfg.train.dataset).splits["val"].total
    f32 = next(t for t in rt.trials if t.precision == "f32")
    assert f32.agreement >= MIN_AGREEMENT and f32.max_prob_diff < 1e-4 and f32.passed
    for t in rt.trials:  # the gate's rule, as the metadata states it
        assert t.passed == (t.agreement >= rt.min_agreement and t.accuracy >= rt.keras_accuracy)
        assert t.images_per_s > 0
    assert rt.precision == max((t for t in rt.trials if t.passed), key=lambda t: t.images_per_s).precision
    for name, digest in rt.files.items():  # the files are in the registry, as recorded
        data = storage.read_bytes(storage.join(registry.root, "exported", name))
        assert hashlib.sha256(data).hexdigest() == digest
    # a second export is refused without --force (exit 2, the version untouched)
    assert cli.main(["models", "export", "exported"]) == 2
    assert "already has an OpenVINO artifact" in capsys.readouterr().err
    assert registry.get("exported").runtime == rt


def test_served_answers_equal_the_registered_model_within_the_gate(setup):
    cfg, registry, model, cache = setup
    loaded = load_version(registry, "exported", cache, 8, (registry.root, "bloodcnn"))
    rt = loaded.meta.runtime
    assert loaded.runtime == f"openvino-{rt.precision}"
    assert loaded._model is None  # Keras is not loaded until Grad-CAM needs it
    x, y = _split(cfg, "test")
    served = np.concatenate([loaded.predictor.predict(x[i:i + 8]) for i in range(0, len(x), 8)])
    keras_probs = model.predict(x, verbose=0)
    agreement = (served.argmax(1) == keras_probs.argmax(1)).mean()
    assert agreement >= MIN_AGREEMENT
    assert (served.argmax(1) == y).mean() == pytest.approx((keras_probs.argmax(1) == y).mean(), abs=1 - MIN_AGREEMENT)
    # Grad-CAM still works on the lazily loaded Keras model
    png, probs = loaded.gradcam().explain(x[0])[:2]
    assert png.startswith(b"\x89PNG") and np.allclose(probs, keras_probs[0], atol=1e-5)
    # a batch-scoring actor's load: its CPU share of threads, unpinned, the same answers
    one = load_version(registry, "exported", cache, 8, (registry.root, "bloodcnn"), threads=1)
    compiled = one.predictor.compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert compiled.get_property("ENABLE_CPU_PINNING") is (os.cpu_count() == 1)
    np.testing.assert_allclose(one.predictor.predict(x[:8]), served[:8], atol=1e-5)


def test_versions_without_a_passing_artifact_are_served_by_tensorflow(setup, tmp_path):
    cfg, registry, model, cache = setup
    source = (registry.root, "bloodcnn")
    old = load_version(registry, "old", cache, 4, source)
    assert old.runtime == "tensorflow" and "no OpenVINO artifact" in old.runtime_reason
    # a gate no precision can pass (agreement above 100%): the version keeps TensorFlow
    info = export(model, 32, split_batches(cfg, "val", 32), tmp_path, min_agreement=1.01)
    assert info.precision is None and "no precision passed the gate" in info.reason
    registry.set_runtime("gate-failed", info, tmp_path)
    auto = load_version(registry, "gate-failed", cache, 4, source)
    assert auto.runtime == "tensorflow" and "no precision passed" in auto.runtime_reason
    forced = load_version(registry, "gate-failed", cache, 4, source, runtime="openvino")
    assert forced.runtime == "openvino-f32"
    assert serving_precision(registry.get("exported").runtime, "tensorflow") == (None, "serve.runtime is tensorflow")
    # a corrupted artifact in the registry is refused by its sha256, and TensorFlow serves instead
    bin_uri = storage.join(registry.root, "gate-failed", "openvino/model.bin")
    storage.write_bytes(bin_uri, storage.read_bytes(bin_uri)[:-64] + b"\0" * 64)
    corrupt = load_version(registry, "gate-failed", tmp_path / "fresh-cache", 4, source, runtime="openvino")
    assert corrupt.runtime == "tensorflow" and "corrupt" in corrupt.runtime_reason
    x, _ = _split(cfg, "test")
    assert np.allclose(corrupt.predictor.predict(x[:4]), model.predict(x[:4], verbose=0), atol=1e-5)
