"""Ray Serve application for bloodcnn: import path ``serving.app:app``.

* :mod:`serving.classifier` - ``BloodClassifier``: batched, autoscaled model replicas that
  load the registry's production (or a pinned) version and hot-swap on promotion.
* :mod:`serving.api` - the FastAPI app (routes, input limits, auth, metrics, web page);
  free of Ray so it can be tested on its own.
* :mod:`serving.app` - ``APIIngress`` (FastAPI through ``serve.ingress``), ``build_app(cfg)``,
  ``app`` and ``run(cfg)``.
"""
