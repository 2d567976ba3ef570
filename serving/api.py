"""The HTTP API as a FastAPI app, independent of Ray.

``create_api(backend, settings, api_key)`` builds the app; in production the backend is the
``BloodClassifier`` deployment handle (see :mod:`serving.app`), in unit tests anything with
the same four coroutines. Everything an untrusted client can send is bounded here, before a
single pixel is decoded: content type, body size (Content-Length *and* bytes actually
read), number of images, image format and pixel count (from the header). Every refusal is a
JSON error ``{"error": {"code": ..., "message": ...}}`` with a 4xx status (``{"error": "..."}`` on
the Open Inference Protocol routes under ``/v2``, which :mod:`serving.oip` adds to the same app).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from bloodcnn import __version__
from bloodcnn.inference import ImageError, inspect_image
from serving.metrics import Metrics, route_label
from serving.settings import IngressSettings

log = logging.getLogger("ray.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                ".ico": "image/x-icon"}
#: routes that answer without the API key (the page loads; its API calls need the key)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/index.html", "/favicon.ico"})
RESEARCH_NOTE = "Research use only; not a diagnosis. Uncertain results must be referred to a specialist."
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'")


class Backend(Protocol):
    async def predict(self, data: bytes) -> dict: ...
    async def predict_pixels(self, x: Any) -> dict: ...  # one float32 (S, S, 3) model input (v2 FP32)
    async def explain(self, data: bytes) -> dict: ...
    async def status(self) -> dict: ...
    async def model_info(self) -> dict | None: ...
    async def model_card(self, fmt: str) -> dict | None: ...


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def is_oip_path(path: str) -> bool:
    """The Open Inference Protocol (v2) routes, whose errors are ``{"error": "message"}`` as its spec says."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   scope: dict | None = None) -> JSONResponse:
    """The error body: ``{"error": {"code", "message"}}``, or the v2 shape on a v2 path (``scope``)."""
    if scope is not None and is_oip_path(_relative_path(scope)):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ---------------------------------------------------------------- response models (for /docs)


