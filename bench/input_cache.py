"""What the decoded-image cache (``train.cache_images_mb``) buys: the same training step with and without it.

    .venv/bin/python bench/input_cache.py --dataset /tmp/acc/cache/datasets/seed-1 [--rounds 2]

``--dataset`` is a prepared dataset (``bench/accuracy.py`` leaves one per seed under its workdir). For each
setting, alternating (cache off, on, off, on, ... so a machine that speeds up or slows down mid-run hits
both alike): the input pipeline alone over one epoch of the train split (augmented, shuffled, as the
training loop reads it; CPU seconds and wall), then a fine-tune epoch of the model at 224 px with the top 8
blocks unfrozen fed by that pipeline (img/s), each after one warm-up epoch (which fills the cache).
Writes ``bench/results/input_cache.json``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

from _common import DEFAULT_WEIGHTS, goal, write_result


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a prepared dataset folder or s3:// prefix")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--memory-cache-mb", type=int, default=1024)
    args = p.parse_args()

    import tf_keras as keras

    from bloodcnn.config import TrainConfig
    from bloodcnn.data.reader import fits_in_memory, load_manifest, make_dataset
    from bloodcnn.model import build_model, unfreeze_top_blocks

    manifest = load_manifest(args.dataset)
    if not fits_in_memory(manifest, "train", args.image_size, 0, 1, args.memory_cache_mb, shuffle=True):
        sys.exit(f"the train split of {args.dataset} does not fit --memory-cache-mb {args.memory_cache_mb}")
    t = TrainConfig()
    steps = manifest.splits["train"].total // t.batch_size
    weights = manifest.balanced_class_weights()

    def data(cache_mb: int):
        return make_dataset(args.dataset, "train", batch_size=t.batch_size, image_size=args.image_size,
                            shuffle=True, augment=True, repeat=True, seed=1, manifest=manifest,
                            class_weights=weights, memory_cache_mb=cache_mb)

    figures: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    for _ in range(args.rounds):
        for name, cache_mb in (("off", 0), ("on", args.memory_cache_mb)):
            it = iter(data(cache_mb))
            for _ in range(steps):  # warm-up epoch (fills the cache)
                next(it)
            c0, w0 = cpu_s(), time.perf_counter()
            for _ in range(steps):
                next(it)
            f = figures[name]
            f.setdefault("pipeline_cpu_s", []).append(round(cpu_s() - c0, 2))
            f.setdefault("pipeline_wall_s", []).append(round(time.perf_counter() - w0, 2))

            model = build_model(manifest.num_classes, args.image_size, str(DEFAULT_WEIGHTS), t.dropout)
            unfreeze_top_blocks(model, t.fine_tune_blocks)
            model.compile(optimizer=keras.optimizers.Adam(t.fine_tune_learning_rate),
                          loss="categorical_crossentropy")
            train = data(cache_mb)
            model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0)  # warm-up epoch (fills the cache)
            w0 = time.perf_counter()
            model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0)
            f.setdefault("fine_tune_img_per_s", []).append(round(steps * t.batch_size / (time.perf_counter() - w0), 1))
            print(f"cache {name}: pipeline {f['pipeline_cpu_s'][-1]} s CPU / {f['pipeline_wall_s'][-1]} s wall per "
                  f"epoch, fine-tune {f['fine_tune_img_per_s'][-1]} img/s", flush=True)

    mean = {name: {k: round(statistics.mean(v), 2) for k, v in f.items()} for name, f in figures.items()}
    speedup = round(mean["on"]["fine_tune_img_per_s"] / mean["off"]["fine_tune_img_per_s"], 3)
    cpu_saved = round(1 - mean["on"]["pipeline_cpu_s"] / mean["off"]["pipeline_cpu_s"], 3)
    out = write_result(
        "input_cache", " ".join(["python", "bench/input_cache.py", *sys.argv[1:]]),
        {"fine_tune_speedup": goal(speedup, ">= 1.05"),
         "pipeline_cpu_saved": goal(cpu_saved, ">= 0.3")},
        dataset=manifest.dataset_version, train_images=manifest.splits["train"].total, image_size=args.image_size,
        rounds=args.rounds, per_round=figures, mean=mean)
    print(f"fine-tune speed-up {speedup}x, input pipeline CPU saved {cpu_saved:.0%} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
