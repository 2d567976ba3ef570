"""How many test-time views pay: one pass, the 4 flips, or all 8 rotations and flips.

    .venv/bin/python bench/tta_views.py /tmp/acc/cache /tmp/acc/tta ...   # accuracy.py --workdir folders

Training draws one of the 8 rotations/flips of each image (``train.augment_online``), but the
``flips`` answer averages only 4 of them (the image, its left-right, up-down and both flips, i.e. the
180-degree turn). Every model in each workdir's registry answers its seed's validation and test
splits in all 8 views (the 4 flips of the image and the 4 flips of its transpose); the answers of 1,
4 and 8 views are the mean of the first 1, 4 and 8. For each, ``bloodcnn.calibration.evaluate``, the
code that runs at registration, fits the temperature, the conformal quantile and the referral floor
(the recipe's share) on the validation answers and reports on the test answers. No retraining:
the same trained models, only the number of views changes. Writes ``bench/results/tta_views.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import DEFAULT_IMAGES, goal, write_result
from accuracy_errors import load_inputs, registered_models, registration_report

VIEWS = (1, 4, 8)
REFERRAL_SHARE = 0.025  # the recipe's (bench/recipes/flip-tta.yaml)


def dihedral_probs(model, x, chunk: int = 64):
    """Probabilities of the 8 rotations/flips of each image in ``x``: [view, image, class], in the order
    the 4 flips of the image, then the 4 flips of its transpose (so the first 4 are the ``flips`` answer)."""
    import numpy as np

    from bloodcnn.inference import flip_views

    out = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        views = np.concatenate([flip_views(part), flip_views(part.transpose(0, 2, 1, 3))])
        out.append(model.predict(views, batch_size=32, verbose=0).reshape(8, len(part), -1))
    return np.concatenate(out, axis=1)


def main() -> int:
    workdirs = [Path(w) for w in sys.argv[1:]]
    if not workdirs:
        sys.exit(__doc__)

    import numpy as np

    rows = []
    for work, meta, dataset, manifest, model in registered_models(workdirs):
        answers = {}
        for split in ("val", "test"):
            images = [im for im in manifest.images if im.split == split]
            x = load_inputs([DEFAULT_IMAGES / im.source for im in images], meta.get("image_size", 224))
            answers[split] = dihedral_probs(model, x), np.array([im.label for im in images])
        row = {"workdir": str(work), "version": meta["version"], "dataset": dataset.name}
        for n in VIEWS:
            val, test = ((p[:n].mean(axis=0), y) for p, y in (answers["val"], answers["test"]))
            _, report = registration_report(val, test, REFERRAL_SHARE)
            probs, y = test
            row[str(n)] = {"errors": int((probs.argmax(axis=1) != y).sum()), "test_images": len(y),
                           "ece_after": report["after"]["ece"], "nll_after": report["after"]["nll"],
                           **{k: report["conformal"][k] for k in ("coverage", "single_set_share", "single_set_accuracy")}}
        rows.append(row)
        print(f"{work.name} {row['version']} ({row['dataset']}): " + "; ".join(
            f"{n} view(s): {row[str(n)]['errors']} errors, single {row[str(n)]['single_set_share']:.3f} "
            f"right {row[str(n)]['single_set_accuracy']:.4f}" for n in VIEWS), flush=True)
    if not rows:
        sys.exit(f"no registered model under {', '.join(map(str, workdirs))}")

    table = {str(n): {"errors": int(sum(r[str(n)]["errors"] for r in rows)),
                      **{k: round(float(np.mean([r[str(n)][k] for r in rows])), 4)
                         for k in ("coverage", "single_set_share", "single_set_accuracy", "ece_after", "nll_after")},
                      "accuracy_mean": round(float(np.mean([1 - r[str(n)]["errors"] / r[str(n)]["test_images"]
                                                            for r in rows])), 4)}
               for n in VIEWS}
    out = write_result(
        "tta_views", " ".join([".venv/bin/python", "bench/tta_views.py", *sys.argv[1:]]),
        {"fewer_errors_with_8_views": goal(table["8"]["errors"] < table["4"]["errors"], "== 1"),
         "accuracy_mean_8_views": goal(table["8"]["accuracy_mean"], ">= 0.995"),
         "single_set_accuracy_mean_8_views": goal(table["8"]["single_set_accuracy"], ">= 0.998")},
        referral_share=REFERRAL_SHARE, models=len(rows), means=table, runs=rows)
    for n in VIEWS:
        print(f"{n} view(s): " + ", ".join(f"{k} {v}" for k, v in table[str(n)].items()))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
