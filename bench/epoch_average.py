"""Would averaging the last two epochs help? Measured on runs ``bench/accuracy.py`` already trained.

    .venv/bin/python bench/epoch_average.py /tmp/acc/tta /tmp/acc/tta1 ...   # accuracy.py --workdir folders

Ray Train keeps the checkpoints of each run's last two epochs (``CheckpointConfig(num_to_keep=2)``). For
every run under each workdir's ``runs/`` that kept epochs 9 and 10, this counts the test errors of its seed's
split (answers: the mean of the image's 4 flips) for epoch 9, epoch 10 (the registered version), the
weights of both averaged (a two-point stochastic weight average) and their probabilities averaged (a
two-member ensemble). No retraining. Writes ``bench/results/epoch_average.json``.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from _common import DEFAULT_IMAGES, goal, write_result
from accuracy_errors import flip_probs, load_inputs

EPOCHS = (9, 10)


def main() -> int:
    workdirs = [Path(w) for w in sys.argv[1:]]
    if not workdirs:
        sys.exit(__doc__)

    import numpy as np

    from bloodcnn.data.reader import load_manifest
    from bloodcnn.model import load_model

    rows = []
    for work in workdirs:
        datasets = {load_manifest(d).dataset_version: d for d in sorted(glob.glob(str(work / "datasets" / "*")))}
        for run in sorted(Path(r) for r in glob.glob(str(work / "runs" / "*"))):
            checkpoints = [run / f"epoch-{e:03d}" / "model.keras" for e in EPOCHS]
            if not all(p.is_file() for p in checkpoints):
                continue
            # run names: acc-seed<N>-<dataset version>-<timestamp>
            manifest = load_manifest(datasets["ds-" + run.name.split("-ds-")[1].rsplit("-", 1)[0]])
            tests = [im for im in manifest.images if im.split == "test"]
            first, last = (load_model(p) for p in checkpoints)
            size = int(first.input_shape[1])
            x = load_inputs([DEFAULT_IMAGES / im.source for im in tests], size)
            y = np.array([im.label for im in tests])
            p_first, p_last = flip_probs(first, x).mean(axis=0), flip_probs(last, x).mean(axis=0)
            last.set_weights([(a + b) / 2 for a, b in zip(first.get_weights(), last.get_weights())])
            p_avg = flip_probs(last, x).mean(axis=0)
            errors = {name: int((p.argmax(1) != y).sum()) for name, p in (
                ("epoch_9", p_first), ("epoch_10", p_last), ("weights_averaged", p_avg),
                ("probabilities_averaged", (p_first + p_last) / 2))}
            rows.append({"workdir": str(work), "run": run.name, "image_size": size, **errors})
            print(f"{work.name} {run.name}: " + ", ".join(f"{k} {v}" for k, v in errors.items()), flush=True)
    if not rows:
        sys.exit(f"no run with the checkpoints of epochs {EPOCHS} under {', '.join(map(str, workdirs))}")
    totals = {k: sum(r[k] for r in rows) for k in ("epoch_9", "epoch_10", "weights_averaged", "probabilities_averaged")}
    out = write_result(
        "epoch_average", " ".join([".venv/bin/python", "bench/epoch_average.py", *sys.argv[1:]]),
        {"weights_averaged_errors_saved": goal(totals["epoch_10"] - totals["weights_averaged"], ">= 1")},
        models=len(rows), totals=totals, runs=rows)
    print(f"{len(rows)} models, test errors: " + ", ".join(f"{k} {v}" for k, v in totals.items()) + f" -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
