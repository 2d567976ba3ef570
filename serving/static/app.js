// bloodcnn web page: upload -> /v1/predict (class, probabilities, uncertain) and
// /v1/explain (Grad-CAM PNG). Plain JS, same origin, no external resources.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("upload-form");
  const fileInput = $("file");
  const keyInput = $("api-key");
  const statusEl = $("status");
  const errorEl = $("error");
  const KEY_STORE = "bloodcnn-api-key";
  let overlayUrl = null;
  let previewUrl = null;

  if (document.body.dataset.authRequired === "true") {
    $("key-hint").textContent = "(required by this service)";
  }
  try {
    const saved = sessionStorage.getItem(KEY_STORE);
    if (saved) keyInput.value = saved;
  } catch (e) { /* storage disabled */ }

  function headers() {
    const key = keyInput.value.trim();
    try { sessionStorage.setItem(KEY_STORE, key); } catch (e) { /* ignore */ }
    return key ? { "X-API-Key": key } : {};
  }

  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error) return `${resp.status} ${body.error.code}: ${body.error.message}`;
    } catch (e) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  function renderBars(probabilities, top) {
    const bars = $("bars");
    bars.textContent = "";
    for (const [name, p] of Object.entries(probabilities)) {
      const row = document.createElement("div");
      row.className = "bar-row" + (name === top ? " top" : "");
      row.dataset.className = name;
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${(p * 100).toFixed(1)}%`;
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = `${(p * 100).toFixed(1)}%`;
      row.append(label, track, value);
      bars.appendChild(row);
    }
  }

  // The model card sits behind the same API key: fetched with it, shown from a blob URL.
  async function showCardLink() {
    const resp = await fetch("v1/models/current", { headers: headers() });
    $("card-link").hidden = !(resp.ok && (await resp.json()).model_card);
  }

  $("card-link").addEventListener("click", async (event) => {
    event.preventDefault();
    const resp = await fetch("v1/models/current/card", { headers: headers() });
    if (!resp.ok) {
      showError(await errorMessage(resp));
      return;
    }
    const url = URL.createObjectURL(new Blob([await resp.text()], { type: "text/html" }));
    window.open(url, "_blank", "noopener");
  });

  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    $("preview").src = previewUrl;
    $("preview-wrap").hidden = false;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorEl.hidden = true;
    const file = fileInput.files[0];
    if (!file) {
      showError("Choose an image first.");
      return;
    }
    $("submit").disabled = true;
    statusEl.textContent = "Classifying...";
    $("result-card").hidden = true;
    $("explain-card").hidden = true;
    try {
      const body = new FormData();
      body.append("file", file, file.name);
      const resp = await fetch("v1/predict", { method: "POST", body, headers: headers() });
      if (!resp.ok) {
        showError(await errorMessage(resp));
        statusEl.textContent = "";
        return;
      }
      const data = await resp.json();
      const r = data.results[0];
      $("pred-class").textContent = r["class"];
      $("pred-confidence").textContent = `(${(r.confidence * 100).toFixed(1)}%)`;
      const set = r.prediction_set;
      $("set-line").hidden = !set;
      if (set) {
        $("pred-set").textContent = set.length ? `{${set.join(", ")}}` : "{ } (empty)";
        $("set-note").textContent = "(holds the true class with the calibrated probability)";
      }
      $("uncertain-why").textContent = r.uncertainty_rule === "conformal"
        ? "the prediction set does not hold exactly one class."
        : "the top probability is under the threshold.";
      $("uncertain").hidden = !r.uncertain;
      $("result-card").classList.toggle("is-uncertain", r.uncertain);
      $("model-version").textContent = r.model_version;
      showCardLink();
      renderBars(r.probabilities, r["class"]);
      $("result-card").hidden = false;

      statusEl.textContent = "Computing Grad-CAM...";
      const body2 = new FormData();
      body2.append("file", file, file.name);
      const resp2 = await fetch("v1/explain", { method: "POST", body: body2, headers: headers() });
      if (!resp2.ok) {
        showError("Grad-CAM failed: " + (await errorMessage(resp2)));
        statusEl.textContent = "";
        return;
      }
      const blob = await resp2.blob();
      if (overlayUrl) URL.revokeObjectURL(overlayUrl);
      overlayUrl = URL.createObjectURL(blob);
      const img = $("gradcam");
      await new Promise((resolve, reject) => {
        img.onload = resolve;
        img.onerror = () => reject(new Error("overlay image did not load"));
        img.src = overlayUrl;
      });
      $("explain-card").hidden = false;
      statusEl.textContent = "Done.";
    } catch (err) {
      showError(`Request failed: ${err.message}`);
      statusEl.textContent = "";
    } finally {
      $("submit").disabled = false;
    }
  });
})();
