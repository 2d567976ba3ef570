"""What a referral share (``registry.calibration.referral_share``) does to the flagged answers.

    .venv/bin/python bench/referral_share.py /tmp/acc/cache /tmp/acc/tta ...   # accuracy.py --workdir folders

Every model in each workdir's registry answers its seed's validation and test splits as the version
does (one pass, or the mean of the 4 flips); ``bloodcnn.calibration.evaluate``, the code that runs at
registration, then fits the temperature, the conformal quantile (alpha 0.01, LAC) and the referral
floor on the validation answers and reports the sets on the test answers, once per share. No
retraining: the same trained models, only the rule that flags answers changes. The goals are the
issue's, over every model given (each workdir of ``bench/accuracy.py --seeds 3`` is one 3-seed run).
Writes ``bench/results/referral_share.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import goal, write_result
from accuracy_errors import registered_models, registration_report, version_answers

SHARES = (0.0, 0.01, 0.02, 0.025, 0.03)
GOAL_SHARE = 0.025  # the recipe's (bench/recipes/flip-tta.yaml)


def main() -> int:
    workdirs = [Path(w) for w in sys.argv[1:]]
    if not workdirs:
        sys.exit(__doc__)

    import numpy as np

    rows = []
    for work, meta, dataset, manifest, model in registered_models(workdirs):
        answers = {split: version_answers(model, meta, [im for im in manifest.images if im.split == split])[:2]
                   for split in ("val", "test")}
        row = {"workdir": str(work), "version": meta["version"], "dataset": dataset.name}
        for share in SHARES:
            fitted, report = registration_report(answers["val"], answers["test"], share)
            row[str(share)] = {"min_confidence": round(fitted.min_confidence, 4), **{
                k: report["conformal"][k] for k in ("coverage", "single_set_share", "single_set_accuracy")}}
        rows.append(row)
        print(f"{work.name} {row['version']} ({row['dataset']}): " + "; ".join(
            f"share {s}: floor {row[str(s)]['min_confidence']:.3f}, single {row[str(s)]['single_set_share']:.3f} "
            f"right {row[str(s)]['single_set_accuracy']:.4f}" for s in SHARES), flush=True)
    if not rows:
        sys.exit(f"no registered model under {', '.join(map(str, workdirs))}")

    def mean(share: float, key: str) -> float:
        return round(float(np.mean([r[str(share)][key] for r in rows])), 4)

    table = {str(s): {k: mean(s, k) for k in ("coverage", "single_set_share", "single_set_accuracy")} for s in SHARES}
    out = write_result(
        "referral_share", " ".join([".venv/bin/python", "bench/referral_share.py", *sys.argv[1:]]),
        {"conformal_coverage_mean": goal(table[str(GOAL_SHARE)]["coverage"], ">= 0.985"),
         "single_set_accuracy_mean": goal(table[str(GOAL_SHARE)]["single_set_accuracy"], ">= 0.998"),
         "single_set_share_mean": goal(table[str(GOAL_SHARE)]["single_set_share"], ">= 0.97")},
        goal_referral_share=GOAL_SHARE, models=len(rows), means=table, runs=rows)
    for s in SHARES:
        print(f"referral share {s}: " + ", ".join(f"{k} {v}" for k, v in table[str(s)].items()))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
