"""A model card per registered version (Mitchell et al., 2019): what it was trained on, how well
it does, how far its probabilities and prediction sets can be trusted, and where it fails.

Rendered once at registration from the test report and the dataset manifest, stored next to the
model as ``model_card.md`` and ``model_card.html`` (markdown-it-py, CommonMark plus tables).
"""

from __future__ import annotations

from typing import Any

INTENDED_USE = (
    "Research use only. bloodcnn is not a medical device and its output is not a diagnosis. It sorts "
    "images of peripheral blood smears into Benign, Early Pre-B, Pre-B and Pro-B acute lymphoblastic "
    "leukemia to help triage them; every answer, and above all one flagged *uncertain*, goes to a "
    "specialist. It has seen one dataset from one lab: images from other microscopes, stains or "
    "scanners are outside what it was measured on."
)

LOOK_ALIKES = (
    "Benign and Early Pre-B cells look alike at this magnification (hematogones against early "
    "blasts): the errors `bench/accuracy_errors.py` lists on the ALL dataset are mostly between "
    "these two classes. Treat a set holding both as a referral. Some of them are confident: a few "
    "Benign images of that dataset are taken for Early Pre-B, at probabilities up to 0.999, by every "
    "model trained on it so far (`bench/error_floor.py`), and no referral rule flags an answer that "
    "sure. An answer that is not flagged is likely right, not certain."
)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(meta: dict[str, Any], manifest: Any | None = None) -> str:
    """``meta``: the version's metadata (ModelMetadata.model_dump() or the dict given to register)."""
    m = meta.get("metrics") or {}
    names = list(meta["class_names"])
    train = (meta.get("config") or {}).get("train", {})
    lines = [f"# Model card: {meta.get('model_name', 'bloodcnn')} {meta.get('version', '')}".rstrip(), ""]
    lines += [f"Created {meta.get('created_at', 'now')} from code {meta.get('code_version', 'unknown')}; "
              f"{meta['image_size']} px MobileNetV2 (ImageNet transfer learning, tf_keras).", ""]
    lines += ["## Intended use", "", INTENDED_USE, ""]

    lines += ["## Data", "", f"Dataset version `{meta.get('dataset_version')}`."]
    if manifest is not None:
        lines += [
            f"Source `{manifest.source}`: {manifest.scanned} files scanned, {len(manifest.bad_images)} unreadable, "
            f"{len(manifest.exact_duplicates)} exact duplicates removed (sha256), {manifest.near_duplicate_groups} "
            "near-duplicate groups (perceptual hash) kept whole within one split.",
            f"Split: grouped and stratified by class, seed {manifest.seed}; a near-duplicate group never spans two "
            "splits, so no test image has a twin in training.", "",
            "| split | " + " | ".join(names) + " | total | augmented copies |",
            "|---|" + "---|" * (len(names) + 2),
        ]
        for split, info in manifest.splits.items():
            counts = [str(info.counts.get(n, 0)) for n in names]
            lines.append(f"| {split} | " + " | ".join(counts) + f" | {sum(info.counts.values())} | {info.augmented} |")
    lines.append("")

    lines += ["## Recipe", ""]
    if train:
        lines += [
            f"- phase 1: {train.get('epochs')} epoch(s), the new head on the frozen base, Adam at "
            f"{train.get('learning_rate')} ({train.get('lr_schedule')});",
            f"- phase 2: {train.get('fine_tune_epochs')} epoch(s) with the top {train.get('fine_tune_blocks')} "
            f"blocks unfrozen, Adam at {train.get('fine_tune_learning_rate')};",
            f"- batch {train.get('batch_size')} per worker, {train.get('num_workers')} worker(s), class weighting "
            f"{train.get('class_weighting')}, online augmentation {train.get('augment_online')}, seed "
            f"{train.get('seed')}.",
        ]
    if meta.get("test_time_augmentation") == "flips":
        lines.append("- answers: the mean probabilities of the image and its 3 flips (test-time augmentation), "
                     "in evaluation, calibration and serving alike.")
    lines.append("")

    lines += ["## Performance on the test split", ""]
    if m:
        lines += [f"{m.get('num_examples')} images never seen in training or model choice: accuracy "
                  f"**{_num(m.get('accuracy'))}**, macro-F1 **{_num(m.get('macro_f1'))}**, ROC-AUC (one-vs-rest, "
                  f"macro) {_num(m.get('roc_auc_ovr_macro'))}.", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for n in names:
            c = m.get("per_class", {}).get(n, {})
            lines.append(f"| {n} | {_num(c.get('precision'), 3)} | {_num(c.get('recall'), 3)} | "
                         f"{_num(c.get('f1'), 3)} | {c.get('support', 'n/a')} |")
        cm = m.get("confusion_matrix")
        if cm:
            lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                      "| true \\ predicted | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {n} | " + " | ".join(str(v) for v in row) + " |" for n, row in zip(names, cm)]
    lines.append("")

    c = m.get("calibration")
    lines += ["## Calibration and prediction sets", ""]
    if c:
        conf = c["conformal"]
        lines += [
            f"Temperature scaling fitted on the {c.get('fitted_on', 'val')} split ({c['calibration_examples']} images): "
            f"T = {c['temperature']:.3f}.", "",
            "| on the test split | ECE (15 bins) | NLL | Brier |", "|---|---|---|---|",
            f"| before | {_num(c['before']['ece'])} | {_num(c['before']['nll'])} | {_num(c['before']['brier'])} |",
            f"| after | {_num(c['after']['ece'])} | {_num(c['after']['nll'])} | {_num(c['after']['brier'])} |", "",
            f"Split-conformal prediction sets ({c['score'].upper()} score, alpha {c['alpha']:g}: a set holds the "
            f"true class with probability at least {1 - c['alpha']:.0%}): coverage {_pct(conf['coverage'])}, mean "
            f"set size {conf['mean_set_size']:.2f}; {_pct(conf['single_set_share'])} of the test images get one "
            f"class, and {_pct(conf['single_set_accuracy'])} of those are right. The service flags every other "
            "answer *uncertain: refer to a specialist*.",
        ]
        if c.get("min_confidence"):
            lines[-1] += (f" Answers under a top probability of {c['min_confidence']:.3f} hold at least two "
                          f"classes, so they are flagged too: with them, about {_pct(c.get('referral_share'))} of the "
                          "validation split's answers are flagged.")
    else:
        lines.append("This version has no calibration: the service flags answers whose top probability is under "
                     "`serve.uncertain_threshold`, a rule whose error rate was not measured.")
    lines.append("")

    lines += ["## Known failure modes", "", LOOK_ALIKES]
    cm = m.get("confusion_matrix")
    if cm:
        pairs = sorted(((cm[i][j], names[i], names[j]) for i in range(len(names)) for j in range(len(names))
                        if i != j and cm[i][j]), reverse=True)
        if pairs:
            lines += ["", "Errors of this version on the test split, most frequent first:", ""]
            lines += [f"- {n} x {t} taken for {p}" for n, t, p in pairs[:6]]
        else:
            lines += ["", "This version made no error on the test split; the look-alikes above still apply."]
    lines.append("")
    return "\n".join(lines)


def render_html(markdown_text: str, title: str) -> str:
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:900px;margin:2em auto;padding:0 1em;color:#1b2430}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #c8d0da;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}code{{background:#eef2f6;padding:0 .2em}}</style>
</head><body>
{body}</body></html>
"""


def render(meta: dict[str, Any], manifest: Any | None = None) -> tuple[bytes, bytes]:
    """(model_card.md, model_card.html) as UTF-8 bytes."""
    md = render_markdown(meta, manifest)
    title = f"Model card: {meta.get('model_name', 'bloodcnn')} {meta.get('version', '')}".strip()
    return md.encode(), render_html(md, title).encode()
