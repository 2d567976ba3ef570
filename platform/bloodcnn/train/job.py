"""The training job (driver side): check inputs, run Ray Train, evaluate, register, promote.

``run_training(cfg)`` does, in order:

1. **Checks before any worker starts** — the dataset manifest (``DatasetError``), enough train
   shards for ``num_workers``, a test split, the weights file against the architecture
   (``WeightsError``), S3 reachability (``StorageError``), that the cluster can place the
   workers at all (``ClusterResourcesError``), and that the run name is not taken by a run
   with another config (``TrainingError``).
2. **Ray Train** — ``TensorflowTrainer`` (Ray Train V2) with ``MultiWorkerMirroredStrategy``
   workers, checkpoints every epoch under ``<train.storage_path>/<run name>/`` and
   ``FailureConfig(max_failures)``. Waiting for workers to be placed times out after
   ``train.placement_timeout_s``. The same run name resumes from its latest checkpoint.
3. **Evaluation** of the final model once, here in the driver, on the held-out test split.
4. **Registry** — ``model.keras`` + metadata + ``metrics.json`` and plots; promoted to
   production only when ``registry.auto_promote`` and the metric gates pass.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import hashlib
import json
import logging
import math
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from bloodcnn import storage
from bloodcnn.config import AppConfig
from bloodcnn.registry import ModelMetadata, Registry, code_version

log = logging.getLogger("bloodcnn.train")

RUN_FILE = "bloodcnn_run.json"
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# fields that change how a run trains; the others (where, how long to wait, retries, resources, the memory
# for the decoded-image cache) may differ on a restart
_OPERATIONAL_FIELDS = {"run_name", "storage_path", "max_failures", "placement_timeout_s", "cpus_per_worker",
                       "gpus_per_worker", "use_gpu", "cache_images_mb"}


class TrainingError(RuntimeError):
    """The training run could not start or did not complete; the message says why."""


class ClusterResourcesError(TrainingError):
    """The Ray cluster cannot place the requested workers."""


@dataclass
class TrainPlan:
    """What the driver decided before starting workers (passed to every worker)."""

    run_name: str
    fingerprint: str
    dataset_version: str
    class_names: list[str]
    weights: str
    batch_size: int
    steps_per_epoch: int
    val_steps: int
    val_sharded: bool
    epochs_head: int
    epochs_fine_tune: int
    train_examples_per_worker: list[int]
    test_examples: int
    mixed_precision: bool = True
    cache_dir: str | None = None
    fault: dict[str, Any] | None = field(default=None)


# ---------------------------------------------------------------------------------------------
# checks before workers start


def _absolute_if_local(uri: str) -> str:
    if storage.is_s3(uri) or uri in ("imagenet", "none", ""):
        return uri
    return str(Path(uri).expanduser().resolve())


def fingerprint(cfg: AppConfig, dataset_version: str) -> str:
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in _OPERATIONAL_FIELDS}
    train["dataset"] = dataset_version
    return hashlib.sha256(json.dumps(train, sort_keys=True).encode()).hexdigest()[:16]


def driver_tensorflow_on_cpu() -> None:
    """Keep the driver's TensorFlow off the GPUs: by default TF takes all of a GPU's memory,
    and on a single-node run the training worker needs that GPU. The driver only checks the
    weights and evaluates once, which the CPU does fine."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # TF already initialised in this process: at least don't grab it all
        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except (RuntimeError, ValueError):
                pass


def check_weights(cfg: AppConfig, num_classes: int) -> None:
    """Build the model once in the driver so a wrong weights file fails before any worker starts."""
    from bloodcnn.model import WeightsError, build_model

    import tf_keras as keras

    try:
        build_model(num_classes, cfg.train.image_size, cfg.train.weights, cfg.train.dropout)
    except WeightsError:
        raise
    except Exception as exc:  # e.g. "imagenet" without internet access
        raise WeightsError(f"cannot load weights {cfg.train.weights!r}: {exc}") from None
    finally:
        keras.backend.clear_session()


