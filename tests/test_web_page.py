"""The web page at ``/`` in headless Chromium (Debian ``chromium``, driven by playwright).

Auth is on: the page itself loads without the key, a classification without the key shows
the 401 error, and with the key typed into the page's field it shows the predicted class,
the probability bars, the uncertain flag, the Grad-CAM overlay and the research-use note.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from bloodcnn.config import load_config
from serving import devtools

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("BLOODCNN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
API_KEY = "page-" + os.urandom(8).hex()
KEY_ENV = "BLOODCNN_TEST_PAGE_API_KEY"


@pytest.fixture(scope="module")
def page_url(s3_server, weights_file):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium")
    registry = f"s3://test/webpage-{os.urandom(3).hex()}/models"
    # an honest untrained head: probabilities near 0.25 each, so the page shows "uncertain"
    model = devtools.make_model(64, weights=str(weights_file), bias=[0.4, 0.1, 0, 0], kernel_scale=0.02, seed=7)
    # calibrated like a trained version: its answers carry a conformal prediction set
    devtools.register_model(registry, model, version="page-v1", calibration={
        "temperature": 1.0, "alpha": 0.01, "score": "lac", "qhat": 0.8, "calibration_examples": 500})
    cfg = load_config(environ={}, overrides={
        "registry": {"uri": registry},
        "serve": {"api_key_env": KEY_ENV, "num_cpus_per_replica": 0.5, "max_batch_size": 4,
                  "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    with devtools.LocalStack({"bloodcnn": ("/", cfg)}, env={KEY_ENV: API_KEY}, num_cpus=2) as local:
        from serving.app import wait_ready

        url = local.url("bloodcnn")
        wait_ready(url, 120)
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_page_classifies_an_upload_with_gradcam(page_url, browser, tmp_path):
    image = devtools.image_bytes("PNG", size=224, seed=11)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((page_url, "blob:", "data:")) else None)

    page.goto(page_url + "/")
    note = page.locator("#research-note")
    assert note.is_visible()
    assert "Research use only, not a diagnosis" in note.inner_text()
    assert page.locator("#key-hint").inner_text() == "(required by this service)"

    # without the key: the API answers 401 and the page says so
    page.set_input_files("#file", files=[{"name": "smear.png", "mimeType": "image/png", "buffer": image}])
    assert page.locator("#preview").is_visible()
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "401 unauthorized" in page.locator("#error").inner_text()
    assert page.locator("#result-card").is_hidden()

    # with the key: class, bars, uncertain flag, Grad-CAM
    page.fill("#api-key", API_KEY)
    page.click("#submit")
    page.wait_for_selector("#explain-card:not([hidden])", timeout=60_000)
    assert page.locator("#error").is_hidden()
    expected = httpx.post(f"{page_url}/v1/predict", headers={"X-API-Key": API_KEY},
                          files={"file": ("smear.png", image, "image/png")}, timeout=60).json()["results"][0]
    assert page.locator("#pred-class").inner_text() == expected["class"]
    assert page.locator("#model-version").inner_text() == "page-v1"
    rows = page.locator(".bar-row")
    assert rows.count() == 4
    assert sorted(rows.nth(i).get_attribute("data-class-name") for i in range(4)) == sorted(devtools.CLASS_NAMES)
    top_width = page.locator(".bar-row.top .bar-fill").evaluate("e => e.style.width")
    assert top_width == f"{expected['confidence'] * 100:.1f}%"
    assert expected["uncertain"] is True and expected["uncertainty_rule"] == "conformal"
    assert len(expected["prediction_set"]) > 1  # near 0.25 each: more than one class is plausible
    assert page.locator("#set-line").is_visible()
    assert page.locator("#pred-set").inner_text() == "{" + ", ".join(expected["prediction_set"]) + "}"
    assert page.locator("#uncertain").is_visible()
    assert "Refer to a specialist" in page.locator("#uncertain").inner_text()
    assert "prediction set does not hold exactly one class" in page.locator("#uncertain").inner_text()
    # the model card, behind the same key: the link opens it in a new tab
    page.wait_for_selector("#card-link:not([hidden])", timeout=30_000)
    with page.expect_popup() as popup:
        page.click("#card-link")
    card = popup.value
    card.wait_for_load_state()
    assert "Model card: bloodcnn page-v1" in card.locator("h1").inner_text()
    assert "Research use only" in card.content()
    card.close()
    size = page.locator("#gradcam").evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size == [True, 224, 224]
    assert page.locator("#status").inner_text() == "Done."

    shot = tmp_path / "bloodcnn-web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("BLOODCNN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    assert external == [], f"the page fetched outside resources: {external}"
    assert [e for e in console_errors if "401" not in e] == []
    page.close()