class Prediction(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = None
    class_: str = Field(alias="class", description="predicted class")
    confidence: float = Field(description="probability of the predicted class")
    probabilities: dict[str, float] = Field(description="probability per class name")
    prediction_set: list[str] | None = Field(
        None, description="conformal prediction set (classes by falling probability) that holds the true class "
        "with probability >= 1 - alpha; null for a version without calibration")
    uncertain: bool = Field(description="refer to a specialist: the prediction set does not hold exactly one "
                            "class (uncertainty_rule conformal), or the top probability is under "
                            "uncertain_threshold (threshold)")
    uncertainty_rule: str = Field(description="conformal or threshold")
    advice: str | None = None
    model_version: str


class PredictResponse(BaseModel):
    model_name: str | None = None
    model_version: str
    uncertain_threshold: float
    note: str = RESEARCH_NOTE
    results: list[Prediction]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def _image_request_body(max_images: int) -> dict:
    """The upload body as :func:`read_images` takes it: 1..max_images images, as repeated multipart
    ``file`` parts or JSON ``images``; no image is a 400, so the schema requires one (``minItems``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {
                            "type": "array", "items": {"type": "string", "format": "binary"},
                            "minItems": 1, "maxItems": max_images,
                            "description": "one file part named 'file' per image (JPEG, PNG, BMP or TIFF); "
                                           "parts with other names are ignored"}},
                        "required": ["file"],
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"images": {
                            "type": "array", "minItems": 1, "maxItems": max_images,
                            "items": {"type": "string", "format": "byte"},
                            "description": "one base64 string (or data: URL) per image"}},
                        "required": ["images"],
                    }
                },
            },
        }
    }


ERROR_TEXT = {
    400: "empty body, not an image, corrupt or truncated image, no or too many images, bad JSON/base64",
    401: "missing or wrong API key (when auth is on)",
    404: "the served version has no model card",
    413: "body larger than max_body_mb, or image over max_pixels (decompression bomb)",
    415: "content type other than multipart/form-data or application/json, or image format not accepted",
    503: "no model loaded yet, or the model service is unavailable",
    504: "the model did not answer within backend_timeout_s",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error responses of one route: only the statuses it can really answer."""
    return {code: {"model": ErrorResponse, "description": ERROR_TEXT[code]} for code in codes}


#: the upload routes' errors
ERROR_RESPONSES = _errors(400, 401, 413, 415, 503, 504)


# ---------------------------------------------------------------- ASGI middleware


def allowed_methods(app, scope: dict) -> str:
    """A 405's ``Allow`` (RFC 9110 15.5.6): the methods of every route at this path, not only of
    the first one Starlette matched."""
    methods: set[str] = set()
    for route in app.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def _relative_path(scope: dict) -> str:
    path = scope.get("path", "/") or "/"
    root = scope.get("root_path", "") or ""
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


class GuardMiddleware:
    """Pure ASGI: API-key check, request metrics (route, status, latency). Never logs headers."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    def _authorized(self, scope: dict) -> bool:
        supplied = None
        for name, value in scope.get("headers", ()):
            if name == b"x-api-key":
                supplied = value.strip()
                break
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = token.strip()
        if supplied is None:
            return False
        return hmac.compare_digest(supplied, self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _relative_path(scope)
        route = route_label(path)
        method = scope.get("method", "GET")
        status_holder = [500]
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            public = path in PUBLIC_PATHS or path.startswith("/static/")
            if self.api_key is not None and not public and not self._authorized(scope):
                self.metrics.errors.labels("unauthorized").inc()
                resp = error_response(
                    401, "unauthorized", "missing or wrong API key: send X-API-Key or Authorization: Bearer",
                    headers={"WWW-Authenticate": 'Bearer realm="bloodcnn"'}, scope=scope,
                )
                await resp(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, method, str(status_holder[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


# ---------------------------------------------------------------- body parsing


def _replay(body: bytes) -> Callable[[], Awaitable[dict]]:
    """An ASGI ``receive`` that hands over an already-read body (for Starlette's form parser)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes by Content-Length and by bytes read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "bad_content_length", "Content-Length is not a number") from None
        if n > limit:
            raise ApiError(413, "body_too_large", f"request body of {n} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _b64(item: Any, i: int) -> bytes:
    if not isinstance(item, str):
        raise ApiError(400, "invalid_base64", f"images[{i}] must be a base64 string")
    s = item.strip()
    if s.startswith("data:"):
        s = s.partition(",")[2]
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"images[{i}] is not valid base64") from None


async def read_images(request: Request, settings: IngressSettings, max_images: int) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) per uploaded image from multipart ``file`` fields or JSON ``images``."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime not in ("multipart/form-data", "application/json"):
        shown = mime or "none"
        raise ApiError(415, "unsupported_media_type",
                       f"content type {shown} is not accepted: send multipart/form-data (field 'file') "
                       "or application/json ({\"images\": [base64, ...]})")
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty")
    images: list[tuple[str | None, bytes]] = []
    if mime == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deeply nested arrays
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise ApiError(400, "invalid_request", 'JSON body must be {"images": ["<base64>", ...]}')
        if len(doc["images"]) > max_images:
            raise ApiError(400, "too_many_images",
                           f"{len(doc['images'])} images sent; at most {max_images} per request")
        images = [(None, _b64(item, i)) for i, item in enumerate(doc["images"])]
    else:
        from starlette.requests import Request as StarletteRequest

        replay = StarletteRequest(request.scope, _replay(body))
        try:
            form = await replay.form(max_files=max_images, max_fields=max_images + 16)
        except Exception as exc:  # MultiPartException and parser errors
            msg = str(getattr(exc, "message", exc))
            if "Too many files" in msg:
                raise ApiError(400, "too_many_images", f"too many images; at most {max_images} per request") from None
            raise ApiError(400, "invalid_multipart", f"the multipart body cannot be parsed: {msg}"[:300]) from None
        try:
            for value in form.getlist("file"):
                if isinstance(value, str):
                    raise ApiError(400, "invalid_request", "the 'file' field must be a file upload")
                images.append(((value.filename or "")[:255] or None, await value.read()))
        finally:
            await form.close()
    if not images:
        raise ApiError(400, "no_image", "no image in the request: send one or more 'file' fields or JSON images")
    if len(images) > max_images:
        raise ApiError(400, "too_many_images", f"{len(images)} images sent; at most {max_images} per request")
    for i, (name, data) in enumerate(images):
        if not data:
            raise ApiError(400, "empty_image", f"image {i}{f' ({name})' if name else ''} is empty")
        try:
            inspect_image(data, settings.max_pixels)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, f"image {i}{f' ({name})' if name else ''}: {exc.message}") from None
    return images


