"""Report plots as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: str | Path | None) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def confusion_matrix_png(
    matrix: Sequence[Sequence[int]], class_names: list[str], path: str | Path | None = None, *, title: str = ""
) -> bytes:
    """Counts with the row-normalised share (recall per true class) in each cell."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * n, 1.6 + 1.2 * n), dpi=110)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(n), class_names, rotation=30, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    acc = np.trace(cm) / cm.sum() if cm.sum() else 0.0
    ax.set_title((title + "\n" if title else "") + f"accuracy {acc:.3f} ({cm.sum()} images)", fontsize=9)
    fig.tight_layout()
    return _finish(fig, path)


def training_curves_png(
    history: list[dict[str, Any]], fine_tune_start: int | None, path: str | Path | None = None, *, title: str = ""
) -> bytes:
    """Loss and accuracy per epoch (train and validation); a line marks the start of fine-tuning."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        train = [h.get(key) for h in history]
        val = [h.get(f"val_{key}") for h in history]
        ax.plot(epochs, train, "o-", label=f"train {label}")
        if any(v is not None for v in val):
            ax.plot(epochs, [np.nan if v is None else v for v in val], "s--", label=f"val {label}")
        if fine_tune_start is not None and epochs and fine_tune_start < max(epochs):
            ax.axvline(fine_tune_start + 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if epochs:
            ax.set_xticks(epochs)
    ips = [h.get("images_per_s") for h in history if h.get("images_per_s")]
    suffix = f" ({np.median(ips):.0f} img/s)" if ips else ""
    fig.suptitle((title or "training") + suffix, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def reliability_png(report: dict[str, Any], path: str | Path | None = None, *, title: str = "") -> bytes:
    """Reliability diagram (accuracy against confidence per bin, before and after temperature
    scaling) and the risk-coverage curve of the conformal single-class answers."""
    plt = _pyplot()
    fig, (ax, rc) = plt.subplots(1, 2, figsize=(9.5, 4.2), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
    for key, label, colour in (("reliability_before", "before", "tab:red"), ("reliability_after", "after", "tab:blue")):
        bins = [b for b in report[key] if b["count"]]
        stage = report["before" if key.endswith("before") else "after"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour, ms=4,
                label=f"{label} (ECE {stage['ece']:.3f})")
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"temperature T = {report['temperature']:.2f}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    curve = [r for r in report["risk_coverage"] if r["single_set_accuracy"] is not None]
    rc.plot([r["single_set_share"] for r in curve], [r["single_set_accuracy"] for r in curve], "o-", ms=4)
    for r in curve:
        rc.annotate(f"α={r['alpha']:g}", (r["single_set_share"], r["single_set_accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    rc.set_xlabel("share of images answered with one class")
    rc.set_ylabel("accuracy on them")
    conf = report["conformal"]
    rc.set_title(f"{report['score'].upper()} sets at α = {report['alpha']:g}: coverage {conf['coverage']:.3f}, "
                 f"mean size {conf['mean_set_size']:.2f}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)