def plan_training(cfg: AppConfig, *, run_name: str | None = None, check_weights_file: bool = True) -> TrainPlan:
    """All checks that need no Ray cluster: dataset, splits, shards per worker, weights."""
    from bloodcnn.data.reader import examples_per_worker, load_manifest

    t = cfg.train
    name = run_name or t.run_name
    if not _RUN_NAME_RE.match(name):
        raise TrainingError(f"invalid run name {name!r}: use letters, digits, '.', '_' or '-'")
    manifest = load_manifest(t.dataset, cfg.storage)  # DatasetError / StorageError
    if manifest.num_classes < 2:
        raise TrainingError(f"dataset {t.dataset} has {manifest.num_classes} class(es); need at least 2")
    for split in ("train", "test"):
        if split not in manifest.splits or manifest.splits[split].total == 0:
            raise TrainingError(f"dataset {t.dataset} has no {split!r} examples")
    per_worker = examples_per_worker(manifest, "train", t.num_workers)  # DatasetError if too few shards
    if min(per_worker) == 0:
        raise TrainingError(
            f"with {t.num_workers} workers some worker gets no training examples ({per_worker}); "
            "use fewer workers or prepare the dataset with a smaller data.shard_size"
        )
    steps = max(1, math.ceil(min(per_worker) / t.batch_size))
    val = manifest.splits.get("val")
    val_steps, val_sharded = 0, False
    if val is not None and val.total > 0:
        nonempty = [s for s in val.shards if s.count > 0]
        if len(val.shards) >= t.num_workers and len(nonempty) == len(val.shards):
            val_sharded = True
            val_steps = max(1, math.ceil(min(examples_per_worker(manifest, "val", t.num_workers)) / t.batch_size))
        else:  # too few val shards to split: every worker validates on all of it
            val_steps = max(1, math.ceil(val.total / t.batch_size))
    weights = _absolute_if_local(t.weights)  # a missing local file: build_model uses Keras's ImageNet download
    if check_weights_file:
        check_weights(cfg.model_copy(update={"train": t.model_copy(update={"weights": weights})}), manifest.num_classes)
    epochs_ft = t.fine_tune_epochs if t.fine_tune_blocks > 0 else 0
    return TrainPlan(
        run_name=name,
        fingerprint=fingerprint(cfg, manifest.dataset_version),
        dataset_version=manifest.dataset_version,
        class_names=list(manifest.class_names),
        weights=weights,
        batch_size=t.batch_size,
        steps_per_epoch=steps,
        val_steps=val_steps,
        val_sharded=val_sharded,
        epochs_head=t.epochs,
        epochs_fine_tune=epochs_ft,
        train_examples_per_worker=per_worker,
        test_examples=manifest.splits["test"].total,
    )


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "local"  # "local": never attach to a stray cluster
        log.info("connecting to Ray at %s", address if address != "local" else "(new local cluster)")
        from bloodcnn import lifecycle

        if lifecycle.active() is not None:
            lifecycle.keep_handlers_in_ray()  # a guarded command keeps its SIGTERM handler
        ray.init(address=address, log_to_driver=True)
        lifecycle.reinstall()


def worker_resources(cfg: AppConfig) -> dict[str, float]:
    t = cfg.train
    res = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        res["GPU"] = float(t.gpus_per_worker or 1.0)
    return res


def check_cluster(cfg: AppConfig) -> None:
    """Fail fast when the cluster can never place ``num_workers`` workers of the requested size.

    Without an autoscaler: count how many workers fit on the alive nodes' total resources.
    With an autoscaler: compare against its maximum cluster size. A cluster that can place
    them but is busy is handled by the placement timeout instead.
    """
    import ray

    t = cfg.train
    need = worker_resources(cfg)
    auto_max: dict[str, float] | None = None
    try:
        from ray._private.state import state as _state

        auto_max = _state.get_max_resources_from_cluster_config() or None
    except Exception:  # private API: absent or changed -> treat as a fixed-size cluster
        auto_max = None
    if auto_max:
        for key, amount in need.items():
            if amount * t.num_workers > auto_max.get(key, 0):
                raise ClusterResourcesError(
                    f"{t.num_workers} workers x {need} need {key}={amount * t.num_workers:g}, but the cluster "
                    f"can grow to at most {key}={auto_max.get(key, 0):g}; lower train.num_workers or the "
                    "per-worker resources"
                )
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    placeable = 0
    for res in nodes:
        placeable += int(min(math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in need.items()))
    if placeable < t.num_workers:
        total = ray.cluster_resources()
        have = {k: total.get(k, 0.0) for k in need}
        raise ClusterResourcesError(
            f"the Ray cluster cannot place {t.num_workers} training worker(s) of {need} each: only "
            f"{placeable} fit on its {len(nodes)} node(s) (cluster total {have}). Lower train.num_workers "
            "or train.cpus_per_worker/gpus_per_worker"
            + (", or set train.use_gpu=false" if t.use_gpu and have.get("GPU", 0) == 0 else "")
            + ", or add nodes."
        )


