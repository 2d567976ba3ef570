"""``ray job submit`` of ``jobs/train.py`` to a ``ray start --head`` cluster started by the test.

The head runs in its own session (``--temp-dir``) and process group and is stopped by signalling
that group: ``ray stop --force`` would kill every Ray process on the machine, other people's too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import ray_support

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _client_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 heads use token auth; the client reads ~/.ray/auth_token
    env["RAY_TRAIN_V2_ENABLED"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A real head node (dashboard + job server) whose processes inherit the S3 env."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with ray_support.ray_head(_client_env(), 2, "--dashboard-host=127.0.0.1") as head:
        yield head["url"]


def test_ray_job_submit_trains_and_registers(ray_head, synthetic_dataset, s3_prefix, weights_file, tmp_path):
    from bloodcnn.registry import Registry

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "train": {
            "dataset": synthetic_dataset, "weights": str(weights_file), "image_size": 64, "batch_size": 32,
            "epochs": 1, "fine_tune_epochs": 0, "num_workers": 1, "storage_path": f"{s3_prefix}/runs",
        },
        "registry": {"uri": f"{s3_prefix}/models", "gates": {"min_accuracy": 0.0, "min_macro_f1": 0.0}},
    }))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(REPO),
           "--", "python", "jobs/train.py", "--config", str(config), "--run-name", "submitted"]
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run(cmd, env=_client_env(), capture_output=True, text=True, timeout=420)
        text = out.stdout + out.stderr
        # the dashboard answers before its job agent is up: that submit is refused, so retry it
        if out.returncode == 0 or "No available agent" not in text or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, text[-6000:]
    assert "[bloodcnn] epoch 1/1" in text, text[-6000:]  # per-epoch progress reached the client
    line = next(line for line in text.splitlines() if line.startswith('{"version"'))
    result = json.loads(line)
    reg = Registry(f"{s3_prefix}/models", "bloodcnn")
    meta = reg.get(result["version"])
    assert meta.metrics["training"]["run_name"] == "submitted"
    assert reg.production() == meta.version
    assert "succeeded" in text.lower()
