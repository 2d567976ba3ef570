"""Benchmark: data-prepare throughput, and shard read throughput from S3 vs local disk.

    .venv/bin/python bench/data_throughput.py [--source ../shared/data/all-leukemia] [--repeats 3]

Prepares the dataset once to a local folder (timed), copies the identical shards to a local
SeaweedFS S3, then reads the train split through the same ``tf.data`` pipeline (checksum,
parse, JPEG decode, resize to 224) from both, alternating, with a cold cache for every S3
read. Prints markdown rows for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bloodcnn import storage
from bloodcnn.config import load_config
from bloodcnn.data import reader
from bloodcnn.data.prepare import prepare_dataset
from bloodcnn.logs import setup_logging
from bloodcnn.s3server import S3Server


def read_all(uri: str, cache: str | None, image_size: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    ds = reader.make_dataset(uri, "train", batch_size=64, image_size=image_size, cache_dir=cache)
    n = sum(int(images.shape[0]) for images, _ in ds)
    return n, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/all-leukemia"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        os.environ.update(s3.env())
        local = f"{tmp}/local-ds"
        cfg = load_config(environ={}, overrides={"data": {"source": args.source, "output": local}})
        t0 = time.perf_counter()
        manifest = prepare_dataset(cfg, progress=False)
        prep_s = time.perf_counter() - t0
        written = sum(s.total for s in manifest.splits.values())
        # identical bytes on S3
        remote = "s3://bloodcnn/bench-ds"
        store = storage.store_for(remote)
        for split in manifest.splits.values():
            for shard in split.shards:
                store.upload_file(storage.join(local, shard.path), storage.join(remote, shard.path))
        store.write_bytes(storage.join(remote, "manifest.json"), manifest.model_dump_json().encode())
        read_all(local, None, args.image_size)  # warm TF and the page cache once
        local_rates, s3_rates = [], []
        for i in range(args.repeats):
            n, secs = read_all(local, None, args.image_size)
            local_rates.append(n / secs)
            n_s3, secs = read_all(remote, f"{tmp}/cache-{i}", args.image_size)  # cold cache: downloads every shard
            assert n_s3 == n
            s3_rates.append(n / secs)
        lr, sr = statistics.median(local_rates), statistics.median(s3_rates)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, Python {sys.version.split()[0]}; date {stamp}")
    print(f"| prepare (validate, hash, dedup, split, augment x2, shard) | {manifest.scanned} source images, "
          f"{written} records | {prep_s:.1f} s | {manifest.scanned / prep_s:.0f} source images/s |")
    print(f"| read train split, local disk | {n} records, {args.image_size} px | median of {args.repeats} | {lr:.0f} images/s |")
    print(f"| read train split, S3 (SeaweedFS, loopback, cold cache) | {n} records, {args.image_size} px | median of {args.repeats} | {sr:.0f} images/s |")
    print(f"| S3 / local | | | **{sr / lr:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
