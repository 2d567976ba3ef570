"""Hostile input (issue 6): generated malformed requests against a real Ray Serve stack.

``hypothesis`` generates the payloads (no hand-rolled generator): random bytes under random
content types; images of every accepted and a few refused formats that are truncated, bit-flipped,
or declare huge dimensions in their header; multipart bodies with odd parts; broken JSON, JSON of
the wrong shape and broken base64; oversized bodies with and without Content-Length; and a few raw
HTTP requests with lying or malformed framing; for the Open Inference Protocol routes
(``/v2/models/.../infer``, versioned or not, right or wrong model and version) also v2 requests with
random tensor names, datatypes, shapes, data and outputs, and binary tensor data with lying
``Inference-Header-Content-Length`` and element lengths. At least 1,000 of them go to
``/v1/predict``, ``/v1/explain`` and the v2 infer routes (with the API key, so they reach the parsers). Expected: no 5xx and no hang, the
proxy, ingress and classifier processes are the same ones afterwards (nothing crashed or was
restarted), and their memory stays bounded. A second fuzz sends random paths, methods and
credentials without the key: always 401 outside health/readiness and the static page.
Finally the Serve logs, the metrics and the error bodies are searched for the S3 secret and the
API key.

Knobs: ``BLOODCNN_FUZZ_EXAMPLES`` (default 1100), ``BLOODCNN_FUZZ_SEED`` (default: derandomized,
the same examples on every run).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st

from bloodcnn.config import load_config
from serving import devtools

pytestmark = pytest.mark.slow

API_KEY = "fuzz-" + os.urandom(16).hex()
KEY_ENV = "BLOODCNN_TEST_FUZZ_API_KEY"
MAX_BODY_MB = 1.0
MAX_BODY = int(MAX_BODY_MB * 1024 * 1024)
MAX_PIXELS = 4_000_000
MAX_IMAGES = 4
EXAMPLES = int(os.environ.get("BLOODCNN_FUZZ_EXAMPLES", "1050"))
FUZZ_SEED = os.environ.get("BLOODCNN_FUZZ_SEED")
#: RSS growth allowed per Serve process over the whole fuzz (after a warm-up)
RSS_GROWTH_LIMIT_MB = 200


def _settings(n: int):
    s = settings(max_examples=n, deadline=None, database=None, derandomize=FUZZ_SEED is None,
                 phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=True,
                 suppress_health_check=list(HealthCheck))
    return s


def _seeded(fn):
    return seed(int(FUZZ_SEED))(fn) if FUZZ_SEED is not None else fn


# ------------------------------------------------------------------------------ the stack


def _serve_processes() -> dict[str, int]:
    """pid of the HTTP proxy, the ingress and the classifier replica of this test's own Ray."""
    return devtools.serve_processes("fuzz")


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class RssSampler:
    """Peak RSS of the Serve processes, sampled every 0.25 s in a thread."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.start = {n: _rss_mb(p) for n, p in pids.items()}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.25):
            for n, p in self.pids.items():
                try:
                    self.peak[n] = max(self.peak[n], _rss_mb(p))
                except Exception:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def stack(s3_server):
    prefix = f"s3://test/fuzz-{os.urandom(3).hex()}"
    registry = f"{prefix}/models"
    devtools.register_model(registry, devtools.make_model(64, weights="none", bias=[3, 0, 0, 0], seed=7), version="f1")
    cfg = load_config(environ={}, overrides={
        "registry": {"uri": registry, "model_name": "bloodcnn"},
        "serve": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_ongoing_requests": 32,
                  "num_cpus_per_replica": 0.5, "version_poll_s": 0, "api_key_env": KEY_ENV,
                  "max_body_mb": MAX_BODY_MB, "max_pixels": MAX_PIXELS, "max_images_per_request": MAX_IMAGES,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    with devtools.LocalStack({"fuzz": ("/", cfg)}, env={KEY_ENV: API_KEY}, num_cpus=4) as local:
        from serving.app import wait_ready

        wait_ready(local.url("fuzz"), 180)
        local.s3_secret = s3_server.secret_key
        yield local


# ------------------------------------------------------------------------------ payloads


@dataclass
class Case:
    kind: str
    route: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    raw: bytes | None = None  # a whole raw HTTP request, sent over a socket


#: "v2" stands for one of V2_ROUTES (drawn in cases()), so the three families get a third each
ROUTES = st.sampled_from(["/v1/predict", "/v1/explain", "v2"])
V2_INFER = "/v2/models/bloodcnn/infer"
V2_ROUTES = st.sampled_from([V2_INFER, V2_INFER, V2_INFER, "/v2/models/bloodcnn/versions/f1/infer",
                             "/v2/models/bloodcnn/versions/f1/infer", "/v2/models/bloodcnn/versions/f2/infer",
                             "/v2/models/other/infer"])
#: printable ASCII without surrounding blanks (httpx refuses to send a header value like " ")
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip)
CONTENT_TYPES = st.one_of(
    st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; boundary=fuzzb",
                     "multipart/form-data; boundary=", "image/png", "image/jpeg", "text/plain",
                     "application/octet-stream", "application/x-www-form-urlencoded", "APPLICATION/JSON",
                     "application/json; charset=utf-16", "multipart/mixed; boundary=fuzzb"]),
    HEADER_TEXT,
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, bit_depth: int = 8, colour: int = 2, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (valid CRCs), with little or no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + (_png_chunk(b"IDAT", idat) if idat else b"") + \
        _png_chunk(b"IEND", b"")


def bmp_header_only(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\x00" * 16


def jpeg_header_only(width: int, height: int) -> bytes:
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


@st.composite
def encoded_images(draw) -> bytes:
    """A small real image in an accepted (or refused) format, with a random mode and size."""
    from PIL import Image

    fmt = draw(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "ICO", "PPM"]))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    modes = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"],
             "TIFF": ["RGB", "RGBA", "L", "1", "CMYK", "I;16", "F"], "BMP": ["RGB", "L", "P", "1"]}
    mode = draw(st.sampled_from(modes.get(fmt, ["RGB"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    img = base.convert(mode) if mode not in ("I;16", "F") else base.convert("L").convert(mode)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        base.save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def hostile_images(draw) -> bytes:
    """Image bytes that are wrong in one way or another (occasionally fine)."""
    how = draw(st.sampled_from(["truncated", "bitflip", "huge_png", "huge_bmp", "huge_jpeg", "big_real",
                                "random", "prefix", "ok", "empty"]))
    if how == "huge_png":
        w, h = draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))
        depth, colour = draw(st.sampled_from([(8, 2), (16, 6), (1, 0), (8, 3), (3, 2)]))
        idat = zlib.compress(b"\x00" * draw(st.integers(0, 64))) if draw(st.booleans()) else b""
        return png_header_only(w, h, depth, colour, idat)
    if how == "huge_bmp":
        return bmp_header_only(draw(st.integers(-2**31, 2**31 - 1)), draw(st.integers(-2**31, 2**31 - 1)))
    if how == "huge_jpeg":
        return jpeg_header_only(draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    if how == "big_real":  # a real, highly compressible image around the pixel limit
        from PIL import Image

        side = draw(st.sampled_from([1500, 1999, 2000, 2001, 2100]))
        buf = io.BytesIO()
        Image.new("L", (side, side), draw(st.integers(0, 255))).save(buf, "PNG")
        return buf.getvalue()
    if how == "random":
        return draw(st.binary(min_size=1, max_size=400))
    if how == "empty":
        return b""
    data = draw(encoded_images())
    if how == "truncated":
        return data[: draw(st.integers(1, max(1, len(data) - 1)))]
    if how == "bitflip":
        blob = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= draw(st.integers(1, 255))
        return bytes(blob)
    if how == "prefix":  # a valid signature in front of garbage
        return draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*"])) + \
            draw(st.binary(max_size=200))
    return data


def _multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    out = io.BytesIO()
    for name, filename, ctype, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out.write(disp.encode() + b"\r\n")
        if ctype:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@st.composite
def b64_items(draw):
    how = draw(st.sampled_from(["image", "data_url", "broken", "text", "non_string", "padding", "whitespace"]))
    if how == "image":
        return base64.b64encode(draw(hostile_images())).decode()
    if how == "data_url":
        return "data:image/png;base64," + base64.b64encode(draw(hostile_images())).decode()
    if how == "broken":
        s = base64.b64encode(draw(hostile_images())).decode()
        i = draw(st.integers(0, max(0, len(s) - 1)))
        return s[:i] + draw(st.sampled_from(["*", "%", "\u00e9", "=", "-", "_", "\x00"])) + s[i:]
    if how == "padding":
        return base64.b64encode(draw(st.binary(max_size=64))).decode().rstrip("=") + draw(st.sampled_from(["", "=", "==", "==="]))
    if how == "whitespace":
        s = base64.b64encode(draw(encoded_images())).decode()
        return "\n".join(s[i:i + 7] for i in range(0, len(s), 7))
    if how == "text":
        return draw(st.text(max_size=200))
    return draw(JSON_VALUES)


@st.composite
def v2_tensor(draw) -> tuple[dict, bytes]:
    """One v2 input tensor, right or wrong in every field; (tensor JSON, binary data for it or b"")."""
    name = draw(st.sampled_from(["images", "images", "pixels", "pixels", "INPUT0", ""]))
    datatype = draw(st.one_of(st.sampled_from(["BYTES", "FP32"] if name != "pixels" else ["FP32", "BYTES"]),
                              st.sampled_from(["FP16", "INT8", "BOOL", "UINT8", "fp32"]), HEADER_TEXT))
    n = draw(st.integers(0, MAX_IMAGES + 2))
    side = draw(st.sampled_from([64, 64, 64, 1, 8, 0]))
    real_shape = [n] if name != "pixels" else [n, side, side, 3]
    shape = draw(st.one_of(st.just(real_shape), st.just(real_shape), st.lists(st.integers(-2, 70), max_size=5),
                           JSON_VALUES))
    tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
    binary = draw(st.booleans())
    if name == "pixels" or datatype == "FP32":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        count = n * side * side * 3 + draw(st.sampled_from([0, 0, 0, 1, -1]))
        how = draw(st.sampled_from(["levels", "floats", "out_of_range", "nan"]))
        values = rng.integers(0, 256, max(count, 0)).astype(np.float32) if how == "levels" else \
            (rng.random(max(count, 0), dtype=np.float32) * 255)
        if how == "out_of_range" and values.size:
            values[rng.integers(0, values.size)] = draw(st.sampled_from([-1.0, 256.0, 1e30]))
        if how == "nan" and values.size:
            values[0] = np.nan
        if binary:
            blob = values.astype("<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            return tensor, blob
        data = values.tolist()
        if draw(st.booleans()) and count == n * side * side * 3 and count:
            data = values.reshape(n, side, side, 3).tolist()  # nested, as the spec allows
        tensor["data"] = draw(st.one_of(st.just(data), st.just(data), JSON_VALUES)) if how != "nan" else data
        return tensor, b""
    if binary:
        elems = [draw(hostile_images()) for _ in range(n)]
        lies = [draw(st.sampled_from([0, 0, 0, 0, 1, -1, 10**6])) for _ in elems]  # element length - true length
        blob = b"".join(struct.pack("<I", (len(e) + lie) % 2**32) + e for e, lie in zip(elems, lies))
        tensor["parameters"] = {"binary_data_size": len(blob) + draw(st.sampled_from([0, 0, 0, 3, -2]))}
        return tensor, blob
    tensor["data"] = draw(st.one_of(st.lists(b64_items(), min_size=n, max_size=n), JSON_VALUES))
    return tensor, b""


@st.composite
def v2_cases(draw, route: str) -> Case:
    """A v2 inference request: JSON, or JSON header + binary tensor data, wrong in some way (or fine)."""
    key = {"X-API-Key": API_KEY}
    kind = draw(st.sampled_from(["v2_json", "v2_json", "v2_binary", "v2_binary", "v2_random", "v2_valid"]))
    if kind == "v2_valid":  # well formed (the images may still be refused formats): the answer path too
        elems = [draw(encoded_images()) for _ in range(draw(st.integers(1, MAX_IMAGES)))]
        binary = draw(st.booleans())
        tensor = {"name": "images", "datatype": "BYTES", "shape": [len(elems)]}
        outputs = draw(st.lists(st.sampled_from(["probabilities", "class", "prediction_set", "uncertain"]),
                                unique=True, max_size=4))
        doc = {"id": draw(st.text(max_size=10)), "inputs": [tensor],
               "outputs": [{"name": n, "parameters": {"binary_data": draw(st.booleans())}} for n in outputs]}
        if binary:
            tail = b"".join(struct.pack("<I", len(e)) + e for e in elems)
            tensor["parameters"] = {"binary_data_size": len(tail)}
            head = json.dumps(doc).encode()
            return Case(kind, route, head + tail, {**key, "Inference-Header-Content-Length": str(len(head))})
        tensor["data"] = [base64.b64encode(e).decode() for e in elems]
        return Case(kind, route, json.dumps(doc).encode(), {**key, "Content-Type": "application/json"})
    if kind == "v2_random":
        doc = draw(st.one_of(JSON_VALUES, st.fixed_dictionaries({"inputs": JSON_VALUES}),
                             st.fixed_dictionaries({"inputs": st.lists(st.fixed_dictionaries(
                                 {"name": st.just("images"), "datatype": st.just("BYTES"), "shape": JSON_VALUES,
                                  "data": JSON_VALUES, "parameters": JSON_VALUES}), max_size=2)})))
        return Case(kind, route, json.dumps(doc).encode(), {**key, "Content-Type": "application/json"})
    tensors = [draw(v2_tensor()) for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2])))]
    doc: dict = {"inputs": [t for t, _ in tensors]}
    if draw(st.booleans()):
        doc["id"] = draw(st.one_of(st.text(max_size=20), JSON_VALUES))
    if draw(st.booleans()):
        names = st.sampled_from(["probabilities", "class", "prediction_set", "uncertain", "logits", ""])
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": names}, optional={
            "parameters": st.one_of(st.fixed_dictionaries({"binary_data": st.one_of(st.booleans(), JSON_VALUES)}),
                                    JSON_VALUES)}), max_size=5))
    if draw(st.booleans()):
        doc["parameters"] = draw(st.one_of(st.fixed_dictionaries({"binary_data_output": st.booleans()}), JSON_VALUES))
    head = json.dumps(doc).encode()
    tail = b"".join(blob for _, blob in tensors)
    headers = {**key, "Content-Type": draw(st.sampled_from(["application/json", "application/octet-stream"]))}
    if kind == "v2_binary" or tail:
        declared = draw(st.one_of(st.just(str(len(head))), st.just(str(len(head))), st.just(str(len(head))),
                                  st.integers(-5, len(head) + len(tail) + 5).map(str), HEADER_TEXT))
        if declared:
            headers["Inference-Header-Content-Length"] = declared
    return Case(kind, route, head + tail, headers)


@st.composite
def cases(draw) -> Case:
    route = draw(ROUTES)
    if route == "v2":
        route = draw(V2_ROUTES)
        if draw(st.integers(0, 2)):  # two thirds v2-shaped requests, a third the /v1 payloads below
            return draw(v2_cases(route))
    kind = draw(st.sampled_from(["random_bytes", "multipart", "multipart_broken", "json_images", "json_random",
                                 "json_broken", "oversized", "raw"]))
    key = {"X-API-Key": API_KEY}
    if kind == "random_bytes":
        ctype = draw(CONTENT_TYPES)
        return Case(kind, route, draw(st.binary(max_size=600)), {**key, "Content-Type": ctype})
    if kind == "multipart":
        boundary = draw(st.sampled_from(["fuzzboundary", "x", "a" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"]))
        parts = []
        for _ in range(draw(st.integers(0, MAX_IMAGES + 2))):
            name = draw(st.sampled_from(["file", "file", "file", "other", "", "fi\"le"]))
            filename = draw(st.one_of(st.none(), st.sampled_from(["a.png", "../../etc/passwd", "x" * 300, "é.jpg", ""])))
            ctype = draw(st.one_of(st.none(), st.sampled_from(["image/png", "text/plain", "application/json"])))
            parts.append((name, filename, ctype, draw(hostile_images())))
        return Case(kind, route, _multipart(parts, boundary),
                    {**key, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    if kind == "multipart_broken":
        boundary = "fuzzb"
        body = _multipart([("file", "a.png", "image/png", draw(hostile_images()))], boundary)
        how = draw(st.sampled_from(["truncate", "wrong_boundary", "no_boundary", "garbage_headers", "no_end"]))
        if how == "truncate":
            body = body[: draw(st.integers(0, len(body)))]
        elif how == "garbage_headers":
            body = body.replace(b"Content-Disposition", draw(st.binary(min_size=1, max_size=40)), 1)
        elif how == "no_end":
            body = body.rsplit(b"--fuzzb--", 1)[0]
        ctype = {"wrong_boundary": "multipart/form-data; boundary=other",
                 "no_boundary": "multipart/form-data"}.get(how, f"multipart/form-data; boundary={boundary}")
        return Case(kind, route, body, {**key, "Content-Type": ctype})
    if kind == "json_images":
        n = draw(st.integers(0, MAX_IMAGES + 2))
        doc = {"images": [draw(b64_items()) for _ in range(n)]}
        if draw(st.booleans()):
            doc[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        return Case(kind, route, json.dumps(doc).encode(), {**key, "Content-Type": "application/json"})
    if kind == "json_random":
        doc = draw(st.one_of(JSON_VALUES, st.fixed_dictionaries({"images": JSON_VALUES})))
        return Case(kind, route, json.dumps(doc).encode(), {**key, "Content-Type": "application/json"})
    if kind == "json_broken":
        text = json.dumps({"images": [base64.b64encode(draw(encoded_images())).decode()]})
        how = draw(st.sampled_from(["truncate", "random_text", "bad_utf8", "nesting", "huge_number"]))
        if how == "truncate":
            body = text[: draw(st.integers(0, len(text) - 1))].encode()
        elif how == "random_text":
            body = draw(st.text(max_size=300)).encode()
        elif how == "bad_utf8":
            body = b'{"images": ["\xff\xfe' + draw(st.binary(max_size=40)) + b'"]}'
        elif how == "nesting":
            depth = draw(st.integers(100, 5000))
            body = b'{"images": ' + b"[" * depth + b"]" * depth + b"}"
        else:
            body = b'{"images": [' + b"9" * draw(st.integers(1000, 100000)) + b"]}"
        return Case(kind, route, body, {**key, "Content-Type": "application/json"})
    if kind == "oversized":
        size = draw(st.integers(MAX_BODY + 1, 3 * MAX_BODY))
        pattern = draw(st.binary(min_size=1, max_size=16))
        body = (pattern * (size // len(pattern) + 1))[:size]
        ctype = draw(st.sampled_from(["application/json", "multipart/form-data; boundary=fuzzb"]))
        return Case(kind, route, body, {**key, "Content-Type": ctype}, chunked=draw(st.booleans()))
    # raw HTTP: framing that an HTTP client library would not send
    how = draw(st.sampled_from(["huge_length", "bad_length", "negative_length", "both_lengths", "bad_chunks"]))
    body = b'{"images": []}'
    lines = [f"POST {route} HTTP/1.1", "Host: 127.0.0.1", f"X-API-Key: {API_KEY}", "Content-Type: application/json",
             "Connection: close"]
    if how == "huge_length":
        lines.append(f"Content-Length: {draw(st.integers(MAX_BODY + 1, 10**15))}")
    elif how == "bad_length":
        lines.append(f"Content-Length: {draw(st.sampled_from(['abc', '1e3', '0x10', ' ', '14, 14', '+14']))}")
    elif how == "negative_length":
        lines.append("Content-Length: -1")
    elif how == "both_lengths":
        lines += ["Content-Length: 14", "Transfer-Encoding: chunked"]
    else:
        lines.append("Transfer-Encoding: chunked")
        body = draw(st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"ffffffffffff\r\nabc\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n"]))
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return Case(kind, route, raw=raw)


# ------------------------------------------------------------------------------ sending


def _first_line(s: socket.socket) -> bytes:
    """Read until the status line is in (or the server closes)."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _send_raw(port: int, raw: bytes) -> int:
    """Send raw bytes; the status of the answer, or 0 when the server closes without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        data = b""
        s.settimeout(2)
        try:
            data = _first_line(s)
        except socket.timeout:  # the server waits for body bytes that never come: end the request
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)
            try:
                data = _first_line(s)
            except OSError:
                pass
        except OSError:
            pass
    if not data.startswith(b"HTTP/"):
        return 0
    return int(data.split(b" ", 2)[1])


def send(client: httpx.Client, base: str, port: int, case: Case) -> tuple[int, httpx.Response | None]:
    if case.raw is not None:
        return _send_raw(port, case.raw), None
    content = case.content
    if case.chunked:
        data = content

        def stream():
            for i in range(0, len(data), 65536):
                yield data[i:i + 65536]

        content = stream()
    r = client.post(base + case.route, content=content, headers=case.headers)
    return r.status_code, r


def _error_shape_ok(r: httpx.Response, v2: bool = False) -> bool:
    """/v1: {"error": {"code", "message"}}; v2 routes: {"error": "message"}, as the protocol says."""
    try:
        body = r.json()
    except ValueError:
        return False
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    if v2:
        return isinstance(body["error"], str) and bool(body["error"])
    return isinstance(body["error"], dict) and {"code", "message"} <= set(body["error"])


def family(route: str) -> str:
    return "/v2 infer" if route.startswith("/v2/") else route


# ------------------------------------------------------------------------------ tests


def test_fuzz_predict_and_explain_never_5xx_process_alive_memory_bounded(stack):
    base = stack.url("fuzz").rstrip("/")
    port = stack.port
    with httpx.Client(timeout=60) as client:
        ok = client.post(f"{base}/v1/predict", headers={"X-API-Key": API_KEY},
                         files=[("file", ("a.png", devtools.image_bytes("PNG", 64), "image/png"))])
        assert ok.status_code == 200, ok.text
        procs = _serve_processes()
        assert set(procs) == {"proxy", "ingress", "classifier"}, procs
        stats = Counter()
        statuses = Counter()
        kind_status = Counter()
        bad: list[str] = []

        def check(case: Case, status: int, r: httpx.Response | None) -> None:
            stats[(case.route, case.kind)] += 1
            statuses[status] += 1
            kind_status[f"{case.kind}:{status}"] += 1
            if status >= 500 or (status == 0 and case.raw is None):
                bad.append(f"{case.kind} {case.route} -> {status}: {(r.text[:200] if r is not None else '')}")
            assert status < 500, bad[-1]
            if r is not None and status != 200:
                # everything the API refuses is one JSON error shape (the HTTP server's own framing
                # errors, from the raw cases, are plain text)
                assert _error_shape_ok(r, case.route.startswith("/v2/")), (case.kind, status, r.text[:200])
            if r is not None and status == 200:
                if case.route.startswith("/v2/"):
                    assert case.route in (V2_INFER, "/v2/models/bloodcnn/versions/f1/infer"), case.route
                    head = r.content[:int(r.headers.get("inference-header-content-length", len(r.content)))]
                    assert json.loads(head)["outputs"], r.content[:200]
                elif case.route == "/v1/predict":
                    assert r.json()["results"]
                else:
                    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"

        @_seeded
        @_settings(EXAMPLES)
        @given(case=cases())
        def fuzz(case: Case):
            status, r = send(client, base, port, case)
            check(case, status, r)

        with RssSampler(procs) as rss:
            t0 = time.monotonic()
            fuzz()
            elapsed = time.monotonic() - t0
        after = _serve_processes()
        end = {n: _rss_mb(p) for n, p in after.items()}
        alive = client.post(f"{base}/v1/predict", headers={"X-API-Key": API_KEY},
                            files=[("file", ("a.png", devtools.image_bytes("PNG", 64), "image/png"))])
    total = sum(stats.values())
    by_route, by_kind = Counter(), Counter()
    for (route, kind), n in stats.items():
        by_route[family(route)] += n
        by_kind[kind] += n
    figures = {
        "requests": total, "seconds": round(elapsed, 1), "by_route": dict(by_route), "by_kind": dict(by_kind),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "by_kind_and_status": dict(sorted(kind_status.items())),
        "rss_mb_start": {k: round(v) for k, v in rss.start.items()},
        "rss_mb_peak": {k: round(v) for k, v in rss.peak.items()},
        "rss_mb_end": {k: round(v) for k, v in end.items()},
    }
    print("fuzz figures:", json.dumps(figures))
    assert bad == []
    assert total >= 1000 and len(by_route) == 3 and min(by_route.values()) >= 250, figures
    assert sum(n for s, n in statuses.items() if s >= 500) == 0
    # still alive: the same processes (nothing crashed and was restarted) and still answering
    assert after == procs, (procs, after)
    assert alive.status_code == 200
    for name in procs:
        assert end[name] - rss.start[name] <= RSS_GROWTH_LIMIT_MB, figures
        assert rss.peak[name] - rss.start[name] <= RSS_GROWTH_LIMIT_MB + 200, figures


PUBLIC = {"/healthz", "/readyz", "/", "/index.html", "/favicon.ico"}


@st.composite
def unauthenticated_requests(draw):
    segment = st.sampled_from(["v1", "predict", "explain", "models", "current", "metrics", "docs", "openapi.json",
                               "healthz", "readyz", "static", "app.js", "..", ".", "", "%2e%2e", "%2F", "index.html",
                               "v2", "health", "live", "ready", "bloodcnn", "versions", "f1", "infer"])
    if draw(st.booleans()):
        path = "/" + "/".join(draw(st.lists(segment, min_size=1, max_size=5)))
    else:
        path = draw(st.sampled_from(["/v1/predict", "/v1/explain", "/v1/models/current", "/metrics", "/docs",
                                     "/openapi.json", "/v1/predict/", "/V1/predict", "/metrics/", "/v2",
                                     "/v2/health/live", "/v2/health/ready", "/v2/models/bloodcnn",
                                     "/v2/models/bloodcnn/ready", "/v2/models/bloodcnn/infer",
                                     "/v2/models/bloodcnn/versions/f1/infer", "/V2/health/live"]))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    headers = {}
    cred = draw(st.sampled_from(["none", "x-api-key", "bearer", "basic", "both_wrong", "near"]))
    value = draw(HEADER_TEXT)
    if cred == "x-api-key":
        headers["X-API-Key"] = value
    elif cred == "bearer":
        headers["Authorization"] = "Bearer " + value
    elif cred == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"user:{API_KEY}".encode()).decode()
    elif cred == "both_wrong":
        headers["Authorization"] = "Bearer " + value
        headers["X-API-Key"] = API_KEY[::-1]
    elif cred == "near":
        headers["X-API-Key"] = API_KEY[:-1] + draw(st.sampled_from("0123456789abcdef"))
    return method, path, headers


def test_fuzz_without_the_key_is_always_refused(stack):
    """Random paths (dot segments, encodings, case), methods and wrong credentials: 401 for every
    path outside health/readiness and the static page, and never a 5xx."""
    base = stack.url("fuzz").rstrip("/")
    seen = Counter()
    with httpx.Client(timeout=30) as client:

        @_seeded
        @_settings(max(150, EXAMPLES // 6))
        @given(req=unauthenticated_requests())
        def fuzz(req):
            method, path, headers = req
            assume(headers.get("X-API-Key") != API_KEY)
            try:
                r = client.request(method, base + path, headers=headers)
            except httpx.LocalProtocolError:  # a header value httpx will not send (e.g. trailing space)
                assume(False)
            effective = r.request.url.path  # the path as the server saw it (httpx drops dot segments)
            public = effective in PUBLIC or effective.startswith("/static/")
            seen["public" if public else "protected"] += 1
            assert r.status_code < 500, (method, path, r.status_code)
            if not public:
                assert r.status_code == 401, (method, path, effective, headers, r.status_code, r.text[:200])

        fuzz()
    assert seen["protected"] >= 100, seen


def test_no_credentials_in_serve_logs_metrics_or_errors(stack):
    """After the fuzz (hundreds of refused requests, logged): neither the S3 secret key nor the API
    key appears in any log file of this Ray session, in /metrics or in an error body."""
    base = stack.url("fuzz").rstrip("/")
    needles = {"s3 secret": stack.s3_secret.encode(), "api key": API_KEY.encode()}
    metrics = httpx.get(f"{base}/metrics", headers={"X-API-Key": API_KEY}, timeout=30)
    assert metrics.status_code == 200 and b"bloodcnn_http_requests_total" in metrics.content
    errors = [
        httpx.post(f"{base}/v1/predict", headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
                   content=b"{", timeout=30),
        httpx.post(f"{base}/v1/predict", headers={"X-API-Key": API_KEY + "x"}, json={"images": []}, timeout=30),
        httpx.get(f"{base}/v1/models/current", headers={"Authorization": f"Basic {API_KEY}"}, timeout=30),
        httpx.post(f"{base}/v2/models/bloodcnn/infer", headers={"X-API-Key": API_KEY}, content=b"{", timeout=30),
        httpx.get(f"{base}/v2/models/bloodcnn", headers={"X-API-Key": API_KEY[:-1]}, timeout=30),
    ]
    info = httpx.get(f"{base}/v1/models/current", headers={"X-API-Key": API_KEY}, timeout=30)
    assert info.status_code == 200
    for what, needle in needles.items():
        assert needle not in metrics.content, what
        assert needle not in info.content, what
        for r in errors:
            assert r.status_code in (400, 401) and needle not in r.content, what
    scanned = 0
    for path in stack.log_dir().rglob("*"):
        if path.is_file() and path.stat().st_size < 200_000_000:
            data = path.read_bytes()
            scanned += 1
            for what, needle in needles.items():
                assert needle not in data, f"{what} found in {path}"
    assert scanned > 10
