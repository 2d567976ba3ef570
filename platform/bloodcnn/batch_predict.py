"""Batch scoring on Ray Data: a folder or S3 prefix of images -> one Parquet file of predictions.

Why it looks the way it does:

* **Checked before anything starts.** The input is listed, the output checked and the model
  version resolved in the driver before Ray starts, so an empty folder, a missing path, wrong S3
  credentials or an unknown version is a one-line error, fast, and nothing is written. The
  version is resolved once (``production`` -> ``v...``), so every actor scores with the same one
  even if someone promotes another meanwhile.
* **Serving's code, not a copy.** Each actor of the pool loads the model once with
  :func:`bloodcnn.loaded_model.load_version`, as serving replicas do (registry fetch with the
  sha256 check, shape checks, OpenVINO at the version's gated precision or the compiled
  ``tf.function``: ``serve.runtime``), decodes with :func:`bloodcnn.inference.decode_image`,
  resizes a batch at a time with :func:`bloodcnn.inference.preprocess_many` (the training
  resize), and turns probabilities into answers with :func:`bloodcnn.calibration.answer`
  (temperature, conformal set, uncertain flag), the function serving answers with.
* **Streaming.** ``paths -> read bytes (tasks, threads for S3) -> score (actor pool)``; the driver
  takes the result blocks as they come (in input order), writes them to a temporary Parquet file
  and counts them for the progress bar and the summary. Image bytes never reach the driver.
* **Bad images are rows.** A file that cannot be read or decoded gets a row with ``error`` (a
  stable code) and ``error_message``, and null predictions; it never stops the run.
* **Atomic output.** The Parquet file is renamed into place (local) or uploaded in one PUT or a
  completed multipart upload (S3) only when it is whole; a rerun replaces it, a failed or
  interrupted run leaves the previous file (or none). The class-count plot is written next to it.

Output columns: ``path``, ``sha256``, ``class``, ``confidence``, one float64 column per class named
after the class (its probability, temperature-scaled for calibrated versions), ``prediction_set``
(list of class names, most probable first; null for versions without calibration),
``uncertain``, ``uncertainty_rule``, ``model_version``, ``error``, ``error_message``. The schema
metadata holds ``bloodcnn.class_names`` (JSON, label order) and ``bloodcnn.model``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bloodcnn import console, storage
from bloodcnn.data import engine
from bloodcnn.config import AppConfig, StorageConfig
from bloodcnn.registry import ModelMetadata, Registry

log = logging.getLogger("bloodcnn.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: files above this are not read at all (an error row instead): no image of a smear is this large
MAX_FILE_BYTES = 256 * 1024 * 1024
#: CPUs the read tasks ask for: they wait on disk or S3, the actors do the work
READ_CPUS = 0.25
READ_THREADS = 8
FIXED_COLUMNS = ("path", "sha256", "class", "confidence", "prediction_set", "uncertain", "uncertainty_rule",
                 "model_version", "error", "error_message")
DEFAULT_LOG = "out/predict/predict.log"


class PredictError(RuntimeError):
    """Batch scoring cannot start or failed; the message is one line for the user."""


@dataclass
class Plan:
    """What a run will do, all checked before Ray starts."""

    input: str
    output: str
    files: list[str]
    ignored: int
    meta: ModelMetadata
    requested: str
    registry_uri: str
    storage: StorageConfig
    max_pixels: int
    uncertain_rule: str
    uncertain_threshold: float
    runtime: str = "auto"

    @property
    def plot(self) -> str:
        return plot_uri(self.output)


@dataclass
class Summary:
    rows: int = 0
    classes: Counter = field(default_factory=Counter)
    uncertain: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    #: when the first results arrived and how many: the rate after it leaves out the model loading
    first_at: float | None = None
    first_rows: int = 0

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def loaded_images_per_s(self) -> float | None:
        after = self.seconds - (self.first_at or 0.0)
        return (self.rows - self.first_rows) / after if self.first_at is not None and after > 0.05 else None


# --------------------------------------------------------------------------- checks (driver)


def plot_uri(output: str) -> str:
    """``.../predictions.parquet`` -> ``.../predictions.classes.png``."""
    return output[: -len(".parquet")] + ".classes.png"


def list_images(uri: str, config: StorageConfig | None = None) -> tuple[list[str], int]:
    """Image files under a folder (recursively) or an S3 prefix, sorted, and how many other files
    were ignored. Raises PredictError for a missing folder or when no image is found."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        everything = list(storage.store_for(uri, config).list(uri))
        where = f"s3://{bucket}/{key.rstrip('/')}/" if key else f"s3://{bucket}/"
    else:
        root = Path(uri).expanduser()
        if not root.exists():
            raise PredictError(f"input folder not found: {uri}")
        if not root.is_dir():
            raise PredictError(f"input is not a folder: {uri} (give the folder that holds the images)")
        everything = list(storage.LocalStore().list(str(root.resolve())))
        where = str(root)
    images = sorted(u for u in everything if u.lower().endswith(IMAGE_SUFFIXES))
    if not images:
        other = f" ({len(everything)} other file(s) ignored)" if everything else ""
        raise PredictError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {where}{other}")
    return images, len(everything) - len(images)


