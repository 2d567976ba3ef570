"""A real ``ray start --head`` for the tests that reach a cluster by its address (job submission,
the dashboard's auth): every port free, its own short temp dir, and a teardown that stops only
this head (never ``ray stop``, which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from serving.devtools import free_port

PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
              "object-manager-port")


def processes_with(needle: str) -> list[int]:
    """Pids whose command line contains ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextmanager
def ray_head(env: dict[str, str], num_cpus: int, *extra_args: str, timeout_s: float = 120) -> Iterator[dict]:
    """Start the head, wait until its dashboard reports a healthy GCS, yield
    ``{"url", "ports", "temp_dir"}``; on exit stop it and anything that carries its temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    ports = {flag: free_port() for flag in PORT_FLAGS}
    worker = free_port()
    log_path = Path(temp_dir) / "ray-start.log"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--include-dashboard=true", "--disable-usage-stats",
           # not the default ports: another Ray on this machine may hold them (the job agent then never starts)
           f"--min-worker-port={worker}", f"--max-worker-port={worker + 30}",
           *[f"--{k}={v}" for k, v in ports.items()], *extra_args]
    env = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:  # a healthy GCS, not just any answer: waiting for an answer alone once let the
                # security test's first unauthenticated jobs-API call get 200 instead of 401
                if httpx.get(f"{url}/api/gcs_healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not come up on {url}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "ports": ports, "temp_dir": temp_dir}
    finally:
        t0 = time.monotonic()
        proc.terminate()  # SIGTERM to `ray start --block` tears its node down
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this head's process group only
        except ProcessLookupError:
            pass
        proc.wait(10)
        deadline = time.monotonic() + 10  # and those that left the group (found by the unique temp dir)
        while (left := processes_with(temp_dir)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        print(f"ray head stopped in {time.monotonic() - t0:.1f}s")
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def two_ray_nodes() -> Iterator:
    """``ray.cluster_utils.Cluster``: a head and one more node, 1 CPU each, this process joined to it
    (the environment, S3's included, is inherited by both nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