# ---------------------------------------------------------------- the app


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = {}
    if STATIC_DIR.is_dir():
        for p in STATIC_DIR.iterdir():
            if p.is_file() and p.suffix in STATIC_TYPES:
                files[p.name] = (p.read_bytes(), STATIC_TYPES[p.suffix])
    return files


def create_api(backend: Backend, settings: IngressSettings, api_key: str | None = None,
               model_name: str = "bloodcnn") -> FastAPI:
    """The app; ``model_name`` is the registry's model name, the one the v2 routes answer to."""
    metrics = Metrics()
    static = _load_static()
    app = FastAPI(
        title="bloodcnn",
        version=__version__,
        summary="Acute lymphoblastic leukemia blood-smear classifier (MobileNetV2). " + RESEARCH_NOTE,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.metrics = metrics
    auth_enabled = bool(api_key)

    # -- errors: one JSON shape for everything
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.errors.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers, request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette's own Allow would name the first matching route only
            headers["Allow"] = allowed_methods(app, request.scope)
        return error_response(exc.status_code, code, str(exc.detail), headers or None, request.scope)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        metrics.errors.labels("invalid_request").inc()
        return error_response(422, "invalid_request", str(exc.errors())[:500], scope=request.scope)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", _relative_path(request.scope))
        metrics.errors.labels("internal_error").inc()
        return error_response(500, "internal_error", "internal server error", scope=request.scope)

    async def call(coro: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(coro, settings.backend_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "backend_timeout", "the model did not answer in time") from None
        except ApiError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("ray"):
                log.warning("model backend unavailable: %s", type(exc).__name__)
                raise ApiError(503, "backend_unavailable", "the model service is unavailable; retry") from None
            raise

    def check(result: dict, index: int, name: str | None) -> dict:
        err = result.get("error") if isinstance(result, dict) else None
        if err:
            label = f"image {index}{f' ({name})' if name else ''}: " if err.get("code") != "not_ready" else ""
            raise ApiError(int(err.get("status", 400)), err["code"], label + err["message"])
        return result

    def public_result(r: dict, index: int, name: str | None) -> dict:
        out = {
            "index": index,
            "filename": name,
            "class": r["class"],
            "confidence": r["confidence"],
            "probabilities": r["probabilities"],
            "prediction_set": r.get("prediction_set"),
            "uncertain": r["uncertain"],
            "uncertainty_rule": r.get("uncertainty_rule", "threshold"),
            "advice": "refer to a specialist" if r["uncertain"] else None,
            "model_version": r["model_version"],
        }
        return out

    # -- routes
    @app.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
              openapi_extra=_image_request_body(settings.max_images_per_request),
              summary="Classify one or more blood-smear images")
    async def predict(request: Request):
        images = await read_images(request, settings, settings.max_images_per_request)
        raw = await call(asyncio.gather(*(backend.predict(data) for _, data in images)))
        results = []
        for i, ((name, _), r) in enumerate(zip(images, raw)):
            r = check(r, i, name)
            metrics.observe_result(r, "/v1/predict")
            results.append(public_result(r, i, name))
        version = results[-1]["model_version"]
        metrics.set_model(None, version)
        return JSONResponse({
            "model_version": version,
            "uncertain_threshold": settings.uncertain_threshold,
            "note": RESEARCH_NOTE,
            "results": results,
        })

    @app.post("/v1/explain", responses={200: {"content": {"image/png": {}},
                                              "description": "Grad-CAM heatmap over the model input"},
                                        **ERROR_RESPONSES},
              response_class=Response, openapi_extra=_image_request_body(1),
              summary="Grad-CAM heatmap overlay (PNG) for one image")
    async def explain(request: Request):
        images = await read_images(request, settings, 1)
        name, data = images[0]
        out = check(await call(backend.explain(data)), 0, name)
        r = out["result"]
        metrics.observe_result({**r, "first_in_batch": False}, "/v1/explain")
        metrics.set_model(None, r["model_version"])
        headers = {
            "X-Bloodcnn-Class": r["class"],
            "X-Bloodcnn-Confidence": f"{r['confidence']:.6f}",
            "X-Bloodcnn-Uncertain": "true" if r["uncertain"] else "false",
            "X-Bloodcnn-Prediction-Set": json.dumps(r.get("prediction_set"), separators=(",", ":")),
            "X-Bloodcnn-Model-Version": r["model_version"],
            "X-Bloodcnn-Gradcam-Layer": out.get("layer", ""),
            "X-Bloodcnn-Probabilities": json.dumps(r["probabilities"], separators=(",", ":")),
            "Cache-Control": "no-store",
        }
        return Response(out["png"], media_type="image/png", headers=headers)

    @app.get("/v1/models/current", responses=_errors(401, 503, 504), summary="The model version being served")
    async def current_model():
        info = await call(backend.model_info())
        if not info:
            raise ApiError(503, "not_ready", "no model loaded yet")
        metrics.set_model(info.get("model_name"), info.get("version"))
        return JSONResponse(info)

    @app.get("/v1/models/current/card", responses={200: {"content": {"text/html": {}, "text/markdown": {}}},
                                                   400: {"model": ErrorResponse, "description": "format not html/md"},
                                                   **_errors(401, 404, 503, 504)},
             response_class=Response, summary="The served version's model card (HTML, or ?format=md)")
    async def current_model_card(format: str = "html"):
        if format not in ("html", "md"):
            raise ApiError(400, "bad_format", f"format must be html or md, not {format!r}")
        card = await call(backend.model_card(format))
        if not card:
            raise ApiError(404, "no_model_card", "the served version has no model card (registered before cards)")
        media = "text/html; charset=utf-8" if format == "html" else "text/markdown; charset=utf-8"
        return Response(card["text"], media_type=media,
                        headers={"X-Bloodcnn-Model-Version": card["version"], "Cache-Control": "no-store"})

    @app.get("/healthz", summary="Liveness: the API process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model is loaded and warmed up (503 before)",
             responses={503: {"description": 'not ready: {"status": "not_ready", "error": {"code", "message"}}'}})
    async def readyz():
        try:
            st = await asyncio.wait_for(backend.status(), 3.0)
        except Exception as exc:  # classifier still starting, or gone
            return JSONResponse({"status": "not_ready", "error": {
                "code": "not_ready", "message": f"model service not answering ({type(exc).__name__})"}},
                status_code=503)
        if not st.get("ready"):
            return JSONResponse({"status": "not_ready", "error": {
                "code": "not_ready", "message": st.get("last_error") or "the model is loading"}},
                status_code=503)
        return {"status": "ready", "model_version": st.get("model_version")}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_errors(401))
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    def page(request: Request) -> HTMLResponse:
        html = static.get("index.html", (b"<h1>bloodcnn</h1>", ""))[0].decode()
        base = (request.scope.get("root_path") or "").rstrip("/") + "/"
        html = html.replace("<head>", f'<head>\n  <base href="{base}">', 1)
        html = html.replace("{{AUTH_REQUIRED}}", "true" if auth_enabled else "false")
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        return page(request)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return await static_file("favicon.svg")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:
            raise ApiError(404, "not_found", "no such file")
        data, ctype = static[name]
        return Response(data, media_type=ctype, headers={"Cache-Control": "no-cache",
                                                         "X-Content-Type-Options": "nosniff"})

    from serving.oip import add_oip_routes  # here: serving.oip builds on this module

    add_oip_routes(app, backend=backend, settings=settings, metrics=metrics, call=call, check=check,
                   model_name=model_name)

    # outside the routing and error handlers, so a 401 never reaches a route and every
    # status (including unhandled 500s) is counted
    app.add_middleware(GuardMiddleware, metrics=metrics, api_key=api_key)
    return app
