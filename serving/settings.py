"""What each deployment receives, derived from :class:`bloodcnn.config.AppConfig`.

``ClassifierSettings`` is the ``user_config`` of ``BloodClassifier`` (so ``serve deploy``
with a changed ``user_config`` reconfigures replicas in place); ``IngressSettings`` are the
``APIIngress`` constructor arguments. ``ray_env`` is what a Ray that bloodcnn starts needs in
its environment for ``serve.proxy``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bloodcnn.config import AppConfig
from bloodcnn.ports import free_port


class ClassifierSettings(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    registry_uri: str
    model_name: str
    model_version: str = "production"
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    uncertain_threshold: float = Field(0.6, ge=0, le=1)
    uncertain_rule: Literal["conformal", "threshold"] = "conformal"
    version_poll_s: float = Field(10.0, ge=0)
    max_pixels: int = Field(40_000_000, ge=1)
    runtime: Literal["auto", "openvino", "tensorflow"] = "auto"


class IngressSettings(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    api_key_env: str = "BLOODCNN_API_KEY"
    max_images_per_request: int = Field(16, ge=1)
    max_body_mb: float = Field(10.0, gt=0)
    max_pixels: int = Field(40_000_000, ge=1)
    uncertain_threshold: float = Field(0.6, ge=0, le=1)
    backend_timeout_s: float = Field(60.0, gt=0)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def classifier_settings(cfg: AppConfig) -> ClassifierSettings:
    s = cfg.serve
    return ClassifierSettings(
        registry_uri=cfg.registry.uri,
        model_name=cfg.registry.model_name,
        model_version=s.model_version,
        max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s,
        uncertain_threshold=s.uncertain_threshold,
        uncertain_rule=s.uncertain_rule,
        version_poll_s=s.version_poll_s,
        max_pixels=s.max_pixels,
        runtime=s.runtime,
    )


def ingress_settings(cfg: AppConfig) -> IngressSettings:
    s = cfg.serve
    return IngressSettings(
        api_key_env=s.api_key_env,
        max_images_per_request=s.max_images_per_request,
        max_body_mb=s.max_body_mb,
        max_pixels=s.max_pixels,
        uncertain_threshold=s.uncertain_threshold,
    )


def ray_env(cfg: AppConfig) -> dict[str, str]:
    """Variables to set before starting Ray for ``serve.proxy`` (Serve reads them once, when its
    controller and proxies start, so they cannot come later or from a runtime_env).

    HAProxy's metrics and stats listeners and Serve's fallback proxy (which HAProxy uses while no
    replica is up) default to fixed ports (9101, 8404, 8500, 9500); a Ray that bloodcnn starts on
    this machine takes free ones instead, so two stacks never collide."""
    if cfg.serve.proxy != "haproxy":
        return {}
    ports = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", **{name: str(free_port()) for name in ports}}
