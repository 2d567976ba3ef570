"""Look at the test errors of the models that ``bench/accuracy.py`` trained (a script, not a test).

    .venv/bin/python bench/accuracy_errors.py [--workdir out/bench-accuracy]

For each model in the bench registry: predicts its seed's test split from the source images,
lists every error of the version's answers (one forward pass, or the mean of the image's 4 flips for
a version with test-time augmentation) with the probabilities of the true and the predicted class,
compares the error counts of one pass, of each flip alone and of the flip mean, and counts the
errors after adding a constant to the Benign log-probability (a class-prior shift), which tells
a wrong threshold (fixed by a small shift) from confidently wrong predictions (not fixed). Each
error's 5 nearest training images in the model's pooled features, with their classes, tell a cell
that looks like the other class (its neighbours are of that class) from a model that failed on it.
Last, the temperature fitted on the version's validation split with and without the log-normal
prior of ``bloodcnn.calibration``, and the test NLL each gives.

Each error also names the style of the scale-bar label burnt into the image's lower-right corner
(red text, a large black bar, or small black text on white: three acquisition set-ups whose mix
differs by class); the style counts per class are printed first.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import Counter
from pathlib import Path

from _common import DEFAULT_IMAGES, REPO


def label_style(rgb) -> str:
    """The scale-bar label in the lower-right corner of a 224 px ALL image: "red" (red text),
    "black bar" (a large black "200 px" bar) or "small" (small black text on a white box)."""
    import numpy as np

    corner = np.asarray(rgb, dtype=np.int32)[180:224, 130:224]
    red = ((corner[..., 0] - corner[..., 1]) > 70) & ((corner[..., 0] - corner[..., 2]) > 50)
    if red.sum() > 8:
        return "red"
    return "black bar" if (corner.max(axis=2) < 60).sum() > 20 else "small"


def load_inputs(paths, size: int):
    """The model inputs (float32 [N, S, S, 3]) of the image files at ``paths``."""
    import numpy as np

    from bloodcnn.inference import load_for_model

    return np.stack([load_for_model(p.read_bytes(), size)[0] for p in paths])


def flip_probs(model, x):
    """Probabilities of the 4 flips of each image in ``x``: [flip, image, class], flip 0 the image itself."""
    from bloodcnn.inference import TTA_VIEWS, flip_views

    return model.predict(flip_views(x), batch_size=32, verbose=0).reshape(TTA_VIEWS["flips"], len(x), -1)


def registered_models(workdirs):
    """``(workdir, metadata, dataset folder, manifest, model)`` for every version in the registries
    of these ``bench/accuracy.py --workdir`` folders, with the dataset it was trained on."""
    from bloodcnn.data.reader import load_manifest
    from bloodcnn.model import load_model

    for work in map(Path, workdirs):
        datasets = {load_manifest(d).dataset_version: Path(d) for d in sorted(glob.glob(str(work / "datasets" / "*")))}
        for meta_path in sorted(glob.glob(str(work / "models" / "*" / "*" / "metadata.json"))):
            meta = json.loads(Path(meta_path).read_text())
            dataset = datasets[meta["dataset_version"]]
            yield work, meta, dataset, load_manifest(str(dataset)), load_model(Path(meta_path).parent / "model.keras")


def version_answers(model, meta: dict, images, source: Path = DEFAULT_IMAGES):
    """``(probabilities, labels, 4-flip views)`` of the manifest ``images`` as the version answers them:
    the mean of the 4 flips for a ``flips`` version, else the first view (one forward pass)."""
    import numpy as np

    views = flip_probs(model, load_inputs([source / im.source for im in images], meta.get("image_size", 224)))
    probs = views.mean(axis=0) if meta.get("test_time_augmentation") == "flips" else views[0]
    return probs, np.array([im.label for im in images]), views


def registration_report(val, test, referral_share: float):
    """``(Calibration, report)`` of ``bloodcnn.calibration.evaluate`` as registration runs it (the
    embedded ``registry.calibration`` settings), fitted on the validation answers ``val`` and
    reported on the test answers ``test`` (each ``(probabilities, labels)``), at this referral share."""
    from bloodcnn import calibration
    from bloodcnn.config import load_config

    c = load_config(environ={}).registry.calibration
    return calibration.evaluate(*val, *test, alpha=c.alpha, score=c.score, prior_sigma=c.temperature_prior_sigma,
                                referral_share=referral_share)


def normalised(f):
    import numpy as np

    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def features(embed, paths, size: int, chunk: int = 128):
    """L2-normalised pooled features of the images at ``paths``, decoded a chunk at a time."""
    import numpy as np

    out = [embed.predict(load_inputs(paths[start:start + chunk], size), batch_size=32, verbose=0)
           for start in range(0, len(paths), chunk)]
    return normalised(np.concatenate(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "out" / "bench-accuracy"))
    ap.add_argument("--source", default=str(DEFAULT_IMAGES))
    args = ap.parse_args()

    import numpy as np
    import tf_keras as keras

    from bloodcnn import calibration
    from bloodcnn.inference import decode_image

    source = Path(args.source)
    style_of = {str(f.relative_to(source)): label_style(decode_image(f.read_bytes()))
                for f in sorted(source.glob("*/*.jpg"))}
    print("scale-bar label styles per class folder:")
    for folder in sorted({path.split("/")[0] for path in style_of}):
        counts = Counter(style for path, style in style_of.items() if path.startswith(folder + "/"))
        print(f"  {folder}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for _, meta, dataset, manifest, model in registered_models([args.workdir]):
        size, tta = meta.get("image_size", 224), meta.get("test_time_augmentation", "none")
        tests = [im for im in manifest.images if im.split == "test"]
        probs, y, views = version_answers(model, meta, tests, source)
        one_pass, flip_mean = views[0], views.mean(axis=0)
        wrong = np.flatnonzero(probs.argmax(1) != y)
        names = manifest.class_names
        print(f"{meta['version']} ({dataset.name}, test-time augmentation "
              f"{tta}): {len(wrong)} errors in {len(y)}; one forward pass: "
              f"{int((one_pass.argmax(1) != y).sum())}, mean of the 4 flips: {int((flip_mean.argmax(1) != y).sum())}, "
              "each flip alone: " + ", ".join(str(int((v.argmax(1) != y).sum())) for v in views))
        train = [im for im in manifest.images if im.split == "train"]
        embed = keras.Model(model.input, model.get_layer("gap").output)
        train_f = features(embed, [source / im.source for im in train], size)
        wrong_f = (normalised(embed.predict(load_inputs([source / tests[i].source for i in wrong], size),
                                            batch_size=32, verbose=0)) if len(wrong) else None)
        for k, i in enumerate(wrong):
            print(f"  {tests[i].source}: true {names[y[i]]} p={probs[i, y[i]]:.3f}, "
                  f"predicted {names[probs[i].argmax()]} p={probs[i].max():.3f}, "
                  f"scale bar: {style_of[tests[i].source]}")
            sims = train_f @ wrong_f[k]
            near = np.argsort(-sims)[:5]
            print("    nearest training images (cosine, the model's pooled features): " + ", ".join(
                f"{Path(train[j].source).stem} {names[train[j].label]} {sims[j]:.3f}" for j in near))
        benign = names.index("Benign")
        shifted = []
        for shift in (0.5, 1.0, 2.0):
            logp = np.log(probs + 1e-12)
            logp[:, benign] += shift
            shifted.append(f"+{shift:g}: {int((logp.argmax(1) != y).sum())}")
        print("  errors with the Benign log-probability shifted " + ", ".join(shifted))
        pv, yv, _ = version_answers(model, meta, [im for im in manifest.images if im.split == "val"], source)
        fits = [f"T = 1: test NLL {calibration.nll(probs, y):.4f}"]
        for sigma in (0.0, 1.0, 0.5, 0.25):
            t = calibration.fit_temperature(pv, yv, prior_sigma=sigma)
            fits.append(f"prior sigma {sigma:g}: T = {t:.3f}, test NLL {calibration.nll(calibration.apply_temperature(probs, t), y):.4f}")
        print(f"  temperature fitted on the val split ({int((pv.argmax(1) != yv).sum())} errors in {len(yv)}): "
              + "; ".join(fits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
