"""The main job: the whole flow on one machine, on embedded defaults.

    python jobs/main.py [--config FILE] [--source DIR | --synthetic] [--epochs N] [--image-size PX] [--no-wait] [--verbose]

Starts a local SeaweedFS S3 and a local Ray, prepares the dataset into shards on S3, trains a
short run, registers and promotes the model, serves it, sends one sample prediction per class
and prints the URL. The console shows one line per stage, progress bars and a summary; the logs
(TensorFlow, Ray, Serve and its access log, SeaweedFS) go to ``<state dir>/logs``, and
``--verbose`` shows them on the console too.

Ctrl-C or SIGTERM at any stage stops everything the job started within seconds (exit status 130
or 143; a second Ctrl-C forces it), and a watchdog stops the servers even when the job itself is
killed with SIGKILL. The state dir (default ``out/main-job``) keeps the S3 data: a second run
reuses the prepared dataset and the finished training run, an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serving` lives at the repository root
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage-stats banner or upload attempt

from bloodcnn import console, lifecycle, storage  # noqa: E402
from bloodcnn.config import AppConfig, ConfigError, load_config  # noqa: E402

log = logging.getLogger("bloodcnn.main")

KAGGLE = "mehradaria/leukemia"
SYNTHETIC_DATASET = "s3://bloodcnn/datasets/synthetic"
SYNTHETIC_MODEL = "bloodcnn-synthetic"
#: The main job's short run, under a user's --config and env (measured on 2 cores, idle, ALL
#: dataset: 2m37s to the first prediction, test accuracy 0.91; at 224 px with 2 offline copies
#: 8m34s and 0.86, see docs/benchmarks.md). A constant rate: one epoch decayed to 0 learns
#: about half as much. The full recipe is the embedded defaults (`bloodcnn train`).
SHORT_RUN: dict[str, Any] = {
    "train": {"epochs": 1, "fine_tune_epochs": 0, "lr_schedule": "constant", "image_size": 160},
    "data": {"augment": {"copies": 0}},
}
STATUS_FILE = "last-run.json"


def dataset_help(cfg: AppConfig) -> str | None:
    """What to tell a user whose configured dataset folder is missing (None: it is there)."""
    source = cfg.data.source
    if storage.is_s3(source):
        return None  # checked by the data pipeline, once S3 is up
    folders = list(cfg.data.class_names)
    p = Path(source)
    if p.is_dir() and (not folders or any((p / f).is_dir() for f in folders)):
        return None
    layout = "  ".join(f"DIR/{f}/" for f in folders) or "DIR/<class>/ ..."
    found = "" if not p.is_dir() else f" (no {', '.join(f + '/' for f in folders)} folder in it)"
    return "\n".join([
        f"error: no dataset in data.source{found}:",
        f"  {source}",
        f"  Get the Kaggle dataset {KAGGLE} (ALL image dataset, Aria et al. 2021):",
        f"    https://www.kaggle.com/datasets/{KAGGLE}",
        f"    or: kaggle datasets download -d {KAGGLE} && unzip leukemia.zip -d leukemia",
        "  then pass the folder that holds the four class folders of JPEGs with --source DIR:",
        f"    {layout}",
        "  (in the Kaggle archive they are under Original/), for example:",
        "    bash scripts/main-job.sh --source leukemia/Original",
        "  Or try the whole flow on generated images: bash scripts/main-job.sh --synthetic",
    ])


def ray_temp_dir(state: Path) -> Path:
    """Ray's temp dir: under the state dir when its unix sockets fit there (107 bytes with
    ``session_<date>_<pid>/sockets/plasma_store`` appended), else a short one in /tmp."""
    inside = state / "ray"
    if len(str(inside)) <= 40:
        return inside
    return Path(tempfile.gettempdir()) / f"bloodcnn-ray-{hashlib.sha256(str(state).encode()).hexdigest()[:10]}"


def _bounded(fn: Callable[[], Any], timeout_s: float) -> bool:
    """Run ``fn`` in a helper thread for at most ``timeout_s`` (this thread stays responsive to
    a second Ctrl-C). True if it finished."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except BaseException:  # noqa: BLE001 - best effort while stopping
            log.exception("while stopping")
        finally:
            done.set()

    threading.Thread(target=target, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.is_set() and time.monotonic() < deadline:
        done.wait(0.2)
    return done.is_set()


class MainJob:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state = Path(args.state_dir).expanduser().resolve()
        self.logs = self.state / "logs"
        self.t0 = time.monotonic()
        self.times: dict[str, float] = {}
        self.current: str | None = None
        self._stage_t = 0.0
        self.first_prediction_s: float | None = None
        self.notes: dict[str, str] = {}
        self.guard = lifecycle.Guard("main", on_force=self._last_words)
        self.capture: console.Capture | None = None
        self.s3 = None
        self.ray_started = False
        self.serve_started = False
        self._lock = None

    # ------------------------------------------------------------------ bookkeeping

    def _last_words(self, message: str) -> None:
        fd = self.capture.console_fd() if self.capture else 2
        os.write(fd, message.encode())
        self._write_status(exit_code=None, forced=True)

    def stage(self, name: str, line: str) -> None:
        now = time.monotonic()
        if self.current is not None:
            self.times[self.current] = round(now - self._stage_t, 1)
        self.current, self._stage_t = name, now
        console.say(f"==> {line}")
        self._write_status()

    def _write_status(self, exit_code: int | None = None, **extra: Any) -> None:
        status = {
            "pid": os.getpid(),
            "stage": self.current,
            "stage_seconds": self.times,
            "seconds": round(time.monotonic() - self.t0, 1),
            "first_prediction_s": self.first_prediction_s,
            "exit_code": exit_code,
            "logs": str(self.logs),
            **extra,
        }
        try:
            tmp = self.state / (STATUS_FILE + ".tmp")
            tmp.write_text(json.dumps(status, indent=1))
            tmp.replace(self.state / STATUS_FILE)
        except OSError:
            pass

    def _lock_state(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.state / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            raise RuntimeError(f"another main job (pid {self._lock.read().strip() or '?'}) uses the state dir "
                               f"{self.state}; stop it or pass --state-dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()

    # ------------------------------------------------------------------ the stages

    def config(self) -> AppConfig:
        """Embedded defaults <- the short run (``SHORT_RUN``) <- --config/env <- this job's flags."""
        a = self.args
        train = {k: v for k, v in (("epochs", a.epochs), ("fine_tune_epochs", a.fine_tune_epochs),
                                   ("lr_schedule", a.lr_schedule), ("image_size", a.image_size)) if v is not None}
        data: dict[str, Any] = {"augment": {"copies": a.copies}} if a.copies is not None else {}
        if a.source:
            data["source"] = a.source
        overrides: dict[str, Any] = {"train": train, "data": data}
        cfg = load_config(a.config, base=SHORT_RUN, overrides=overrides)
        if "cpus_per_worker" not in cfg.train.model_fields_set and cfg.train.num_workers == 1:
            # the local Ray is this machine: its one worker gets every core (TF's threads follow it)
            train["cpus_per_worker"] = float(os.cpu_count() or 1)
        if a.synthetic:
            size = max(64, min(cfg.train.image_size, 224))
            train["dataset"] = SYNTHETIC_DATASET
            data.update(source=str(self.state / "synthetic" / f"{size}px"), output=SYNTHETIC_DATASET)
            overrides["registry"] = {"model_name": SYNTHETIC_MODEL}
        return load_config(a.config, base=SHORT_RUN, overrides=overrides)

    def make_synthetic(self, cfg: AppConfig) -> None:
        from bloodcnn.data.synthetic import make_class_folders

        root = Path(cfg.data.source)
        done = root / ".complete"
        size = int(root.name.removesuffix("px"))
        per_class = 60
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            make_class_folders(root, per_class=per_class, size=size, duplicates=2, near_duplicates=2)
            done.write_text("ok\n")
        console.say(f"==> synthetic data: 4 classes x {per_class} generated {size} px images (bloodcnn.data.synthetic)")
        console.say(f"    in {console.rel(root)}/")
        console.say("    (not blood smears: the model and its predictions only show the flow)")

    def start_s3(self) -> None:
        from bloodcnn.s3server import S3Server

        self.stage("s3", f"starting SeaweedFS S3 on 127.0.0.1 (data in {console.rel(self.state / 's3')})")
        self.s3 = S3Server(data_dir=self.state / "s3", log_path=self.logs / "weed.log")
        self.s3.start()
        os.environ.update(self.s3.env())
        storage._s3_store.cache_clear()
        lifecycle.pause_point("s3", console.say)

    def start_ray(self, cfg: AppConfig) -> None:
        from serving.settings import ray_env

        self.stage("ray", "starting a local Ray" + (" (Serve on HAProxy)" if cfg.serve.proxy == "haproxy" else ""))
        temp = ray_temp_dir(self.state)
        temp.mkdir(parents=True, exist_ok=True)
        sessions = sorted(p for p in temp.glob("session_2*") if p.is_dir())
        for old in sessions[:-2]:  # keep the last two runs' Ray logs
            shutil.rmtree(old, ignore_errors=True)
        import ray

        # address="local": a fresh private Ray that inherits this S3 server's credentials, never a
        # cluster that happens to run on this machine. The dashboard shows the training run, and
        # Ray Train's placement-group cleaner needs its state API.
        os.environ.update(ray_env(cfg))  # serve.proxy: read by Serve when Ray starts
        self.ray_started = True  # from here on stop it, even when ray.init is interrupted midway
        lifecycle.keep_handlers_in_ray()
        ctx = ray.init(address="local", include_dashboard=True, log_to_driver=self.args.verbose,
                       _temp_dir=str(temp))
        lifecycle.reinstall()  # ray.init replaced our SIGTERM handler with its own
        link = self.logs / "ray"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(temp / "session_latest" / "logs")
        if ctx.dashboard_url:
            console.say(f"    Ray dashboard: http://{ctx.dashboard_url} (token in ~/.ray/auth_token)")
        lifecycle.pause_point("ray", console.say)

    def prepare(self, cfg: AppConfig):
        from bloodcnn.data.prepare import prepare_dataset, summary_table

        self.stage("prepare", f"preparing {console.rel(cfg.data.source)} -> {cfg.data.output}")
        manifest = prepare_dataset(cfg, progress=True)
        log.info("dataset %s:\n%s", manifest.dataset_version, summary_table(manifest))
        reused = manifest.created_at < self._started_iso  # prepared by an earlier run
        n = {s: sum(manifest.splits[s].counts.values()) for s in manifest.splits}
        console.say(f"    dataset {manifest.dataset_version}: {sum(n.values())} images (train {n.get('train', 0)}, "
                    f"val {n.get('val', 0)}, test {n.get('test', 0)}) + {manifest.splits['train'].augmented} "
                    f"augmented{', reused' if reused else ''}")
        self.notes["dataset"] = manifest.dataset_version + (" (reused)" if reused else "")
        lifecycle.pause_point("prepare", console.say)
        return manifest

    def train(self, cfg: AppConfig, manifest):
        from bloodcnn.model import missing_weights_file
        from bloodcnn.registry import Registry
        from bloodcnn.train.job import fingerprint, run_training

        t = cfg.train
        self.stage("training", f"training ({t.epochs + (t.fine_tune_epochs if t.fine_tune_blocks else 0)} "
                               f"epoch(s), {t.num_workers} worker(s), {t.image_size} px)")
        missing = missing_weights_file(t.weights)
        if missing:
            console.say(f"    weights file {console.rel(missing)} not found: using Keras's ImageNet download")

        def on_stage(name: str, info: dict) -> None:
            if name == "reused":
                console.say(f"    run {info['run_name']} already completed: reusing model {info['version']}")
                self.notes["model"] = f"{info['version']} (reused)"
            elif name == "training" and info.get("resuming"):
                console.say(f"    resuming run {info['run_name']} from its latest checkpoint")
            elif name == "evaluation":
                self.stage("evaluation", "evaluating the trained model on the test split")

        # named after what it trains: a rerun resumes or reuses it, a changed config trains anew
        meta = run_training(cfg, run_name=f"main-{fingerprint(cfg, manifest.dataset_version)}", progress=True,
                            on_stage=on_stage)
        lifecycle.reinstall()
        registry = Registry(cfg.registry.uri, cfg.registry.model_name, cfg.storage)
        note = "promoted"
        if registry.production() != meta.version:
            registry.promote(meta.version)
            note = "promoted for this local demo although it misses the promotion gates"
        m = meta.metrics
        console.say(f"    model {meta.version}: accuracy {m.get('accuracy', float('nan')):.4f}, "
                    f"macro-F1 {m.get('macro_f1', float('nan')):.4f} on {m.get('num_examples', '?')} test images, "
                    f"{note}")
        c = m.get("calibration")
        if c:
            conf = c["conformal"]
            console.say(f"    calibrated on val: T {c['temperature']:.2f}, ECE {c['before']['ece']:.3f} -> "
                        f"{c['after']['ece']:.3f}; {1 - c['alpha']:.0%} sets: coverage {conf['coverage']:.3f}, "
                        f"one class {conf['single_set_share']:.0%}")
        self.notes.setdefault("model", meta.version)
        self.notes["accuracy"] = f"{m.get('accuracy', float('nan')):.4f}"
        lifecycle.pause_point("evaluation", console.say)
        return meta

    def serve(self, cfg: AppConfig) -> str:
        from ray import serve

        from serving import app as serving_app

        url = serving_app.base_url(cfg)
        self.stage("serve_start", f"starting the service on {url}/")
        self.serve_started = True
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        lifecycle.reinstall()
        box: dict[str, Any] = {}

        def deploy() -> None:
            try:
                serve.run(serving_app.build_app(cfg), name=serving_app.APP_NAME, route_prefix="/")
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                box["error"] = exc
            box["done"] = True

        threading.Thread(target=deploy, name="bloodcnn-deploy", daemon=True).start()
        wanted = max(cfg.serve.autoscaling.min_replicas, 1) + 1  # classifier replica(s) + the ingress
        with console.bar(desc="replicas (model load, warm-up)", total=wanted, unit="replica",
                         bar_format="{desc}: {n_fmt}/{total_fmt} running [{elapsed}]", mininterval=0) as bar:
            while not box.get("done"):
                time.sleep(0.5)
                try:
                    app = serve.status().applications.get(serving_app.APP_NAME)
                except Exception:  # noqa: BLE001 - controller busy; next time
                    continue
                if app is not None:
                    running = sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())
                    if running > bar.n:
                        bar.update(min(running, wanted) - bar.n)
            if "error" in box:
                raise box["error"]
            serving_app.wait_ready(url, 600)
            bar.update(wanted - bar.n)
        lifecycle.pause_point("serve_start", console.say)
        return url

    def sample_predictions(self, url: str, cfg: AppConfig, manifest) -> None:
        """POST the first test image of each class and print what the service answers."""
        import httpx

        self.stage("predictions", "sample predictions (one test image per class)")
        root = cfg.data.source.rstrip("/")
        shown: set[int] = set()
        for img in manifest.images:
            if img.split != "test" or img.label in shown:
                continue
            shown.add(img.label)
            data = storage.read_bytes(storage.join(root, img.source), cfg.storage)
            r = httpx.post(f"{url}/v1/predict", files={"file": (Path(img.source).name, data, "image/jpeg")},
                           timeout=60)
            r.raise_for_status()
            result = r.json()["results"][0]
            if self.first_prediction_s is None:
                self.first_prediction_s = round(time.monotonic() - self.t0, 1)
            prob = result["probabilities"][result["class"]]
            flag = "  uncertain, refer to a specialist" if result.get("uncertain") else ""
            name = Path(img.source).name
            name = name if len(name) <= 26 else name[:23] + "..."
            console.say(f"  {name:<26} true {manifest.class_names[img.label]:<11} -> {result['class']:<11} "
                        f"{prob:.2f}{flag}")

    # ------------------------------------------------------------------ run and stop

    def run(self) -> int:
        a = self.args
        self.guard.install()  # first: a signal from here on is ours
        try:
            try:
                cfg = self.config()
            except ConfigError as exc:
                console.error(f"error: {exc}")
                return 2
            if not a.synthetic:
                help_text = dataset_help(cfg)
                if help_text:
                    console.error(help_text)
                    return 2
            try:
                self._lock_state()
            except RuntimeError as exc:
                console.error(f"error: {exc}")
                return 1
            return self._run(cfg)
        except lifecycle.Interrupted as exc:  # before anything was started
            return exc.exit_code

    def _run(self, cfg: AppConfig) -> int:
        from datetime import datetime, timezone

        self._started_iso = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.capture = console.capture(self.logs / "main.log", verbose=self.args.verbose)
        from bloodcnn.logs import setup_logging

        setup_logging()
        log.info("main job %d starting: %s", os.getpid(), " ".join(sys.argv))
        self.guard.start(self.logs / "main.log")
        console.say("bloodcnn main job: one line per stage; the logs of TensorFlow, Ray, Serve and S3 go to")
        console.say(f"  {console.rel(self.logs)}/" + ("" if self.args.verbose else "  (--verbose shows them here too)"))
        code = 1
        reason: str | None = None
        try:
            if self.args.synthetic:
                self.make_synthetic(cfg)
            self.start_s3()
            self.start_ray(cfg)
            manifest = self.prepare(cfg)
            meta = self.train(cfg, manifest)
            url = self.serve(cfg)
            self.sample_predictions(url, cfg, manifest)
            self.stage("serving", f"serving at {url}/")
            self._summary(url, meta)
            if self.args.no_wait:
                code = 0
                return code
            console.say("Press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
        except lifecycle.Interrupted as exc:
            code, reason = exc.exit_code, exc.args[0]
            return code
        except Exception as exc:  # a clear last line instead of a bare traceback
            interrupted = lifecycle.interruption(exc)
            if interrupted is not None:  # a signal that library code re-raised as another error
                code, reason = interrupted.exit_code, interrupted.args[0]
                return code
            log.exception("main job failed")
            from bloodcnn.model import WeightsError

            console.error(f"error: {exc}")
            console.error(f"       (stage {self.current}; details in {console.rel(self.logs / 'main.log')})")
            code = 2 if isinstance(exc, WeightsError) else 1
            return code
        finally:
            self.shutdown(reason, code)

    def _summary(self, url: str, meta) -> None:
        short = {"serve_start": "serving"}
        stages = ", ".join(f"{short.get(k, k)} {v:.0f}s" for k, v in self.times.items() if k != "predictions")
        console.say(f"bloodcnn is serving at {url}/ (API docs: {url}/docs)")
        console.say("Research use only: the model's answer is not a diagnosis.")
        if self.first_prediction_s is not None:
            minutes, seconds = divmod(int(round(self.first_prediction_s)), 60)
            console.say(f"first prediction after {minutes}m{seconds:02d}s")
            console.say(f"stages: {stages}")
        console.say(f"model {self.notes.get('model', meta.version)}, dataset {self.notes.get('dataset', '?')}")
        console.say(f"logs: {console.rel(self.logs)}/")

    def shutdown(self, reason: str | None, code: int) -> None:
        """Stop everything this job started: Serve (gracefully, after success), Ray, SeaweedFS,
        then whatever is left (Ray's agents). A signal from here on forces the stop."""
        self.guard.begin_stop()
        t0 = time.monotonic()
        if self.current is not None:
            self.times.setdefault(self.current, round(t0 - self._stage_t, 1))
        if reason:
            console.say(f"\n==> stopping after {reason} in stage {self.current} (Ctrl-C again to force)")
        if self.serve_started and reason is None:
            from ray import serve

            _bounded(serve.shutdown, 10)
        if self.ray_started:
            import ray

            _bounded(ray.shutdown, 10)
        if self.s3 is not None:
            self.s3.stop(timeout_s=5)
        left = self.guard.sweep()
        if left:
            log.info("stopped %d leftover process(es): %s", len(left), ", ".join(sorted({p.name for p in left})))
        took = time.monotonic() - t0
        self._write_status(exit_code=code, signal=reason, stop_seconds=round(took, 1))
        if reason:
            console.say(f"==> stopped in {took:.1f}s; the state in {console.rel(self.state)} is kept: "
                        "run again to resume")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (default: embedded defaults)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", default=None, help="folder of class folders Benign/ Early/ Pre/ Pro/ (data.source)")
    src.add_argument("--synthetic", action="store_true",
                     help="generated images (bloodcnn.data.synthetic) instead of the dataset: tries the flow")
    short = "(default: the short run, see SHORT_RUN)"
    p.add_argument("--epochs", type=int, default=None, help=f"phase-1 epochs {short}")
    p.add_argument("--fine-tune-epochs", type=int, default=None, help=f"phase-2 epochs {short}")
    p.add_argument("--image-size", type=int, default=None, help=f"train.image_size in px {short}")
    p.add_argument("--copies", type=int, default=None, help=f"offline augmented copies per train image {short}")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None, help=f"{short}")
    p.add_argument("--state-dir", default=str(REPO / "out" / "main-job"),
                   help="S3 data, logs and Ray's session (default out/main-job)")
    p.add_argument("--no-wait", action="store_true", help="exit after the sample predictions")
    p.add_argument("--verbose", action="store_true", help="show the logs on the console too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return MainJob(parse_args(argv)).run()


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, console.out(), console.err()):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    # os._exit: the exit status is the one decided above, and no C++ destructor of Ray or
    # TensorFlow runs in a half-torn-down interpreter (the "Aborted" after a signal)
    os._exit(status)
