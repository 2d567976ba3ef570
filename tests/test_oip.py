"""The Open Inference Protocol (v2) routes against a real Ray Serve stack, with the real tritonclient.

One Ray + Serve for the module: a 64 px model with a calibration (so answers carry a conformal
prediction set), API key on. Every v2 answer is compared with /v1's answer for the same image:
both go through the same batched classifier, so the numbers must agree to float32 precision.
"""

from __future__ import annotations

import base64
import json
import os
import struct

import httpx
import numpy as np
import pytest

from bloodcnn.config import load_config
from serving import devtools

pytestmark = pytest.mark.slow

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

API_KEY = "oip-" + os.urandom(12).hex()
KEY_ENV = "BLOODCNN_TEST_OIP_API_KEY"
H = {"X-API-Key": API_KEY}  # for httpx; tritonclient gets key(): it adds its own headers to the dict it is given
MODEL = "bloodcnn"
VERSION = "o1"
MAX_IMAGES = 4
MAX_BODY_MB = 1.0
SIZE = 64


@pytest.fixture(scope="module")
def stack(s3_server, weights_file):
    registry = f"s3://test/oip-{os.urandom(3).hex()}/models"
    # ImageNet backbone: its answers depend on the pixels (a randomly initialised one gives every image
    # the same probabilities, which would hide a wrong pixel convention)
    model = devtools.make_model(SIZE, weights=str(weights_file), bias=[1.0, 0.6, 0.0, 0.0], kernel_scale=0.05, seed=3)
    devtools.register_model(registry, model, version=VERSION, calibration={
        "temperature": 1.3, "alpha": 0.05, "score": "lac", "qhat": 0.8, "calibration_examples": 500})
    cfg = load_config(environ={}, overrides={
        "registry": {"uri": registry, "model_name": MODEL},
        "serve": {"api_key_env": KEY_ENV, "num_cpus_per_replica": 0.5, "max_batch_size": 8,
                  "batch_wait_timeout_s": 0.005, "max_images_per_request": MAX_IMAGES, "max_body_mb": MAX_BODY_MB,
                  "version_poll_s": 0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    with devtools.LocalStack({"oip": ("/", cfg)}, env={KEY_ENV: API_KEY}, num_cpus=4) as local:
        from serving.app import wait_ready

        wait_ready(local.url("oip"), 180)
        yield local


@pytest.fixture(scope="module")
def base(stack) -> str:
    return stack.url("oip").rstrip("/")


@pytest.fixture
def client(stack):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{stack.port}", network_timeout=120)
    yield c
    c.close()


def images() -> list[bytes]:
    """Three different images in three formats and sizes (two need the resize, one is already 64 px)."""
    return [devtools.encode(devtools.smear_like(90, seed=1), "PNG"),
            devtools.encode(devtools.smear_like(130, seed=2), "JPEG", quality=90),
            devtools.encode(devtools.smear_like(SIZE, seed=3), "BMP")]


def v1_results(base: str, imgs: list[bytes]) -> list[dict]:
    r = httpx.post(f"{base}/v1/predict", headers=H, timeout=120,
                   json={"images": [base64.b64encode(i).decode() for i in imgs]})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_same_as_v1(result, v1: list[dict], classes: list[str]) -> None:
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(v1), len(classes))
    expected = np.array([[r["probabilities"][c] for c in classes] for r in v1])
    assert np.ptp(expected, axis=0).max() > 0.01  # the images get different answers: the comparison means something
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    as_text = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("class")]
    assert as_text == [r["class"] for r in v1]
    sets = [json.loads(x.decode() if isinstance(x, bytes) else x) for x in result.as_numpy("prediction_set")]
    assert sets == [r["prediction_set"] for r in v1]
    assert result.as_numpy("uncertain").tolist() == [r["uncertain"] for r in v1]


def key() -> dict:
    return {"X-API-Key": API_KEY}


def metadata(client) -> dict:
    return client.get_model_metadata(MODEL, headers=key())


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# ------------------------------------------------------------------------------ metadata and health


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live(headers=key())
    assert client.is_server_ready(headers=key())
    server = client.get_server_metadata(headers=key())
    assert server["name"] == "bloodcnn" and server["version"] and isinstance(server["extensions"], list)
    assert client.is_model_ready(MODEL, headers=key())
    assert client.is_model_ready(MODEL, VERSION, headers=key())
    assert not client.is_model_ready(MODEL, "not-" + VERSION, headers=key())
    assert not client.is_model_ready("other", headers=key())
    meta = metadata(client)
    assert meta["name"] == MODEL and meta["versions"] == [VERSION] and meta["platform"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("images", "BYTES", [-1]), ("pixels", "FP32", [-1, SIZE, SIZE, 3])]
    assert "base64" in meta["inputs"][0]["parameters"]["content"]
    assert "0..255" in meta["inputs"][1]["parameters"]["content"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 4]), ("class", "BYTES", [-1]), ("prediction_set", "BYTES", [-1]),
        ("uncertain", "BOOL", [-1])]
    assert meta["outputs"][0]["parameters"]["classes"] == devtools.CLASS_NAMES
    assert client.get_model_metadata(MODEL, VERSION, headers=key())["versions"] == [VERSION]
    for name, version in (("other", ""), (MODEL, "not-" + VERSION)):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version, headers=key())
        assert err.value.status() == "404" and isinstance(err.value.message(), str)


