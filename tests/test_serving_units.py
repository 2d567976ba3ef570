"""Serving pieces without Ray: image decoding and validation, the compiled predictor,
Grad-CAM, the batch runner, the FastAPI app's error paths and the deployment options."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bloodcnn.inference import ImageError, decode_image, inspect_image, load_for_model, preprocess

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from serving import devtools  # noqa: E402


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "TIFF"])
def test_decode_accepted_formats_to_rgb_uint8(fmt):
    arr = devtools.smear_like(50, seed=1)
    out = decode_image(devtools.encode(arr, fmt))
    assert out.dtype == np.uint8 and out.shape == (50, 50, 3)
    if fmt != "JPEG":
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_decode_converts_every_mode_to_rgb(mode):
    base = Image.fromarray(devtools.smear_like(40, seed=2))
    img = base.convert("RGBA").convert(mode) if mode != "I;16" else base.convert("L").convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    out = decode_image(_save(img, fmt))
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_image(_save(img, "PNG")) == 255).all()


def test_multi_page_tiff_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((10, 20, 30), (200, 100, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(decode_image(buf.getvalue())[0, 0], [10, 20, 30])


@pytest.mark.parametrize(
    "data, code, status",
    [
        (b"", "empty_image", 400),
        (b"%PDF-1.7 not an image at all", "not_an_image", 400),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "corrupt_image", 400),
    ],
)
def test_decode_errors(data, code, status):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert (e.value.code, e.value.status) == (code, status)


def test_truncated_and_unsupported_and_bombs():
    jpeg = devtools.encode(devtools.smear_like(120), "JPEG")
    inspect_image(jpeg[: len(jpeg) // 2])  # the header is fine ...
    with pytest.raises(ImageError) as e:  # ... the pixels are not
        decode_image(jpeg[: len(jpeg) // 2])
    assert e.value.code == "corrupt_image"
    for fmt in ("GIF", "WEBP"):
        with pytest.raises(ImageError) as e:
            inspect_image(_save(Image.new("RGB", (8, 8)), fmt))
        assert (e.value.code, e.value.status) == ("unsupported_image_format", 415)
    bomb = _save(Image.new("L", (3000, 3000)), "PNG")
    assert len(bomb) < 100_000
    for fn in (inspect_image, decode_image):
        with pytest.raises(ImageError) as e:
            fn(bomb, max_pixels=1_000_000)
        assert (e.value.code, e.value.status) == ("too_many_pixels", 413)
    assert inspect_image(bomb, max_pixels=9_000_000).pixels == 9_000_000


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on mangled TIFF tags
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["JPEG", "PNG", "BMP", "TIFF"]), st.data())
def test_mangled_uploads_never_raise_anything_but_image_error(fmt, data):
    """Whatever a client sends, decoding answers with an array or an ImageError."""
    good = devtools.encode(devtools.smear_like(24, seed=3), fmt)
    ops = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=12))
    cut = data.draw(st.integers(0, len(good)))
    mangled = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for pos, val in ops:
        if pos < len(mangled):
            mangled[pos] = val
    try:
        out = decode_image(bytes(mangled), max_pixels=100_000)
    except ImageError as exc:
        assert 400 <= exc.status < 500
    else:
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(blob):
    try:
        decode_image(blob, max_pixels=100_000)
    except ImageError:
        pass


def test_preprocess_is_the_training_resize():
    from bloodcnn.preprocess import resize

    rgb = devtools.smear_like(130, seed=4)
    x, decoded = load_for_model(devtools.encode(rgb, "PNG"), 64)
    np.testing.assert_array_equal(decoded, rgb)
    np.testing.assert_array_equal(x, resize(rgb, 64).numpy())
    assert x.dtype == np.float32 and x.shape == (64, 64, 3) and 0 <= x.min() and x.max() <= 255
    np.testing.assert_array_equal(preprocess(rgb, 64), x)


def test_jpeg_decodes_the_same_in_training_and_serving():
    """Training reads JPEGs with tf.io.decode_jpeg, serving with PIL: TF's default (fast integer)
    IDCT differs from PIL's by up to ~20 grey levels, which flipped a borderline test image."""
    import tensorflow as tf

    from bloodcnn.preprocess import decode_jpeg

    for seed, size in [(1, 224), (2, 97)]:
        data = devtools.encode(devtools.smear_like(size, seed=seed), "JPEG")
        served, _ = load_for_model(data, 64)
        np.testing.assert_array_equal(decode_jpeg(tf.constant(data), 64).numpy(), served)


