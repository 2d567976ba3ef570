"""``bloodcnn predict``: batch scoring on Ray Data with real SeaweedFS S3 and a real local Ray.

One small model (32 px, ImageNet backbone, random head) registered twice: ``cal`` with a calibration
(temperature + LAC sets, the conformal rule) and promoted, ``plain`` without (the threshold rule).
The images are made here: good ones in every accepted format and size, nested in sub-folders,
and bad ones (not an image, truncated, empty, more pixels than ``serve.max_pixels``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from bloodcnn import batch_predict as bp
from bloodcnn import calibration, storage
from bloodcnn.config import load_config
from serving import devtools

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_PIXELS = 20_000
CALIBRATION = {"temperature": 1.6, "alpha": 0.1, "score": "lac", "qhat": 0.8, "calibration_examples": 200}
BAD = {"not-an-image.png": "not_an_image", "truncated.jpg": "corrupt_image", "empty.jpeg": "empty_image",
       "huge.png": "too_many_pixels"}
COLUMNS = ["path", "sha256", "class", "confidence", *devtools.CLASS_NAMES, "prediction_set", "uncertain",
           "uncertainty_rule", "model_version", "error", "error_message"]


@pytest.fixture(scope="module")
def registry(s3_server, weights_file) -> str:
    uri = f"s3://test/predict-{os.urandom(3).hex()}/models"
    # ImageNet features, so that each image gets its own answer (a random backbone gives all the same)
    model = devtools.make_model(32, weights=str(weights_file), kernel_scale=1.0, seed=3)
    devtools.register_model(uri, model, version="plain", promote=False)
    devtools.register_model(uri, model, version="cal", calibration=CALIBRATION)  # promoted
    return uri


def _cfg(registry_uri: str):
    return load_config(environ={}, overrides={"registry": {"uri": registry_uri},
                                              "serve": {"max_pixels": MAX_PIXELS, "uncertain_threshold": 0.6}})


def _config_file(registry_uri: str, tmp_path: Path) -> Path:
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump({"registry": {"uri": registry_uri}, "serve": {"max_pixels": MAX_PIXELS}}))
    return path


def _good_images() -> dict[str, bytes]:
    out = {}
    for i, (fmt, ext, size) in enumerate([("PNG", "png", 32), ("JPEG", "jpg", 40), ("BMP", "bmp", 64),
                                          ("TIFF", "tif", 50), ("PNG", "PNG", 90), ("JPEG", "jpeg", 32)]):
        folder = "a" if i % 2 else "b/c"
        out[f"{folder}/cell-{i}.{ext}"] = devtools.encode(devtools.smear_like(size, seed=i), fmt)
    rgba = np.dstack([devtools.smear_like(48, seed=9), np.full((48, 48), 128, np.uint8)])
    out["a/transparent.png"] = devtools.encode(rgba, "PNG")
    return out


def _bad_images() -> dict[str, bytes]:
    jpeg = devtools.image_bytes("JPEG", size=64, seed=5)
    return {"not-an-image.png": b"just some text, no pixels\n", "truncated.jpg": jpeg[: len(jpeg) // 2],
            "empty.jpeg": b"", "huge.png": devtools.image_bytes("PNG", size=200, seed=6)}  # 40,000 px > MAX_PIXELS


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, data in {**_good_images(), **_bad_images(), "notes.txt": b"ignored: not an image name"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """One private local Ray for the in-process runs; its workers inherit the S3 variables."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(registry, tmp_path_factory):
    """The same model in this process, loaded as serving loads it: bytes -> answer(). ``cal`` and
    ``plain`` share the model file and differ in their calibration only."""
    from bloodcnn.inference import load_for_model
    from bloodcnn.registry import Registry
    from bloodcnn.loaded_model import load_version

    reg = Registry(registry, "bloodcnn")
    cur = load_version(reg, "cal", tmp_path_factory.mktemp("model-cache"), 4, (registry, "bloodcnn"))
    calibrations = {"cal": cur.meta.calibration, "plain": reg.get("plain").calibration}

    def predict(version: str, data: bytes) -> dict:
        x, _ = load_for_model(data, cur.image_size, MAX_PIXELS)
        probs = cur.predictor.predict(x[None])[0]
        return calibration.answer(probs, cur.class_names, calibrations[version], "conformal", 0.6)

    return predict


