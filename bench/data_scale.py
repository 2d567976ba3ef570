"""Data prepare at 10k, 100k and 300k images, and batch scoring against its runtime's ceiling.

    .venv/bin/python bench/data_scale.py [--sizes 10000 100000 300000] [--score-images 10000]
                                     [--score-sizes 224 32]

1. Generates class folders of small synthetic JPEGs by code (32 px, four classes, as
   ``bloodcnn.data.synthetic``; nothing from ../shared) for each size.
2. Runs ``bloodcnn data prepare`` on each in its own process (no offline copies, defaults
   otherwise: validation, sha256 de-duplication, near-duplicate grouping, grouped split, shards,
   manifest), timing it and reading that process's peak RSS from ``wait4``.
3. Registers a 224 px model (ImageNet backbone, random head) with its OpenVINO export, measures
   the runtime's in-process throughput at batch 32 (the predictor serving and batch scoring load)
   before and after, and runs ``bloodcnn predict`` (Ray Data, actor pool, default settings) over
   ``--score-images`` synthetic JPEGs of each ``--score-sizes`` size, comparing its steady rate
   (after the first results) with the higher ceiling. The goal is on 224 px, the ALL dataset's
   own size, where nothing is resized; 32 px adds an upscale per image (batched per shape).

Writes ``bench/results/data-scale.json`` with the goals time_per_image_ratio_largest_over_smallest,
peak_driver_rss_mb_largest and batch_scoring_over_runtime_ceiling (largest = the largest size run).
The near-duplicate index checks its candidate pairs as it makes them, so prepare's peak follows
the images (about 0.9 GB at 100,000 of these, most of it TensorFlow's import), not the candidates.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DEFAULT_WEIGHTS, REPO, goal, write_result
from serve_load import runtime_ceiling


def make_folders(root: Path, n: int, size: int = 32) -> Path:
    """``n`` synthetic JPEGs in 4 class folders (the same generator the tests use)."""
    from bloodcnn.data.synthetic import make_class_folders

    return make_class_folders(root, per_class=n // 4, size=size, seed=n)


def prepare(source: Path, output: Path, log: Path) -> dict:
    """``bloodcnn data prepare`` in a child process: wall time and the child's peak RSS."""
    env = {**os.environ, "BLOODCNN__DATA__AUGMENT__COPIES": "0", "BLOODCNN__DATA__WORKERS": str(os.cpu_count())}
    cmd = [sys.executable, "-m", "bloodcnn", "data", "prepare", "--source", str(source), "--output", str(output),
           "--no-progress"]
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"prepare of {source} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def score(n: int, size: int, work: Path, weights: str) -> dict:
    """``bloodcnn predict`` over ``n`` synthetic ``size`` px JPEGs against the runtime's ceiling.

    The ceiling is measured before and after the run, and the higher one counts: the machines
    are shared and a slow spell during one of them must not flatter the ratio."""
    from bloodcnn.batch_predict import predict_command
    from bloodcnn.config import load_config
    from bloodcnn.inference import load_for_model
    from bloodcnn.loaded_model import load_version
    from bloodcnn.openvino_runtime import export
    from bloodcnn.registry import Registry
    from serving import devtools

    from bloodcnn.data.synthetic import make_class_folders

    images = make_class_folders(work / f"score-{size}px", per_class=n // 4, size=size, seed=size)
    uri = str(work / "models")
    registry = Registry(uri, "bloodcnn")
    version = "scale-224"
    sample = sorted(images.rglob("*.jpg"))[:64]
    x = np.stack([load_for_model(f.read_bytes(), 224)[0] for f in sample])
    if version not in {m.version for m in registry.versions()}:
        model = devtools.make_model(224, weights=weights, kernel_scale=1.0, seed=1)
        meta = devtools.register_model(uri, model, version=version)
        labels = model.predict(x, verbose=0).argmax(1)
        info = export(model, 224, [(x[i:i + 32], labels[i:i + 32]) for i in range(0, len(x), 32)], work / "export")
        registry.set_runtime(meta.version, info, work / "export")

    def ceiling() -> float:
        loaded = load_version(registry, version, work / "cache", 32, (uri, "bloodcnn"))
        return runtime_ceiling(loaded, x, seconds=10.0)["ips"]

    before = ceiling()
    cfg = load_config(environ={}, overrides={"registry": {"uri": uri}})
    summary = predict_command(cfg, input_uri=str(images), output=str(work / "predictions.parquet"),
                              log_file=work / "predict.log", progress=False)
    after = ceiling()
    shutil.rmtree(images, ignore_errors=True)
    return {"image_px": size, "images": summary.rows, "errors": sum(summary.errors.values()),
            "runtime": registry.get(version).runtime.precision,
            "runtime_ceiling_ips": round(max(before, after), 1),
            "runtime_ceiling_before_after_ips": [round(before, 1), round(after, 1)],
            "images_per_s": round(summary.images_per_s, 1),
            "steady_images_per_s": round(summary.loaded_images_per_s or 0.0, 1), "seconds": round(summary.seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--score-images", type=int, default=10_000)
    ap.add_argument("--score-sizes", type=int, nargs="+", default=[224, 32],
                    help="image sizes to score; the goal uses the first (224: the ALL dataset's own size)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bloodcnn-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in sorted(args.sizes):
            t0 = time.perf_counter()
            src = make_folders(work / f"src-{n}", n)
            made = time.perf_counter() - t0
            r = {"images": n, "generate_s": round(made, 1),
                 **prepare(src, work / f"ds-{n}", work / "prepare.log")}
            r["ms_per_image"] = round(1000 * r["seconds"] / n, 3)
            rows.append(r)
            print(f"  prepare {n:>7} images: {r['seconds']:7.1f} s  {r['ms_per_image']:.3f} ms/img  "
                  f"peak RSS {r['peak_rss_mb']:7.1f} MB  (generated in {made:.0f} s)", flush=True)
            shutil.rmtree(work / f"ds-{n}", ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
        scoring = []
        for size in args.score_sizes:
            scoring.append(score(args.score_images, size, work, args.weights))
            print(f"  batch scoring: {scoring[-1]}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    small, large = rows[0], rows[-1]
    goals = {
        "time_per_image_ratio_largest_over_smallest": goal(round(large["ms_per_image"] / small["ms_per_image"], 3),
                                                           "<= 1.5"),
        "peak_driver_rss_mb_largest": goal(large["peak_rss_mb"], "<= 2048"),
        "batch_scoring_over_runtime_ceiling": goal(
            round(scoring[0]["steady_images_per_s"] / scoring[0]["runtime_ceiling_ips"], 3), ">= 0.8"),
    }
    for name, g in goals.items():
        print(f"- [{'x' if g['met'] else ' '}] {name} {g['target']}: {g['value']}")
    if not args.no_write:
        out = write_result("data-scale", "python bench/data_scale.py " + " ".join(sys.argv[1:]), goals,
                           prepare=rows, batch_scoring=scoring)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