@pytest.mark.parametrize("size", [32, 97, 224])
def test_same_size_shortcut_equals_the_training_resize(size):
    """preprocess() skips tf.image.resize when the image already has the model's size; that
    is only allowed because the antialiased resize at scale 1 is exactly the identity."""
    from bloodcnn.preprocess import resize

    rng = np.random.default_rng(size)
    for arr in (rng.integers(0, 256, (size, size, 3), dtype=np.uint8), np.full((size, size, 3), 255, np.uint8),
                devtools.smear_like(size, seed=size)):
        np.testing.assert_array_equal(resize(arr, size).numpy(), arr.astype(np.float32))
        np.testing.assert_array_equal(preprocess(arr, size), arr.astype(np.float32))


def test_preprocess_many_equals_preprocess_on_each():
    """Batch scoring resizes each batch's same-shape images in one call: the pixels must be those
    of the per-image path, whatever the mix of shapes (and a lone image of its shape)."""
    from bloodcnn.inference import preprocess_many

    images = [devtools.smear_like(s, seed=i) for i, s in enumerate([32, 97, 32, 64, 32, 97, 200])]
    images.append(np.full((40, 60, 3), 7, np.uint8))
    x = preprocess_many(images, 64)
    assert x.shape == (len(images), 64, 64, 3) and x.dtype == np.float32
    for i, rgb in enumerate(images):
        np.testing.assert_array_equal(x[i], preprocess(rgb, 64), err_msg=f"image {i} {rgb.shape}")


# ------------------------------------------------------------------------------ model pieces


@pytest.fixture(scope="module")
def small_model():
    return devtools.make_model(64, weights="none", kernel_scale=0.05, seed=0)


def test_predictor_is_traced_once_for_every_batch_size(small_model):
    from bloodcnn.inference import Predictor

    pred = Predictor(small_model)
    xs = np.random.default_rng(0).uniform(0, 255, (8, 64, 64, 3)).astype(np.float32)
    outs = {n: pred.predict(xs[:n]) for n in (1, 3, 8, 5)}
    assert pred.trace_count == 1
    assert outs[8].shape == (8, 4)
    np.testing.assert_allclose(outs[3], outs[8][:3], atol=1e-5)
    np.testing.assert_allclose(outs[8], small_model(xs, training=False).numpy(), atol=1e-5)
    assert pred.predict(xs[0]).shape == (1, 4)


def test_gradcam_on_the_nested_backbone(weights_file):
    from bloodcnn.inference import GradCam

    model = devtools.make_model(96, weights=str(weights_file), kernel_scale=0.05, seed=0)
    gc = GradCam(model)
    assert gc.layer_name == "Conv_1"
    x = load_for_model(devtools.image_bytes("PNG", 96, seed=5), 96)[0]
    heat, probs = gc.heatmap(x)
    assert heat.shape == (3, 3) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    np.testing.assert_allclose(probs, model(x[None], training=False).numpy()[0], atol=1e-5)
    png, probs2 = gc.explain(x)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (224, 224)


# ------------------------------------------------------------------------------ batch runner


class _FakePredictor:
    def __init__(self):
        self.calls: list[int] = []

    def predict(self, x):
        import time

        self.calls.append(len(x))
        time.sleep(0.05)
        return np.repeat(x[:, :1, 0, 0], 4, axis=1)  # "probabilities" that identify each input


class _FakeModel:
    def __init__(self):
        self.predictor = _FakePredictor()


def test_batch_runner_merges_batches_that_queue_while_busy():
    from concurrent.futures import ThreadPoolExecutor

    from serving.classifier import BatchRunner

    async def main():
        runner = BatchRunner(ThreadPoolExecutor(1), max_images=8)
        m1, m2 = _FakeModel(), _FakeModel()

        def batch(start, n):
            return np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3))

        first = asyncio.create_task(runner.run(m1, batch(0, 2)))
        await asyncio.sleep(0.01)  # the first pass is running; these queue up
        rest = [asyncio.create_task(runner.run(m1, batch(10 * i, 3))) for i in (1, 2, 3)]
        other = asyncio.create_task(runner.run(m2, batch(100, 1)))
        results = await asyncio.gather(first, *rest, other)
        return m1, m2, results

    m1, m2, results = asyncio.run(main())
    assert m1.predictor.calls == [2, 6, 3]  # 3 + 3 merged (cap 8), the third batch waits
    assert m2.predictor.calls == [1]  # never mixed with another model version
    (p0, n0, f0), (p1, n1, f1), (p2, n2, f2), (p3, n3, f3), (p4, n4, f4) = results
    assert p1[:, 0].tolist() == [10, 11, 12] and p2[:, 0].tolist() == [20, 21, 22] and p3[:, 0].tolist() == [30, 31, 32]
    assert (n1, f1, n2, f2, n3, f3) == (6, True, 6, False, 3, True)
    assert p4[:, 0].tolist() == [100]


