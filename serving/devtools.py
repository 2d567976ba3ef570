"""Helpers for tests, the load benchmark and demos: a registered model without training,
synthetic images in every accepted format, free ports."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.settings import free_port, ray_env  # noqa: F401  (free_port: re-exported for tests and benchmarks)

CLASS_NAMES = ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]


def serve_processes(app: str) -> dict[str, int]:
    """pid of the HTTP proxy (Serve's proxy actor, or in HAProxy mode its manager actor and the
    ``haproxy`` process) and of app ``app``'s ingress and classifier (or service) replicas, among
    this process's descendants (the Ray it started); for memory and CPU checks. A second replica
    of a deployment is ``service#2``, and so on."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    titles = {"proxy": "ProxyActor", "haproxy_manager": "HAProxyManager", "ingress": f"ServeReplica:{app}:APIIngress",
              "classifier": f"ServeReplica:{app}:BloodClassifier",
              "service": f"ServeReplica:{app}:BloodService"}  # serve.ingress colocated
    found: dict[str, int] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if proc.name() == "haproxy":
                found["haproxy"] = proc.pid  # a reload leaves the newest; the old one is exiting
                continue
        except psutil.Error:
            continue
        for name, title in titles.items():
            if title in cmd:
                n = 1 + sum(1 for key in found if key.split("#")[0] == name)
                found[name if n == 1 else f"{name}#{n}"] = proc.pid
    return found


def make_model(image_size: int = 64, weights: str = "none", bias: list[float] | None = None,
               kernel_scale: float | None = None, seed: int = 0, num_classes: int = len(CLASS_NAMES)):
    """An untrained classifier. ``bias``/``kernel_scale`` set the softmax layer so tests can
    choose how confident (and in which class) the model is."""
    import tf_keras as keras

    from bloodcnn.model import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(num_classes, image_size=image_size, weights=weights)
    dense = model.get_layer("probs")
    kernel, b = dense.get_weights()
    if kernel_scale is not None:
        kernel = np.random.default_rng(seed).normal(0.0, kernel_scale, kernel.shape).astype(np.float32)
    if bias is not None:
        b = np.asarray(bias, np.float32)
    dense.set_weights([kernel, b])
    return model


def register_model(
    registry_uri: str,
    model,
    *,
    model_name: str = "bloodcnn",
    version: str | None = None,
    class_names: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    promote: bool = True,
    storage_config=None,
    calibration: dict[str, Any] | None = None,
    dataset_version: str = "synthetic",
    test_time_augmentation: str = "none",
):
    """Save ``model`` as .keras, register it (and promote it); returns the ModelMetadata."""
    from bloodcnn.registry import Registry

    from bloodcnn import model_card

    reg = Registry(registry_uri, model_name, storage_config)
    version = version or reg.new_version()
    metadata = {
        "dataset_version": dataset_version,
        "class_names": class_names or CLASS_NAMES,
        "image_size": int(model.input_shape[1]),
        "test_time_augmentation": test_time_augmentation,
        "metrics": metrics or {},
        "config": {"note": "untrained model registered by serving.devtools"},
        "calibration": calibration,
    }
    card_md, card_html = model_card.render({**metadata, "model_name": model_name, "version": version})
    with tempfile.TemporaryDirectory(prefix="bloodcnn-model-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        meta = reg.register(path, metadata, version=version,
                            artifacts={"model_card.md": card_md, "model_card.html": card_html})
    if promote:
        reg.promote(meta.version)
    return meta


def smear_like(size: int = 96, seed: int = 0) -> np.ndarray:
    """A synthetic RGB uint8 image: pink background with a few purple 'cells'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.float32)
    img[...] = (235, 200, 210)
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.08, 0.2) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[mask] = (120 + rng.uniform(-20, 20), 60, 160 + rng.uniform(-20, 20))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_bytes(fmt: str = "PNG", size: int = 96, seed: int = 0) -> bytes:
    return encode(smear_like(size, seed), fmt)


class LocalStack:
    """A local Ray + Serve with one or more bloodcnn applications, for tests and benchmarks.

    ``apps`` maps application name -> (route_prefix, AppConfig). Environment variables in
    ``env`` (and those the apps' ``serve.proxy`` needs) are set before Ray starts, so every
    replica inherits them, and restored after.
    """

    def __init__(self, apps: dict, *, env: dict[str, str] | None = None, num_cpus: int = 4,
                 host: str = "127.0.0.1"):
        self.apps = apps
        self.env = dict(env or {})
        self.num_cpus = num_cpus
        self.host = host
        self.port = 0
        self._saved: dict[str, str | None] = {}

    def url(self, name: str) -> str:
        prefix = self.apps[name][0].rstrip("/")
        return f"http://{self.host}:{self.port}{prefix}"

    def start(self) -> "LocalStack":
        import os
        import sys

        import ray
        from ray import serve

        from serving.app import build_app

        repo = str(Path(__file__).resolve().parents[1])
        env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        for _, cfg in self.apps.values():
            env.update(ray_env(cfg))  # serve.proxy: Serve reads it when Ray starts
        env.update(self.env)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if repo not in paths:
            env["PYTHONPATH"] = os.pathsep.join([repo, *paths])
        for k, v in env.items():
            self._saved[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if repo not in sys.path:
            sys.path.insert(0, repo)
        # address="local": always a fresh private instance, never a cluster someone else started
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, configure_logging=False)
        self.port = free_port()
        serve.start(http_options={"host": self.host, "port": self.port})
        targets = [
            serve.RunTarget(target=build_app(cfg), name=name, route_prefix=prefix)
            for name, (prefix, cfg) in self.apps.items()
        ]
        serve.run_many(targets)
        return self

    def stop(self) -> None:
        import os

        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._saved.clear()

    def replicas(self, app: str, deployment: str = "BloodClassifier") -> int:
        from ray import serve

        st = serve.status().applications[app].deployments[deployment]
        return int(st.replica_states.get("RUNNING", 0))

    def log_dir(self) -> Path:
        import ray

        return Path(ray._private.worker._global_node.get_logs_dir_path())

    def __enter__(self) -> "LocalStack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