def test_openapi_describes_the_v2_routes(base):
    spec = httpx.get(f"{base}/openapi.json", headers=H, timeout=30).json()
    paths = spec["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
            "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"} <= set(paths)
    for route in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        post = paths[route]["post"]
        body = post["requestBody"]["content"]
        assert {"application/json", "application/octet-stream"} <= set(body)
        assert body["application/json"]["schema"]["properties"]["inputs"]["maxItems"] == 1
        assert "Inference-Header-Content-Length" in [p["name"] for p in post["parameters"]]
        assert {"200", "400", "401", "404", "413"} <= set(post["responses"])


# ------------------------------------------------------------------------------ inference


def test_infer_bytes_binary_and_json_equal_v1(base, client):
    imgs = images()
    v1 = v1_results(base, imgs)
    classes = metadata(client)["outputs"][0]["parameters"]["classes"]
    assert any(r["prediction_set"] for r in v1)  # calibrated: sets are there to compare
    # tritonclient's default: binary tensor data both ways (Inference-Header-Content-Length)
    inp = httpclient.InferInput("images", [len(imgs)], "BYTES")
    inp.set_data_from_numpy(np.array(imgs, dtype=np.object_))
    res = client.infer(MODEL, [inp], request_id="req-1", headers=key())
    response = res.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == VERSION and response["id"] == "req-1"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert_same_as_v1(res, v1, classes)
    # the spec's JSON form: BYTES elements are strings, here base64; outputs in JSON as well
    inp = httpclient.InferInput("images", [len(imgs)], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(i) for i in imgs], dtype=np.object_), binary_data=False)
    outs = [httpclient.InferRequestedOutput(n, binary_data=False)
            for n in ("probabilities", "class", "prediction_set", "uncertain")]
    res = client.infer(MODEL, [inp], outputs=outs, headers=key())
    assert all("data" in o for o in res.get_response()["outputs"])
    assert_same_as_v1(res, v1, classes)
    # and without any client library
    r = httpx.post(f"{base}/v2/models/{MODEL}/infer", headers=H, timeout=120, json={
        "id": "plain", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                   "data": [base64.b64encode(imgs[0]).decode()]}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert body["id"] == "plain" and [o["name"] for o in body["outputs"]] == [
        "probabilities", "class", "prediction_set", "uncertain"]
    assert body["outputs"][1]["data"] == [v1[0]["class"]]
    assert json.loads(body["outputs"][2]["data"][0]) == v1[0]["prediction_set"]


def test_infer_fp32_pixels_equal_v1(base, client):
    from bloodcnn.inference import load_for_model

    imgs = images()
    v1 = v1_results(base, imgs)
    classes = metadata(client)["outputs"][0]["parameters"]["classes"]
    # the model input exactly as the service prepares it: decoded RGB, training resize, 0..255
    pixels = np.stack([load_for_model(i, SIZE)[0] for i in imgs]).astype(np.float32)
    assert pixels.max() > 1.0
    inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    res = client.infer(MODEL, [inp], headers=key())
    assert_same_as_v1(res, v1, classes)
    # JSON, nested lists, on the versioned route
    inp = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels, binary_data=False)
    res = client.infer(MODEL, [inp], model_version=VERSION, headers=key(),
                       outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert res.get_response()["model_version"] == VERSION
    np.testing.assert_allclose(res.as_numpy("probabilities"),
                               [[r["probabilities"][c] for c in classes] for r in v1], atol=1e-5, rtol=0)
    r = httpx.post(f"{base}/v2/models/{MODEL}/versions/{VERSION}/infer", headers=H, timeout=120, json={
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, SIZE, SIZE, 3], "data": pixels[:1].tolist()}],
        "outputs": [{"name": "class"}]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [{"name": "class", "datatype": "BYTES", "shape": [1], "data": [v1[0]["class"]]}]


