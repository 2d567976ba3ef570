"""Ray Train job: train, evaluate and register a bloodcnn model.

    ray job submit --working-dir . -- python jobs/train.py --config CONFIG   # on a running cluster
    python jobs/train.py --config CONFIG                                      # starts a local Ray

Exit status 0 with one JSON line (version, metrics) on success; 2 on bad input (config,
dataset, weights, cluster size); 1 when training failed; 130/143 after SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
try:
    import bloodcnn  # noqa: F401
except ImportError:  # running from a checkout (e.g. the uploaded working dir) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: $BLOODCNN_CONFIG or embedded defaults)")
    parser.add_argument("--run-name", default=None, help="name of the run; the same name resumes it (train.run_name)")
    args = parser.parse_args(argv)

    import logging

    from bloodcnn import lifecycle
    from bloodcnn.config import ConfigError, load_config
    from bloodcnn.data.manifest import DatasetError
    from bloodcnn.logs import setup_logging
    from bloodcnn.model import WeightsError
    from bloodcnn.storage import StorageError
    from bloodcnn.train.job import ClusterResourcesError, TrainingError, run_training

    setup_logging()
    log = logging.getLogger("bloodcnn.train")
    try:
        cfg = load_config(args.config)
        # without $RAY_ADDRESS: a local Ray, stopped again on exit, signal or kill
        with lifecycle.guarded_local_ray("train"):
            meta = run_training(cfg, run_name=args.run_name, progress=sys.stderr.isatty())
    except KeyboardInterrupt as exc:  # SIGINT / SIGTERM
        log.error("interrupted (%s)", exc.args[0] if exc.args else "SIGINT")
        return lifecycle.exit_code(exc)
    except (ConfigError, DatasetError, WeightsError, ClusterResourcesError, StorageError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    except TrainingError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    print(json.dumps({
        "version": meta.version,
        "model": f"{meta.model_name}/{meta.version}",
        "metrics": {k: meta.metrics.get(k) for k in ("accuracy", "macro_f1", "roc_auc_ovr_macro")},
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
