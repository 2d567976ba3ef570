"""``bloodcnn data prepare`` on Ray Data across two (simulated) Ray nodes of 1 CPU each.

Both stages (validate+hash, write shards) must run on both nodes, and the dataset must equal the
one the threads engine makes in this process: the same version, images, groups, splits and the
same shard bytes. Then the Ray job entrypoint, run the way ``ray job submit`` runs it (a driver
with ``$RAY_ADDRESS``), picks the Ray engine by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bloodcnn.data import reader
from bloodcnn.data.prepare import prepare_dataset

from conftest import REPO, synthetic_config
from ray_support import two_ray_nodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    with two_ray_nodes() as cluster:
        yield cluster


def _without_run_facts(manifest) -> dict:
    doc = manifest.model_dump()
    for key in ("created_at", "config", "nodes"):
        doc.pop(key)
    return doc


def test_two_nodes_share_both_stages_and_match_the_threads_engine(two_nodes, synthetic_source, s3_prefix):
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    on_ray = prepare_dataset(synthetic_config(synthetic_source, f"{s3_prefix}/ray", engine="auto"), progress=False)
    local = prepare_dataset(synthetic_config(synthetic_source, f"{s3_prefix}/threads"), progress=False)

    assert set(on_ray.nodes) == {"validate+hash", "write shards"}
    for stage, per_node in on_ray.nodes.items():
        assert set(per_node) == alive, f"{stage} ran on {sorted(per_node)}, not on both nodes {sorted(alive)}"
        assert all(n > 0 for n in per_node.values())
    assert sum(on_ray.nodes["validate+hash"].values()) == on_ray.scanned
    assert sum(on_ray.nodes["write shards"].values()) == sum(s.total for s in on_ray.splits.values())
    assert len(local.nodes["validate+hash"]) == 1  # the threads engine: this host only

    shards = {s: [(x.path, x.sha256) for x in info.shards] for s, info in on_ray.splits.items()}
    assert shards == {s: [(x.path, x.sha256) for x in info.shards] for s, info in local.splits.items()}
    assert _without_run_facts(on_ray) == _without_run_facts(local)
    batches = list(reader.make_dataset(f"{s3_prefix}/ray", "train", batch_size=16, image_size=32))
    assert sum(int(b[1].shape[0]) for b in batches) == on_ray.splits["train"].total


def test_the_ray_job_entrypoint_uses_every_node_by_itself(two_nodes, synthetic_source, s3_prefix):
    """What ``ray job submit -- python jobs/prepare_data.py`` runs: a driver with $RAY_ADDRESS."""
    env = {**os.environ, "RAY_ADDRESS": two_nodes.address, "BLOODCNN__DATA__SHARD_SIZE": "16",
           "BLOODCNN__DATA__AUGMENT__COPIES": "1"}
    proc = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", "--source", str(synthetic_source), "--output", s3_prefix,
         "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "validate+hash: 2 node(s)" in proc.stdout, proc.stdout
    assert "write shards: 2 node(s)" in proc.stdout, proc.stdout
    manifest = reader.load_manifest(s3_prefix)
    assert len(manifest.nodes["write shards"]) == 2
