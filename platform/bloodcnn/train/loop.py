"""The per-worker training loop that Ray Train runs on every worker.

Each worker joins a ``MultiWorkerMirroredStrategy`` (Ray Train writes ``TF_CONFIG``), reads its
own disjoint TFRecord shards, and trains in two phases: the classifier head on a frozen
MobileNetV2, then the top ``fine_tune_blocks`` blocks at a lower learning rate. After every
epoch every rank saves the model (saving on rank 0 alone deadlocks MWMS); rank 0 reports the
full checkpoint (``model.keras`` with optimizer state + ``state.json``), the other ranks report
only a small ``workers/rank-<i>.json`` that Ray merges into the same checkpoint folder.

On a restart (a worker died, or the same run name was submitted again) the loop restores the
model, its optimizer and the epoch counter from ``ray.train.get_checkpoint()`` and goes on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
WORKERS_DIR = "workers"
PHASE_HEAD = "head"
PHASE_FINE_TUNE = "fine_tune"


def _say(message: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver's console)."""
    sys.stdout.write(f"[bloodcnn] {message}\n")
    sys.stdout.flush()


def _configure_threads(cpus: float) -> None:
    """Keep TF to the worker's CPU share (several workers may share one node)."""
    import tensorflow as tf

    n = max(1, int(math.floor(cpus)))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, min(n, 4)))
    except RuntimeError:  # TF already initialised in this process (e.g. local mode)
        pass