def check_output(uri: str, config: StorageConfig | None = None) -> None:
    """The output must be a .parquet file we may write: a folder in its place, or S3 that refuses
    us, is an error now rather than after the whole run."""
    if not uri.endswith(".parquet"):
        raise PredictError(f"output must be a .parquet file, e.g. {storage.join(uri, 'predictions.parquet')}")
    if storage.is_s3(uri):
        storage.store_for(uri, config).exists(uri)  # raises StorageError on credentials / endpoint
    elif Path(uri).is_dir():
        raise PredictError(f"output {uri} is a folder; name the file, e.g. {storage.join(uri, 'predictions.parquet')}")


def plan(cfg: AppConfig, input_uri: str, output: str, model: str = "production") -> Plan:
    """Everything a run needs, checked: input listed, output writable, model version resolved."""
    if not storage.is_s3(output):
        output = str(Path(output).expanduser().resolve())
    check_output(output, cfg.storage)
    files, ignored = list_images(input_uri, cfg.storage)
    registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
    meta = registry.get(registry.resolve(model))
    return Plan(input=input_uri, output=output, files=files, ignored=ignored, meta=meta, requested=model,
                registry_uri=cfg.registry.uri, storage=cfg.storage, max_pixels=cfg.serve.max_pixels,
                uncertain_rule=cfg.serve.uncertain_rule, uncertain_threshold=cfg.serve.uncertain_threshold,
                runtime=cfg.serve.runtime)


# --------------------------------------------------------------------------- Ray Data stages


def _schema(class_names: list[str]):
    import pyarrow as pa

    clash = set(class_names) & set(FIXED_COLUMNS)
    if clash:
        raise PredictError(f"class name(s) {sorted(clash)} clash with the output's own columns")
    return pa.schema(
        [("path", pa.string()), ("sha256", pa.string()), ("class", pa.string()), ("confidence", pa.float64())]
        + [(name, pa.float64()) for name in class_names]
        + [("prediction_set", pa.list_(pa.string())), ("uncertain", pa.bool_()), ("uncertainty_rule", pa.string()),
           ("model_version", pa.string()), ("error", pa.string()), ("error_message", pa.string())]
    )


def _read_one(uri: str, config: StorageConfig, max_bytes: int) -> tuple[bytes | None, str | None, str | None, str | None]:
    """(bytes, sha256, error code, error message) of one file; a failure is a result, not a raise."""
    store = storage.store_for(uri, config)
    try:
        size = store.size(uri)
        if size > max_bytes:
            return None, None, "file_too_large", f"the file is {size} bytes, more than the limit of {max_bytes}"
        data = store.read_bytes(uri)
    except (storage.StorageError, OSError) as exc:
        return None, None, "unreadable", f"{type(exc).__name__}: {exc}"[:300]
    return data, hashlib.sha256(data).hexdigest(), None, None


def read_images(batch, storage_config: dict, max_bytes: int = MAX_FILE_BYTES):
    """Ray Data task: paths -> bytes, sha256 and read errors (threads: reads wait on I/O)."""
    import pyarrow as pa

    config = StorageConfig.model_validate(storage_config)
    paths = batch.column("path").to_pylist()
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        rows = list(pool.map(lambda p: _read_one(p, config, max_bytes), paths))
    data, sha, code, message = (list(c) for c in zip(*rows))
    return pa.table({"path": pa.array(paths, pa.string()), "data": pa.array(data, pa.binary()),
                     "sha256": pa.array(sha, pa.string()), "error": pa.array(code, pa.string()),
                     "error_message": pa.array(message, pa.string())})


