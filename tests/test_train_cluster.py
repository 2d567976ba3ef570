"""Training across two (simulated) Ray nodes of 1 CPU each, and a restarted job that resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bloodcnn import storage
from bloodcnn.config import load_config

from ray_support import two_ray_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_node_cluster(s3_server):
    """``ray.cluster_utils.Cluster``: a head and one more node, 1 CPU each (S3 env inherited)."""
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    with two_ray_nodes() as cluster:
        yield cluster


def test_two_nodes_and_a_restarted_job_resumes(two_node_cluster, synthetic_dataset, s3_prefix, weights_file: Path,
                                               tmp_path):
    """First submission dies in epoch 2 (a worker is killed and max_failures=0); submitting the same
    run name again resumes from epoch 1's checkpoint on S3, with one worker on each node."""
    import ray

    from bloodcnn.registry import Registry
    from bloodcnn.train.job import TrainingError, run_training

    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2

    def config(max_failures: int):
        return load_config(environ={}, overrides={
            "train": {
                "dataset": synthetic_dataset, "weights": str(weights_file), "image_size": 64, "batch_size": 32,
                "epochs": 2, "fine_tune_epochs": 0, "num_workers": 2, "storage_path": f"{s3_prefix}/runs",
                "max_failures": max_failures,
            },
            "registry": {"uri": f"{s3_prefix}/models", "auto_promote": False},
        })

    marker = tmp_path / "killed.json"
    with pytest.raises(TrainingError, match="failed"):
        run_training(config(0), run_name="two-nodes", _fault={"rank": 0, "epoch": 2, "batch": 1, "marker": str(marker)})
    assert marker.exists()
    assert storage.exists(storage.join(s3_prefix, "runs", "two-nodes", "epoch-001", "model.keras"))

    meta = run_training(config(2), run_name="two-nodes")  # the restarted job: same name, same recipe

    training = meta.metrics["training"]
    assert training["resumed_from_epoch"] == 1 and training["epochs_completed"] == 2
    nodes = training["worker_nodes"]
    assert set(nodes) == {"0", "1"}
    assert len(set(nodes.values())) == 2, f"both workers ran on one node: {nodes}"
    assert set(nodes.values()) == set(alive)
    reg = Registry(f"{s3_prefix}/models", "bloodcnn")
    assert [v.version for v in reg.versions()] == [meta.version]
    assert reg.production() is None  # auto_promote off
    assert storage.exists(storage.join(s3_prefix, "runs", "two-nodes", "epoch-002", "workers", "rank-1.json"))