def _strategy(world: int):
    import tensorflow as tf

    if world > 1:
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _learning_rate(peak: float, schedule: str, steps: int, warmup_steps: int):
    """The rate for one phase of ``steps`` steps.

    Cosine: a linear warm-up (unfreezing blocks under a full rate jolts the pretrained weights),
    then a decay to 0, so the phase ends on settled weights rather than on the noise of a
    constant rate. The step counter is the optimizer's, which checkpoints restore.
    """
    import tf_keras as keras

    if schedule == "constant" or steps <= 0:
        return peak
    warmup_steps = min(warmup_steps, steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 100 if warmup_steps else peak,
        decay_steps=steps - warmup_steps,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def _compile(model, learning_rate, label_smoothing: float) -> None:
    import tf_keras as keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def _restore(checkpoint) -> tuple[dict[str, Any], str, str] | None:
    """Download the latest checkpoint: (state, local model path, scratch dir) or None.

    Each worker downloads into its own scratch dir: ``Checkpoint.as_directory()`` shares one temp
    dir between the workers of a node and races (one deletes it while another waits on its lock).
    """
    if checkpoint is None:
        return None
    scratch = tempfile.mkdtemp(prefix="bloodcnn-restore-")
    d = Path(checkpoint.to_directory(str(Path(scratch) / "ckpt")))
    state_path = d / STATE_FILE
    model_path = d / MODEL_FILE
    if not (state_path.is_file() and model_path.is_file()):
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(f"checkpoint {checkpoint.path} lacks {STATE_FILE} or {MODEL_FILE}")
    state = json.loads(state_path.read_text())
    return state, str(model_path), scratch


def _fault_callback(fault: dict[str, Any] | None, rank: int):
    """Test-only fault injection: SIGKILL this worker once, mid-epoch (guarded by a marker file)."""
    import tf_keras as keras

    class KillOnce(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch = -1

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (
                fault
                and rank == int(fault.get("rank", 1))
                and self.epoch + 1 == int(fault.get("epoch", 2))
                and batch + 1 >= int(fault.get("batch", 1))
            ):
                marker = Path(fault["marker"])
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(json.dumps({"rank": rank, "epoch": self.epoch + 1, "pid": os.getpid()}))
                    _say(f"fault injection: killing rank {rank} (pid {os.getpid()}) in epoch {self.epoch + 1}")
                    os.kill(os.getpid(), signal.SIGKILL)

    return KillOnce()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: ``config`` = {"app": AppConfig dict, "plan": the driver's TrainPlan dict}."""
    from bloodcnn.config import AppConfig

    app = AppConfig.model_validate(config["app"])
    plan = config["plan"]
    board = config.get("progress")  # the driver's ProgressBoard actor (rank 0 reports to it), or None
    t = app.train
    _configure_threads(t.cpus_per_worker)

    import ray.train
    import tensorflow as tf
    import tf_keras as keras

    from bloodcnn.data.reader import load_manifest, make_dataset
    from bloodcnn.model import build_model, load_model, unfreeze_top_blocks

    tf.get_logger().setLevel("WARNING")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    mixed = bool(gpus) and plan.get("mixed_precision", True)
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = _strategy(world)
    keras.utils.set_random_seed(t.seed)

    manifest = load_manifest(t.dataset, app.storage)
    batch = int(plan["batch_size"])  # per worker
    local_replicas = max(1, strategy.num_replicas_in_sync // world)
    per_replica = max(1, batch // local_replicas)
    global_batch = per_replica * strategy.num_replicas_in_sync
    steps = int(plan["steps_per_epoch"])
    val_steps = int(plan["val_steps"])
    epochs_head, epochs_ft = int(plan["epochs_head"]), int(plan["epochs_fine_tune"])
    total_epochs = epochs_head + epochs_ft
    lr_scale = global_batch / t.batch_size

    def phase_rate(peak: float, epochs: int, warmup_epochs: float = 0.0):
        warmup = int(round(warmup_epochs * steps))
        return _learning_rate(peak * lr_scale, t.lr_schedule, steps * epochs, warmup)

    class_weights = manifest.balanced_class_weights() if t.class_weighting == "balanced" else None

    def train_fn(input_context):
        return make_dataset(
            t.dataset, "train", batch_size=per_replica, image_size=t.image_size,
            worker_index=rank, num_workers=world, shuffle=True, augment=t.augment_online,
            repeat=True, seed=t.seed * 1000 + rank + 17 * attempt_seed, storage_config=app.storage,
            manifest=manifest, class_weights=class_weights, memory_cache_mb=t.cache_images_mb,
        )

    def val_fn(input_context):
        sharded = plan["val_sharded"]
        return make_dataset(
            t.dataset, "val", batch_size=per_replica, image_size=t.image_size,
            worker_index=rank if sharded else 0, num_workers=world if sharded else 1,
            repeat=True, storage_config=app.storage, manifest=manifest, memory_cache_mb=t.cache_images_mb,
        )

    restored = _restore(ray.train.get_checkpoint())
    history: list[dict[str, Any]] = []
    done = 0
    phase = PHASE_HEAD
    attempt_seed = 0
    with strategy.scope():
        if restored is not None:
            state, local_model, scratch = restored
            model = load_model(local_model, compile=True)
            shutil.rmtree(scratch, ignore_errors=True)
            history = state["history"]
            done = int(state["epochs_done"])
            phase = state["phase"]
            attempt_seed = done + 1
            if rank == 0:
                _say(f"resuming run {plan['run_name']} after epoch {done} of {total_epochs} ({phase} phase)")
        else:
            model = build_model(manifest.num_classes, t.image_size, plan["weights"], t.dropout,
                                cache_dir=plan.get("cache_dir"))
            _compile(model, phase_rate(t.learning_rate, epochs_head), t.label_smoothing)
    resumed_from = done

    train_data = strategy.distribute_datasets_from_function(train_fn)
    val_data = strategy.distribute_datasets_from_function(val_fn) if val_steps > 0 else None

    class Report(keras.callbacks.Callback):
        """Checkpoint + ray.train.report after every epoch; a log line on rank 0."""

        def __init__(self, phase_name: str):
            super().__init__()
            self.phase_name = phase_name
            self.t0 = self.t_train = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()
            self.t_train = 0.0

        def on_test_begin(self, logs=None):
            if not self.t_train:
                self.t_train = time.perf_counter() - self.t0

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            train_s = self.t_train or (time.perf_counter() - self.t0)
            images = steps * global_batch
            row = {
                "epoch": epoch + 1,
                "phase": self.phase_name,
                "loss": float(logs.get("loss", float("nan"))),
                "accuracy": float(logs.get("accuracy", float("nan"))),
                "val_loss": float(logs["val_loss"]) if "val_loss" in logs else None,
                "val_accuracy": float(logs["val_accuracy"]) if "val_accuracy" in logs else None,
                "images_per_s": images / train_s if train_s > 0 else None,
                "train_s": train_s,
                "epoch_s": time.perf_counter() - self.t0,
            }
            history.append(row)
            report_dir = Path(tempfile.mkdtemp(prefix="bloodcnn-ckpt-"))
            scratch = Path(tempfile.mkdtemp(prefix="bloodcnn-ckpt-scratch-"))
            try:
                # every rank saves (MWMS reads variables collectively); only rank 0's file is kept
                self.model.save(str((report_dir if rank == 0 else scratch) / MODEL_FILE))
                if rank == 0:
                    state = {
                        "epochs_done": epoch + 1,
                        "total_epochs": total_epochs,
                        "phase": self.phase_name,
                        "history": history,
                        "run_name": plan["run_name"],
                        "fingerprint": plan["fingerprint"],
                        "global_batch": global_batch,
                        "world_size": world,
                        "mixed_precision": mixed,
                        "resumed_from_epoch": resumed_from,
                    }
                    (report_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
                (report_dir / WORKERS_DIR).mkdir()
                (report_dir / WORKERS_DIR / f"rank-{rank}.json").write_text(json.dumps({
                    "rank": rank, "node_id": node_id, "hostname": socket.gethostname(), "pid": os.getpid(),
                    "gpus": len(gpus), "epoch": epoch + 1,
                }))
                metrics = {k: v for k, v in row.items() if v is not None}
                metrics.update(epochs_done=epoch + 1, total_epochs=total_epochs,
                               resumed_from_epoch=resumed_from, world_size=world, node_id=node_id)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(str(report_dir)),
                    checkpoint_dir_name=f"epoch-{epoch + 1:03d}",
                )
                # The controller commits a report (and its run snapshot on storage) when it next
                # polls the workers; wait for that, so a crash from here on resumes from this epoch.
                try:
                    ray.train.get_all_reported_checkpoints(
                        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
                    )
                except Exception as exc:  # noqa: BLE001 - a slow controller must not stop training
                    _say(f"warning: checkpoint of epoch {epoch + 1} not confirmed yet: {exc}")
            finally:
                shutil.rmtree(report_dir, ignore_errors=True)
                shutil.rmtree(scratch, ignore_errors=True)
            if rank == 0 and board is not None:
                from bloodcnn.train.progress import epoch_done

                epoch_done(board, row, total_epochs)
            if rank == 0:
                val = (f" val_loss={row['val_loss']:.4f} val_acc={row['val_accuracy']:.4f}"
                       if row["val_loss"] is not None else "")
                ips = f"{row['images_per_s']:.1f}" if row["images_per_s"] else "-"
                _say(f"epoch {epoch + 1}/{total_epochs} ({self.phase_name}) "
                     f"loss={row['loss']:.4f} acc={row['accuracy']:.4f}{val} "
                     f"{ips} img/s ({world} worker(s), {row['epoch_s']:.1f}s)")

    def fit(phase_name: str, initial_epoch: int, epochs: int) -> None:
        callbacks = [Report(phase_name)]
        if rank == 0 and board is not None:
            from bloodcnn.train.progress import worker_callback

            # first, so its "saving checkpoint" goes out before Report saves it
            callbacks.insert(0, worker_callback(board, steps=steps, global_batch=global_batch,
                                                total_epochs=total_epochs, phase=phase_name))
        if plan.get("fault"):
            callbacks.append(_fault_callback(plan["fault"], rank))
        model.fit(
            train_data, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
            validation_data=val_data, validation_steps=val_steps if val_data is not None else None,
            callbacks=callbacks, verbose=0,
        )

    if done < epochs_head:
        fit(PHASE_HEAD, done, epochs_head)
        done = epochs_head
        phase = PHASE_HEAD
    if epochs_ft > 0 and done < total_epochs:
        if phase != PHASE_FINE_TUNE:
            with strategy.scope():
                trainable = unfreeze_top_blocks(model, t.fine_tune_blocks)
                _compile(model, phase_rate(t.fine_tune_learning_rate, epochs_ft, t.warmup_epochs), t.label_smoothing)
            if rank == 0:
                _say(f"fine-tuning the top {t.fine_tune_blocks} block(s): {trainable} trainable layers in the backbone")
        fit(PHASE_FINE_TUNE, done, total_epochs)
