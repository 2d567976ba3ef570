"""Prometheus metrics of the HTTP API (prometheus_client, one registry per ingress replica).

Scrape ``/metrics``. Each ingress replica exposes its own counters; Prometheus sums them.
Batch sizes are observed once per model batch: the classifier marks the first image of
every batch, and exactly one request (so one ingress) carries that image.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: this process only serves the API

KNOWN_ROUTES = (
    "/v1/predict", "/v1/explain", "/v1/models/current", "/healthz", "/readyz", "/metrics",
    "/docs", "/openapi.json", "/",
)


def route_label(path: str) -> str:
    """Bounded label set: known routes, ``/static``, else ``other`` (no path-based cardinality)."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/docs"):
        return "/docs"
    return "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "bloodcnn_http_requests", "HTTP requests by route, method and status code",
            ["route", "method", "status"], registry=r,
        )
        self.latency = Histogram(
            "bloodcnn_http_request_duration_seconds", "HTTP request latency by route", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0), registry=r,
        )
        self.in_flight = Gauge("bloodcnn_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.batch_size = Histogram(
            "bloodcnn_batch_size", "Images per model batch (one observation per batch)",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128), registry=r,
        )
        self.images = Counter("bloodcnn_images", "Images classified", ["route"], registry=r)
        self.predictions = Counter(
            "bloodcnn_predictions", "Predictions by predicted class", ["class_name"], registry=r,
        )
        self.uncertain = Counter(
            "bloodcnn_uncertain_predictions", "Predictions under the uncertain threshold", registry=r,
        )
        self.errors = Counter("bloodcnn_errors", "Error responses by error code", ["code"], registry=r)
        self.model_version = Gauge(
            "bloodcnn_model_version_info", "Model version in the latest answer (value 1)",
            ["model_name", "version"], registry=r,
        )
        self._version: tuple[str, str] | None = None

    def set_model(self, model_name: str | None, version: str | None) -> None:
        if not version:
            return
        key = (model_name or "", version)
        if key != self._version:
            self.model_version.clear()
            self.model_version.labels(*key).set(1)
            self._version = key

    def observe_result(self, result: dict, route: str) -> None:
        self.images.labels(route).inc()
        self.predictions.labels(result["class"]).inc()
        if result.get("uncertain"):
            self.uncertain.inc()
        if result.get("first_in_batch") and result.get("batch_size"):
            self.batch_size.observe(result["batch_size"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