# ------------------------------------------------------------------------------ API without Ray


class _Backend:
    def __init__(self, predict=None):
        self._predict = predict

    async def predict(self, data):
        if self._predict:
            return await self._predict(data)
        return {"class": "Benign", "class_index": 0, "confidence": 0.9, "uncertain": False,
                "probabilities": {"Benign": 0.9, "Pro-B": 0.1}, "model_version": "v9", "batch_size": 1,
                "first_in_batch": True}

    async def explain(self, data):
        return {"error": {"code": "not_ready", "message": "x", "status": 503}}

    async def status(self):
        return {"ready": False, "last_error": "no production model"}

    async def model_info(self):
        return None


def _client(backend, **settings_kw):
    from serving.api import create_api
    from serving.settings import IngressSettings

    app = create_api(backend, IngressSettings(**settings_kw), api_key=settings_kw.pop("api_key", None))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t")


def _run(coro):
    return asyncio.run(coro)


def test_api_backend_failures_map_to_json_errors():
    png = devtools.image_bytes("PNG", 32)

    class RayLikeError(Exception):
        pass

    RayLikeError.__module__ = "ray.exceptions"

    async def ray_down(data):
        raise RayLikeError("actor died")

    async def slow(data):
        await asyncio.sleep(5)

    async def bug(data):
        raise KeyError("oops")

    async def go():
        out = {}
        for name, fn, kw in (("ray", ray_down, {}), ("slow", slow, {"backend_timeout_s": 0.2}), ("bug", bug, {})):
            async with _client(_Backend(fn), **kw) as c:
                r = await c.post("/v1/predict", files={"file": ("a.png", png, "image/png")})
                out[name] = (r.status_code, r.json())
                out[name + "_metrics"] = (await c.get("/metrics")).text
        async with _client(_Backend()) as c:
            out["ready"] = (await c.get("/readyz")).status_code
            out["current"] = (await c.get("/v1/models/current")).status_code
            out["explain"] = (await c.post("/v1/explain", files={"file": ("a.png", png, "image/png")})).status_code
            ok = await c.post("/v1/predict", files={"file": ("a.png", png, "image/png")})
            out["ok"] = ok.json()
            out["metrics"] = (await c.get("/metrics")).text
        return out

    out = _run(go())
    assert out["ray"] == (503, {"error": {"code": "backend_unavailable", "message": "the model service is unavailable; retry"}})
    assert out["slow"][0] == 504 and out["slow"][1]["error"]["code"] == "backend_timeout"
    assert out["bug"] == (500, {"error": {"code": "internal_error", "message": "internal server error"}})
    assert (out["ready"], out["current"], out["explain"]) == (503, 503, 503)
    assert out["ok"]["results"][0]["class"] == "Benign" and "batch_size" not in out["ok"]["results"][0]
    assert 'bloodcnn_model_version_info{model_name="",version="v9"} 1.0' in out["metrics"]
    assert 'bloodcnn_http_requests_total{method="POST",route="/v1/predict",status="500"} 1.0' in out["bug_metrics"]
    assert 'bloodcnn_errors_total{code="backend_timeout"} 1.0' in out["slow_metrics"]
    assert 'bloodcnn_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in out["metrics"]


def test_api_key_comparison_and_exempt_paths():
    async def go():
        async with _client(_Backend(), api_key="s3cret") as c:
            return {
                "none": (await c.get("/v1/models/current")).status_code,
                "x": (await c.get("/v1/models/current", headers={"X-API-Key": "s3cret"})).status_code,
                "bearer": (await c.get("/v1/models/current", headers={"Authorization": "bearer s3cret"})).status_code,
                "prefix": (await c.get("/v1/models/current", headers={"X-API-Key": "s3cre"})).status_code,
                "health": (await c.get("/healthz")).status_code,
                "page": (await c.get("/")).text,
                "css": (await c.get("/static/style.css")).status_code,
                "missing": (await c.get("/static/../api.py")).status_code,
            }

    out = _run(go())
    assert (out["none"], out["prefix"]) == (401, 401)
    assert (out["x"], out["bearer"]) == (503, 503)  # past auth: no model in the fake backend
    assert out["health"] == 200 and out["css"] == 200 and out["missing"] in (401, 404)
    assert 'data-auth-required="true"' in out["page"] and "not a diagnosis" in out["page"]


