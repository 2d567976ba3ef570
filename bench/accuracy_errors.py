"""Look at the test errors of the models that ``bench/accuracy.py`` trained (a script, not a test).

    .venv/bin/python bench/accuracy_errors.py [--workdir out/bench-accuracy]

For each model in the bench registry: predicts its seed's test split from the source images,
lists every error with the probabilities of the true and the predicted class, and counts the
errors after adding a constant to the Benign log-probability (a class-prior shift), which tells
a wrong threshold (fixed by a small shift) from confidently wrong predictions (not fixed).

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(REPO / "out" / "bench-accuracy"))
    ap.add_argument("--source", default=str(DEFAULT_IMAGES))
    args = ap.parse_args()

    import numpy as np

    from bloodcnn.data.reader import load_manifest
    from bloodcnn.inference import decode_image, load_for_model
    from bloodcnn.model import load_model

    work, source = Path(args.workdir), Path(args.source)
    style_of = {str(f.relative_to(source)): label_style(decode_image(f.read_bytes()))
                for f in sorted(source.glob("*/*.jpg"))}
    print("scale-bar label styles per class folder:")
    for folder in sorted({path.split("/")[0] for path in style_of}):
        counts = Counter(style for path, style in style_of.items() if path.startswith(folder + "/"))
        print(f"  {folder}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    datasets = {load_manifest(d).dataset_version: d for d in sorted(glob.glob(str(work / "datasets" / "*")))}
    for meta_path in sorted(glob.glob(str(work / "models" / "*" / "*" / "metadata.json"))):
        meta = json.loads(Path(meta_path).read_text())
        manifest = load_manifest(datasets[meta["dataset_version"]])
        model = load_model(Path(meta_path).parent / "model.keras")
        tests = [im for im in manifest.images if im.split == "test"]
        x = np.stack([load_for_model((source / im.source).read_bytes(), meta.get("image_size", 224))[0] for im in tests])
        probs = model.predict(x, batch_size=32, verbose=0)
        y = np.array([im.label for im in tests])
        wrong = np.flatnonzero(probs.argmax(1) != y)
        names = manifest.class_names
        print(f"{meta['version']} ({Path(datasets[meta['dataset_version']]).name}): {len(wrong)} errors in {len(y)}")
        for i in wrong:
            print(f"  {tests[i].source}: true {names[y[i]]} p={probs[i, y[i]]:.3f}, "
                  f"predicted {names[probs[i].argmax()]} p={probs[i].max():.3f}, "
                  f"scale bar: {style_of[tests[i].source]}")
        benign = names.index("Benign")
        shifted = []
        for shift in (0.5, 1.0, 2.0):
            logp = np.log(probs + 1e-12)
            logp[:, benign] += shift
            shifted.append(f"+{shift:g}: {int((logp.argmax(1) != y).sum())}")
        print("  errors with the Benign log-probability shifted " + ", ".join(shifted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
