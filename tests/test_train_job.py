"""``ray job submit`` of ``jobs/train.py`` to a ``ray start --head`` cluster started by the test.

The head runs in its own session (``--temp-dir``) and process group and is stopped by signalling
that group: ``ray stop --force`` would kill every Ray process on the machine, other people's too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port, dash, agent, agent_grpc, runtime_env, metrics, client = (_free_port() for _ in range(7))
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    log_path = Path(temp_dir) / "ray-start.log"
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--block",
           # not the default ports: another Ray on this machine may hold them (the job agent then never starts)
           f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}"]
    env = dict(_client_env(), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:  # answering (401 without the token): up
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray dashboard did not come up on {address}:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield address
    finally:
        # stop only this head: SIGTERM to `ray start --block` tears its node down; then its group
        t0 = time.monotonic()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this head only
        except ProcessLookupError:
            pass
        proc.wait(10)
        print(f"ray head stopped in {time.monotonic() - t0:.1f}s")
        shutil.rmtree(temp_dir, ignore_errors=True)


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