def test_requested_outputs_only_and_wrong_version(client):
    inp = httpclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([images()[0]], dtype=np.object_))
    res = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("uncertain")], headers=key())
    assert [o["name"] for o in res.get_response()["outputs"]] == ["uncertain"]
    assert res.as_numpy("uncertain").dtype == np.bool_ and res.as_numpy("probabilities") is None
    for kwargs, status in (({"model_version": "not-" + VERSION}, "404"),
                           ({"outputs": [httpclient.InferRequestedOutput("logits")]}, "400")):
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [inp], headers=key(), **kwargs)
        assert err.value.status() == status, err.value
        assert isinstance(err.value.message(), str)
    with pytest.raises(InferenceServerException) as err:
        client.infer("other", [inp], headers=key())
    assert err.value.status() == "404" and "unknown model" in err.value.message()


# ------------------------------------------------------------------------------ auth and bad input


def test_api_key_is_required(base, client):
    for call in (lambda: client.get_server_metadata(), lambda: client.get_model_metadata(MODEL),
                 lambda: client.get_model_metadata(MODEL, headers={"X-API-Key": API_KEY + "x"})):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "401" and "API key" in err.value.message()
    assert not client.is_server_live()  # health is behind the key too (like every route but /healthz, /readyz)
    inp = httpclient.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([images()[0]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [inp])
    assert err.value.status() == "401"
    for method, path in (("GET", "/v2"), ("GET", "/v2/health/ready"), ("POST", f"/v2/models/{MODEL}/infer"),
                         ("POST", f"/v2/models/{MODEL}/versions/{VERSION}/infer")):
        r = httpx.request(method, base + path, timeout=30, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in error_of(r)
    r = httpx.get(f"{base}/v2/health/live", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200


def _binary_request(header: dict, tail: bytes, declared: int | None = None) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    n = len(head) if declared is None else declared
    return head + tail, {**H, "Inference-Header-Content-Length": str(n)}


def _images_tensor(data, shape=None, datatype="BYTES", name="images") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}]}


