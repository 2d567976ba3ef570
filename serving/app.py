"""The bloodcnn Serve application: ``APIIngress`` (FastAPI) -> ``BloodClassifier`` (batched).

Ways to run it:

* ``serve run serving/serve_config.yaml`` or ``serve deploy serving/serve_config.yaml``
  (import path ``serving.app:app``; settings come from ``$BLOODCNN_CONFIG`` / defaults and
  ``BLOODCNN__SERVE__*`` overrides).
* ``serve run serving.app:app`` or ``python -m serving.app`` (blocks; Ctrl-C stops).
* From Python: ``url = serving.app.run(cfg)`` starts Serve on ``cfg.serve.host:port`` and
  returns the base URL; ``build_app(cfg)`` returns the bound application for ``serve.run``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from bloodcnn.config import AppConfig, load_config
from bloodcnn.inference import set_max_pixels
from serving.api import create_api
from serving.classifier import BloodClassifier
from serving.settings import IngressSettings, classifier_settings, ingress_settings, ray_env

log = logging.getLogger("ray.serve")

APP_NAME = "bloodcnn"


class _HandleBackend:
    """The API's backend: calls on the ``BloodClassifier`` deployment handle."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def predict(self, data: bytes) -> dict:
        return await self.handle.predict.remote(data)

    async def predict_pixels(self, x) -> dict:
        return await self.handle.predict_pixels.remote(x)

    async def explain(self, data: bytes) -> dict:
        return await self.handle.explain.remote(data)

    async def status(self) -> dict:
        return await self.handle.status.remote()

    async def model_info(self) -> dict | None:
        return await self.handle.model_info.remote()

    async def model_card(self, fmt: str) -> dict | None:
        return await self.handle.model_card.remote(fmt)


@serve.deployment(name="APIIngress", max_ongoing_requests=128)
@serve.ingress()
class APIIngress:
    """HTTP front door. The FastAPI app is built in the replica (``__serve_build_asgi_app__``)
    so it can hold this replica's settings, API key and Prometheus registry."""

    def __init__(self, classifier: DeploymentHandle, settings: dict, model_name: str = "bloodcnn"):
        self.settings = IngressSettings.model_validate(settings)
        self.model_name = model_name  # the name on the v2 (Open Inference Protocol) routes
        self.classifier = classifier
        set_max_pixels(self.settings.max_pixels)
        key = os.environ.get(self.settings.api_key_env, "").strip()
        self._api_key = key or None  # never logged
        log.info("APIIngress: API key auth is %s (variable %s)", "on" if key else "off", self.settings.api_key_env)

    def __serve_build_asgi_app__(self):
        return create_api(_HandleBackend(self.classifier), self.settings, self._api_key, model_name=self.model_name)


def classifier_options(cfg: AppConfig) -> dict[str, Any]:
    s, a = cfg.serve, cfg.serve.autoscaling
    return {
        "max_ongoing_requests": max(s.max_ongoing_requests, s.max_batch_size),
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica},
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
            # deprecated in Ray but still validated against look_back_period_s
            "metrics_interval_s": min(10.0, a.look_back_period_s / 2),
        },
        "user_config": classifier_settings(cfg).model_dump(),
    }


def ingress_options(cfg: AppConfig) -> dict[str, Any]:
    s = cfg.serve
    return {
        "num_replicas": 1,
        "max_ongoing_requests": max(2 * s.max_ongoing_requests, 4 * s.max_batch_size),
        "ray_actor_options": {"num_cpus": 0},
    }


def build_app(cfg: AppConfig | None = None) -> serve.Application:
    """The bound application: ``APIIngress`` over an autoscaled, batched ``BloodClassifier``; with
    ``serve.ingress: colocated``, ``BloodService`` alone (the classifier replicas serve HTTP)."""
    cfg = cfg or load_config()
    if cfg.serve.ingress == "colocated":
        from serving.service import BloodService

        return BloodService.options(**classifier_options(cfg)).bind(
            ingress_settings(cfg).model_dump(), storage=cfg.storage.model_dump(), cache_dir=None,
            model_name=cfg.registry.model_name)
    classifier = BloodClassifier.options(**classifier_options(cfg)).bind(
        storage=cfg.storage.model_dump(), cache_dir=None
    )
    return APIIngress.options(**ingress_options(cfg)).bind(classifier, ingress_settings(cfg).model_dump(),
                                                           cfg.registry.model_name)


def app_builder(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve application builder: ``import_path: serving.app:app_builder`` with ``args``
    ``{config: PATH, overrides: {serve: {...}}}`` in a Serve config file."""
    args = dict(args or {})
    return build_app(load_config(args.get("config"), overrides=args.get("overrides")))


def __getattr__(name: str):
    # ``serving.app:app`` is built on access, so importing this module (as every replica
    # does) never reads a config file.
    if name == "app":
        return build_app(load_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def base_url(cfg: AppConfig, route_prefix: str = "/") -> str:
    host = cfg.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{cfg.serve.port}{route_prefix.rstrip('/')}"


def wait_ready(url: str, timeout_s: float = 120.0, api_key: str | None = None) -> dict:
    """Poll ``{url}/readyz`` until 200; returns its JSON. Raises TimeoutError."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    headers = {"X-API-Key": api_key} if api_key else {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url.rstrip('/')}/readyz", timeout=5.0, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = r.text[:200]
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready within {timeout_s:.0f}s: {last}")


def run(
    cfg: AppConfig | None = None,
    *,
    blocking: bool = False,
    name: str = APP_NAME,
    route_prefix: str = "/",
    wait_ready_s: float | None = None,
) -> str:
    """Start Serve's HTTP proxy on ``cfg.serve.host:port``, deploy the app, return its URL.

    Connects to the Ray cluster in ``$RAY_ADDRESS`` (or starts a local one). With
    ``wait_ready_s`` it also waits for ``/readyz`` (a model loaded and warmed up).
    """
    import ray

    cfg = cfg or load_config()
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):  # a Ray started here: serve.proxy applies to it
            os.environ.update(ray_env(cfg))
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = base_url(cfg, route_prefix)
    if blocking:
        log.info("bloodcnn serving at %s", url)
    serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)
    if wait_ready_s:
        wait_ready(url, wait_ready_s)
    return url


def shutdown() -> None:
    serve.shutdown()


if __name__ == "__main__":  # python -m serving.app
    logging.basicConfig(level=logging.INFO)
    print(run(blocking=True))
