"""Test accuracy and macro-F1 on the real dataset over several split seeds (mean and spread).

For every seed: prepare ../shared/data/all-leukemia with ``data.split.seed = seed`` (grouped,
de-duplicated split; augmented train copies), train with the configured recipe through the
Ray Train job, and evaluate on that seed's held-out test split. Models go to a separate bench
registry and are never promoted.

    .venv/bin/python bench/accuracy.py                          # 3 seeds, embedded default recipe
    .venv/bin/python bench/accuracy.py --config my.yaml --seeds 1,2,3 --workers 2

Everything is written under --workdir (local folders; no S3 needed). Takes long on CPU:
about (train images x epochs) / (~35 img/s on 2 cores at 224 px) per seed.
Output: markdown rows for docs/benchmarks.md (and JSON lines in <workdir>/accuracy.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _common import REPO  # also sets up paths and env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config for the recipe (default: embedded defaults)")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "all-leukemia"))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--workers", type=int, default=None, help="train.num_workers (default: from the config)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: from the config)")
    p.add_argument("--fine-tune-epochs", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--workdir", default=str(REPO / "out" / "bench-accuracy"))
    args = p.parse_args(argv)

    from bloodcnn.config import load_config
    from bloodcnn.data.prepare import prepare_dataset
    from bloodcnn.logs import setup_logging
    from bloodcnn.train.job import run_training

    setup_logging()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    train_over = {k: v for k, v in {
        "num_workers": args.workers, "epochs": args.epochs, "fine_tune_epochs": args.fine_tune_epochs,
        "image_size": args.image_size,
    }.items() if v is not None}

    import ray

    # with the dashboard: Ray Train's placement-group cleaner polls its state API (else a warning a second)
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=True)
    results = []
    try:
        for seed in seeds:
            dataset = str(work / "datasets" / f"seed-{seed}")
            cfg = load_config(args.config, overrides={
                "data": {"source": args.source, "output": dataset, "split": {"seed": seed}},
                "train": {**train_over, "dataset": dataset, "storage_path": str(work / "runs"), "seed": seed},
                "registry": {"uri": str(work / "models"), "model_name": "bench-accuracy", "auto_promote": False},
            })
            t0 = time.perf_counter()
            manifest = prepare_dataset(cfg, progress=False)
            prep_s = time.perf_counter() - t0
            run_name = f"acc-seed{seed}-{manifest.dataset_version}-{int(time.time())}"
            meta = run_training(cfg, run_name=run_name)
            wall = time.perf_counter() - t0
            m = meta.metrics
            row = {
                "seed": seed, "dataset_version": manifest.dataset_version, "version": meta.version,
                "test_images": m["num_examples"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                "roc_auc_ovr_macro": m.get("roc_auc_ovr_macro"),
                "per_class_f1": {k: v["f1"] for k, v in m["per_class"].items()},
                "epochs": m["training"]["epochs_completed"], "workers": m["training"]["num_workers"],
                "images_per_s": m["training"]["images_per_s"], "prepare_s": round(prep_s, 1),
                "fit_s": m["training"]["fit_wall_time_s"], "wall_s": round(wall, 1),
            }
            results.append(row)
            with open(work / "accuracy.jsonl", "a") as f:
                f.write(json.dumps({**row, "config": cfg.train.model_dump()}) + "\n")
            print(f"seed {seed}: accuracy={row['accuracy']:.4f} macro_f1={row['macro_f1']:.4f} "
                  f"wall {row['wall_s']:.0f}s", flush=True)
    finally:
        ray.shutdown()

    t = cfg.train
    print()
    print(f"Real dataset ({args.source}), {t.image_size} px, {t.epochs}+{t.fine_tune_epochs} epochs "
          f"(head + top-{t.fine_tune_blocks} fine-tune), batch {t.batch_size}/worker, {t.num_workers} worker(s), "
          f"{platform.node()} ({os.cpu_count()} CPUs)")
    print()
    print("| seed | test images | accuracy | macro-F1 | ROC-AUC (ovr) | img/s | wall (prepare + train + eval) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        auc = f"{r['roc_auc_ovr_macro']:.4f}" if r["roc_auc_ovr_macro"] is not None else "-"
        print(f"| {r['seed']} | {r['test_images']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {auc} | "
              f"{r['images_per_s']:.1f} | {r['wall_s'] / 60:.1f} min |")

    def spread(key: str) -> str:
        vals = [r[key] for r in results]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.4f} ± {sd:.4f}"

    if results:
        total = sum(r["wall_s"] for r in results)
        print(f"| **mean ± sd ({len(results)} seeds)** | | **{spread('accuracy')}** | **{spread('macro_f1')}** | | | "
              f"{total / 60:.1f} min total |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
