"""The README's main job, end to end, on a small synthetic source (the real run takes minutes)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, WEIGHTS
from serving.devtools import free_port


def test_main_job_prepares_trains_serves_and_predicts(synthetic_source, tmp_path):
    cfg = tmp_path / "main.yaml"
    cfg.write_text(
        f"""
data: {{source: {synthetic_source}, shard_size: 32, augment: {{copies: 1}}}}
train: {{image_size: 64, batch_size: 16, weights: {WEIGHTS}, num_workers: 1}}
registry: {{gates: {{min_macro_f1: 0.0}}}}
serve: {{port: {free_port()}, autoscaling: {{min_replicas: 1, max_replicas: 1}}}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = subprocess.run(
        [sys.executable, "jobs/main.py", "--config", str(cfg), "--epochs", "1", "--no-wait",
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    for step in ("starting SeaweedFS", "preparing", "training", "serving", "sample predictions"):
        assert f"==> {step}" in out
    predictions = [line for line in out.splitlines() if " true " in line and " -> " in line]
    assert len(predictions) == 4, out[-3000:]  # one sample prediction per class
    assert "bloodcnn is serving at http://127.0.0.1:" in out
