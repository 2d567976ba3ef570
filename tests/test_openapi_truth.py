"""The OpenAPI document tells the truth: what it calls valid the server takes, what it calls
invalid the server refuses with a 4xx, every status the server answers is documented, and
every 405 names the methods the path does take in ``Allow`` (RFC 9110 15.5.6).

Fast: the FastAPI app in-process through raw ASGI with a fake backend (no Ray, no model).
"""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from serving.api import create_api
from serving.settings import IngressSettings

from asgi_support import asgi_request

KEY = "openapi-truth-key"
AUTH = [(b"x-api-key", KEY.encode())]
MODEL = "bloodcnn"
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
#: statuses any operation may answer without listing them (auth, wrong method, FastAPI's validation)
DEFAULT_STATUSES = {401, 405, 422}


class _Backend:
    """Every call succeeds (or answers 'no such card'), so each documented 2xx is reachable."""

    RESULT = {"class": "Benign", "class_index": 0, "confidence": 0.9, "uncertain": False,
              "probabilities": {"Benign": 0.9, "Pro-B": 0.1}, "prediction_set": ["Benign"], "model_version": "v1"}

    async def predict(self, data: bytes) -> dict:
        return dict(self.RESULT)

    async def predict_pixels(self, x) -> dict:
        return dict(self.RESULT)

    async def explain(self, data: bytes) -> dict:
        return {"png": b"\x89PNG", "layer": "out_relu", "result": dict(self.RESULT)}

    async def status(self) -> dict:
        return {"ready": True, "model_version": "v1"}

    async def model_info(self) -> dict:
        return {"model_name": MODEL, "version": "v1", "image_size": 2, "class_names": ["Benign", "Pro-B"]}

    async def model_card(self, fmt: str) -> dict | None:
        return {"text": "# card", "version": "v1"} if fmt == "html" else None


def _asgi(app, method: str, path: str, headers=(), body: bytes = b"", query: bytes = b"",
          root_path: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI app: (status, headers with lower-case names, body)."""
    return asgi_request(app, method, root_path + path, headers, body, query, root_path)


@pytest.fixture(scope="module")
def app():
    return create_api(_Backend(), IngressSettings(), api_key=KEY, model_name=MODEL)


@pytest.fixture(scope="module")
def spec(app) -> dict:
    return app.openapi()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _concrete(path: str) -> str:
    return path.replace("{name}", MODEL).replace("{version}", "v1")


def _documented(spec: dict, path: str, method: str, status: int) -> None:
    """The status the server just answered is in the operation's documented responses (or a default)."""
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses or status in DEFAULT_STATUSES, (path, method, status, sorted(responses))


def _request_schema(spec: dict, path: str, method: str, media: str) -> Draft202012Validator:
    schema = spec["paths"][path][method]["requestBody"]["content"][media]["schema"]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# ------------------------------------------------------------------------------ 405 and Allow


def test_every_405_names_the_allowed_methods(app):
    """Each method a route does not take: 405, ``Allow`` = the path's methods, the API's error body."""
    checked = 0
    for route in app.routes:
        allowed = set(route.methods)
        path = re.sub(r"\{[^}]+\}", "x", _concrete(route.path))
        for method in sorted(set(METHODS) - allowed):
            for root in ("", "/prefix"):
                status, headers, body = _asgi(app, method, path, AUTH, root_path=root)
                assert status == 405, (method, path, status)
                assert "allow" in headers, (method, path)
                assert {m.strip() for m in headers["allow"].split(",")} == allowed, (method, path, headers["allow"])
                error = json.loads(body)["error"]
                if path.startswith("/v2"):
                    assert isinstance(error, str) and error, (path, error)
                else:
                    assert error["code"] == "method_not_allowed", (path, error)
                checked += 1
    assert checked > 100


def test_allow_is_stable_and_unauthenticated_requests_are_still_401(app):
    """A sorted Allow (same header in every process), and the API key is checked before the method."""
    assert _asgi(app, "POST", "/docs", AUTH)[1]["allow"] == "GET, HEAD"
    status, headers, _ = _asgi(app, "GET", "/v1/predict")
    assert status == 401 and "allow" not in headers


# ------------------------------------------------------------------------------ uploads


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "truthb") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: image/png\r\n" if filename else b""
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def _form_instance(parts: list[tuple[str, str | None, bytes]]) -> dict[str, list[str]]:
    """The multipart body as OpenAPI maps it onto the schema: each field name -> its parts' values."""
    form: dict[str, list[str]] = {}
    for name, _, data in parts:
        form.setdefault(name, []).append(data.decode("latin-1"))
    return form


