"""HTTP load benchmark of the bloodcnn Serve application (a script, not a test).

    .venv/bin/python bench/serve_load.py [--model model.keras] [--duration 20] [--concurrency 1 8 32]

What it does, all in one command so the figures are comparable:

1. starts a local SeaweedFS S3, takes a 224 px MobileNetV2 classifier (``--model``: a trained
   ``model.keras``, such as a version ``bench/accuracy.py`` registered; without it the shared
   ImageNet weights under a random head), registers + promotes it, and exports its OpenVINO
   artifact with the precision gate (on ``--gate-images`` of the dataset, labelled by the Keras
   model, so a precision passes only if it changes no answer: a random head sits near ties and
   fails bf16, a trained model passes it as its registration gate did);
2. (a) the TensorFlow ceiling: the compiled ``tf.function`` in this process at batch 32 on
   pre-resized images; (a') the chosen runtime's ceiling, its predictor loaded as a replica
   loads it, at batch 32 (both measured before and after the served runs; goals use the higher);
3. deploys ``serving.app`` four times, each on a fresh local Ray + Serve, ``--replicas`` (2)
   model replicas of 1 CPU and so 1 OpenVINO thread each: APIIngress ->
   BloodClassifier on ``serve.runtime: tensorflow`` (today's path), the same on ``auto``
   (OpenVINO, two hops), ``serve.ingress: colocated`` on ``auto`` (BloodService, one hop) behind
   Serve's Python proxy, and the same behind ``serve.proxy: haproxy`` (Serve's HAProxy mode, the
   new path, which the goals are on), each driven with ``POST /v1/predict`` (one JPEG from the
   dataset per request, multipart) at each concurrency by a closed-loop load generator
   (threads, one keep-alive connection each);
4. (b) the naive baseline: a separate Serve app, one FastAPI deployment that decodes the
   upload and calls ``model.predict`` per request (no batching), under the same load;
5. prints markdown rows for docs/benchmarks.md and writes ``bench/results/serve.json`` with
   the goals at the top concurrency: served_over_tf_ceiling, served_over_runtime_ceiling,
   p99_ms, failed_requests, served_over_naive.

The load generator runs on the same machine, so it competes with the server for CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from _common import DEFAULT_IMAGES, DEFAULT_WEIGHTS, REPO, dataset_jpegs, goal, multipart_bodies, percentile, write_result


#: served path -> (serve.ingress, serve.runtime, serve.proxy)
PATHS = {
    "tensorflow": ("separate", "tensorflow", "python"),  # today's path
    "two_hops": ("separate", "auto", "python"),
    "one_hop": ("colocated", "auto", "python"),
    "served": ("colocated", "auto", "haproxy"),  # the new path: the goals are on it
}


def load(url: str, ctype: str, bodies: list[bytes], concurrency: int, duration: float, warmup: float) -> dict:
    """Closed-loop load: ``concurrency`` threads, each with one keep-alive connection
    (stdlib http.client: ~0.2 ms of client CPU per request, against ~1.4 ms for httpx async,
    which matters when the client shares 2 cores with the server)."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    path = parts.path or "/"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration

    def worker(w: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        i = w
        mine: list[float] = []
        bad: dict[str, int] = {}
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                status = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            t1 = time.perf_counter()
            if t0 >= t_measure and t1 <= t_end:
                if status == "200":
                    mine.append(t1 - t0)
                else:
                    bad[status] = bad.get(status, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for k, v in bad.items():
                errors[k] = errors.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": errors,
        "rps": len(latencies) / duration,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


def ceiling(model, images_224, seconds: float, batch: int = 32) -> dict:
    """(a) in-process compiled tf.function at a fixed batch size on pre-resized images."""
    import numpy as np

    from bloodcnn.inference import Predictor

    pred = Predictor(model, 224)
    x = np.stack([images_224[i % len(images_224)] for i in range(batch)])
    pred.warmup([batch])
    pred.predict(x)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pred.predict(x)
        n += batch
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    m = 0
    while time.perf_counter() - t1 < seconds / 2:
        model.predict(x[:1], verbose=0)
        m += 1
    return {"tf_function_ips": n / elapsed, "model_predict_1_ips": m / (time.perf_counter() - t1),
            "traces": pred.trace_count}


def naive_app(registry_uri: str, model_name: str):
    """(b) the common Ray Serve MobileNet example: one ``model.predict`` per request, no
    batching, on the same decoding and resize (one replica, one CPU, like BloodClassifier)."""
    from ray import serve

    @serve.deployment(name="NaiveClassifier", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    class NaiveClassifier:
        def __init__(self, registry_uri: str, model_name: str):
            import tempfile as _tmp

            from bloodcnn.model import load_model
            from bloodcnn.registry import Registry

            path, self.meta = Registry(registry_uri, model_name).fetch("production", _tmp.mkdtemp())
            self.model = load_model(path)

        async def __call__(self, request):
            from starlette.responses import JSONResponse

            from bloodcnn.inference import load_for_model

            form = await request.form()
            data = await form["file"].read()
            x, _ = load_for_model(data, self.meta.image_size)
            probs = self.model.predict(x[None], verbose=0)[0]
            top = int(probs.argmax())
            return JSONResponse({"class": self.meta.class_names[top], "probabilities": probs.tolist()})

    return NaiveClassifier.bind(registry_uri, model_name)


def wait_first_prediction(url: str, ctype: str, body: bytes, timeout: float = 300.0) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            r = httpx.post(url, content=body, headers={"content-type": ctype}, timeout=30)
            if r.status_code == 200:
                return time.perf_counter()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no successful prediction from {url} within {timeout}s")


def runtime_ceiling(loaded, images_224, seconds: float, batch: int = 32) -> dict:
    """(a') the chosen runtime's predictor (as a replica loads it) in this process, batch 32."""
    import numpy as np

    x = np.stack([images_224[i % len(images_224)] for i in range(batch)])
    loaded.predictor.predict(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        loaded.predictor.predict(x)
        n += batch
    return {"runtime": loaded.runtime, "ips": n / (time.perf_counter() - t0)}


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (its threads included), from /proc; NaN once it
    has exited (HAProxy replaces its process when Serve reloads its configuration)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_levels(name: str, url: str, ctype: str, bodies: list[bytes], args, app: str = "bloodcnn") -> list[dict]:
    """Each concurrency level, with the CPU each process spent per request (the load generator,
    this process, is "client"); the CPU window holds the warm-up too, so requests are counted at
    the measured rate over warm-up plus duration."""
    from serving import devtools

    rows = []
    for c in args.concurrency:
        pids = {**devtools.serve_processes(app), "client": os.getpid()}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        r = load(url, ctype, bodies, c, args.duration, args.warmup)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        served = max(1.0, r["rps"] * (args.warmup + args.duration))  # the window holds the warm-up too
        r["cpu_ms_per_request"] = {k: round(1000 * (after[k] - before[k]) / served, 2) for k in pids}
        r["loadavg_1m_after"] = os.getloadavg()[0]
        rows.append(r)
        print(f"  {name:<10} c={c:<3d} {r['rps']:7.1f} req/s  p50 {r['p50']*1000:7.0f} ms  "
              f"p99 {r['p99']*1000:7.0f} ms  errors {r['errors']}  CPU ms/req {r['cpu_ms_per_request']}",
              flush=True)
    return rows


@contextlib.contextmanager
def serve_stack(cfg):
    """A fresh local Ray + Serve for one path, with ``cfg.serve.proxy``'s variables set while Ray
    starts (Serve reads them once), all stopped on the way out; yields the base URL."""
    import ray
    from ray import serve

    from serving.settings import free_port, ray_env

    with mock.patch.dict(os.environ, ray_env(cfg)):
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--naive-concurrency", type=int, nargs="+", default=None,
                    help="levels for the naive baseline (default: --concurrency)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--kernel-scale", type=float, default=0.05,
                    help="std of the random head's weights: 0.05 gives near-ties (the hardest case for bf16's "
                         "gate), 1.0 answers as confidently as a trained model")
    ap.add_argument("--model", default=None,
                    help="a trained model.keras (e.g. a version bench/accuracy.py registered) instead of the "
                         "random head; the export and its gate run on it the same way")
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEGs (searched recursively)")
    ap.add_argument("--gate-images", type=int, default=480, help="images the export's precision gate runs on")
    ap.add_argument("--replicas", type=int, default=2,
                    help="BloodClassifier replicas (min = max), 1 CPU and so 1 OpenVINO thread each")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                    help="served paths to measure (serve.json is written only with all of them)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline (no goals then)")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/serve.json")
    args = ap.parse_args(argv)

    import numpy as np

    from bloodcnn import storage
    from bloodcnn.inference import load_for_model
    from bloodcnn.openvino_runtime import export
    from bloodcnn.registry import Registry
    from bloodcnn.s3server import S3Server
    from serving import devtools
    from bloodcnn.loaded_model import load_version

    raw_images = dataset_jpegs(args.images)
    if not raw_images:
        print(f"no JPEGs under {args.images}", file=sys.stderr)
        return 2
    ctype, bodies = multipart_bodies(raw_images)

    # paths relative to the checkout: the figures are committed
    shown = {k: os.path.relpath(v, REPO) if k in ("weights", "images", "model") and v else v
             for k, v in vars(args).items()}
    results: dict = {"host": platform.node(), "cpus": os.cpu_count(), "args": shown}
    with S3Server(buckets=("bloodcnn",)) as s3, tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        os.environ.update(s3.env())
        storage._s3_store.cache_clear()
        registry_uri = "s3://bloodcnn/models"
        if args.model:
            from bloodcnn.model import load_model

            model = load_model(args.model)
            if int(model.input_shape[1]) != 224:
                print(f"--model {args.model} takes {model.input_shape[1]} px images; this benchmark is at 224 px",
                      file=sys.stderr)
                return 2
        else:
            model = devtools.make_model(224, weights=args.weights, kernel_scale=args.kernel_scale, seed=1)
        meta = devtools.register_model(registry_uri, model, version="bench-224")
        registry = Registry(registry_uri, "bloodcnn")
        images_224 = [load_for_model(b, 224)[0] for b in raw_images]
        # the export's gate on --gate-images of the dataset, labelled by the Keras model itself: a
        # precision passes only if it changes no answer (a random head is close to ties, the
        # hardest case for bf16)
        x = np.stack([load_for_model(b, 224)[0] for b in dataset_jpegs(args.images, args.gate_images)])
        labels = model.predict(x, verbose=0).argmax(1)
        info = export(model, 224, [(x[i:i + 32], labels[i:i + 32]) for i in range(0, len(x), 32)], Path(tmp))
        registry.set_runtime(meta.version, info, Path(tmp))
        results["export"] = info.model_dump()
        print(f"registered {meta.model_name}/{meta.version} (224 px); OpenVINO export: {info.reason}", flush=True)
        loaded = load_version(registry, meta.version, Path(tmp) / "cache", 32, (registry_uri, "bloodcnn"))

        print("measuring (a) TensorFlow and (a') the chosen runtime in-process at batch 32 ...", flush=True)
        results["ceiling"] = ceiling(model, images_224, seconds=10.0)
        results["runtime_ceiling"] = runtime_ceiling(loaded, images_224, seconds=10.0)
        results["ceiling"]["loadavg_1m_after"] = os.getloadavg()[0]
        print(f"  {results['ceiling']}\n  {results['runtime_ceiling']}", flush=True)

        from ray import serve

        from bloodcnn.config import load_config
        from serving.app import build_app

        # Ray starts workers at nice 15; the ceiling above ran at nice 0 in this process, so
        # give the replicas the same priority for a fair comparison on a shared machine
        os.environ.setdefault("RAY_worker_niceness", "0")
        for key in args.paths:
            ingress, runtime, proxy = PATHS[key]
            cfg = load_config(overrides={
                "registry": {"uri": registry_uri},
                "serve": {
                    "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
                    "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas},
                    "runtime": runtime, "ingress": ingress, "proxy": proxy,
                },
            })
            with serve_stack(cfg) as base:
                t0 = time.perf_counter()
                serve.run(build_app(cfg), name="bloodcnn", route_prefix="/")
                t_first = wait_first_prediction(f"{base}/v1/predict", ctype, bodies[0])
                results[f"{key}_cold_start_s"] = t_first - t0
                on = __import__("httpx").get(f"{base}/v1/models/current", timeout=30).json()["runtime"]
                print(f"serve.ingress {ingress}, serve.runtime {runtime}, serve.proxy {proxy}: serving on {on}, "
                      f"deploy -> first prediction {t_first - t0:.1f}s", flush=True)
                results[f"{key}_runtime"] = on
                results[key] = serve_levels(key, f"{base}/v1/predict", ctype, bodies, args)
                metrics = __import__("httpx").get(f"{base}/metrics").text
                results[f"{key}_batch_size_sum_count"] = [
                    line for line in metrics.splitlines()
                    if line.startswith("bloodcnn_batch_size_") and "bucket" not in line
                ]
        # the machine may be shared: measure the ceilings again and hold the service to the higher
        print("measuring (a) and (a') again after the served runs ...", flush=True)
        results["ceiling_after"] = ceiling(model, images_224, seconds=10.0)
        results["runtime_ceiling_after"] = runtime_ceiling(loaded, images_224, seconds=10.0)
        results["ceiling_after"]["loadavg_1m_after"] = os.getloadavg()[0]
        print(f"  {results['ceiling_after']}\n  {results['runtime_ceiling_after']}", flush=True)
        del model, loaded

        if not args.no_naive:
            with serve_stack(load_config()) as base:
                serve.run(naive_app(registry_uri, "bloodcnn"), name="naive", route_prefix="/naive")
                wait_first_prediction(f"{base}/naive", ctype, bodies[0])
                levels = argparse.Namespace(**{**vars(args), "concurrency": args.naive_concurrency or args.concurrency})
                results["naive"] = serve_levels("naive", f"{base}/naive", ctype, bodies, levels)

    goals = report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.no_write and goals and set(args.paths) == set(PATHS):
        out = write_result("serve", "python bench/serve_load.py " + " ".join(sys.argv[1:]), goals, figures=results)
        print(f"wrote {out}")
    return 0


def report(results: dict, args) -> dict:
    """Markdown rows for docs/benchmarks.md; returns the goals at the top concurrency."""
    ceil = max(results["ceiling"]["tf_function_ips"], results["ceiling_after"]["tf_function_ips"])
    rceil = max(results["runtime_ceiling"]["ips"], results["runtime_ceiling_after"]["ips"])
    top = max(args.concurrency)
    rows = {name: {r["concurrency"]: r for r in results.get(name, [])} for name in (*PATHS, "naive")}
    cmd = "python bench/serve_load.py " + " ".join(sys.argv[1:])
    print()
    print(f"Command: `{cmd.strip()}` ({results['cpus']} CPUs, 224 px MobileNetV2, one JPEG per request)")
    print()
    print("| service | concurrency | req/s | p50 (ms) | p99 (ms) | errors | load avg |")
    print("|---|---|---|---|---|---|---|")
    for when, c, r in (("before", results["ceiling"], results["runtime_ceiling"]),
                       ("after", results["ceiling_after"], results["runtime_ceiling_after"])):
        print(f"| (a) in-process tf.function, batch 32 ({when}) | - | {c['tf_function_ips']:.1f} img/s"
              f" | - | - | - | {c.get('loadavg_1m_after', float('nan')):.1f} |")
        print(f"| (a') in-process {r['runtime']}, batch 32 ({when}) | - | {r['ips']:.1f} img/s | - | - | - | |")
    on = {key: results.get(f"{key}_runtime") for key in PATHS}
    names = {"tensorflow": f"APIIngress -> BloodClassifier on {on['tensorflow']} (today's path)",
             "two_hops": f"APIIngress -> BloodClassifier on {on['two_hops']}",
             "one_hop": f"BloodService (one hop) on {on['one_hop']}, Serve's Python proxy",
             "served": f"BloodService (one hop) on {on['served']}, Serve's HAProxy (the new path)",
             "naive": "(b) naive model.predict per request"}
    for key, name in names.items():
        if key not in results:
            continue
        for c, r in sorted(rows[key].items()):
            errs = sum(r["errors"].values())
            print(f"| {name} | {c} | {r['rps']:.1f} | {r['p50']*1000:.0f} | {r['p99']*1000:.0f} | {errs} "
                  f"| {r.get('loadavg_1m_after', float('nan')):.1f} |")
    print()
    if top not in rows["served"] or top not in rows["naive"]:
        return {}
    b, n = rows["served"][top], rows["naive"][top]
    goals = {
        "served_over_tf_ceiling": goal(round(b["rps"] / ceil, 3), ">= 1.0"),
        "served_over_runtime_ceiling": goal(round(b["rps"] / rceil, 3), ">= 0.6"),
        "p99_ms": goal(round(b["p99"] * 1000, 1), "<= 1000"),
        "failed_requests": goal(sum(b["errors"].values()), "== 0"),
        "served_over_naive": goal(round(b["rps"] / max(n["rps"], 1e-9), 2), ">= 5"),
    }
    print(f"Goals at concurrency {top}:")
    for name, g in goals.items():
        print(f"- [{'x' if g['met'] else ' '}] {name} {g['target']}: {g['value']}")
    return goals


if __name__ == "__main__":
    sys.exit(main())
