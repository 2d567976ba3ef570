"""Fine-tune step speed of two recipe knobs that were candidates for a faster recipe: XLA and fewer blocks.

    .venv/bin/python bench/fit_probe.py [--images 192] [--rounds 2]

``fit`` of the classifier at 224 px on synthetic in-memory images (batch 32, Adam), so the input
pipeline is out of the figure: the top 8 blocks unfrozen (the recipe), the same under XLA
(``compile(jit_compile=True)``), and the top 6 blocks. The settings alternate within each round, so a
machine that speeds up or slows down mid-run hits all of them alike; each is timed after a warm-up
``fit`` that traces (and for XLA, compiles) the step, and a first round is run and not counted (the first
fits in a process ran at half speed). Writes ``bench/results/fit_probe.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import DEFAULT_WEIGHTS, goal, write_result

SETTINGS = {"8 blocks": (8, False), "8 blocks, XLA": (8, True), "6 blocks": (6, False)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import tf_keras as keras

    from bloodcnn.model import build_model, unfreeze_top_blocks

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.images, 224, 224, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 4, args.images), 4)
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_ in range(args.rounds + 1):  # round 0 is not counted: a process's first fits run cold
        for name, (blocks, xla) in SETTINGS.items():
            model = build_model(4, 224, str(DEFAULT_WEIGHTS))
            unfreeze_top_blocks(model, blocks)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", jit_compile=xla)
            model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)  # trace / compile
            t0 = time.perf_counter()
            model.fit(x, y, batch_size=32, epochs=1, verbose=0)
            rate = round(args.images / (time.perf_counter() - t0), 1)
            if round_:
                rates[name].append(rate)
            print(f"round {round_}{' (warm-up, not counted)' if not round_ else ''}, {name}: {rate} img/s", flush=True)
    mean = {name: round(statistics.mean(r), 1) for name, r in rates.items()}
    base = mean["8 blocks"]
    out = write_result(
        "fit_probe", " ".join([".venv/bin/python", "bench/fit_probe.py", *sys.argv[1:]]),
        {"xla_speedup": goal(round(mean["8 blocks, XLA"] / base, 3), ">= 1.1"),
         "six_blocks_speedup": goal(round(mean["6 blocks"] / base, 3), ">= 1.1")},
        images=args.images, rounds=args.rounds, img_per_s=rates, mean_img_per_s=mean)
    print(", ".join(f"{k} {v} img/s" for k, v in mean.items()) + f" -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