def _read(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _check_rows(table, files: dict[str, bytes], root: str, version: str, reference) -> None:
    """Every file has one row; good ones match the in-process answer, bad ones carry their reason."""
    assert table.column_names == COLUMNS
    rows = {r["path"]: r for r in table.to_pylist()}
    assert set(rows) == {storage.join(root, name) for name in files}
    assert [r["path"] for r in table.to_pylist()] == sorted(rows)  # in listing order
    for name, data in files.items():
        row = rows[storage.join(root, name)]
        assert row["model_version"] == version
        if Path(name).name in BAD:
            assert row["error"] == BAD[Path(name).name] and row["error_message"], row
            assert row["class"] is None and row["prediction_set"] is None and row["uncertain"] is None
            assert all(row[c] is None for c in devtools.CLASS_NAMES)
            continue
        assert row["error"] is None and row["sha256"] == hashlib.sha256(data).hexdigest()
        want = reference(version, data)
        got = np.array([row[c] for c in devtools.CLASS_NAMES])
        np.testing.assert_allclose(got, [want["probabilities"][c] for c in devtools.CLASS_NAMES], atol=1e-5)
        assert row["class"] == want["class"] and row["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        assert row["prediction_set"] == want["prediction_set"]
        assert row["uncertain"] == want["uncertain"] and row["uncertainty_rule"] == want["uncertainty_rule"]


def test_every_image_a_row_answered_as_serving_then_a_rerun_from_s3_replaces_it(ray_local, registry, images,
                                                                                reference, s3_prefix):
    # a local folder (nested, every format, bad images, a .txt) -> S3, the calibrated production version
    files = {**_good_images(), **_bad_images()}
    out = f"{s3_prefix}/scores/predictions.parquet"
    p = bp.plan(_cfg(registry), str(images), out)
    assert p.meta.version == "cal" and p.ignored == 1  # production; notes.txt is not an image name
    summary = bp.score(p, batch_size=4, actors=2, progress=False)
    table = _read(out)
    _check_rows(table, files, str(images.resolve()), "cal", reference)
    answered = [r for r in table.to_pylist() if not r["error"]]
    assert {r["uncertainty_rule"] for r in answered} == {"conformal"}
    assert {len(r["prediction_set"]) for r in answered} != {len(devtools.CLASS_NAMES)}  # the sets say something
    assert summary.rows == len(files) and summary.errors == Counter(BAD.values())
    assert sum(summary.classes.values()) == len(answered)
    assert json.loads(table.schema.metadata[b"bloodcnn.class_names"]) == devtools.CLASS_NAMES
    plot = f"{s3_prefix}/scores/predictions.classes.png"
    assert storage.read_bytes(plot)[:8] == b"\x89PNG\r\n\x1a\n"

    # an S3 prefix with fewer images -> the same output, another version: replaced whole
    few = {**dict(list(_good_images().items())[:3]), "bad/truncated.jpg": _bad_images()["truncated.jpg"]}
    for name, data in few.items():
        storage.write_bytes(f"{s3_prefix}/in/{name}", data)
    again = bp.score(bp.plan(_cfg(registry), f"{s3_prefix}/in/", out, "plain"), batch_size=8, actors=1,
                     progress=False)
    table = _read(out)
    _check_rows(table, few, f"{s3_prefix}/in", "plain", reference)
    rows = [r for r in table.to_pylist() if not r["error"]]
    assert all(r["prediction_set"] is None and r["uncertainty_rule"] == "threshold" for r in rows)
    assert all(r["uncertain"] == (r["confidence"] < 0.6) for r in rows)
    assert again.rows == 4 and again.errors == {"corrupt_image": 1}
    assert sorted(storage.store_for(out).list(f"{s3_prefix}/scores")) == [plot, out]  # no temporary objects


def test_a_corrupt_model_file_fails_cleanly_and_writes_nothing(ray_local, registry, tmp_path):
    """The actors load with serving's sha256 check: a swapped model file is refused, the run fails
    with one line naming it, and no Parquet file appears."""
    from bloodcnn.registry import Registry

    model = devtools.make_model(32, weights="none", seed=4)
    devtools.register_model(registry, model, version="swapped", promote=False)
    storage.write_bytes(Registry(registry, "bloodcnn")._uri("swapped", "model.keras"), b"not the model")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.png").write_bytes(devtools.image_bytes("PNG", 32))
    out = tmp_path / "out" / "predictions.parquet"
    with pytest.raises(bp.PredictError) as err:
        bp.score(bp.plan(_cfg(registry), str(tmp_path / "in"), str(out), "swapped"), actors=1, progress=False)
    assert str(err.value).startswith("batch scoring failed: RegistryError: model file of bloodcnn/swapped is corrupt")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------ the command line


def _env(s3_server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLOODCNN", "AWS_", "RAY_ADDRESS"))}
    env.update(s3_server.env(), **extra)
    return env


def test_cli_end_to_end(s3_server, registry, images, tmp_path):
    """``bloodcnn predict`` on its own local Ray: stage lines, a bar, the summary; the libraries'
    output in the log file; a stale file at the output replaced, no temporary file left."""
    out = tmp_path / "scores" / "predictions.parquet"
    out.parent.mkdir()
    out.write_bytes(b"an older run's file")
    log = tmp_path / "logs" / "predict.log"
    cmd = [str(BIN / "bloodcnn"), "predict", "--config", str(_config_file(registry, tmp_path)), "--input",
           str(images), "--output", str(out), "--batch-size", "4", "--actors", "1", "--log-file", str(log)]
    run = subprocess.run(cmd, env=_env(s3_server), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + log.read_text()[-3000:]
    lines = run.stdout.splitlines()
    for stage in ("==> input: 11 image(s)", "==> model: bloodcnn/cal (production), 32 px",
                  "    calibrated: T 1.60, lac sets at alpha 0.1, conformal rule", "==> ray: a local Ray",
                  "==> predicting: 1 actor(s)", "==> writing"):
        assert any(line.startswith(stage) for line in lines), run.stdout
    assert any(line.startswith("predicting: 100%") and "11/11" in line and ("img/s" in line or "s/img" in line)
               for line in lines), run.stdout  # tqdm's rate and ETA
    assert "images/s" in run.stdout and "errors: " in run.stdout and f"plot: {out.parent}" in run.stdout
    assert all(len(line) <= 100 for line in lines), run.stdout
    assert not run.stderr.strip(), run.stderr  # TensorFlow's and Ray's noise is in the log
    assert "Traceback" not in run.stdout and log.stat().st_size > 0
    assert _read(str(out)).num_rows == 11
    assert sorted(f.name for f in out.parent.iterdir()) == ["predictions.classes.png", "predictions.parquet"]


def _bad_input(case: str, images: Path, s3_prefix: str, tmp_path: Path) -> tuple[list[str], dict, str, str]:
    """(arguments, environment changes, expected words, output) of one bad-input case."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    local_out = str(tmp_path / "out" / "predictions.parquet")
    wrong = {"AWS_SECRET_ACCESS_KEY": "wrong-secret-1234"}
    if case == "wrong-credentials":
        storage.write_bytes(f"{s3_prefix}/in/one.png", devtools.image_bytes("PNG", 32))
    return {
        "empty-folder": (["--input", str(tmp_path / "empty")], {}, "no image files", local_out),
        "missing-path": (["--input", str(tmp_path / "nowhere")], {}, "input folder not found", local_out),
        "empty-prefix": (["--input", f"{s3_prefix}/nothing"], {}, "no image files", local_out),
        "wrong-credentials": (["--input", f"{s3_prefix}/in"], wrong, "rejected the credentials", local_out),
        "unknown-version": (["--input", str(images), "--model", "v-nope"], {}, "model version 'v-nope' not found",
                            local_out),
        "wrong-credentials-output": (["--input", str(images)], wrong, "rejected the credentials",
                                     f"{s3_prefix}/out/predictions.parquet"),
    }[case]


def _nothing_written(s3_prefix: str, tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not list(storage.store_for(s3_prefix).list(f"{s3_prefix}/out"))


@pytest.mark.parametrize("case", ["empty-folder", "missing-path", "empty-prefix", "wrong-credentials",
                                  "unknown-version", "wrong-credentials-output"])
def test_bad_input_is_one_line_and_writes_nothing(case, s3_server, registry, images, s3_prefix, tmp_path,
                                                  monkeypatch, capfd):
    """In process (fast): the CLI's exit status and its one stderr line; nothing at the output."""
    from bloodcnn import cli

    args, env, expect, out = _bad_input(case, images, s3_prefix, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    storage._s3_store.cache_clear()  # S3 clients are cached with their credentials
    try:
        code = cli.main(["predict", "--config", str(_config_file(registry, tmp_path)), *args, "--output", out,
                         "--log-file", str(tmp_path / "predict.log")])
    finally:
        monkeypatch.undo()
        storage._s3_store.cache_clear()
    captured = capfd.readouterr()
    assert code == 2, captured.out + captured.err
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and expect in errors[0], captured.err
    assert "wrong-secret-1234" not in captured.out + captured.err
    _nothing_written(s3_prefix, tmp_path)


def test_the_ray_job_entrypoint_reports_bad_input(s3_server, registry, images, s3_prefix, tmp_path):
    """``python jobs/predict.py`` (what ``ray job submit`` runs) is the CLI: same checks, exit 2."""
    args, env, expect, out = _bad_input("unknown-version", images, s3_prefix, tmp_path)
    cmd = [sys.executable, str(REPO / "jobs" / "predict.py"), "--config", str(_config_file(registry, tmp_path)),
           *args, "--output", out, "--log-file", str(tmp_path / "predict.log")]
    run = subprocess.run(cmd, env=_env(s3_server), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [f"error: model version 'v-nope' not found (or incomplete) in "
                                               f"{registry}/bloodcnn"], run.stderr
    assert run.stdout.startswith("bloodcnn predict: the logs of TensorFlow, Ray and S3 go to ")
    _nothing_written(s3_prefix, tmp_path)
