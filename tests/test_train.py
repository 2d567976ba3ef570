"""Ray Train job end to end on the real SeaweedFS S3: train with 2 workers, register, resume, bad input.

One in-process Ray (2 CPUs) is shared by the whole module. Images are 64 px and runs are 1-2
epochs of a few steps, so each training run takes well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bloodcnn import storage
from bloodcnn.config import load_config
from bloodcnn.registry import Registry

pytestmark = pytest.mark.slow


def train_config(dataset: str, prefix: str, weights: Path, **train):
    base = {
        "dataset": dataset, "weights": str(weights), "image_size": 64, "batch_size": 16,
        "epochs": 1, "fine_tune_epochs": 1, "fine_tune_blocks": 1, "num_workers": 2,
        "storage_path": f"{prefix}/runs", "max_failures": 1, "placement_timeout_s": 60,
    }
    base.update(train)
    return load_config(environ={}, overrides={
        "train": base,
        "registry": {"uri": f"{prefix}/models", "gates": {"min_accuracy": 0.0, "min_macro_f1": 0.0}},
    })


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """In-process Ray with 2 CPUs; started after the S3 env is exported so workers inherit it."""
    import ray

    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _predict(model, images):
    return np.asarray(model(images, training=False))


def test_two_workers_survive_a_killed_worker_register_evaluate_and_rerun(
    ray_local, synthetic_dataset, s3_prefix, weights_file, tmp_path
):
    """2 Ray Train workers on S3 shards; rank 1 SIGKILLs itself once in epoch 2 (fine-tuning), Ray
    restarts the group from epoch 1's checkpoint on S3, the run completes, and the driver
    evaluates, registers and promotes the model. (One run covers both, to keep the suite short.)"""
    from bloodcnn.data.reader import load_manifest, make_dataset
    from bloodcnn.model import load_model
    from bloodcnn.train.evaluate import evaluate_registered
    from bloodcnn.train.job import TrainingError, run_training

    cfg = train_config(synthetic_dataset, s3_prefix, weights_file)
    manifest = load_manifest(synthetic_dataset)
    marker = tmp_path / "killed.json"
    meta = run_training(cfg, run_name="two-workers",
                        _fault={"rank": 1, "epoch": 2, "batch": 2, "marker": str(marker)})

    # the worker was killed once, mid-epoch 2, and the restarted group resumed after epoch 1
    killed = json.loads(marker.read_text())
    assert killed["rank"] == 1 and killed["epoch"] == 2
    training = meta.metrics["training"]
    assert training["resumed_from_epoch"] == 1
    assert training["epochs_completed"] == 2
    assert [(h["epoch"], h["phase"]) for h in training["history"]] == [(1, "head"), (2, "fine_tune")]
    # trained by 2 data-parallel workers
    assert training["num_workers"] == 2 and set(training["worker_nodes"]) == {"0", "1"}
    assert training["images_per_s"] > 0

    # test-split metrics
    m = meta.metrics
    n_test = manifest.splits["test"].total
    assert m["num_examples"] == n_test and m["split"] == "test"
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
    assert set(m["per_class"]) == set(manifest.class_names)
    assert np.asarray(m["confusion_matrix"]).shape == (4, 4) and np.sum(m["confusion_matrix"]) == n_test

    # registry: metadata, artifacts on S3, promoted (gates are 0 here)
    reg = Registry(cfg.registry.uri, cfg.registry.model_name)
    assert reg.get(meta.version).model_sha256 == meta.model_sha256
    assert meta.dataset_version == manifest.dataset_version
    assert meta.class_names == manifest.class_names and meta.image_size == 64
    assert meta.config["train"]["run_name"] == "two-workers" and meta.code_version
    assert sorted(meta.artifacts) == ["confusion_matrix.png", "metrics.json", "model_card.html", "model_card.md",
                                      "reliability.png", "training_curves.png"]
    # calibrated on the validation split, reported on the test split, stored with the version
    c = m["calibration"]
    assert c["fitted_on"] == "val" and c["calibration_examples"] == manifest.splits["val"].total
    assert meta.calibration.temperature == c["temperature"] > 0 and meta.calibration.qhat == c["qhat"]
    assert meta.calibration.alpha == cfg.registry.calibration.alpha
    for stage in ("before", "after"):
        assert set(c[stage]) == {"ece", "nll", "brier"}
    # exported to OpenVINO at registration, gated on the same validation split
    rt = meta.runtime
    assert rt.num_examples == manifest.splits["val"].total and set(rt.files) == {"openvino/model.xml",
                                                                                  "openvino/model.bin"}
    assert rt.precision in {t.precision for t in rt.trials if t.passed}  # f32 agrees with Keras to 1e-5
    assert c["after"]["nll"] <= c["before"]["nll"] + 0.05  # fitted on val; test is close to it
    assert 0 <= c["conformal"]["coverage"] <= 1 and c["risk_coverage"]
    for name in meta.artifacts:
        data = storage.read_bytes(storage.join(reg.root, meta.version, name))
        if name.startswith("model_card"):
            assert f"Model card: {cfg.registry.model_name} {meta.version}".encode() in data
            assert f"{m['accuracy']:.4f}".encode() in data and b"T = " in data
        else:
            assert data[:4] == b"\x89PNG" or json.loads(data)["accuracy"] == m["accuracy"]
    assert reg.production() == meta.version

    # checkpoints on S3: rank 0's model + state, each rank's worker record merged in one folder
    ckpt = storage.join(cfg.train.storage_path, "two-workers", "epoch-002")
    for rel in ("model.keras", "state.json", "workers/rank-0.json", "workers/rank-1.json"):
        assert storage.exists(storage.join(ckpt, rel)), rel
    # the local weights file was staged next to the run, so workers on any node can read it
    assert storage.exists(storage.join(cfg.train.storage_path, "two-workers", "weights", weights_file.name))

    # the registered model loads in safe mode and predicts like the trained checkpoint
    local, _ = reg.fetch(meta.version, tmp_path / "reg")
    served = load_model(local)
    storage.store_for(ckpt).download_file(storage.join(ckpt, "model.keras"), tmp_path / "ckpt.keras")
    import tf_keras as keras

    trained = keras.models.load_model(str(tmp_path / "ckpt.keras"), compile=False)
    images, _ = next(iter(make_dataset(synthetic_dataset, "test", batch_size=8, image_size=64)))
    probs = _predict(served, images)
    assert probs.shape == (images.shape[0], 4) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(probs, _predict(trained, images), atol=1e-5)

    # the same run name again: already completed -> same model, no training, no new version
    t0 = time.monotonic()
    again = run_training(cfg, run_name="two-workers")
    assert again.version == meta.version and time.monotonic() - t0 < 30
    assert [v.version for v in reg.versions()] == [meta.version]
    # ... but not with another config
    with pytest.raises(TrainingError, match="already used"):
        run_training(train_config(synthetic_dataset, s3_prefix, weights_file, epochs=2), run_name="two-workers")

    # re-evaluation of the production model reproduces the registered metrics
    report = evaluate_registered(cfg, "production")
    assert report["accuracy"] == pytest.approx(m["accuracy"]) and report["macro_f1"] == pytest.approx(m["macro_f1"])
    assert report["output"]["metrics"] == storage.join(reg.root, meta.version, "evaluation", "metrics.json")
    assert storage.exists(report["output"]["metrics"]) and storage.exists(report["output"]["confusion_matrix"])
    # ... and of a local .keras file, into a given folder
    out = tmp_path / "eval"
    report2 = evaluate_registered(cfg, str(local), output=str(out))
    assert report2["accuracy"] == pytest.approx(m["accuracy"])
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


# --- bad input: clear errors, fast, before any worker starts ------------------------------------


def test_missing_and_corrupt_manifest(ray_local, s3_prefix, weights_file):
    from bloodcnn.data.manifest import DatasetError
    from bloodcnn.train.job import run_training

    t0 = time.monotonic()
    with pytest.raises(DatasetError, match="manifest.json"):
        run_training(train_config(f"{s3_prefix}/no-such-dataset", s3_prefix, weights_file))
    storage.write_bytes(f"{s3_prefix}/corrupt/manifest.json", b'{"dataset_version": ')
    with pytest.raises(DatasetError, match="corrupt"):
        run_training(train_config(f"{s3_prefix}/corrupt", s3_prefix, weights_file))
    assert time.monotonic() - t0 < 30


def test_weights_that_do_not_fit(ray_local, synthetic_dataset, s3_prefix, weights_file, tmp_path, monkeypatch):
    import tf_keras as keras

    from bloodcnn.model import WeightsError
    from bloodcnn.train.job import run_training

    wrong = tmp_path / "wrong.h5"
    tiny = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    tiny.save_weights(str(wrong))
    t0 = time.monotonic()
    with pytest.raises(WeightsError, match="do not fit"):
        run_training(train_config(synthetic_dataset, s3_prefix, wrong))
    # a missing file falls back to Keras's ImageNet download; make that fail as it does offline
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached download in ~/.keras
    with pytest.raises(WeightsError, match="not found.*download"):
        run_training(train_config(synthetic_dataset, s3_prefix, tmp_path / "missing.h5"))
    assert time.monotonic() - t0 < 60


def test_too_many_workers_fails_fast(ray_local, synthetic_dataset, s3_prefix, weights_file):
    from bloodcnn.data.manifest import DatasetError
    from bloodcnn.train.job import ClusterResourcesError, run_training

    t0 = time.monotonic()
    with pytest.raises(ClusterResourcesError, match="cannot place 3 training worker"):
        run_training(train_config(synthetic_dataset, s3_prefix, weights_file, num_workers=3))
    with pytest.raises(ClusterResourcesError, match="use_gpu=false"):
        run_training(train_config(synthetic_dataset, s3_prefix, weights_file, num_workers=1, use_gpu=True))
    with pytest.raises(DatasetError, match="fewer than 500 workers"):  # more workers than train shards
        run_training(train_config(synthetic_dataset, s3_prefix, weights_file, num_workers=500))
    assert time.monotonic() - t0 < 60


def test_busy_cluster_times_out_with_a_message(ray_local, synthetic_dataset, s3_prefix, weights_file):
    """The cluster could place the workers, but its CPUs are taken: a timed-out wait, not a hang."""
    from bloodcnn.train.job import ClusterResourcesError, run_training

    ray = ray_local

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        t0 = time.monotonic()
        with pytest.raises(ClusterResourcesError, match="placement_timeout_s=5"):
            run_training(train_config(synthetic_dataset, s3_prefix, weights_file, num_workers=1,
                                      placement_timeout_s=5), run_name="busy")
        assert time.monotonic() - t0 < 60
    finally:
        ray.kill(hog)


def test_s3_unreachable(ray_local, synthetic_dataset, s3_prefix, weights_file, monkeypatch):
    from bloodcnn.storage import StorageError
    from bloodcnn.train.job import run_training

    cfg = train_config(synthetic_dataset, s3_prefix, weights_file)
    cfg.storage.max_attempts = 1
    cfg.storage.connect_timeout_s = 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    storage._s3_store.cache_clear()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            run_training(cfg)
        assert time.monotonic() - t0 < 30
    finally:
        monkeypatch.undo()
        storage._s3_store.cache_clear()