class Scorer:
    """Ray Data actor: loads the model once (``load_version``, as serving does), then scores batches."""

    def __init__(self, registry_uri: str, model_name: str, version: str, storage_config: dict, batch_size: int,
                 max_pixels: int, uncertain_rule: str, uncertain_threshold: float, runtime: str = "auto",
                 threads: int | None = None):
        from bloodcnn.inference import set_max_pixels
        from bloodcnn.loaded_model import load_version

        set_max_pixels(max_pixels)
        self.max_pixels = max_pixels
        self.rule, self.threshold = uncertain_rule, uncertain_threshold
        self.cache = tempfile.mkdtemp(prefix="bloodcnn-predict-")
        registry = Registry(registry_uri, model_name, StorageConfig.model_validate(storage_config))
        self.model = load_version(registry, version, self.cache, batch_size, (registry_uri, model_name), runtime,
                                  threads)
        self.schema = _schema(self.model.class_names)

    def __del__(self):
        shutil.rmtree(getattr(self, "cache", ""), ignore_errors=True)

    def __call__(self, batch):
        from bloodcnn.inference import ImageError, decode_image, preprocess_many

        cur = self.model
        codes = batch.column("error").to_pylist()
        messages = batch.column("error_message").to_pylist()
        rgbs, where = [], []
        for i, data in enumerate(batch.column("data").to_pylist()):
            if codes[i] is not None:
                continue
            try:
                rgbs.append(decode_image(data, self.max_pixels))
                where.append(i)
            except ImageError as exc:
                codes[i], messages[i] = exc.code, exc.message
        answers: list[dict | None] = [None] * batch.num_rows
        if rgbs:
            probs = cur.predictor.predict(preprocess_many(rgbs, cur.image_size))
            for i, p in zip(where, probs):
                answers[i] = self.answer(p)
        return self.table(batch, answers, codes, messages)

    def answer(self, probs) -> dict:
        from bloodcnn import calibration

        return calibration.answer(probs, self.model.class_names, self.model.meta.calibration, self.rule,
                                  self.threshold)

    def table(self, batch, answers: list[dict | None], codes: list, messages: list):
        import pyarrow as pa

        def col(key: str) -> list:
            return [a[key] if a else None for a in answers]

        probs = [a["probabilities"] if a else {} for a in answers]
        columns = {"path": batch.column("path").to_pylist(), "sha256": batch.column("sha256").to_pylist(),
                   "class": col("class"),
                   "confidence": col("confidence"),
                   **{name: [p.get(name) for p in probs] for name in self.model.class_names},
                   "prediction_set": col("prediction_set"), "uncertain": col("uncertain"),
                   "uncertainty_rule": col("uncertainty_rule"),
                   "model_version": [self.model.version] * batch.num_rows, "error": codes, "error_message": messages}
        return pa.Table.from_pydict(columns, schema=self.schema)


def _actor_cpus(actors: int) -> tuple[float, int]:
    """CPUs per actor (one each, less when the actors would leave no room for two read tasks:
    actors holding every CPU starve the reads that feed them, the run would hang) and the
    runtime threads each gets: its share of the cluster's CPUs. One actor per CPU with one thread
    each beats fewer actors with more threads (they wait for each other's decode)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    cpus = math.floor(min(1.0, (total - 2 * READ_CPUS) / actors) * 100) / 100
    if cpus < 0.1:
        raise PredictError(f"--actors {actors} is too many for this Ray cluster's {total:g} CPU(s)")
    return cpus, max(1, round(total / actors))


def dataset(p: Plan, *, batch_size: int, actors: int):
    """The Ray Data pipeline: paths -> bytes (tasks) -> answers (a fixed pool of ``actors`` actors;
    ``compute=ActorPoolStrategy`` is what ``concurrency=`` became in Ray 2.51)."""
    import ray

    blocks = max(1, min(math.ceil(len(p.files) / batch_size), 2000))
    ds = ray.data.from_items([{"path": f} for f in p.files], override_num_blocks=blocks)
    ds = ds.map_batches(read_images, batch_size=batch_size, batch_format="pyarrow", num_cpus=READ_CPUS,
                        fn_kwargs={"storage_config": p.storage.model_dump()})
    cpus, threads = _actor_cpus(actors)
    return ds.map_batches(
        Scorer, batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        fn_constructor_kwargs={
            "registry_uri": p.registry_uri, "model_name": p.meta.model_name, "version": p.meta.version,
            "storage_config": p.storage.model_dump(), "batch_size": batch_size, "max_pixels": p.max_pixels,
            "uncertain_rule": p.uncertain_rule, "uncertain_threshold": p.uncertain_threshold,
            "runtime": p.runtime, "threads": threads,
        },
    )


def _cause(exc: BaseException) -> str:
    """The user's part of a Ray error: its innermost ``SomeError: message`` line."""
    text = str(exc).strip()
    for line in reversed(text.splitlines()):
        head, _, rest = line.strip().partition(":")
        if head.endswith(("Error", "Exception")) and " " not in head and rest:
            return f"{head.rsplit('.', 1)[-1]}:{rest}"[:400]  # RegistryError, not bloodcnn.registry.RegistryError
    return (text.splitlines() or [type(exc).__name__])[-1][:400]


