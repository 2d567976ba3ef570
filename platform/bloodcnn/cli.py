"""The ``bloodcnn`` command line (also ``python -m bloodcnn``): data, training, evaluation and
the model registry.

Every command takes ``--config FILE`` (else ``$BLOODCNN_CONFIG``, else embedded defaults) and
exits non-zero with a one-paragraph message on bad input, never with a bare traceback.
``bloodcnn train`` without ``$RAY_ADDRESS`` starts a local Ray and stops it again on success,
failure, SIGINT/SIGTERM (exit 130/143) and, through a watchdog, when it is killed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from bloodcnn import lifecycle
from bloodcnn.config import AppConfig, ConfigError, load_config
from bloodcnn.logs import setup_logging


class UsageError(RuntimeError):
    pass


def _known_errors() -> tuple[type[BaseException], ...]:
    from bloodcnn.data.manifest import DatasetError
    from bloodcnn.model import WeightsError
    from bloodcnn.registry import RegistryError
    from bloodcnn.storage import StorageError

    return (ConfigError, DatasetError, StorageError, RegistryError, WeightsError, UsageError)


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> AppConfig:
    return load_config(args.config, overrides=overrides)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from bloodcnn.data.prepare import prepare_dataset, summary_table
    from bloodcnn import storage

    data: dict[str, Any] = {}
    if args.source:
        data["source"] = args.source
    if args.output:
        data["output"] = args.output
    if args.on_bad_image:
        data["on_bad_image"] = args.on_bad_image
    if args.seed is not None:
        data["split"] = {"seed": args.seed}
    cfg = _config(args, {"data": data} if data else None)
    manifest = prepare_dataset(cfg, progress=not args.no_progress)
    print(summary_table(manifest))
    print(f"dataset {manifest.dataset_version}: {storage.join(cfg.data.output, 'manifest.json')}")
    for plot in manifest.plots:
        print(f"plot: {storage.join(cfg.data.output, plot)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bloodcnn.train.job import run_training

    cfg = _config(args)
    with lifecycle.guarded_local_ray("train"):
        meta = run_training(cfg, run_name=args.run_name, progress=not args.no_progress)
    print(json.dumps({"version": meta.version, "metrics": {k: meta.metrics.get(k) for k in ("accuracy", "macro_f1")}}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bloodcnn.train.evaluate import evaluate_registered

    cfg = _config(args)
    report = evaluate_registered(cfg, args.model, output=args.output, progress=not args.no_progress)
    print(json.dumps(report, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from bloodcnn.batch_predict import PredictError, predict_command
    from bloodcnn.registry import RegistryError
    from bloodcnn.storage import StorageError

    try:
        cfg = _config(args)
        predict_command(cfg, input_uri=args.input, output=args.output, model=args.model, batch_size=args.batch_size,
                        actors=args.actors, log_file=args.log_file, verbose=args.verbose,
                        progress=not args.no_progress)
    except (ConfigError, PredictError, RegistryError, StorageError) as exc:
        # caught here, not by main(): its error list imports TensorFlow, which logs a line to stderr
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _registry(cfg: AppConfig):
    from bloodcnn.registry import Registry

    return Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)


def cmd_models_list(args: argparse.Namespace) -> int:
    cfg = _config(args)
    reg = _registry(cfg)
    production = reg.production()
    versions = reg.versions()
    if args.json:
        print(json.dumps([m.model_dump(exclude={"config"}) for m in versions], indent=2))
        return 0
    if not versions:
        print(f"no model versions in {reg.root}")
        return 0
    print(f"{'':2}{'version':<28} {'created':<26} {'dataset':<20} {'accuracy':>8} {'macro_f1':>8}")
    for m in versions:
        mark = "* " if m.version == production else "  "
        acc, f1 = m.metrics.get("accuracy"), m.metrics.get("macro_f1")
        fmt = lambda v: f"{v:>8.4f}" if isinstance(v, (int, float)) else f"{'-':>8}"  # noqa: E731
        print(f"{mark}{m.version:<28} {m.created_at:<26} {m.dataset_version:<20} {fmt(acc)} {fmt(f1)}")
    print("(* = production)")
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    cfg = _config(args)
    meta = _registry(cfg).promote(args.version)
    print(f"promoted {meta.model_name}/{meta.version} to production")
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    from bloodcnn.openvino_runtime import ExportError, export_registered
    from bloodcnn.registry import RegistryError

    cfg = _config(args)
    try:
        meta = export_registered(cfg, args.version, force=args.force)
    except (ExportError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rt = meta.runtime
    for t in rt.trials:
        print(f"  {t.precision:<5} agreement {t.agreement:.4f}  max |dp| {t.max_prob_diff:.2e}  "
              f"accuracy {t.accuracy:.4f}  {t.images_per_s:>6.1f} img/s  {'passed' if t.passed else 'failed'}")
    print(f"  keras accuracy {rt.keras_accuracy:.4f}  {rt.keras_images_per_s:>6.1f} img/s on {rt.num_examples} "
          f"{rt.validated_on} images")
    print(f"exported {meta.model_name}/{meta.version}: " + (f"OpenVINO {rt.precision}" if rt.precision
                                                           else "TensorFlow keeps serving it") + f" ({rt.reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloodcnn", description="bloodcnn: data, training, evaluation and the model registry")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(subparsers, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help, description=help)
        p.add_argument("--config", default=None, help="YAML config (default: $BLOODCNN_CONFIG or embedded defaults)")
        p.set_defaults(func=fn)
        return p

    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    p = add(data, "prepare", cmd_data_prepare, "validate, de-duplicate, split and shard a folder of class sub-folders")
    p.add_argument("--source", help="folder of class sub-folders, local or s3:// (data.source)")
    p.add_argument("--output", help="where shards and manifest.json go, local or s3:// (data.output)")
    p.add_argument("--on-bad-image", choices=["fail", "skip"], help="data.on_bad_image")
    p.add_argument("--seed", type=int, help="split seed (data.split.seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add(sub, "train", cmd_train, "run the Ray Train job, evaluate and register the model "
                                     "(on $RAY_ADDRESS, else on a local Ray that it stops again)")
    p.add_argument("--run-name", default=None, help="resume or name the run (train.run_name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = add(sub, "evaluate", cmd_evaluate, "evaluate a registered model on the test split")
    p.add_argument("--model", required=True, help="version, 'production', 'latest' or a .keras path/URI")
    p.add_argument("--output", default=None, help="folder or s3:// prefix for metrics.json and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add(sub, "predict", cmd_predict, "score a folder or s3:// prefix of images with a registered model on Ray "
                                         "Data, into one Parquet file (on $RAY_ADDRESS, else on a local Ray)")
    p.add_argument("--input", required=True, help="folder (recursive) or s3://bucket/prefix of images")
    p.add_argument("--output", required=True, help="the .parquet file to write, local or s3://; replaced atomically")
    p.add_argument("--model", default="production", help="'production' (default), 'latest' or a version")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--actors", type=int, default=2, help="model replicas in the actor pool (default 2)")
    p.add_argument("--log-file", default="out/predict/predict.log",
                   help="where TensorFlow's, Ray's and S3's output goes (default out/predict/predict.log)")
    p.add_argument("--verbose", action="store_true", help="show the log on the terminal too")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    models = sub.add_parser("models", help="model registry").add_subparsers(dest="models_command", required=True)
    p = add(models, "list", cmd_models_list, "list registered versions and their metrics")
    p.add_argument("--json", action="store_true")
    p = add(models, "promote", cmd_models_promote, "point production at a version")
    p.add_argument("version")
    p = add(models, "export", cmd_models_export,
            "add an OpenVINO artifact to a version, its precision gated on the validation split")
    p.add_argument("version", help="a version, production or latest")
    p.add_argument("--force", action="store_true", help="replace the version's artifact")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM under a lifecycle.Guard
        print(f"interrupted ({exc.args[0] if exc.args else 'SIGINT'})", file=sys.stderr)
        return lifecycle.exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