# ------------------------------------------------------------------------------ deployment options


def test_build_app_uses_the_serve_config():
    from bloodcnn.config import load_config
    from serving.app import build_app

    cfg = load_config(environ={}, overrides={"serve": {
        "max_batch_size": 16, "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 48, "num_cpus_per_replica": 2,
        "model_version": "v7", "uncertain_threshold": 0.7,
        "autoscaling": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 8,
                        "upscale_delay_s": 4, "downscale_delay_s": 30, "look_back_period_s": 12}}})
    app = build_app(cfg)
    ingress = app._bound_deployment
    assert ingress.name == "APIIngress"
    classifier = ingress.init_args[0]._bound_deployment
    assert classifier.name == "BloodClassifier"
    assert classifier.max_ongoing_requests == 48
    assert classifier.ray_actor_options["num_cpus"] == 2
    a = classifier._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests, a.upscale_delay_s, a.downscale_delay_s,
            a.look_back_period_s) == (2, 5, 8, 4, 30, 12)
    uc = classifier.user_config
    assert uc["max_batch_size"] == 16 and uc["batch_wait_timeout_s"] == 0.05
    assert uc["model_version"] == "v7" and uc["uncertain_threshold"] == 0.7
    assert uc["registry_uri"] == cfg.registry.uri and uc["model_name"] == cfg.registry.model_name
    assert ingress.init_args[1]["api_key_env"] == "BLOODCNN_API_KEY"


def test_serve_config_file_is_valid_and_imports_the_app(monkeypatch):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(doc)
    app = schema.applications[0]
    assert app.import_path == "serving.app:app" and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == {"APIIngress", "BloodClassifier"}
    monkeypatch.delenv("BLOODCNN_CONFIG", raising=False)
    import importlib

    module = importlib.import_module("serving.app")
    assert isinstance(module.app, Application)
    assert isinstance(module.app_builder({"overrides": {"serve": {"max_batch_size": 4}}}), Application)


# ------------------------------------------------------------------------------ classifier lifecycle


def test_classifier_reconfigure_pins_swaps_and_keeps_serving_on_errors(tmp_path):
    """``reconfigure`` (a changed Serve user_config) and the poller's ``refresh`` outside Ray."""
    from bloodcnn.registry import Registry
    from serving.classifier import BloodClassifier

    registry_uri = str(tmp_path / "registry")
    model = devtools.make_model(64, weights="none", kernel_scale=0.01, seed=0)
    devtools.register_model(registry_uri, model, version="v1")
    devtools.register_model(registry_uri, model, version="v2", promote=False)
    cls = BloodClassifier.func_or_class
    user_config = {"registry_uri": registry_uri, "model_name": "bloodcnn", "model_version": "production",
                   "max_batch_size": 4, "version_poll_s": 0}

    async def scenario():
        c = cls(cache_dir=str(tmp_path / "cache"))
        seen = {"start": await c.status()}
        await c.reconfigure(user_config)
        seen["production"] = await c.status()
        await c.reconfigure({**user_config, "model_version": "v2"})  # pin
        seen["pinned"] = await c.model_info()
        await c.reconfigure({**user_config, "model_version": "v9"})  # no such version: keep serving v2
        seen["missing"] = await c.status()
        Registry(registry_uri, "bloodcnn").promote("v2")
        await c.reconfigure(user_config)  # back to production, which is v2 now: nothing to load
        seen["unchanged"] = await c.refresh()
        Registry(registry_uri, "bloodcnn").promote("v1")
        seen["polled"] = await c.refresh()  # what the version poller does
        seen["final"] = await c.status()
        return seen

    seen = asyncio.run(scenario())
    assert seen["start"]["ready"] is False
    assert seen["production"]["ready"] and seen["production"]["model_version"] == "v1"
    assert seen["pinned"]["version"] == "v2" and seen["pinned"]["requested_version"] == "v2"
    assert seen["missing"]["model_version"] == "v2" and "v9" in seen["missing"]["last_error"]
    assert seen["unchanged"] is False
    assert seen["polled"] is True and seen["final"]["model_version"] == "v1" and seen["final"]["last_error"] is None
