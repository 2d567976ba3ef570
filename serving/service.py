"""``BloodService``: one hop per request, the batched model replica is also the HTTP ingress.

With ``serve.ingress: separate`` (the default) a request crosses the Serve proxy, the
``APIIngress`` replica and a handle call into a ``BloodClassifier`` replica, and the answer
comes back the same way. Here the FastAPI app (:func:`serving.api.create_api`) runs inside
each ``BloodClassifier`` replica and calls the replica's own methods, so the proxy hands the
request straight to the process that batches and runs the model; the deployment autoscales on
HTTP requests in flight (``serve.ingress: colocated``).
"""

from __future__ import annotations

import logging
import os

from ray import serve

from bloodcnn.inference import set_max_pixels
from serving.api import create_api
from serving.classifier import BloodClassifier
from serving.settings import IngressSettings

log = logging.getLogger("ray.serve")


@serve.deployment(name="BloodService", max_ongoing_requests=128, graceful_shutdown_timeout_s=30)
@serve.ingress()
class BloodService(BloodClassifier.func_or_class):
    """``BloodClassifier`` (batching, hot swap, ``user_config``) with ``APIIngress``'s app on top."""

    def __init__(self, settings: dict, storage: dict | None = None, cache_dir: str | None = None,
                 model_name: str = "bloodcnn"):
        super().__init__(storage=storage, cache_dir=cache_dir)
        self.ingress_settings = IngressSettings.model_validate(settings)
        self.model_name = model_name
        set_max_pixels(self.ingress_settings.max_pixels)
        key = os.environ.get(self.ingress_settings.api_key_env, "").strip()
        self._api_key = key or None  # never logged
        log.info("BloodService: API key auth is %s (variable %s)", "on" if key else "off",
                 self.ingress_settings.api_key_env)

    def __serve_build_asgi_app__(self):
        return create_api(self, self.ingress_settings, self._api_key, model_name=self.model_name)
