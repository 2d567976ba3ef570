"""The main job: the whole flow on one machine, on embedded defaults.

    python jobs/main.py [--config FILE] [--epochs 1] [--no-wait]

Starts a local SeaweedFS S3 and a local Ray, prepares the dataset into shards on S3, trains a
short run, registers and promotes the model, serves it, sends one sample prediction per class
and prints the URL. Ctrl-C (or SIGTERM) shuts everything down. S3 data is kept in
``out/main-job/s3`` so a second run reuses the prepared dataset and finished training run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serving` lives at the repository root
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])

from bloodcnn import storage  # noqa: E402
from bloodcnn.config import ConfigError, load_config  # noqa: E402
from bloodcnn.logs import setup_logging  # noqa: E402
from bloodcnn.s3server import S3Server  # noqa: E402

log = logging.getLogger("bloodcnn.main")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def sample_predictions(url: str, cfg, manifest) -> None:
    """POST the first test image of each class and print what the service answers."""
    import httpx

    root = cfg.data.source.rstrip("/")
    shown: set[int] = set()
    for img in manifest.images:
        if img.split != "test" or img.label in shown:
            continue
        shown.add(img.label)
        data = storage.read_bytes(storage.join(root, img.source), cfg.storage)
        r = httpx.post(f"{url}/v1/predict", files={"file": (Path(img.source).name, data, "image/jpeg")}, timeout=60)
        r.raise_for_status()
        result = r.json()["results"][0]
        probs = ", ".join(f"{k} {v:.3f}" for k, v in result["probabilities"].items())
        flag = "  [uncertain: refer to a specialist]" if result.get("uncertain") else ""
        print(f"  {img.source:<40} true {manifest.class_names[img.label]:<12} -> {result['class']:<12} ({probs}){flag}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: embedded defaults)")
    p.add_argument("--epochs", type=int, default=1, help="short run: phase-1 epochs (default 1)")
    p.add_argument("--fine-tune-epochs", type=int, default=0)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant (default here): a one-epoch demo decayed to 0 learns about half as much")
    p.add_argument("--state-dir", default=str(REPO / "out" / "main-job"), help="where the local S3 keeps its data")
    p.add_argument("--no-wait", action="store_true", help="exit after the sample predictions")
    args = p.parse_args()
    setup_logging()
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        cfg = load_config(args.config, overrides={"train": {
            "epochs": args.epochs, "fine_tune_epochs": args.fine_tune_epochs, "lr_schedule": args.lr_schedule,
        }})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    s3 = S3Server(data_dir=Path(args.state_dir) / "s3")
    ray_started = serve_started = False
    try:
        print("==> starting SeaweedFS S3 on 127.0.0.1")
        s3.start()
        os.environ.update(s3.env())
        storage._s3_store.cache_clear()

        import ray

        print("==> starting a local Ray")
        # address="local": a fresh private Ray that inherits this S3 server's credentials, never a
        # cluster that happens to run on this machine (ray.init() would attach to it). The dashboard
        # shows the training run, and Ray Train's placement-group cleaner needs its state API.
        ctx = ray.init(address="local", include_dashboard=True, log_to_driver=True)
        ray_started = True
        if ctx.dashboard_url:
            print(f"    Ray dashboard: http://{ctx.dashboard_url} (token in ~/.ray/auth_token)")

        from bloodcnn.data.prepare import prepare_dataset, summary_table

        print(f"==> preparing {cfg.data.source} -> {cfg.data.output}")
        manifest = prepare_dataset(cfg)
        print(summary_table(manifest))

        from bloodcnn.registry import Registry
        from bloodcnn.train.job import fingerprint, run_training

        print(f"==> training ({cfg.train.epochs} epoch(s), {cfg.train.num_workers} worker(s), {cfg.train.image_size} px)")
        # named after what it trains: a rerun resumes or reuses it, a changed config trains anew
        meta = run_training(cfg, run_name=f"main-{fingerprint(cfg, manifest.dataset_version)}")
        registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
        if registry.production() != meta.version:
            log.warning("model %s did not pass the promotion gates; promoting it for this local demo", meta.version)
            registry.promote(meta.version)
        print(f"==> model {meta.version}: accuracy {meta.metrics.get('accuracy', float('nan')):.4f}, "
              f"macro-F1 {meta.metrics.get('macro_f1', float('nan')):.4f}")

        from serving import app as serving_app

        print("==> serving")
        url = serving_app.run(cfg, wait_ready_s=600)
        serve_started = True
        print("==> sample predictions (test split)")
        sample_predictions(url, cfg, manifest)
        print(f"\nbloodcnn is serving at {url}/ (API docs at {url}/docs). Research use only, not a diagnosis.")
        if args.no_wait:
            return 0
        print("Press Ctrl-C to stop.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n==> shutting down")
        return 130
    except Exception as exc:  # a clear last line instead of a bare traceback
        log.exception("main job failed")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if serve_started:
            from ray import serve

            serve.shutdown()
        if ray_started:
            import ray

            ray.shutdown()
        s3.stop()


if __name__ == "__main__":
    sys.exit(main())
