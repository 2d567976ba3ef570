"""Training throughput: the Ray Train job (1 and 2 workers) vs a bare single-process tf_keras loop.

All modes train the same model (frozen MobileNetV2 + head, the first training phase) on the same
prepared data and count images per second of training only (not validation, checkpointing or
start-up); the first epoch is warm-up (graph tracing, shard download) and is left out.

    .venv/bin/python bench/train_throughput.py                      # synthetic data, 224 px
    .venv/bin/python bench/train_throughput.py --dataset s3://bloodcnn/datasets/all-leukemia

Without --dataset a synthetic dataset is generated and prepared into a local folder. Output:
markdown table rows for docs/benchmarks.md (also written to --out as JSON lines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_WEIGHTS  # also sets up paths and env



def synthetic_dataset(root: Path, per_class: int, size: int) -> str:
    from bloodcnn.config import load_config
    from bloodcnn.data.prepare import prepare_dataset
    from bloodcnn.data.synthetic import make_class_folders

    src = make_class_folders(root / "src", per_class=per_class, size=size)
    out = root / "dataset"
    cfg = load_config(environ={}, overrides={"data": {
        "source": str(src), "output": str(out), "shard_size": 64, "augment": {"copies": 0},
        "near_duplicate_distance": 0,
    }})
    prepare_dataset(cfg, progress=False)
    return str(out)


def bare_loop(dataset: str, *, image_size: int, batch: int, epochs: int, weights: str, storage_config) -> dict:
    """One process, no Ray, no distribution strategy: model.fit on the whole train split."""
    import tf_keras as keras

    from bloodcnn.data.reader import load_manifest, make_dataset
    from bloodcnn.model import build_model

    manifest = load_manifest(dataset, storage_config)
    steps = max(1, math.ceil(manifest.splits["train"].total / batch))
    data = make_dataset(dataset, "train", batch_size=batch, image_size=image_size, shuffle=True, augment=True,
                        repeat=True, storage_config=storage_config, manifest=manifest)
    model = build_model(manifest.num_classes, image_size, weights, 0.2)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=[Timer()], verbose=0)
    measured = times[1:] or times
    ips = [steps * batch / t for t in measured]
    keras.backend.clear_session()
    return {"images_per_s": statistics.mean(ips), "epoch_s": statistics.mean(measured), "steps": steps,
            "global_batch": batch}


def ray_job(dataset: str, *, workers: int, cpus: int, image_size: int, batch: int, epochs: int, weights: str,
            work: Path, use_gpu: bool = False) -> dict:
    from bloodcnn.config import load_config
    from bloodcnn.train.job import run_training

    cfg = load_config(environ={}, overrides={
        "train": {
            "dataset": dataset, "weights": weights, "image_size": image_size, "batch_size": batch,
            "epochs": epochs, "fine_tune_epochs": 0, "num_workers": workers, "use_gpu": use_gpu,
            "cpus_per_worker": max(1, cpus // workers), "storage_path": str(work / "runs"),
            "run_name": f"throughput-{workers}w-{int(time.time())}",
        },
        "registry": {"uri": str(work / "models"), "auto_promote": False},
    })
    t0 = time.perf_counter()
    meta = run_training(cfg)
    wall = time.perf_counter() - t0
    tr = meta.metrics["training"]
    history = tr["history"]
    measured = history[1:] or history
    return {
        "images_per_s": statistics.mean(h["images_per_s"] for h in measured),
        "epoch_s": statistics.mean(h["train_s"] for h in measured),
        "steps": None,
        "global_batch": tr["global_batch_size"],
        "fit_wall_s": tr["fit_wall_time_s"],
        "run_wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="prepared dataset (local or s3://); default: synthetic, generated here")
    p.add_argument("--per-class", type=int, default=160, help="synthetic images per class")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for Ray (split among workers)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--out", default=None, help="also append JSON lines here")
    args = p.parse_args(argv)

    from bloodcnn.config import StorageConfig
    from bloodcnn.logs import setup_logging

    setup_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="bloodcnn-bench-"))
    dataset = args.dataset or synthetic_dataset(work, args.per_class, max(64, args.image_size))
    rows = []
    host = f"{platform.node()} ({os.cpu_count()} CPUs)"

    t0 = time.perf_counter()
    bare = bare_loop(dataset, image_size=args.image_size, batch=args.batch_size, epochs=args.epochs,
                     weights=args.weights, storage_config=StorageConfig())
    rows.append({"mode": "bare tf_keras (1 process)", "workers": 1, **bare, "run_wall_s": round(time.perf_counter() - t0, 1)})

    import ray

    # with the dashboard: Ray Train's placement-group cleaner polls its state API (else a warning a second)
    ray.init(address="local", num_cpus=args.cpus, num_gpus=None if args.use_gpu else 0, include_dashboard=True,
             log_to_driver=False)
    try:
        for n in [int(x) for x in args.workers.split(",") if x.strip()]:
            res = ray_job(dataset, workers=n, cpus=args.cpus, image_size=args.image_size, batch=args.batch_size,
                          epochs=args.epochs, weights=args.weights, work=work, use_gpu=args.use_gpu)
            rows.append({"mode": "Ray Train job (MWMS)", "workers": n, **res})
    finally:
        ray.shutdown()

    print()
    print(f"Training throughput, frozen-backbone phase, {args.image_size} px, batch {args.batch_size}/worker, "
          f"{host}, dataset {dataset}")
    print()
    print("| mode | workers | global batch | images/s | s per epoch | run wall s | vs bare |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["images_per_s"]
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['global_batch']} | {r['images_per_s']:.1f} | "
              f"{r['epoch_s']:.1f} | {r.get('run_wall_s', '-')} | {r['images_per_s'] / base:.2f}x |")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "image_size": args.image_size, "host": host, "dataset": dataset}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
