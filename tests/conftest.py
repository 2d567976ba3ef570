"""Shared fixtures: a real SeaweedFS S3 for the whole session, synthetic images, prepared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bloodcnn import storage
from bloodcnn.s3server import S3Server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DATASET = SHARED / "data" / "all-leukemia"

#: set by tests/test_k8s_e2e.py when a whole e2e run wrote bench/results/k8s-e2e.json: whether
#: its cluster build was cold; the session's end then adds the whole suite's minutes to that file
E2E_WRITTEN = pytest.StashKey[bool]()


def pytest_sessionstart(session):
    import time

    session.config.stash[_SUITE_T0] = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    """suite_minutes_cold / suite_minutes_warm in k8s-e2e.json: the whole pytest run, timed here."""
    import json
    import time

    cold = session.config.stash.get(E2E_WRITTEN, None)
    if cold is None:
        return
    minutes = round((time.monotonic() - session.config.stash[_SUITE_T0]) / 60, 1)
    path = REPO / "bench" / "results" / "k8s-e2e.json"
    doc = json.loads(path.read_text())
    key, limit = ("suite_minutes_cold", 60) if cold else ("suite_minutes_warm", 30)
    doc["goals"][key] = {"value": minutes, "target": f"<= {limit}", "met": minutes <= limit,
                         "tests": session.testscollected, "failed": session.testsfailed}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


_SUITE_T0 = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def s3_server():
    """One real S3 server for the session; its AWS_* variables are exported for child processes too."""
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")}
    with S3Server(buckets=("bloodcnn", "test")) as server:
        os.environ.update(server.env())
        storage._s3_store.cache_clear()
        yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._s3_store.cache_clear()


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh s3:// prefix per test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"s3://test/{name}-{os.urandom(3).hex()}"


@pytest.fixture(scope="session")
def weights_file() -> Path:
    if not WEIGHTS.is_file():
        pytest.fail(f"ImageNet weights missing at {WEIGHTS} (../shared/weights)")
    return WEIGHTS


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """4 class folders of 64 px synthetic cells, with exact and near duplicates."""
    from bloodcnn.data.synthetic import make_class_folders

    return make_class_folders(tmp_path_factory.mktemp("synthetic") / "src", per_class=48, size=64,
                              duplicates=2, near_duplicates=2)


def synthetic_config(source: Path, output: str, **data):
    from bloodcnn.config import load_config

    base = {"source": str(source), "output": output, "shard_size": 16, "augment": {"copies": 1}, "workers": 2,
            "engine": "threads"}  # the Ray Data engine has its own tests (test_prepare_cluster.py)
    base.update(data)
    return load_config(environ={}, overrides={"data": base})


@pytest.fixture(scope="session")
def synthetic_dataset(s3_server, synthetic_source) -> str:
    """A prepared synthetic dataset on the session's S3: ``s3://test/synthetic-ds``."""
    from bloodcnn.data.prepare import prepare_dataset

    uri = "s3://test/synthetic-ds"
    prepare_dataset(synthetic_config(synthetic_source, uri), progress=False)
    return uri


def small_model_registry(name: str, synthetic_dataset: str, weights_file: Path, seed: int,
                         versions: dict[str, dict]):
    """(config, Registry, model): a 32 px model (ImageNet backbone, random head, so each image gets
    its own answer) registered under ``versions`` (version -> register_model keywords) in a fresh
    registry on the session's S3, for the synthetic dataset."""
    from bloodcnn.config import load_config
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.registry import Registry
    from serving import devtools

    uri = f"s3://test/{name}-{os.urandom(3).hex()}/models"
    cfg = load_config(environ={}, overrides={"registry": {"uri": uri}, "train": {"dataset": synthetic_dataset}})
    model = devtools.make_model(32, weights=str(weights_file), kernel_scale=1.0, seed=seed)
    dataset_version = load_manifest(synthetic_dataset).dataset_version
    for version, kwargs in versions.items():
        devtools.register_model(uri, model, version=version, dataset_version=dataset_version, **kwargs)
    return cfg, Registry(uri, "bloodcnn"), model
