"""Signals and leftovers outside the main job: the watchdog on its own, ``bloodcnn train`` and
``serve run serving/serve_config.yaml`` interrupted for real, ``python -m bloodcnn``, and the
weights fallback when the local file is missing and the ImageNet download fails."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import yaml

from conftest import REPO
from proc_support import Command, base_env, server_like
from serving.devtools import free_port


def test_a_signal_that_library_code_re_raises_is_still_an_interruption():
    """CI, 2026-12-05: a Ctrl-C while Ray Data defined its classes reached the main job as
    "RuntimeError: Error calling __set_name__ ...", which it reported as a failure (exit 1)
    instead of stopping after SIGINT (exit 130)."""
    import os

    from bloodcnn import lifecycle

    class Field:
        def __set_name__(self, owner, name):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, long before

    guard = lifecycle.Guard("test").install()
    try:
        with pytest.raises(RuntimeError, match="__set_name__") as info:
            type("Blocks", (), {"ray_remote_args": Field()})
    finally:
        guard.restore()
    interrupted = lifecycle.interruption(info.value)
    assert interrupted is not None and interrupted.exit_code == 130
    assert lifecycle.interruption(ValueError("not a signal")) is None


def test_watchdog_stops_what_a_killed_job_left_even_orphans_that_ignore_sigterm(tmp_path):
    """A guarded job starts a server that ignores SIGTERM and one that left the job's process
    tree (double fork, its own session); SIGKILL the job: the watchdog stops both."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys, time
        from bloodcnn import lifecycle
        guard = lifecycle.Guard("test").start()
        guard.install()
        stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", stubborn])
        orphan = "import os, time; os.fork() and os._exit(0); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", orphan], start_new_session=True).wait()
        print("READY", flush=True)
        time.sleep(600)
    """))
    job = Command([sys.executable, str(script)], env=base_env(), cwd=REPO)
    try:
        job.wait_for("READY", 60)
        time.sleep(0.5)
        started = job.processes()
        kinds = {p.ppid == job.proc.pid for p in started if p.name.startswith("python")}
        assert len(started) >= 3 and kinds == {True, False}, started  # watchdog + stubborn, and the orphan
        job.send(signal.SIGKILL)
        left, gone = job.leftovers_after(10)
        assert not left, left
        assert gone < 10
    finally:
        job.kill_all()


def test_python_dash_m_bloodcnn_is_the_bloodcnn_command():
    bin_dir = REPO / ".venv" / "bin"
    script = bin_dir / "bloodcnn" if (bin_dir / "bloodcnn").exists() else None
    module = subprocess.run([sys.executable, "-m", "bloodcnn", "--help"], capture_output=True, text=True, timeout=60)
    assert module.returncode == 0, module.stderr
    assert "usage: bloodcnn" in module.stdout and "models" in module.stdout
    if script is not None:
        direct = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert direct.stdout == module.stdout
    bad = subprocess.run([sys.executable, "-m", "bloodcnn", "models", "promote"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "version" in bad.stderr


def test_missing_weights_file_falls_back_to_imagenet_and_names_both_when_offline(tmp_path, monkeypatch):
    """No local file -> Keras's ImageNet download; with that failing too (a proxy on a closed
    port stands for a machine without internet), the error names the file and the URL."""
    from bloodcnn.model import WeightsError, build_model, imagenet_url

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached download in ~/.keras
    missing = tmp_path / "nowhere" / "mobilenet_v2.h5"
    with pytest.raises(WeightsError) as err:
        build_model(4, image_size=64, weights=str(missing))
    message = str(err.value)
    assert f"weights file not found: {missing}" in message
    assert imagenet_url(64) in message and "failed" in message


# ------------------------------------------------------------------------------ bloodcnn train


@pytest.mark.slow
def test_bloodcnn_train_on_its_local_ray_stops_on_ctrl_c(s3_server, synthetic_dataset, s3_prefix, weights_file,
                                                         tmp_path):
    """``bloodcnn train`` without $RAY_ADDRESS starts a local Ray; Ctrl-C in the middle of an
    epoch (Ray Train would otherwise take SIGINT over) stops it: exit 130, nothing left."""
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({
        "train": {"dataset": synthetic_dataset, "weights": str(weights_file), "image_size": 64, "batch_size": 8,
                  "epochs": 3, "fine_tune_epochs": 0, "num_workers": 1, "storage_path": f"{s3_prefix}/runs"},
        "registry": {"uri": f"{s3_prefix}/models"},
    }))
    job = Command([sys.executable, "-m", "bloodcnn", "train", "--config", str(cfg), "--run-name", "ctrl-c"],
                  env={**base_env(), **s3_server.env()}, cwd=REPO)
    try:
        job.wait_for(r"epoch 1/3[^\n]*step \d+/\d+ training", 420)
        assert any(p.name == "ray::RayTrainWo" for p in job.processes())
        job.send(signal.SIGINT)
        rc, took = job.wait(60)
        left, gone = job.leftovers_after(20)
        assert not left, left
        assert rc == 130, job.tail()
        assert took < 20 and gone < 20, (took, gone)
        assert "interrupted (SIGINT)" in job.out
    finally:
        job.kill_all()


# ------------------------------------------------------------------------------ serve run


@pytest.mark.slow
def test_serve_run_serve_config_stops_on_sigint_and_sigterm(s3_server, s3_prefix, tmp_path):
    """``serve run serving/serve_config.yaml`` (Ray's CLI, a local Ray) with a registered model:
    SIGINT and SIGTERM, once its HTTP API answers (the classifier replica is loading the model
    or serving), each stop it and leave no Ray process behind."""
    from serving import devtools

    registry = f"{s3_prefix}/models"
    devtools.register_model(registry, devtools.make_model(64))
    app_cfg = tmp_path / "app.yaml"
    app_cfg.write_text(yaml.safe_dump({"registry": {"uri": registry},
                                       "serve": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}}))
    results = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        port = free_port()
        serve_cfg = yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text())
        serve_cfg["http_options"].update(host="127.0.0.1", port=port)  # only where it listens differs
        path = tmp_path / f"serve_config_{sig.name}.yaml"
        path.write_text(yaml.safe_dump(serve_cfg))
        env = {**base_env(), **s3_server.env(), "BLOODCNN_CONFIG": str(app_cfg), "PYTHONPATH": str(REPO)}
        job = Command([str(REPO / ".venv" / "bin" / "serve") if (REPO / ".venv/bin/serve").exists() else "serve",
                       "run", str(path)], env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert job.proc.poll() is None, job.tail()
                assert time.monotonic() < deadline, job.tail()
                time.sleep(1)
            assert any(server_like(p) for p in job.processes())
            job.send(sig)
            rc, took = job.wait(60)
            left, gone = job.leftovers_after(20)
            assert not left, (sig.name, left)
            assert took < 20 and gone < 20, (sig.name, took, gone)
            results[sig.name] = (rc, round(took, 1), round(gone, 1))
        finally:
            job.kill_all()
    print(results)  # Ray's CLI exits 0 after Ctrl-C; its C++ handler aborts it on SIGTERM