# ---------------------------------------------------------------------------------------------
# run bookkeeping on storage


def run_uri(cfg: AppConfig, run_name: str) -> str:
    return storage.join(cfg.train.storage_path, run_name)


def _read_run_file(cfg: AppConfig, run_name: str) -> dict[str, Any] | None:
    uri = storage.join(run_uri(cfg, run_name), RUN_FILE)
    try:
        return json.loads(storage.read_bytes(uri, cfg.storage))
    except storage.ObjectNotFound:
        return None
    except (ValueError, UnicodeDecodeError):
        log.warning("ignoring unreadable %s", uri)
        return None


def _write_run_file(cfg: AppConfig, run_name: str, record: dict[str, Any]) -> None:
    folder = run_uri(cfg, run_name)
    uri = storage.join(folder, RUN_FILE)
    storage.store_for(folder, cfg.storage).ensure_container(folder)
    storage.write_bytes(uri, json.dumps(record, indent=1).encode(), cfg.storage)


def _storage_filesystem(storage_path: str):
    """(path, pyarrow filesystem) for Ray's RunConfig; S3 endpoint/region from the AWS_* env.

    Credentials are *not* put in the filesystem object (it is pickled to the Ray controller and
    workers); each process finds them in its own environment through the AWS chain.
    """
    if not storage.is_s3(storage_path):
        path = Path(storage_path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    fs = pyarrow.fs.S3FileSystem(
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=5), **kwargs
    )
    return storage_path[len("s3://"):].rstrip("/"), fs


def _stage_weights(cfg: AppConfig, plan: TrainPlan) -> str:
    """A local weights file exists on this machine only: with S3 run storage, copy it next to the
    run's checkpoints so that workers on every node can fetch it."""
    from bloodcnn.model import missing_weights_file

    weights = plan.weights
    if weights in ("imagenet", "none", "") or storage.is_s3(weights) or not storage.is_s3(cfg.train.storage_path):
        return weights
    if missing_weights_file(weights):
        return weights  # every worker falls back to Keras's ImageNet download, as the driver did
    target = storage.join(run_uri(cfg, plan.run_name), "weights", Path(weights).name)
    store = storage.store_for(target, cfg.storage)
    if not (store.exists(target) and store.size(target) == Path(weights).stat().st_size):
        store.upload_file(weights, target)
    return target


# ---------------------------------------------------------------------------------------------
# Ray Train


def build_trainer(cfg: AppConfig, plan: TrainPlan, board=None):
    """The ``TensorflowTrainer`` for this config and plan (not started); rank 0 reports its
    progress to ``board`` (a ``progress.ProgressBoard`` actor) when given."""
    from ray.train import CheckpointConfig
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.tensorflow.tensorflow_trainer import TensorflowTrainer

    from bloodcnn.train.loop import train_loop_per_worker

    t = cfg.train
    # worker placement waits at most placement_timeout_s, then fails (no endless retries)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(t.placement_timeout_s)
    res = worker_resources(cfg)
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=res)
    path, fs = _storage_filesystem(t.storage_path)
    run_config = RunConfig(
        name=plan.run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=t.max_failures, controller_failure_limit=0),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    app = cfg.model_copy(deep=True)
    app.train.dataset = _absolute_if_local(app.train.dataset)
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"app": app.model_dump(), "plan": asdict(plan), "progress": board},
        scaling_config=scaling,
        run_config=run_config,
    )