def test_bad_requests_are_4xx_with_a_v2_error(base):
    png = devtools.image_bytes("PNG", 48)
    b64 = base64.b64encode(png).decode()
    gif = devtools.encode(devtools.smear_like(32), "GIF")
    elem = struct.pack("<I", len(png)) + png
    one_pixel_image = {"name": "pixels", "datatype": "FP32", "shape": [1, SIZE, SIZE, 3]}
    cases = {
        "malformed json": (400, b'{"inputs": [', H),
        "not an object": (400, b"[1, 2]", H),
        "empty body": (400, b"", H),
        "no inputs": (400, json.dumps({"inputs": []}).encode(), H),
        "two inputs": (400, json.dumps({"inputs": _images_tensor([b64])["inputs"] * 2}).encode(), H),
        "unknown input name": (400, json.dumps(_images_tensor([b64], name="INPUT0")).encode(), H),
        "wrong datatype": (400, json.dumps(_images_tensor([b64], datatype="FP32")).encode(), H),
        "shape not [N]": (400, json.dumps(_images_tensor([b64], shape=[1, 1])).encode(), H),
        "shape and data disagree": (400, json.dumps(_images_tensor([b64], shape=[2])).encode(), H),
        "bad base64": (400, json.dumps(_images_tensor(["not*base64!"])).encode(), H),
        "not a string": (400, json.dumps(_images_tensor([12])).encode(), H),
        "not an image": (400, json.dumps(_images_tensor([base64.b64encode(b"hello world").decode()])).encode(), H),
        "image format not accepted": (415, json.dumps(_images_tensor([base64.b64encode(gif).decode()])).encode(), H),
        "too many images": (400, json.dumps(_images_tensor([b64] * (MAX_IMAGES + 1))).encode(), H),
        "unknown output": (400, json.dumps({**_images_tensor([b64]), "outputs": [{"name": "logits"}]}).encode(), H),
        "id not a string": (400, json.dumps({**_images_tensor([b64]), "id": 7}).encode(), H),
        "pixels wrong size for the model": (400, json.dumps({"inputs": [{
            "name": "pixels", "datatype": "FP32", "shape": [1, 8, 8, 3], "data": [0.0] * 192}]}).encode(), H),
        "pixels not numbers": (400, json.dumps({"inputs": [{**one_pixel_image, "data": ["x"] * (SIZE * SIZE * 3)}]}).encode(), H),
        "pixels out of 0..255": (400, json.dumps({"inputs": [{**one_pixel_image, "data": [-1.0] * (SIZE * SIZE * 3)}]}).encode(), H),
        "pixels wrong rank": (400, json.dumps({"inputs": [{**one_pixel_image, "shape": [SIZE, SIZE, 3],
                                                            "data": [0.0] * (SIZE * SIZE * 3)}]}).encode(), H),
        "body too large": (413, json.dumps(_images_tensor(["A" * int(MAX_BODY_MB * 2**20)])).encode(), H),
        "compressed": (415, json.dumps(_images_tensor([b64])).encode(), {**H, "Content-Encoding": "gzip"}),
    }
    header = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                          "parameters": {"binary_data_size": len(elem)}}]}
    body, headers = _binary_request(header, elem, declared=10**6)
    cases["header length past the body"] = (400, body, headers)
    body, headers = _binary_request(header, elem[:-5])
    cases["binary_data_size disagrees with the body"] = (400, body, headers)
    bad_elem = struct.pack("<I", 10**6) + png
    body, headers = _binary_request({"inputs": [{**header["inputs"][0], "parameters": {
        "binary_data_size": len(bad_elem)}}]}, bad_elem)
    cases["element length past the data"] = (400, body, headers)
    body, headers = _binary_request(header, elem)
    cases["binary without the header"] = (400, body, {**H})
    seen = {}
    with httpx.Client(timeout=60) as http:
        for what, (status, content, headers) in cases.items():
            r = http.post(f"{base}/v2/models/{MODEL}/infer", content=content, headers=headers)
            seen[what] = (r.status_code, error_of(r))
        r = http.post(f"{base}/v2/models/other/infer", content=json.dumps(_images_tensor([b64])).encode(), headers=H)
        seen["unknown model"] = (r.status_code, error_of(r))
        ok_body, ok_headers = _binary_request(header, elem)
        ok = http.post(f"{base}/v2/models/{MODEL}/infer", content=ok_body, headers=ok_headers)
    expected = {what: status for what, (status, _, _) in cases.items()} | {"unknown model": 404}
    assert {what: s for what, (s, _) in seen.items()} == expected, seen
    assert "base64" in seen["bad base64"][1] and "at most 4" in seen["too many images"][1]
    assert f"[N, {SIZE}, {SIZE}, 3]" in seen["pixels wrong size for the model"][1]
    assert "logits" in seen["unknown output"][1] and "datatype BYTES" in seen["wrong datatype"][1]
    # the same framing, told the truth, is accepted: the refusals above are about the lies
    assert ok.status_code == 200, ok.text


def test_not_ready_without_a_model():
    """Before a model is loaded (empty registry): v2 readiness answers 503 like /readyz, liveness 200.
    The real FastAPI app over a backend that reports what the classifier does with no model."""
    import asyncio

    from serving.api import create_api
    from serving.settings import IngressSettings

    class NoModel:
        async def status(self):
            return {"ready": False, "last_error": "no production model"}

        async def model_info(self):
            return None

        async def predict(self, data):
            return {"error": {"code": "not_ready", "message": "no model loaded yet", "status": 503}}

    app = create_api(NoModel(), IngressSettings(), api_key=None)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = {p: await c.get(p) for p in ("/v2/health/live", "/v2/health/ready", "/readyz",
                                               f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}")}
            out["infer"] = await c.post(f"/v2/models/{MODEL}/infer", json=_images_tensor(
                [base64.b64encode(devtools.image_bytes("PNG", 32)).decode()]))
            return out

    out = asyncio.run(go())
    assert out["/v2/health/live"].status_code == 200
    assert out["/readyz"].status_code == 503
    for key in ("/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}", "infer"):
        assert out[key].status_code == 503, key
        assert "no production model" in error_of(out[key]) or "no model" in error_of(out[key])
