"""The README's main job as a real process, interrupted in one stage after another (S3 start,
Ray start, prepare, training, evaluation, serving start, serving; SIGINT, SIGTERM, SIGKILL and a
double Ctrl-C), each run resuming from the same state dir, and a last run through to the sample
predictions with a quiet console. (bench/main_job.py sends SIGTERM in every stage.)

One state dir and synthetic 64 px images (``--synthetic``) for the whole sequence: each run
reuses what the ones before it finished, so the sequence costs about one full run plus a Ray
start per interruption. After every run the process table must hold nothing the run started.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, WEIGHTS
from proc_support import Command, base_env, server_like
from serving.devtools import free_port

pytestmark = pytest.mark.slow

STOP_S = 20  # a signal -> the job exited and nothing it started runs any more
KILL_S = 10  # SIGKILL -> nothing it started runs any more
NOISE = re.compile(r"cuda|absl|oneDNN|\(pid=|\(raylet\)|Traceback|\bINFO\b|\bWARNING\b|\b[IEW]0000 ")


def _job(tmp_path: Path, *extra: str, pause: str | None = None) -> Command:
    env = base_env()
    env.pop("BLOODCNN_TEST_PAUSE", None)
    if pause:
        env["BLOODCNN_TEST_PAUSE"] = pause
    return Command([sys.executable, "jobs/main.py", "--config", str(tmp_path / "main.yaml"), "--synthetic",
                    "--epochs", "2", "--state-dir", str(tmp_path / "state"), *extra], env=env, cwd=REPO)


def _stopped(job: Command, sig: int, expect_rc: int | None, stage: str) -> dict:
    """After ``sig``: the exit status, the time to stop, and nothing left running."""
    rc, took = job.wait(60)
    left, gone = job.leftovers_after(STOP_S)
    assert not left, f"{stage}: still running {gone:.0f}s after {sig.name}: {left}\n{job.tail()}"
    if expect_rc is not None:
        assert rc == expect_rc, f"{stage}: exit status {rc} after {sig.name}\n{job.tail()}"
    assert took < STOP_S and gone < STOP_S, f"{stage}: exit after {took:.1f}s, all gone after {gone:.1f}s"
    return {"stage": stage, "signal": sig.name, "rc": rc, "exit_s": round(took, 1), "all_gone_s": round(gone, 1)}


def _send_when_running(job: Command, sig: int) -> None:
    """Signal the job once it runs servers (a real stage, not the start-up)."""
    assert any(server_like(p) for p in job.processes()), f"no server running yet:\n{job.tail()}"
    job.send(sig)


def test_main_job_stops_cleanly_at_every_stage_and_resumes(tmp_path):
    (tmp_path / "main.yaml").write_text(f"""