def _fit(trainer, plan: TrainPlan, cfg: AppConfig, view=None):
    """``trainer.fit()`` in a helper thread, while this thread draws the workers' progress.

    Why a thread: Ray Train's ``fit()`` installs its own SIGINT handler when it runs in the main
    thread, and that handler outlives it (a Ctrl-C after training then only "aborts" a finished
    run). In a helper thread it installs none, and this thread stays responsive to signals: an
    interrupt propagates from here while the caller stops Ray, which ends ``fit()`` too.
    """
    from ray.train import TrainingFailedError

    from bloodcnn import lifecycle

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="bloodcnn-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
            if view is not None:
                view.poll()
        if view is not None:
            view.poll()
    finally:
        if view is not None:
            view.close()
        lifecycle.reinstall()
    exc = box.get("error")
    if exc is None:
        return box["result"]
    if not isinstance(exc, TrainingFailedError):
        raise exc
    text = str(exc)
    if "WorkerGroupStartupTimeoutError" in repr(exc) or "startup timed out" in text:
        raise ClusterResourcesError(
            f"training run {plan.run_name!r}: workers could not be placed within "
            f"train.placement_timeout_s={cfg.train.placement_timeout_s:g}s "
            f"({cfg.train.num_workers} x {worker_resources(cfg)}); the cluster is busy or too small"
        ) from exc
    if len(text) > 3000:
        text = text[:3000] + "\n... (truncated; the full errors are in the Ray logs)"
    raise TrainingError(
        f"training run {plan.run_name!r} failed (max_failures={cfg.train.max_failures}); it resumes from its "
        f"latest checkpoint when started again with the same run name: {text}"
    ) from exc


def _load_final_checkpoint(result, scratch: Path) -> tuple[Path, dict[str, Any], dict[int, dict[str, Any]]]:
    """Copy the final checkpoint's model locally; return (model path, state, {rank: worker info})."""
    from bloodcnn.train.loop import MODEL_FILE, STATE_FILE, WORKERS_DIR

    checkpoint = result.checkpoint
    if checkpoint is None:
        raise TrainingError("the training run finished without a checkpoint")
    d = Path(checkpoint.to_directory(str(scratch / "checkpoint")))
    state = json.loads((d / STATE_FILE).read_text())
    workers = {}
    for p in sorted((d / WORKERS_DIR).glob("rank-*.json")):
        info = json.loads(p.read_text())
        workers[int(info["rank"])] = info
    return d / MODEL_FILE, state, workers


def export_inference_model(checkpoint_model: Path, plan: TrainPlan, cfg: AppConfig, out: Path):
    """A clean float32 copy without optimizer state: what the registry stores and serving loads."""
    from bloodcnn.model import build_model, load_model

    trained = load_model(checkpoint_model)
    fresh = build_model(len(plan.class_names), cfg.train.image_size, "none", cfg.train.dropout)
    # same flags on both -> same weight order (Keras lists trainable weights first)
    trained.trainable = False
    fresh.trainable = False
    fresh.set_weights(trained.get_weights())
    fresh.save(str(out))  # not compiled: no optimizer state in the file
    return fresh


def gates_passed(metrics: dict[str, Any], cfg: AppConfig) -> tuple[bool, list[str]]:
    g = cfg.registry.gates
    failed = []
    if (metrics.get("accuracy") or 0.0) < g.min_accuracy:
        failed.append(f"accuracy {metrics.get('accuracy', 0):.4f} < {g.min_accuracy}")
    if (metrics.get("macro_f1") or 0.0) < g.min_macro_f1:
        failed.append(f"macro_f1 {metrics.get('macro_f1', 0):.4f} < {g.min_macro_f1}")
    return not failed, failed


