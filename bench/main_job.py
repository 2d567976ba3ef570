"""The main job, timed: first prediction from an empty state dir, the console of a second run,
stopping after SIGTERM at every stage, leftovers, and a fresh checkout with setup included.

    .venv/bin/python bench/main_job.py [--parts first,second,signals,fresh] [--keep]

* ``first``: ``jobs/main.py --no-wait`` on the embedded defaults (the ALL dataset in ../shared,
  1 head epoch) from an empty state dir, setup already done: wall time, time to the first served
  prediction and per-stage times (from the job's ``last-run.json``).
* ``second``: the same again on that state dir (dataset and model reused): console lines,
  progress-bar redraws excluded.
* ``signals``: ``--synthetic --epochs 2`` on a state dir of its own, SIGTERM once in each stage
  (s3 start, Ray start, prepare, training, evaluation, serving start, serving) and a SIGKILL in
  training (after the SIGTERM one), each run resuming the one before. Seconds from the signal until the job exited and
  until nothing it started runs (the worst stage is the goal); processes left over.
* ``fresh``: a copy of the checkout (tracked and untracked files, no .venv) next to this one, then
  ``bash scripts/main-job.sh --no-wait`` in it: venv, pip install (pip's download cache is warm
  on a machine that ran setup before), main job.

Writes ``bench/results/main-job.json``. Mind the load average it records: on a busy machine the
times are longer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common  # noqa: F401  (paths, environment)
from _common import REPO, goal, machine, write_result

sys.path.insert(0, str(REPO / "tests"))
from proc_support import Command, base_env  # noqa: E402

def console_lines(job: Command) -> list[str]:
    return [line for line in job.lines() if line]


def run_to_end(args: list[str], state: Path, timeout_s: float = 1800) -> dict:
    job = Command([sys.executable, "jobs/main.py", *args, "--no-wait", "--state-dir", str(state)],
                  env=base_env(), cwd=REPO)
    rc, wall = job.wait(timeout_s)
    left, _ = job.leftovers_after(20)
    status = json.loads((state / "last-run.json").read_text())
    lines = console_lines(job)
    print("\n".join(lines), flush=True)
    return {"rc": rc, "wall_s": round(wall, 1), "first_prediction_s": status.get("first_prediction_s"),
            "stage_seconds": status.get("stage_seconds"), "console_lines": len(lines),
            "widest_line": max((len(x) for x in lines), default=0), "leftovers": left}


def signal_sequence(state: Path) -> dict:
    """SIGTERM once per stage, then SIGKILL in training; each run resumes the one before."""
    base = ["--synthetic", "--epochs", "2", "--state-dir", str(state)]
    waits = {  # stage -> (what to wait for, seconds to wait after it)
        "s3": (r"paused at stage 's3'", 0), "ray": (r"==> starting a local Ray", 4),
        "prepare": (r"validate\+hash", 0), "training": (r"epoch 1/2[^\n]*step \d+/\d+ training", 0),
        "evaluation": (r"loading the trained model", 0), "serve_start": (r"replicas \(model load", 2),
        "serving": (r"Press Ctrl-C to stop", 0),
    }
    rows = []
    for stage in ("s3", "ray", "prepare", "training", "kill", "evaluation", "serve_start", "serving"):
        env = base_env()
        if stage == "s3":
            env["BLOODCNN_TEST_PAUSE"] = "s3"
        job = Command([sys.executable, "jobs/main.py", *base], env=env, cwd=REPO)
        pattern, delay = waits[stage] if stage != "kill" else (r"epoch \d/2[^\n]*step \d+/\d+ training", 0)
        job.wait_for(pattern, 1800)
        time.sleep(delay)
        sig = signal.SIGKILL if stage == "kill" else signal.SIGTERM
        job.send(sig)
        rc, took = job.wait(120)
        left, gone = job.leftovers_after(10 if stage == "kill" else 20)
        row = {"stage": "training" if stage == "kill" else stage, "signal": sig.name, "rc": rc,
               "exit_s": round(took, 1), "all_gone_s": round(gone, 1), "leftovers": left}
        print(row, flush=True)
        rows.append(row)
        job.kill_all()
    return {"runs": rows}


def fresh_checkout(dest: Path) -> dict:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    t0 = time.monotonic()
    job = Command(["bash", "scripts/main-job.sh", "--no-wait"], env=base_env(), cwd=dest)
    rc, wall = job.wait(3600)
    left, _ = job.leftovers_after(20)
    lines = console_lines(job)
    print("\n".join(lines), flush=True)
    status = json.loads((dest / "out" / "main-job" / "last-run.json").read_text())
    setup_s = wall - status["seconds"]
    return {"rc": rc, "wall_s": round(time.monotonic() - t0, 1), "setup_s": round(setup_s, 1),
            "first_prediction_s": status.get("first_prediction_s"), "stage_seconds": status.get("stage_seconds"),
            "leftovers": left}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="first,second,signals,fresh")
    p.add_argument("--keep", action="store_true", help="keep the state dirs and the fresh checkout")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    work = REPO / "out" / "bench-mj"  # short: Ray's sockets live under <state>/ray
    results: dict = {}
    previous = REPO / "bench" / "results" / "main-job.json"
    if previous.exists():  # parts not run this time keep their last figures
        old = json.loads(previous.read_text())
        results.update({k: v for k, v in old.get("details", {}).items() if k not in parts})

    def timed(name: str, fn) -> None:  # each part with the load average around it
        before = machine()
        results[name] = {**fn(), "machine_before": before, "machine_after": machine()}

    if "first" in parts:
        shutil.rmtree(work / "first", ignore_errors=True)
        timed("first", lambda: run_to_end([], work / "first"))
    if "second" in parts:
        timed("second", lambda: run_to_end([], work / "first"))
    if "signals" in parts:
        shutil.rmtree(work / "sig", ignore_errors=True)
        timed("signals", lambda: signal_sequence(work / "sig"))
    if "fresh" in parts:
        dest = REPO.parent / f"{REPO.name}-fresh-bench"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        try:
            timed("fresh", lambda: fresh_checkout(dest))
        finally:
            if not args.keep:
                shutil.rmtree(dest, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    first, second = results.get("first", {}), results.get("second", {})
    runs = results.get("signals", {}).get("runs", [])
    term = [r for r in runs if r["signal"] == "SIGTERM"]
    leftovers = sum(len(r.get("leftovers", [])) for r in [*runs, first, second, results.get("fresh", {})] if r)
    fp = first.get("first_prediction_s")
    fresh_s = results.get("fresh", {}).get("wall_s")
    goals = {
        "minutes_to_first_prediction": goal(round(fp / 60, 2) if fp else None, "<= 3"),
        "console_lines_second_run": goal(second.get("console_lines"), "<= 60"),
        "seconds_to_stop_after_sigterm": goal(max((max(r["exit_s"], r["all_gone_s"]) for r in term), default=None),
                                              "<= 20"),
        "leftover_processes": goal(leftovers, "== 0"),
        "minutes_fresh_machine": {"value": round(fresh_s / 60, 2) if fresh_s else None, "target": None,
                                  "met": None},
    }
    out = write_result("main-job", "python bench/main_job.py --parts " + args.parts, goals, details=results)
    print(json.dumps(goals, indent=1))
    print(f"wrote {out}")
    return 0 if all(g["met"] in (True, None) for g in goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