data: {{shard_size: 32, augment: {{copies: 1}}}}
train: {{image_size: 64, batch_size: 16, weights: {WEIGHTS}, num_workers: 1}}
registry: {{gates: {{min_macro_f1: 0.0}}}}
serve: {{port: {free_port()}, autoscaling: {{min_replicas: 1, max_replicas: 1}}}}
""")
    state = tmp_path / "state"
    results = []
    try:
        # 1. SIGINT in S3 start: SeaweedFS runs, nothing else yet
        job = _job(tmp_path, pause="s3")
        job.wait_for(r"paused at stage 's3'", 120)
        assert {p.name for p in job.processes()} >= {"weed"}
        _send_when_running(job, signal.SIGINT)
        results.append(_stopped(job, signal.SIGINT, 130, "s3"))
        assert "==> stopping after SIGINT in stage s3" in job.out

        # 2. SIGTERM in Ray start (ray.init is still bringing up the GCS, raylet and agents)
        job = _job(tmp_path)
        job.wait_for(r"==> starting a local Ray", 120)
        time.sleep(2)
        _send_when_running(job, signal.SIGTERM)
        results.append(_stopped(job, signal.SIGTERM, 143, "ray"))
        assert "==> stopping after SIGTERM in stage ray" in job.out, job.tail()

        # 3. a double Ctrl-C while preparing the dataset: the second one forces the stop at once
        #    (SIGKILL to SeaweedFS and Ray); the next runs must still reuse the S3 store
        job = _job(tmp_path)
        job.wait_for(r"==> preparing", 180)
        _send_when_running(job, signal.SIGINT)
        job.wait_for(r"==> stopping after SIGINT in stage prepare", 10)
        job.send(signal.SIGINT)
        results.append(_stopped(job, signal.SIGINT, 130, "prepare (double Ctrl-C)"))
        assert "forced stop" in job.out, job.tail()

        # 4. SIGKILL in training, once the workers report progress: the watchdog stops the rest
        job = _job(tmp_path)
        job.wait_for(r"epoch 1/2[^\n]*step \d+/\d+ training", 420)
        assert any(p.name == "ray::RayTrainWo" for p in job.processes()), sorted(p.name for p in job.processes())
        job.send(signal.SIGKILL)
        left, gone = job.leftovers_after(KILL_S)
        assert not left, f"{gone:.0f}s after SIGKILL: {left}"
        assert job.wait(10)[0] == -signal.SIGKILL
        results.append({"stage": "training", "signal": "SIGKILL", "all_gone_s": round(gone, 1)})

        # 5. SIGTERM in evaluation; this run resumed the killed training run
        job = _job(tmp_path)
        job.wait_for(r"==> evaluating", 600)
        assert re.search(r"dataset ds-\w+: .*reused", job.out), job.tail()
        assert "resuming run main-" in job.out, job.tail()
        job.wait_for(r"loading the trained model", 60)
        _send_when_running(job, signal.SIGTERM)
        results.append(_stopped(job, signal.SIGTERM, 143, "evaluation"))

        # 6. this run finishes training (Ray Train's fit() ran in it), then SIGINT while the
        #    service starts (replicas loading the model): Ray Train's handler must not keep it alive
        job = _job(tmp_path)
        job.wait_for(r"==> starting the service", 600)
        job.wait_for(r"replicas \(model load", 60)
        _send_when_running(job, signal.SIGINT)
        results.append(_stopped(job, signal.SIGINT, 130, "serve_start"))
        assert "==> stopping after SIGINT in stage serve_start" in job.out, job.tail()
        assert "resuming run main-" in job.out and "already completed" not in job.out, job.tail()

        # 7. SIGTERM while it serves (the model reused)
        job = _job(tmp_path)
        job.wait_for(r"Press Ctrl-C to stop", 600)
        _send_when_running(job, signal.SIGTERM)
        results.append(_stopped(job, signal.SIGTERM, 143, "serving"))
        assert "==> stopping after SIGTERM in stage serving" in job.out, job.tail()

        # 8. a run through to the predictions: dataset and model reused, a quiet console
        job = _job(tmp_path, "--no-wait")
        rc, took = job.wait(900)
        lines = [line for line in job.lines() if line]
        assert rc == 0, job.tail(60)
        left, _ = job.leftovers_after(STOP_S)
        assert not left, left
    except BaseException:
        job.kill_all()
        raise
    print("\n".join(str(r) for r in results))
    text = "\n".join(lines)
    for step in ("starting SeaweedFS", "starting a local Ray", "preparing", "training", "starting the service",
                 "sample predictions"):
        assert f"==> {step}" in text
    assert "already completed: reusing model" in text and ", reused" in text
    predictions = [line for line in lines if " true " in line and " -> " in line]
    assert len(predictions) == 4, text  # one sample prediction per class
    assert "bloodcnn is serving at http://127.0.0.1:" in text
    assert f"logs: {state / 'logs'}/" in text and f"  {state / 'logs'}/" in text
    # quiet: at most ~60 lines (bar redraws aside), none wider than 100 columns, no log noise
    assert len(lines) <= 60, text
    assert max(len(line) for line in lines) <= 100, text
    assert not [line for line in lines if NOISE.search(line)], text
    # ... and the noise went to the log files under the state dir
    main_log = (state / "logs" / "main.log").read_text(errors="replace")
    assert "Started a local Ray instance" in main_log
    ray_logs = (state / "logs" / "ray").resolve()
    assert (ray_logs / "raylet.out").is_file()
    assert list(ray_logs.glob("serve/*.log"))  # Serve's and its access logs
    if "bloodcnn-ray-" in str(ray_logs):
        shutil.rmtree(ray_logs.parents[1], ignore_errors=True)  # Ray's temp dir outside tmp_path


def test_missing_dataset_says_how_to_get_it_and_starts_nothing(tmp_path):
    job = Command([sys.executable, "jobs/main.py", "--source", str(tmp_path / "nowhere"),
                   "--state-dir", str(tmp_path / "state")], env=base_env(), cwd=REPO)
    rc, _ = job.wait(60)
    out = job.out
    assert rc == 2, out
    for needed in ("mehradaria/leukemia", "kaggle.com", "Benign/", "Early/", "Pre/", "Pro/", "--source",
                   "--synthetic", str(tmp_path / "nowhere")):
        assert needed in out, (needed, out)
    assert not (tmp_path / "state").exists()  # nothing was started or written
    assert max(len(line) for line in out.splitlines() if "nowhere" not in line) <= 100, out


def test_verbose_shows_the_logs_on_the_console_too(tmp_path):
    """--verbose: what goes to logs/main.log (here SeaweedFS's start-up log line) shows on the
    console as well; Ctrl-C still stops the job cleanly."""
    env = {**base_env(), "BLOODCNN_TEST_PAUSE": "s3"}
    job = Command([sys.executable, "jobs/main.py", "--synthetic", "--verbose", "--state-dir", str(tmp_path / "state")],
                  env=env, cwd=REPO)
    try:
        job.wait_for(r"paused at stage 's3'", 120)
        job.wait_for(r"INFO bloodcnn.s3server: SeaweedFS S3 ready", 10)
        job.send(signal.SIGINT)
        rc, took = job.wait(60)
        left, _ = job.leftovers_after(STOP_S)
        assert rc == 130 and not left, (rc, left, job.tail())
        assert "SeaweedFS S3 ready" in (tmp_path / "state" / "logs" / "main.log").read_text()
    finally:
        job.kill_all()
