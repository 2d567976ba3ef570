"""Where the CPU goes per request in the served path (a script, not a test).

    .venv/bin/python bench/serve_cpu.py [--concurrency 32] [--duration 15]

Deploys the bloodcnn Serve app like ``bench/serve_load.py`` (224 px MobileNetV2 with the shared
ImageNet weights, one replica), drives ``POST /v1/predict`` at one concurrency, and reads each
process's CPU time from ``/proc`` before and after the measured window. Prints CPU per request
for the HTTP proxy, the ingress and the classifier replica, next to the in-process ceiling's
CPU per image, which says how much of the machine each stage of the request path costs.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import DEFAULT_IMAGES, DEFAULT_WEIGHTS, dataset_jpegs, multipart_bodies
from serve_load import ceiling, cpu_seconds, load, wait_first_prediction

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=15.0)
    args = ap.parse_args()

    import ray
    from ray import serve

    from bloodcnn import storage
    from bloodcnn.config import load_config
    from bloodcnn.inference import load_for_model
    from bloodcnn.s3server import S3Server
    from serving import devtools
    from serving.app import build_app

    raw = dataset_jpegs(DEFAULT_IMAGES)
    ctype, bodies = multipart_bodies(raw)
    with S3Server(buckets=("bloodcnn",)) as s3:
        os.environ.update(s3.env())
        storage._s3_store.cache_clear()
        model = devtools.make_model(224, weights=str(DEFAULT_WEIGHTS), kernel_scale=0.05, seed=1)
        devtools.register_model("s3://bloodcnn/models", model, version="bench-224")
        ceil = ceiling(model, [load_for_model(b, 224)[0] for b in raw], seconds=8.0)
        del model
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        port = devtools.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = load_config(overrides={"registry": {"uri": "s3://bloodcnn/models"},
                                     "serve": {"port": port, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}})
        serve.run(build_app(cfg), name="bloodcnn", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/predict"
        wait_first_prediction(url, ctype, bodies[0])
        load(url, ctype, bodies, args.concurrency, 5.0, 1.0)  # warm-up

        pids = {"load generator (this process)": os.getpid(), **devtools.serve_processes("bloodcnn")}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.perf_counter()
        r = load(url, ctype, bodies, args.concurrency, args.duration, 0.0)
        wall = time.perf_counter() - t0
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        serve.shutdown()
        ray.shutdown()

    cores = os.cpu_count() or 1
    print(f"\nCommand: `python bench/serve_cpu.py --concurrency {args.concurrency} --duration {args.duration:g}` "
          f"({cores} CPUs)\n")
    print(f"served: {r['rps']:.1f} req/s at concurrency {args.concurrency}, p50 {r['p50'] * 1000:.0f} ms, "
          f"errors {r['errors'] or 0}; ceiling {ceil['tf_function_ips']:.1f} img/s "
          f"= {cores / ceil['tf_function_ips'] * 1000:.1f} core-ms per image\n")
    print("| process | CPU (% of one core) | core-ms per request |")
    print("|---|---|---|")
    for name, sec in sorted(used.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {sec / wall * 100:.0f} | {sec / max(r['ok'], 1) * 1000:.1f} |")
    total = sum(used.values())
    print(f"| **all of the above** | {total / wall * 100:.0f} | {total / max(r['ok'], 1) * 1000:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