# --------------------------------------------------------------------------- writing (driver)


def _count(summary: Summary, table) -> None:
    for cls, unc, err in zip(table.column("class").to_pylist(), table.column("uncertain").to_pylist(),
                             table.column("error").to_pylist()):
        summary.rows += 1
        if err is not None:
            summary.errors[err] += 1
        else:
            summary.classes[cls] += 1
            summary.uncertain[cls] += bool(unc)


def score(p: Plan, *, batch_size: int = 32, actors: int = 2, progress: bool = True) -> Summary:
    """Run the pipeline on the Ray this process is connected to and write the Parquet file and plot."""
    import pyarrow.parquet as pq

    schema = _schema(p.meta.class_names).with_metadata({
        "bloodcnn.class_names": json.dumps(p.meta.class_names),
        "bloodcnn.model": json.dumps({"model_name": p.meta.model_name, "version": p.meta.version,
                                      "model_sha256": p.meta.model_sha256, "requested": p.requested}),
    })
    local = not storage.is_s3(p.output)
    tmp_dir = Path(p.output).parent if local else Path(tempfile.gettempdir())
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f".{Path(p.output).name}.", suffix=".tmp")
    os.close(fd)
    summary = Summary()
    saved = engine.quiet_ray_data()
    t0 = time.perf_counter()
    try:
        with pq.ParquetWriter(tmp, schema) as writer, \
                console.bar(desc="predicting", total=len(p.files), unit="img", disable=not progress) as bar:
            try:
                for table in dataset(p, batch_size=batch_size, actors=actors).iter_batches(
                        batch_size=None, batch_format="pyarrow"):
                    table = table.select(schema.names).cast(schema)
                    writer.write_table(table)
                    _count(summary, table)
                    if summary.first_at is None:
                        summary.first_at, summary.first_rows = time.perf_counter() - t0, summary.rows
                    bar.update(table.num_rows)
            except (PredictError, KeyboardInterrupt):
                raise
            except Exception as exc:  # Ray wraps the actor's or task's error: one line for the user
                log.exception("batch scoring failed")
                raise PredictError(f"batch scoring failed: {_cause(exc)}") from None
        summary.seconds = time.perf_counter() - t0
        if summary.rows != len(p.files):
            raise PredictError(f"batch scoring returned {summary.rows} rows for {len(p.files)} images")
        console.say(f"==> writing {p.output} ({summary.rows} rows)")
        if local:
            os.replace(tmp, p.output)
        else:
            store = storage.store_for(p.output, p.storage)
            store.ensure_container(p.output)
            store.upload_file(tmp, p.output)  # one PUT, or a multipart upload that only completes whole
        storage.write_bytes(p.plot, class_counts_png(summary, p.meta), p.storage)
    finally:
        Path(tmp).unlink(missing_ok=True)
        engine.restore_ray_data(saved)
    return summary