def run_training(
    cfg: AppConfig,
    *,
    run_name: str | None = None,
    progress: bool = True,
    on_stage: Callable[[str, dict[str, Any]], None] | None = None,
    _fault: dict[str, Any] | None = None,
) -> ModelMetadata:
    """Train, evaluate, register (and maybe promote) a model; returns its registry metadata.

    ``run_name`` (default ``train.run_name``) names the run: submitting the same name again
    resumes it from its latest checkpoint, or returns the registered model if it completed.
    ``progress`` draws bars on ``bloodcnn.console`` (training per epoch as the workers report it,
    model load, evaluation). ``on_stage(name, info)`` is told when a stage begins: "reused"
    (``info``: version, run_name), "training" (run_name, steps, epochs), "evaluation".
    ``_fault`` is for tests only (kill a worker once, see ``loop._fault_callback``).
    """
    stage = on_stage or (lambda name, info: None)
    started = time.time()
    driver_tensorflow_on_cpu()
    plan = plan_training(cfg, run_name=run_name, check_weights_file=False)
    cfg = cfg.model_copy(deep=True)
    cfg.train.run_name = plan.run_name
    plan.fault = _fault
    registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
    registry.store.ensure_container(registry.root)  # S3 reachable and writable, before any worker

    previous = _read_run_file(cfg, plan.run_name)
    if previous is not None and previous.get("fingerprint") != plan.fingerprint:
        raise TrainingError(
            f"run name {plan.run_name!r} is already used at {run_uri(cfg, plan.run_name)} by a run with another "
            "config or dataset; pass a new run name (--run-name / train.run_name) to train a new model"
        )
    if previous is not None and previous.get("status") == "completed":
        try:
            meta = registry.get(previous["version"])
        except Exception:
            log.warning("run %s completed but its model %s is not in the registry: evaluating again",
                        plan.run_name, previous.get("version"))
        else:
            log.warning("run %s already completed and registered as %s/%s; nothing to train "
                        "(pass a new run name to train again)", plan.run_name, meta.model_name, meta.version)
            _summary(cfg, registry, meta, promoted=registry.production() == meta.version,
                     reasons=gates_passed(meta.metrics, cfg)[1])
            stage("reused", {"version": meta.version, "run_name": plan.run_name})
            return meta

    check_weights(cfg.model_copy(update={"train": cfg.train.model_copy(update={"weights": plan.weights})}),
                  len(plan.class_names))
    plan.weights = _stage_weights(cfg, plan)
    _ensure_ray()
    check_cluster(cfg)
    _write_run_file(cfg, plan.run_name, {
        "status": "running", "fingerprint": plan.fingerprint, "dataset_version": plan.dataset_version,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    log.info(
        "training run %s: %d worker(s) x batch %d, %d steps/epoch, %d + %d epochs, dataset %s (%s), "
        "checkpoints in %s", plan.run_name, cfg.train.num_workers, plan.batch_size, plan.steps_per_epoch,
        plan.epochs_head, plan.epochs_fine_tune, cfg.train.dataset, plan.dataset_version, run_uri(cfg, plan.run_name),
    )
    stage("training", {"run_name": plan.run_name, "steps": plan.steps_per_epoch,
                       "epochs": plan.epochs_head + plan.epochs_fine_tune, "resuming": previous is not None})
    from bloodcnn.train import progress as train_progress

    import ray

    board = train_progress.create_board()
    view = train_progress.DriverView(board, show=progress)
    trainer = build_trainer(cfg, plan, board)
    fit_started = time.time()
    try:
        result = _fit(trainer, plan, cfg, view)
    finally:
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001 - Ray already gone (interrupted)
            pass
    fit_wall = time.time() - fit_started
    log.info("training run %s finished in %.1fs; evaluating the final model on the test split",
             plan.run_name, fit_wall)
    stage("evaluation", {"run_name": plan.run_name})

    from bloodcnn import model_card
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.openvino_runtime import export_for_registration
    from bloodcnn.train.evaluate import evaluate_model
    from bloodcnn.train.plots import confusion_matrix_png, reliability_png, training_curves_png

    with tempfile.TemporaryDirectory(prefix="bloodcnn-train-") as tmp:
        tmp = Path(tmp)
        from bloodcnn import console

        with console.bar(desc="loading the trained model", total=2, unit="step", disable=not progress,
                         mininterval=0) as load_bar:
            ckpt_model, state, workers = _load_final_checkpoint(result, tmp)
            load_bar.update()
            model_path = tmp / "model.keras"
            model = export_inference_model(ckpt_model, plan, cfg, model_path)
            load_bar.update()
        manifest = load_manifest(cfg.train.dataset, cfg.storage)  # for the evaluation and the model card
        report, calib = evaluate_model(model, cfg, class_names=plan.class_names, manifest=manifest,
                                       progress=progress, calibrate=True,
                                       test_time_augmentation=cfg.train.test_time_augmentation)
        history = state["history"]
        ips = [h["images_per_s"] for h in history if h.get("images_per_s")]
        steady = ips[1:] if len(ips) > 1 else ips
        report["training"] = {
            "run_name": plan.run_name,
            "checkpoint": storage.join(run_uri(cfg, plan.run_name), Path(result.checkpoint.path).name),
            "epochs_completed": state["epochs_done"],
            "epochs_head": plan.epochs_head,
            "epochs_fine_tune": plan.epochs_fine_tune,
            "resumed_from_epoch": state.get("resumed_from_epoch", 0),
            "num_workers": state.get("world_size", cfg.train.num_workers),
            "global_batch_size": state.get("global_batch"),
            "mixed_precision": state.get("mixed_precision", False),
            "images_per_s": sum(steady) / len(steady) if steady else None,
            "final_val_accuracy": history[-1].get("val_accuracy") if history else None,
            "wall_time_s": round(time.time() - started, 1),
            "fit_wall_time_s": round(fit_wall, 1),
            "worker_nodes": {str(r): w["node_id"] for r, w in workers.items()},
            "history": history,
        }
        cm_png = tmp / "confusion_matrix.png"
        curves_png = tmp / "training_curves.png"
        confusion_matrix_png(report["confusion_matrix"], plan.class_names, cm_png,
                             title=f"{cfg.registry.model_name} {plan.run_name}: test split")
        training_curves_png(history, plan.epochs_head, curves_png, title=f"{plan.run_name}")
        artifacts = {"metrics.json": json.dumps(report, indent=2).encode(), "confusion_matrix.png": cm_png,
                     "training_curves.png": curves_png}
        if "calibration" in report:
            artifacts["reliability.png"] = reliability_png(report["calibration"], tmp / "reliability.png",
                                                           title=f"{plan.run_name}: test split")
        metadata = {
            "dataset_version": plan.dataset_version,
            "class_names": plan.class_names,
            "image_size": cfg.train.image_size,
            "test_time_augmentation": cfg.train.test_time_augmentation,
            "metrics": report,
            "config": cfg.model_dump(),
            "code_version": code_version(),
            "calibration": calib.model_dump() if calib else None,
        }
        version = registry.new_version()
        card_md, card_html = model_card.render(
            {**metadata, "model_name": registry.model_name, "version": version,
             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            manifest)
        artifacts.update({"model_card.md": card_md, "model_card.html": card_html})
        with console.bar(desc="OpenVINO export and precision gate (val split)", total=1, unit="step",
                         disable=not progress or cfg.registry.export.runtime == "none", mininterval=0) as bar:
            runtime = export_for_registration(model_path, cfg, cfg.train.image_size, tmp / "export", manifest)
            bar.update()
        meta = registry.register(model_path, metadata, artifacts=artifacts, version=version,
                                 runtime=(runtime, tmp / "export") if runtime else None)
    passed, reasons = gates_passed(report, cfg)
    promoted = False
    if cfg.registry.auto_promote and passed:
        registry.promote(meta.version)
        promoted = True
    _write_run_file(cfg, plan.run_name, {
        "status": "completed", "fingerprint": plan.fingerprint, "dataset_version": plan.dataset_version,
        "version": meta.version, "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    _summary(cfg, registry, meta, promoted=promoted, reasons=reasons)
    return meta


def _summary(cfg: AppConfig, registry: Registry, meta: ModelMetadata, *, promoted: bool, reasons: list[str]) -> None:
    base = storage.join(registry.root, meta.version)
    m = meta.metrics
    training = m.get("training", {})
    lines = [
        f"model {meta.model_name}/{meta.version}: accuracy={m.get('accuracy', float('nan')):.4f} "
        f"macro_f1={m.get('macro_f1', float('nan')):.4f} on {m.get('num_examples', '?')} test images "
        f"(dataset {meta.dataset_version})",
        f"  model:    {storage.join(base, meta.model_file)}",
        f"  report:   {storage.join(base, 'metrics.json')}",
        f"  plots:    {storage.join(base, 'confusion_matrix.png')}, {storage.join(base, 'training_curves.png')}",
        f"  run:      {training.get('run_name')} ({training.get('epochs_completed')} epochs, "
        f"{training.get('num_workers')} worker(s), "
        + (f"{training['images_per_s']:.1f} img/s, " if training.get("images_per_s") else "")
        + f"checkpoints in {run_uri(cfg, training.get('run_name') or cfg.train.run_name)})",
    ]
    rt = meta.runtime
    lines.append(f"  runtime:  OpenVINO {rt.precision} ({rt.reason})" if rt and rt.precision else
                 f"  runtime:  TensorFlow ({rt.reason if rt else 'no OpenVINO export'})")
    if promoted:
        lines.append(f"  promoted to production ({storage.join(registry.root, 'production')})")
    elif not cfg.registry.auto_promote:
        lines.append("  not promoted (registry.auto_promote is off): bloodcnn models promote " + meta.version)
    else:
        lines.append("  not promoted: " + ("; ".join(reasons) or "gates not met"))
    log.info("\n".join(lines))