def _max_images(path: str) -> int:
    return 1 if path == "/v1/explain" else IngressSettings().max_images_per_request


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/explain"])
def test_upload_schema_requires_an_image_as_the_server_does(app, spec, path):
    """A multipart or JSON body is schema-valid exactly when the server takes it (2xx); a body
    without any image is invalid and the server answers 4xx, never 5xx."""
    n = _max_images(path)
    form = _request_schema(spec, path, "post", "multipart/form-data")
    forms = {
        "no parts": [],
        "only a text field": [("note", None, b"hello")],
        "'files' is not a field the server reads": [("files", "a.png", PNG)],
        "one image": [("file", "a.png", PNG)],
        "as many images as allowed": [("file", f"{i}.png", PNG) for i in range(n)],
        "one image too many": [("file", f"{i}.png", PNG) for i in range(n + 1)],
        "an image and an ignored text field": [("file", "a.png", PNG), ("note", None, b"x")],
    }
    for what, parts in forms.items():
        status, _, body = _asgi(app, "POST", path, [*AUTH, (b"content-type", b"multipart/form-data; boundary=truthb")],
                                _multipart(parts))
        _documented(spec, path, "post", status)
        assert status < 500, (what, status, body)
        assert form.is_valid(_form_instance(parts)) == (200 <= status < 300), (what, status, body)
    assert not form.is_valid({}) and not form.is_valid({"file": []})

    doc = _request_schema(spec, path, "post", "application/json")
    b64 = base64.b64encode(PNG).decode()
    docs = {"no images key": {}, "empty images": {"images": []}, "one image": {"images": [b64]},
            "as many as allowed": {"images": [b64] * n}, "one too many": {"images": [b64] * (n + 1)},
            "images not a list": {"images": b64}}
    for what, instance in docs.items():
        status, _, body = _asgi(app, "POST", path, [*AUTH, (b"content-type", b"application/json")],
                                json.dumps(instance).encode())
        _documented(spec, path, "post", status)
        assert status < 500, (what, status, body)
        assert doc.is_valid(instance) == (200 <= status < 300), (what, status, body)

    for headers, body in [([(b"content-type", b"text/plain")], b"x"), ([(b"content-type", b"application/json")], b"")]:
        status, _, _ = _asgi(app, "POST", path, [*AUTH, *headers], body)
        _documented(spec, path, "post", status)
        assert 400 <= status < 500


@pytest.mark.parametrize("path", ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"])
def test_v2_infer_schema_is_as_strict_as_the_server(app, spec, path):
    """A v2 request is schema-valid exactly when the server takes it; no input, no image, both
    data and binary_data_size, or a name/datatype mismatch are invalid and answered 4xx."""
    validator = _request_schema(spec, path, "post", "application/json")
    b64 = base64.b64encode(PNG).decode()
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [1, 2, 2, 3], "data": [128.0] * 12}
    images = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64]}
    requests = {
        "empty object": {},
        "no inputs": {"inputs": []},
        "two inputs": {"inputs": [images, images]},
        "zero images": {"inputs": [{**images, "shape": [0], "data": []}]},
        "one image": {"inputs": [images]},
        "one image, with id and outputs": {"id": "r1", "inputs": [images], "outputs": [{"name": "class"}]},
        "images without data": {"inputs": [{k: v for k, v in images.items() if k != "data"}]},
        "data and binary_data_size": {"inputs": [{**images, "parameters": {"binary_data_size": 4}}]},
        "images as FP32": {"inputs": [{**images, "datatype": "FP32"}]},
        "images shape [1, 1]": {"inputs": [{**images, "shape": [1, 1]}]},
        "unknown input": {"inputs": [{**images, "name": "x"}]},
        "pixels": {"inputs": [pixels]},
        "pixels with 4 channels": {"inputs": [{**pixels, "shape": [1, 2, 2, 4], "data": [1.0] * 16}]},
        "zero pixel images": {"inputs": [{**pixels, "shape": [0, 2, 2, 3], "data": []}]},
    }
    for what, instance in requests.items():
        status, _, body = _asgi(app, "POST", _concrete(path), [*AUTH, (b"content-type", b"application/json")],
                                json.dumps(instance).encode())
        _documented(spec, path, "post", status)
        assert status < 500, (what, status, body)
        assert validator.is_valid(instance) == (200 <= status < 300), (what, status, body)
    other = _concrete(path).replace(MODEL, "other")
    status, _, _ = _asgi(app, "POST", other, AUTH, json.dumps(requests["one image"]).encode())
    _documented(spec, path, "post", status)
    assert status == 404


# ------------------------------------------------------------------------------ documented statuses


def test_get_routes_answer_only_documented_statuses(app, spec):
    """Every documented GET route, served and with a bad argument where it takes one; every
    status in the upload and infer tests above is checked the same way (:func:`_documented`)."""
    for path, ops in spec["paths"].items():
        if "get" in ops:
            for query in (b"", b"format=md", b"format=pdf") if path.endswith("/card") else (b"",):
                status, _, body = _asgi(app, "GET", _concrete(path), AUTH, query=query)
                _documented(spec, path, "get", status)
                assert status < 500, (path, query, status, body)
    for path in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready"):
        status, _, _ = _asgi(app, "GET", _concrete(path).replace(MODEL, "other"), AUTH)
        _documented(spec, path, "get", status)
        assert status == 404