def class_counts_png(summary: Summary, meta: ModelMetadata) -> bytes:
    """Images per class (the uncertain part hatched), and errors, as a bar plot."""
    from bloodcnn.train.plots import _finish, _pyplot

    plt = _pyplot()
    names = list(meta.class_names) + (["error"] if summary.errors else [])
    counts = [summary.classes[n] for n in meta.class_names] + ([sum(summary.errors.values())] if summary.errors else [])
    unsure = [summary.uncertain[n] for n in meta.class_names] + ([0] if summary.errors else [])
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(names), 3.8), dpi=110)
    colours = ["tab:blue"] * len(meta.class_names) + (["0.6"] if summary.errors else [])
    ax.bar(names, [c - u for c, u in zip(counts, unsure)], color=colours, label="certain")
    ax.bar(names, unsure, bottom=[c - u for c, u in zip(counts, unsure)], color="tab:orange", hatch="//",
           label="uncertain")
    for i, c in enumerate(counts):
        ax.text(i, c, str(c), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images")
    ax.set_ylim(0, max(counts + [1]) * 1.15)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{meta.model_name}/{meta.version}: {summary.rows} images, "
                 f"{sum(summary.uncertain.values())} uncertain, {sum(summary.errors.values())} errors", fontsize=9)
    fig.tight_layout()
    return _finish(fig, None)


def summary_table(summary: Summary, meta: ModelMetadata) -> str:
    """Count per class (and its uncertain part), errors, and the rate."""
    total = max(summary.rows, 1)
    lines = [f"{'class':<16} {'images':>7} {'share':>7} {'uncertain':>10}"]
    for name in meta.class_names:
        n = summary.classes[name]
        lines.append(f"{name:<16} {n:>7} {n / total:>7.1%} {summary.uncertain[name]:>10}")
    errors = sum(summary.errors.values())
    lines.append(f"{'error':<16} {errors:>7} {errors / total:>7.1%} {'-':>10}")
    lines.append(f"{'total':<16} {summary.rows:>7} {1:>7.1%} {sum(summary.uncertain.values()):>10}")
    if summary.errors:
        lines.append("errors: " + ", ".join(f"{code} {n}" for code, n in summary.errors.most_common()))
    loaded = summary.loaded_images_per_s
    lines.append(f"{summary.rows} images in {summary.seconds:.1f} s: {summary.images_per_s:.1f} images/s"
                 + (f" ({loaded:.1f} images/s once the model was loaded)" if loaded else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def _model_lines(p: Plan) -> str:
    m, c = p.meta, p.meta.calibration
    how = (f"calibrated: T {c.temperature:.2f}, {c.score} sets at alpha {c.alpha:g}"
           + (f" (two classes under p {c.min_confidence:.3f})" if c.min_confidence else "")
           + f", {p.uncertain_rule} rule"
           if c is not None else f"not calibrated: threshold rule at {p.uncertain_threshold:g}")
    asked = f" ({p.requested})" if p.requested != m.version else ""
    return f"==> model: {m.model_name}/{m.version}{asked}, {m.image_size} px\n    {how}"


def predict_command(cfg: AppConfig, *, input_uri: str, output: str, model: str = "production", batch_size: int = 32,
                    actors: int = 2, log_file: str | Path = DEFAULT_LOG, verbose: bool = False,
                    progress: bool = True) -> Summary:
    """``bloodcnn predict``: one line per stage, a progress bar, a summary; the libraries' output
    goes to ``log_file``. Raises PredictError / StorageError / RegistryError on bad input."""
    from bloodcnn import lifecycle

    if batch_size < 1 or actors < 1:
        raise PredictError("--batch-size and --actors must be at least 1")
    capture = console.capture(log_file, verbose)
    try:
        log.info("bloodcnn predict %s -> %s (model %s)", input_uri, output, model)
        console.say(f"bloodcnn predict: the logs of TensorFlow, Ray and S3 go to {console.rel(log_file)}")
        try:
            p = plan(cfg, input_uri, output, model)
        except Exception as exc:
            log.error("%s: %s", type(exc).__name__, exc)
            raise
        ignored = f" ({p.ignored} other file(s) ignored)" if p.ignored else ""
        console.say(f"==> input: {len(p.files)} image(s) in {input_uri}{ignored}")
        console.say(_model_lines(p))
        with lifecycle.guarded_local_ray("predict"):
            console.say(engine.connect())
            console.say(f"==> predicting: {actors} actor(s), batches of {batch_size}")
            try:
                summary = score(p, batch_size=batch_size, actors=actors, progress=progress)
            except PredictError as exc:
                raise PredictError(f"{exc} (details in {console.rel(log_file)})") from None
        console.say(summary_table(summary, p.meta))
        console.say(f"predictions: {p.output}")
        console.say(f"plot: {p.plot}")
        return summary
    finally:
        capture.stop()
