"""Soak test of the bloodcnn Serve application (a script, not a CI test).

    .venv/bin/python bench/soak.py [--requests 10000] [--concurrency 32] [--min-duration 180]
                                   [--image-size 96] [--json out/soak.json]

What it does, in one command:

1. starts a local SeaweedFS S3 on 127.0.0.1, builds a MobileNetV2 classifier (``--image-size``
   px, the shared ImageNet backbone weights when present; head untrained) and registers +
   promotes it;
2. starts a local Ray + Serve with the real ``serving.app`` (APIIngress -> one BloodClassifier
   replica, fixed, so memory figures belong to the same processes throughout);
3. sends ``POST /v1/predict`` (one image per request, multipart; real JPEGs from
   ../shared/data/all-leukemia when present, else synthetic smears) from ``--concurrency``
   asyncio clients until at least ``--requests`` requests are done *and* ``--min-duration``
   seconds have passed (so the first and the last minute do not overlap);
4. samples the RSS of the HTTP proxy, the ingress and the classifier replica (and this
   process) every 5 s;
5. prints the error count, throughput, p50/p99 overall and in the first and the last minute
   (the p99 drift), and the RSS of each process at start, after the first minute and at the
   end, as markdown rows for docs/reliability.md; ``--json`` also writes everything.

The load generator runs on the same machine as the server, so it competes for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import DEFAULT_IMAGES, DEFAULT_WEIGHTS, dataset_jpegs, multipart_bodies, percentile


def load_images(folder: str, n: int = 64) -> tuple[list[bytes], str, str]:
    images = dataset_jpegs(folder, n)
    if images:
        return images, "image/jpeg", f"{len(images)} JPEGs from {folder}"
    from serving import devtools

    return [devtools.image_bytes("JPEG", 224, seed=i) for i in range(n)], "image/jpeg", f"{n} synthetic 224 px JPEGs"


# ------------------------------------------------------------------------------ processes and memory


def serve_processes(app: str) -> dict[str, int]:
    from serving.devtools import serve_processes as replicas

    return {"driver (load generator)": os.getpid(), **replicas(app)}


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], t0: float, every: float = 5.0):
        super().__init__(daemon=True)
        self.pids, self.t0, self.every = pids, t0, every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop_event = threading.Event()

    def sample(self) -> None:
        import psutil

        row = {}
        for name, pid in self.pids.items():
            try:
                row[name] = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                row[name] = float("nan")
        self.samples.append((time.perf_counter() - self.t0, row))

    def run(self) -> None:
        self.sample()
        while not self.stop_event.wait(self.every):
            self.sample()

    def at(self, t: float) -> dict[str, float]:
        """The first sample taken at or after ``t`` seconds (else the last one)."""
        for ts, row in self.samples:
            if ts >= t:
                return row
        return self.samples[-1][1]


# ------------------------------------------------------------------------------ load


async def _soak(url: str, ctype: str, bodies: list[bytes], concurrency: int, min_requests: int,
                min_duration: float, progress_every: float = 30.0) -> tuple[list[tuple[float, float, str]], float, float]:
    import httpx

    records: list[tuple[float, float, str]] = []  # (end time since start, latency s, status)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t_start = time.perf_counter()
    done = asyncio.Event()
    async with httpx.AsyncClient(limits=limits, timeout=120.0) as client:

        async def worker(w: int) -> None:
            i = w
            while not done.is_set():
                body = bodies[i % len(bodies)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"content-type": ctype})
                    status = str(r.status_code)
                    if r.status_code == 200:
                        r.json()["results"][0]["class"]
                except Exception as exc:  # transport errors count as errors, with their type
                    status = type(exc).__name__
                t1 = time.perf_counter()
                records.append((t1 - t_start, t1 - t0, status))
                if len(records) >= min_requests and t1 - t_start >= min_duration:
                    done.set()

        async def progress() -> None:
            while not done.is_set():
                await asyncio.sleep(progress_every)
                n = len(records)
                errs = sum(1 for r in records if r[2] != "200")
                print(f"  {time.perf_counter() - t_start:6.0f}s  {n:6d} requests  {errs} errors", flush=True)

        reporter = asyncio.create_task(progress())
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        reporter.cancel()
    return records, t_start, time.perf_counter()


def window(records, t_from: float, t_to: float) -> dict:
    lat = [r[1] for r in records if t_from <= r[0] < t_to and r[2] == "200"]
    errs = sum(1 for r in records if t_from <= r[0] < t_to and r[2] != "200")
    return {"from_s": t_from, "to_s": t_to, "ok": len(lat), "errors": errs, "rps": len(lat) / max(1e-9, t_to - t_from),
            "p50_ms": percentile(lat, 0.5) * 1000, "p99_ms": percentile(lat, 0.99) * 1000}


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="at least this many requests")
    ap.add_argument("--min-duration", type=float, default=180.0, help="and at least this many seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=96, help="model input size (px)")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help='backbone weights file, or "none"')
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEGs (searched recursively)")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-s", type=float, default=0.02)
    ap.add_argument("--window", type=float, default=60.0, help="length of the first/last window (s)")
    ap.add_argument("--json", default=None, help="also write the raw figures to this JSON file")
    args = ap.parse_args(argv)
    if args.min_duration < 2 * args.window:
        ap.error("--min-duration must be at least twice --window so the first and last windows do not overlap")

    from bloodcnn import storage
    from bloodcnn.config import load_config
    from bloodcnn.s3server import S3Server
    from serving import devtools

    raw, image_type, image_note = load_images(args.images)
    ctype, bodies = multipart_bodies(raw, image_type)
    weights = args.weights if args.weights != "none" and Path(args.weights).is_file() else "none"
    started = datetime.now(timezone.utc)
    results: dict = {
        "date": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_before": os.getloadavg(), "args": vars(args), "images": image_note, "weights": weights,
    }
    with S3Server(buckets=("bloodcnn",)) as s3:
        os.environ.update(s3.env())
        storage._s3_store.cache_clear()
        registry_uri = "s3://bloodcnn/models"
        model = devtools.make_model(args.image_size, weights=weights, kernel_scale=0.05, seed=1)
        meta = devtools.register_model(registry_uri, model, version=f"soak-{args.image_size}")
        del model
        print(f"registered {meta.model_name}/{meta.version} ({meta.image_size} px) in {registry_uri}", flush=True)
        cfg = load_config(environ={}, overrides={
            "registry": {"uri": registry_uri},
            "serve": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s,
                      "max_ongoing_requests": max(64, args.concurrency * 2), "version_poll_s": 10,
                      "api_key_env": "BLOODCNN_SOAK_UNSET_API_KEY",
                      "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        })
        with devtools.LocalStack({"soak": ("/", cfg)}, env={"BLOODCNN_SOAK_UNSET_API_KEY": None, "RAY_SERVE_LOG_TO_STDERR": "0"},
                                 num_cpus=max(4, os.cpu_count() or 1)) as local:
            from serving.app import wait_ready

            url = local.url("soak")
            t0 = time.perf_counter()
            wait_ready(url, 300)
            results["ready_s"] = round(time.perf_counter() - t0, 1)
            pids = serve_processes("soak")
            results["pids"] = pids
            print(f"serving at {url} (ready after {results['ready_s']} s); processes {pids}", flush=True)
            print(f"soak: >= {args.requests} requests and >= {args.min_duration:.0f} s at concurrency "
                  f"{args.concurrency}", flush=True)
            t_origin = time.perf_counter()
            sampler = RssSampler(pids, t_origin)
            sampler.start()
            records, t_start, t_end = asyncio.run(_soak(f"{url}/v1/predict", ctype, bodies, args.concurrency,
                                                         args.requests, args.min_duration))
            sampler.stop_event.set()
            sampler.join(10)
            sampler.sample()
            alive = serve_processes("soak")
            import httpx

            metrics = httpx.get(f"{url}/metrics", timeout=30).text
    duration = t_end - t_start
    offset = t_start - t_origin
    ok = [r for r in records if r[2] == "200"]
    errors: dict[str, int] = {}
    for r in records:
        if r[2] != "200":
            errors[r[2]] = errors.get(r[2], 0) + 1
    first = window(records, 0.0, args.window)
    last = window(records, duration - args.window, duration + 1e-9)
    rss_start = sampler.samples[0][1]
    rss_1min = sampler.at(offset + args.window)
    rss_end = sampler.samples[-1][1]
    results.update({
        "requests": len(records), "errors": errors, "error_count": sum(errors.values()),
        "duration_s": round(duration, 1), "rps": len(ok) / duration,
        "p50_ms": percentile([r[1] for r in ok], 0.5) * 1000, "p99_ms": percentile([r[1] for r in ok], 0.99) * 1000,
        "first_window": first, "last_window": last,
        "p99_drift_ms": last["p99_ms"] - first["p99_ms"],
        "p99_drift_ratio": last["p99_ms"] / first["p99_ms"] if first["p99_ms"] else float("nan"),
        "rss_mb": {name: {"start": rss_start.get(name), "after_first_window": rss_1min.get(name),
                          "end": rss_end.get(name)} for name in pids},
        "rss_samples": sampler.samples,
        "same_processes_at_end": alive == pids,
        "loadavg_after": os.getloadavg(),
        "batch_size_sum_count": [line for line in metrics.splitlines()
                                 if line.startswith("bloodcnn_batch_size_") and "bucket" not in line],
    })
    report(results, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if results["error_count"] == 0 and results["same_processes_at_end"] else 1


def report(r: dict, args) -> None:
    cmd = "python bench/soak.py " + " ".join(sys.argv[1:])
    print()
    print(f"Command: `{cmd.strip()}`")
    print(f"Date: {r['date']}. Machine: {r['host']}, {r['cpus']} CPUs, {r['mem_gib']} GiB; "
          f"load average before {r['loadavg_before'][0]:.1f}, after {r['loadavg_after'][0]:.1f}. "
          f"Model: {args.image_size} px MobileNetV2 (weights: {Path(r['weights']).name}); images: {r['images']}.")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| requests (concurrency {args.concurrency}) | {r['requests']} in {r['duration_s']:.0f} s "
          f"({r['rps']:.1f} req/s) |")
    print(f"| errors | {r['error_count']}" + (f" {r['errors']}" if r["errors"] else "") + " |")
    print(f"| p50 / p99 overall | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} ms |")
    f, l = r["first_window"], r["last_window"]
    print(f"| p99 first {args.window:.0f} s / last {args.window:.0f} s | {f['p99_ms']:.0f} / {l['p99_ms']:.0f} ms "
          f"(drift {r['p99_drift_ms']:+.0f} ms, x{r['p99_drift_ratio']:.2f}) |")
    print(f"| throughput first / last window | {f['rps']:.1f} / {l['rps']:.1f} req/s |")
    for name, m in r["rss_mb"].items():
        print(f"| RSS {name}: start / after {args.window:.0f} s / end | {m['start']:.0f} / "
              f"{m['after_first_window']:.0f} / {m['end']:.0f} MiB (growth after the first window "
              f"{m['end'] - m['after_first_window']:+.0f} MiB) |")
    print(f"| same server processes at the end | {'yes' if r['same_processes_at_end'] else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
