"""The test errors every model makes: how far the accuracy goals of issue 14 can go on these splits.

    .venv/bin/python bench/error_floor.py /tmp/acc/cache /tmp/acc/tta ...   # accuracy.py --workdir folders

Every model in each workdir's registry answers its seed's test split as the version does (one forward
pass, or the mean of the image's 4 flips). Per seed (the folder name of the model's dataset), an image
wrong in every model of that seed is a *persistent* error: no recipe tried moved it. If every other
error vanished, the mean accuracy over the seeds would be at most ``1 - persistent / n`` per seed:
``accuracy_mean_ceiling``. A persistent error leaves the unflagged answers only if a flag can catch it
within the 3% referral budget, i.e. at most 3% of the model's answers are less confident than it;
``single_set_accuracy_mean_ceiling`` counts the ones that cannot be caught in the seed's best model.
The mean answer of all the seed's models is the most that averaging models (an ensemble) could give:
``ensemble_accuracy_mean`` counts its errors.
Writes ``bench/results/error_floor.json``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from _common import goal, write_result
from accuracy_errors import registered_models, version_answers

REFERRAL_BUDGET = 0.03  # single_set_share_mean >= 0.97


def main() -> int:
    workdirs = [Path(w) for w in sys.argv[1:]]
    if not workdirs:
        sys.exit(__doc__)

    import numpy as np

    by_seed: dict[str, list[dict]] = defaultdict(list)
    answers_of: dict[str, list] = defaultdict(list)  # per seed: each model's test probabilities
    tests_of: dict[str, list[str]] = {}
    for work, meta, dataset, manifest, model in registered_models(workdirs):
        tests = [im for im in manifest.images if im.split == "test"]
        if tests_of.setdefault(dataset.name, [im.source for im in tests]) != [im.source for im in tests]:
            sys.exit(f"{dataset}: another test split than the other {dataset.name} datasets")
        probs, y, _ = version_answers(model, meta, tests)
        answers_of[dataset.name].append((probs, y))
        top = probs.max(axis=1)
        wrong = np.flatnonzero(probs.argmax(axis=1) != y)
        by_seed[dataset.name].append({
            "workdir": str(work), "version": meta["version"],
            # the share of this model's answers less confident than each error: flagging the
            # error would flag at least that share
            "errors": {tests[i].source: {"p_predicted": round(float(top[i]), 4),
                                         "flag_share": round(float((top < top[i]).mean()), 4)}
                       for i in wrong},
        })
        print(f"{work.name} {meta['version']} ({dataset.name}): {len(wrong)} errors", flush=True)
    if not by_seed:
        sys.exit(f"no registered model under {', '.join(map(str, workdirs))}")

    seeds, accuracy_ceilings, single_ceilings, ensemble_accuracies = {}, [], [], []
    for seed, models in sorted(by_seed.items()):
        n = len(tests_of[seed])
        persistent = sorted(set.intersection(*(set(m["errors"]) for m in models)))
        # in the seed's best model for it: the persistent errors more confident than the budget allows to flag
        uncatchable = min(sum(m["errors"][s]["flag_share"] > REFERRAL_BUDGET for s in persistent) for m in models)
        accuracy_ceilings.append(1 - len(persistent) / n)
        single_ceilings.append(1 - uncatchable / n)
        y = answers_of[seed][0][1]
        ensemble_wrong = np.flatnonzero(np.mean([p for p, _ in answers_of[seed]], axis=0).argmax(axis=1) != y)
        ensemble_accuracies.append(1 - len(ensemble_wrong) / n)
        seeds[seed] = {
            "models": len(models), "test_images": n,
            "errors_per_model": [len(m["errors"]) for m in models],
            "persistent": {s: {"p_predicted": [m["errors"][s]["p_predicted"] for m in models],
                               "flag_share": [m["errors"][s]["flag_share"] for m in models]} for s in persistent},
            "uncatchable_within_budget": uncatchable,
            "accuracy_ceiling": round(accuracy_ceilings[-1], 4),
            "single_set_accuracy_ceiling": round(single_ceilings[-1], 4),
            "ensemble_errors": [tests_of[seed][i] for i in ensemble_wrong],
            "ensemble_accuracy": round(ensemble_accuracies[-1], 4),
        }
        print(f"{seed}: {len(models)} models, errors {seeds[seed]['errors_per_model']}; wrong in every one: "
              + (", ".join(persistent) or "none") + f"; accuracy ceiling {accuracy_ceilings[-1]:.4f}, "
              f"single-set accuracy ceiling {single_ceilings[-1]:.4f}; the mean of its models: {len(ensemble_wrong)} "
              "errors (" + ", ".join(seeds[seed]["ensemble_errors"]) + ")")
    acc, single, ensemble = (float(np.mean(v)) for v in (accuracy_ceilings, single_ceilings, ensemble_accuracies))
    out = write_result(
        "error_floor", " ".join([".venv/bin/python", "bench/error_floor.py", *sys.argv[1:]]),
        {"accuracy_mean_ceiling": goal(round(acc, 4), ">= 0.995"),
         "single_set_accuracy_mean_ceiling": goal(round(single, 4), ">= 0.998"),
         "ensemble_accuracy_mean": goal(round(ensemble, 4), ">= 0.995")},
        referral_budget=REFERRAL_BUDGET, seeds=seeds, models=by_seed)
    print(f"ceilings over {len(seeds)} seeds: accuracy_mean {acc:.4f} (goal >= 0.995), single_set_accuracy_mean "
          f"{single:.4f} (goal >= 0.998); the mean answer of each seed's models: accuracy_mean {ensemble:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
