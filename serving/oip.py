"""The Open Inference Protocol (KServe / Triton "v2" REST) on the bloodcnn API.

Routes ``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready`` and
``.../infer``, on the same FastAPI app as ``/v1``: same API key and guard middleware, same body
limit, same image checks (:func:`bloodcnn.inference.inspect_image`), and the same path into the
batched ``BloodClassifier`` (one ``predict`` per image, or ``predict_pixels`` for FP32 input), so
there is one model load and the v2 numbers are the /v1 numbers.

One input tensor per request:

* ``images``, ``BYTES`` ``[N]``: encoded JPEG/PNG/BMP/TIFF files. In JSON ``data`` each element is
  a base64 string (the spec's JSON BYTES elements are strings, and image files are not UTF-8); as
  binary tensor data (``Inference-Header-Content-Length``, what tritonclient sends by default)
  each element is the raw file, 4-byte little-endian length first.
* ``pixels``, ``FP32`` ``[N, S, S, 3]``: the model input itself: RGB, 0..255 (not scaled; the
  model's own Rescaling layer maps to [-1, 1]), already resized to S px with the training resize
  (:func:`bloodcnn.preprocess.resize`: bilinear, antialiased).

Outputs ``probabilities`` FP32 ``[N, C]`` (class order in the model metadata), ``class`` BYTES
``[N]``, ``prediction_set`` BYTES ``[N]`` (JSON list of class names, ``null`` for a version without
calibration) and ``uncertain`` BOOL ``[N]``, each in JSON or as binary data as the request asks.
Every error is ``{"error": "message"}`` (the spec's shape) with a 4xx status for bad input.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from bloodcnn import __version__
from bloodcnn.inference import ImageError, inspect_image
from serving.api import ApiError, _b64, read_body
from serving.metrics import Metrics
from serving.settings import IngressSettings

SERVER_NAME = "bloodcnn"
#: spec extension names this server implements (``binary_tensor_data``: Inference-Header-Content-Length)
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "tensorflow_keras"
#: metrics label for images classified through v2
METRIC_ROUTE = "/v2/infer"
HEADER_LENGTH = "inference-header-content-length"

INPUTS = {"images": "BYTES", "pixels": "FP32"}
OUTPUTS = {"probabilities": "FP32", "class": "BYTES", "prediction_set": "BYTES", "uncertain": "BOOL"}
IMAGES_DOC = ("encoded JPEG, PNG, BMP or TIFF files, one per element; in JSON data each element is a "
              "base64 string, as binary tensor data each element is the raw file")
PIXELS_DOC = ("the model input: RGB pixel values 0..255 as float32 (not scaled to [-1, 1]: the model "
              "does that), resized to {s}x{s} with bilinear antialiased resizing (the training resize)")


# ---------------------------------------------------------------- response models (for /docs)


class V2Error(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size (the image count N)")
    parameters: dict[str, Any] | None = Field(None, description="what the tensor holds (bloodcnn addition)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata] = Field(description="send exactly one of these per request")
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="row-major values (absent when sent as binary data)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when sent as binary data")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    outputs: list[OutputTensor]


ERROR_TEXT = {
    400: "malformed request: JSON, tensor name, datatype, shape, data, base64, not an image, too many images",
    401: "missing or wrong API key (when auth is on)",
    404: "unknown model name, or a version that is not the one served",
    413: "body larger than max_body_mb, or image over max_pixels",
    415: "image format not accepted, or a compressed (Content-Encoding) request",
    503: "no model loaded yet",
    504: "the model did not answer within backend_timeout_s",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": V2Error, "description": ERROR_TEXT[code]} for code in codes}


def _infer_openapi(max_images: int) -> dict:
    """The request body in /docs: the spec's JSON request, and its binary-data form. As strict as
    :func:`parse_infer_request`: one ``images`` [N] BYTES or ``pixels`` [N, S, S, 3] FP32 tensor,
    1 <= N <= max_images, with ``data`` or (binary form) ``binary_data_size``, never both."""
    n = {"type": "integer", "minimum": 1, "maximum": max_images, "description": "N, the image count"}
    params = {"type": "object", "properties": {"binary_data_size": {
        "type": "integer", "minimum": 0, "description": "bytes of this tensor after the JSON header (binary form)"}}}
    data_or_binary = [{"required": ["data"]},
                      {"required": ["parameters"], "properties": {"parameters": {"required": ["binary_data_size"]}}}]

    def tensor(name: str, shape: dict, data: dict) -> dict:
        return {"type": "object", "required": ["name", "datatype", "shape"], "oneOf": data_or_binary,
                "properties": {"name": {"type": "string", "const": name},
                               "datatype": {"type": "string", "const": INPUTS[name]},
                               "shape": shape, "parameters": params, "data": data}}

    images = tensor("images", {"type": "array", "prefixItems": [n], "minItems": 1, "maxItems": 1},
                    {"type": "array", "minItems": 1, "maxItems": max_images,
                     "items": {"type": "string", "format": "byte"}, "description": "one base64 file per image"})
    side = {"type": "integer", "minimum": 1, "description": "S, the model's image size"}
    pixels = tensor("pixels", {"type": "array", "prefixItems": [n, side, side, {"type": "integer", "const": 3}],
                               "minItems": 4, "maxItems": 4},
                    {"type": "array", "minItems": 1,
                     "description": "N*S*S*3 numbers in 0..255, flat or nested, row-major"})
    output = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "enum": list(OUTPUTS)},
        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}}}}
    request = {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "echoed in the response"},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "items": {"oneOf": [images, pixels]}, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": output, "description": "default: all four outputs"},
        },
    }
    return {
        "parameters": [{
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "binary tensor data extension: the body is this many bytes of JSON request, "
                           "then the tensors' binary_data_size bytes in input order",
        }],
        "requestBody": {
            "required": True,
            "description": "a v2 inference request (JSON), or with Inference-Header-Content-Length the JSON "
                           "header followed by binary tensor data (BYTES: 4-byte little-endian length + raw "
                           "file per element; FP32: little-endian float32, row-major)",
            "content": {"application/json": {"schema": request},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
    }


# ---------------------------------------------------------------- the request


@dataclass
class InferRequest:
    request_id: str | None
    outputs: list[tuple[str, bool]]  # (name, send as binary data)
    images: list[bytes] | None = None
    pixels: np.ndarray | None = None  # float32 [N, H, W, 3]


def _bad(message: str, code: str = "invalid_request", status: int = 400) -> ApiError:
    return ApiError(status, code, message)


def _dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _flag(params: dict, key: str, default: bool, what: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{what}: parameter {key} must be true or false")
    return value


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
        raise _bad(f"input {name}: shape must be a list of non-negative integers", "invalid_shape")
    return value


def _count(n: int, max_images: int) -> None:
    if n == 0:
        raise _bad("no image in the request: the first dimension N of the input is 0", "no_image")
    if n > max_images:
        raise _bad(f"{n} images sent; at most {max_images} per request", "too_many_images")


def _requested_outputs(value: Any, default_binary: bool) -> list[tuple[str, bool]]:
    if value is None or value == []:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(value, list):
        raise _bad("outputs must be a list of {\"name\": ...} objects")
    out: list[tuple[str, bool]] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad("each requested output must be an object with a string name")
        name = item["name"]
        if name not in OUTPUTS:
            raise _bad(f"unknown output {name[:100]!r}; the outputs are {', '.join(OUTPUTS)}", "unknown_output")
        if any(name == seen for seen, _ in out):
            raise _bad(f"output {name} is requested twice")
        params = _dict(item.get("parameters"), f"output {name}: parameters")
        if params.get("classification"):
            raise _bad("the classification extension is not supported: ask for the class output")
        if any(k.startswith("shared_memory") for k in params):
            raise _bad("shared memory is not supported")
        out.append((name, _flag(params, "binary_data", default_binary, f"output {name}")))
    return out


def _unpack_bytes(blob: bytes, n: int, name: str) -> list[bytes]:
    """Binary BYTES tensor data: per element a 4-byte little-endian length, then the bytes."""
    items, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise _bad(f"input {name}: binary data ends inside an element's 4-byte length", "invalid_binary_data")
        (size,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + size > len(blob):
            raise _bad(f"input {name}: element {len(items)} declares {size} bytes but only {len(blob) - pos} "
                       "follow", "invalid_binary_data")
        items.append(blob[pos:pos + size])
        pos += size
    if len(items) != n:
        raise _bad(f"input {name}: binary data holds {len(items)} elements, shape says {n}", "invalid_shape")
    return items


def _image_elements(tensor: dict, shape: list[int], raw: bytes | None, settings: IngressSettings) -> list[bytes]:
    if len(shape) != 1:
        raise _bad(f"input images must have shape [N] (one encoded image per element), not {shape}", "invalid_shape")
    n = shape[0]
    _count(n, settings.max_images_per_request)
    if raw is not None:
        images = _unpack_bytes(raw, n, "images")
    else:
        data = tensor["data"]
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise _bad(f"input images: data must be a list of {n} base64 strings (shape [{n}]), got {got}",
                       "invalid_shape")
        images = []
        for i, item in enumerate(data):
            if not isinstance(item, str):
                raise _bad(f"input images: element {i} must be a base64 string", "invalid_base64")
            try:
                images.append(_b64(item, i))
            except ApiError:
                raise _bad(f"input images: element {i} is not valid base64", "invalid_base64") from None
    for i, data in enumerate(images):
        if not data:
            raise _bad(f"input images: element {i} is empty", "empty_image")
        try:
            inspect_image(data, settings.max_pixels)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, f"input images: element {i}: {exc.message}") from None
    return images


def _pixel_tensor(tensor: dict, shape: list[int], raw: bytes | None, settings: IngressSettings) -> np.ndarray:
    if len(shape) != 4 or shape[3] != 3 or shape[1] < 1 or shape[2] < 1:
        raise _bad(f"input pixels must have shape [N, S, S, 3] (RGB), not {shape}", "invalid_shape")
    _count(shape[0], settings.max_images_per_request)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"input pixels: binary data is {len(raw)} bytes; shape {shape} needs {4 * count}",
                       "invalid_shape")
        arr = np.frombuffer(raw, dtype="<f4").reshape(shape)
    else:
        try:
            arr = np.array(tensor["data"])
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise _bad("input pixels: data must be numbers (a flat or nested list matching the shape)",
                       "invalid_data") from None
        if arr.dtype.kind not in "iuf":
            raise _bad("input pixels: data must be numbers (FP32)", "invalid_datatype")
        if arr.size != count:
            raise _bad(f"input pixels: data holds {arr.size} values; shape {shape} needs {count}", "invalid_shape")
        arr = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise _bad("input pixels: values must be finite RGB levels in 0..255 (not scaled to 0..1 or -1..1)",
                   "invalid_data")
    return arr


def parse_infer_request(body: bytes, header_length: str | None, settings: IngressSettings) -> InferRequest:
    """A v2 request body (JSON, or JSON header + binary tensor data) -> validated input; ApiError otherwise."""
    tail = b""
    head = body
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length is not a number") from None
        if not 0 < n <= len(body):
            raise _bad(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad("the request is not valid JSON", "invalid_json") from None
    if not isinstance(doc, dict):
        raise _bad('the request must be a JSON object {"inputs": [...]}')
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("id must be a string")
    params = _dict(doc.get("parameters"), "parameters")
    outputs = _requested_outputs(doc.get("outputs"), _flag(params, "binary_data_output", False, "request"))
    inputs = doc.get("inputs")
    names = " or ".join(f"{k} ({v})" for k, v in INPUTS.items())
    if not isinstance(inputs, list) or not inputs:
        raise _bad(f"inputs must be a list holding one input tensor: {names}")
    if len(inputs) != 1:
        raise _bad(f"{len(inputs)} input tensors sent; send exactly one: {names}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise _bad("the input tensor must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str) or name not in INPUTS:
        shown = repr(name[:100]) if isinstance(name, str) else "missing"
        raise _bad(f"unknown input {shown}; the inputs are {names}", "unknown_input")
    datatype = tensor.get("datatype")
    if datatype != INPUTS[name]:
        shown = repr(datatype[:20]) if isinstance(datatype, str) else "missing"
        raise _bad(f"input {name} must have datatype {INPUTS[name]}, not {shown}", "invalid_datatype")
    shape = _shape(tensor.get("shape"), name)
    tparams = _dict(tensor.get("parameters"), f"input {name}: parameters")
    if any(k.startswith("shared_memory") for k in tparams):
        raise _bad("shared memory is not supported")
    size = tparams.get("binary_data_size")
    raw: bytes | None = None
    if size is not None:
        if header_length is None:
            raise _bad(f"input {name} has binary_data_size but there is no Inference-Header-Content-Length header",
                       "invalid_binary_data")
        if type(size) is not int or size < 0:
            raise _bad(f"input {name}: binary_data_size must be a non-negative integer", "invalid_binary_data")
        if "data" in tensor:
            raise _bad(f"input {name} has both data and binary_data_size", "invalid_binary_data")
        if size != len(tail):
            raise _bad(f"input {name}: binary_data_size is {size} but {len(tail)} bytes follow the JSON header",
                       "invalid_binary_data")
        raw = tail
    else:
        if "data" not in tensor:
            raise _bad(f"input {name} has no data (nor binary_data_size)", "invalid_data")
        if tail:
            raise _bad(f"{len(tail)} bytes follow the JSON header but no input has binary_data_size",
                       "invalid_binary_data")
    if name == "images":
        return InferRequest(request_id, outputs, images=_image_elements(tensor, shape, raw, settings))
    return InferRequest(request_id, outputs, pixels=_pixel_tensor(tensor, shape, raw, settings))


# ---------------------------------------------------------------- the response


def _binary(datatype: str, values: Any) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
    if datatype == "BOOL":
        return np.asarray(values, dtype=np.bool_).tobytes()
    return np.asarray(values, dtype="<f4").tobytes()


def infer_response(model_name: str, version: str, request_id: str | None, results: list[dict],
                   outputs: list[tuple[str, bool]]) -> Response:
    """The v2 response; JSON, or JSON header + binary data when any output is asked for as binary."""
    classes = list(results[0]["probabilities"])
    n = len(results)
    values = {
        "probabilities": ([n, len(classes)], np.array([[r["probabilities"][c] for c in classes] for r in results],
                                                      dtype=np.float32)),
        "class": ([n], [r["class"] for r in results]),
        "prediction_set": ([n], [json.dumps(r.get("prediction_set"), separators=(",", ":")) for r in results]),
        "uncertain": ([n], [bool(r["uncertain"]) for r in results]),
    }
    tensors, blobs = [], []
    for name, binary in outputs:
        shape, v = values[name]
        t: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": shape}
        if binary:
            blob = _binary(OUTPUTS[name], v)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = v.ravel().tolist() if isinstance(v, np.ndarray) else v
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = tensors
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


# ---------------------------------------------------------------- routes


def add_oip_routes(app: FastAPI, *, backend: Any, settings: IngressSettings, metrics: Metrics,
                   call: Callable[[Awaitable[Any]], Awaitable[Any]], check: Callable[[dict, int, str | None], dict],
                   model_name: str) -> None:
    """Register the v2 routes; ``call``/``check`` are the /v1 helpers (timeouts, Ray errors, per-image errors)."""

    def known(name: str) -> None:
        if name != model_name:
            raise ApiError(404, "unknown_model", f"unknown model {name[:100]!r}; this server serves {model_name!r}")

    async def ready_status() -> tuple[bool, dict, str]:
        """Like /readyz: the classifier's status within 3 s, else not ready."""
        try:
            st = await asyncio.wait_for(backend.status(), 3.0)
        except Exception as exc:  # classifier still starting, or gone
            return False, {}, f"model service not answering ({type(exc).__name__})"
        if not st.get("ready"):
            return False, st, st.get("last_error") or "the model is loading"
        return True, st, ""

    def unserved(version: str, served: str | None) -> ApiError:
        return ApiError(404, "unknown_version",
                        f"model {model_name} version {version[:100]!r} is not served; the served version is {served!r}")

    async def require_ready(version: str | None) -> None:
        """503 while no model is ready; 404 when ``version`` is given and is not the one served."""
        ok, st, why = await ready_status()
        if not ok:
            raise ApiError(503, "not_ready", f"model {model_name} is not ready: {why}")
        if version is not None and version != st.get("model_version"):
            raise unserved(version, st.get("model_version"))

    async def model_ready(name: str, version: str | None) -> Response:
        known(name)
        await require_ready(version)
        return Response(status_code=200)

    async def model_metadata(name: str, version: str | None) -> JSONResponse:
        known(name)
        info = await call(backend.model_info())
        if not info:
            raise ApiError(503, "not_ready", f"model {model_name} is not ready: no model loaded yet")
        if version is not None and version != info["version"]:
            raise unserved(version, info["version"])
        s = int(info["image_size"])
        classes = list(info["class_names"])
        calibrated = info.get("calibration") is not None
        doc = {
            "name": model_name,
            "versions": [info["version"]],
            "platform": PLATFORM,
            "inputs": [
                {"name": "images", "datatype": "BYTES", "shape": [-1], "parameters": {"content": IMAGES_DOC}},
                {"name": "pixels", "datatype": "FP32", "shape": [-1, s, s, 3],
                 "parameters": {"content": PIXELS_DOC.format(s=s)}},
            ],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes)],
                 "parameters": {"content": "probability per class" + (" (temperature-scaled)" if calibrated else ""),
                                "classes": classes}},
                {"name": "class", "datatype": "BYTES", "shape": [-1],
                 "parameters": {"content": "the most probable class name"}},
                {"name": "prediction_set", "datatype": "BYTES", "shape": [-1],
                 "parameters": {"content": "JSON list of the conformal prediction set's class names, by falling "
                                           "probability; null for a version without calibration"}},
                {"name": "uncertain", "datatype": "BOOL", "shape": [-1],
                 "parameters": {"content": "refer to a specialist", "rule": info.get("uncertainty_rule")}},
            ],
            "parameters": {"max_images_per_request": settings.max_images_per_request, "image_size": s,
                           "note": "Research use only; not a diagnosis."},
        }
        return JSONResponse(doc)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        known(name)
        if version is not None:
            await require_ready(version)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(415, "unsupported_content_encoding",
                           f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed")
        body = await read_body(request, settings.max_body_bytes)
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty")
        req = parse_infer_request(body, request.headers.get(HEADER_LENGTH), settings)
        if req.images is not None:
            coros = [backend.predict(data) for data in req.images]
        else:
            coros = [backend.predict_pixels(np.ascontiguousarray(x)) for x in req.pixels]
        raw = await call(asyncio.gather(*coros))
        results = [check(r, i, None) for i, r in enumerate(raw)]
        served = {r["model_version"] for r in results}
        if len(served) != 1:  # a hot swap between two images of this request
            raise ApiError(503, "model_changed", "the model version changed during the request; retry")
        answered = served.pop()
        if version is not None and answered != version:
            raise unserved(version, answered)
        for r in results:
            metrics.observe_result(r, METRIC_ROUTE)
        metrics.set_model(None, answered)
        return infer_response(model_name, answered, req.request_id, results, req.outputs)

    ok_doc = {"model": InferResponse, "content": {"application/octet-stream": {}},
              "description": "JSON, or with Inference-Header-Content-Length a JSON header then binary outputs"}
    infer_doc = dict(responses={200: ok_doc, **_errors(400, 401, 404, 413, 415, 503, 504)},
                     openapi_extra=_infer_openapi(settings.max_images_per_request), tags=["v2"])

    @app.get("/v2", response_model=ServerMetadata, responses=_errors(401), tags=["v2"], summary="v2 server metadata")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", responses=_errors(401), tags=["v2"], response_class=Response,
             summary="v2 liveness (200, empty body)")
    async def server_live():
        return Response(status_code=200)

    @app.get("/v2/health/ready", responses=_errors(401, 503), tags=["v2"], response_class=Response,
             summary="v2 readiness: 200 once a model is loaded and warmed up, else 503")
    async def server_ready():
        ok, _, why = await ready_status()
        if not ok:
            raise ApiError(503, "not_ready", f"not ready: {why}")
        return Response(status_code=200)

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=_errors(401, 404, 503, 504), tags=["v2"],
             summary="v2 model metadata: the served version, inputs and outputs")
    async def get_model(name: str):
        return await model_metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
             responses=_errors(401, 404, 503, 504), tags=["v2"],
             summary="v2 model metadata of one version (404 unless it is the one served)")
    async def get_model_version(name: str, version: str):
        return await model_metadata(name, version)

    @app.get("/v2/models/{name}/ready", responses=_errors(401, 404, 503), tags=["v2"], response_class=Response,
             summary="v2 model readiness (200, empty body; 503 before a model is loaded)")
    async def get_model_ready(name: str):
        return await model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", responses=_errors(401, 404, 503), tags=["v2"],
             response_class=Response, summary="v2 readiness of one version")
    async def get_model_version_ready(name: str, version: str):
        return await model_ready(name, version)

    @app.post("/v2/models/{name}/infer", response_class=Response, summary="v2 inference", **infer_doc)
    async def post_infer(request: Request, name: str):
        return await infer(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", response_class=Response,
              summary="v2 inference on one version (404 unless it is the one served)", **infer_doc)
    async def post_infer_version(request: Request, name: str, version: str):
        return await infer(request, name, version)
