"""Ray Serve application for bloodcnn: import path ``serving.app:app``.

* :mod:`serving.classifier` - ``BloodClassifier``: batched, autoscaled model replicas that
  load the registry's production (or a pinned) version and hot-swap on promotion.
* :mod:`serving.api` - the FastAPI app (routes, input limits, auth, metrics, web page);
  free of Ray so it can be tested on its own.
* :mod:`serving.app` - ``APIIngress`` (FastAPI through ``serve.ingress``), ``build_app(cfg)``,
  ``app`` and ``run(cfg)``.
* :mod:`serving.service` - ``BloodService``: the classifier replica as its own HTTP ingress
  (``serve.ingress: colocated``, one hop per request).
* :mod:`serving.oip` - the Open Inference Protocol (v2) routes of the same app.
"""
