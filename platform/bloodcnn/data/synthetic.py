"""Synthetic class folders for tests, benchmarks and GPU checks (the real images stay in ../shared).

Each class has its own cell colour and size on a noisy smear-like background, so a frozen
MobileNetV2 separates them after a few steps. ``duplicates`` adds byte-identical copies and
``near_duplicates`` adds re-encoded, slightly brightened copies, to exercise the leak checks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

CLASS_FOLDERS = ("Benign", "Early", "Pre", "Pro")
_COLOURS = [(150, 60, 170), (60, 60, 200), (200, 80, 80), (70, 160, 90)]


def synthetic_image(label: int, index: int, size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([seed, label, index])
    bg = rng.normal(225, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):  # red blood cells scattered around, unlike per image
        rr = size * rng.uniform(0.08, 0.14)
        x, y = rng.uniform(0, 1, 2) * size
        draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=(int(rng.integers(200, 235)), 130, 140))
    r = size * (0.14 + 0.05 * label) * rng.uniform(0.85, 1.15)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    colour = tuple(int(c + rng.integers(-20, 21)) for c in _COLOURS[label % len(_COLOURS)])
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return img


def make_class_folders(
    root: str | Path,
    per_class: int = 40,
    size: int = 64,
    seed: int = 0,
    duplicates: int = 0,
    near_duplicates: int = 0,
    classes: tuple[str, ...] = CLASS_FOLDERS,
) -> Path:
    root = Path(root)
    for label, folder in enumerate(classes):
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            synthetic_image(label, i, size, seed).save(d / f"{folder}-{i:04d}.jpg", quality=92)
        for i in range(duplicates):
            (d / f"{folder}-{i:04d}-copy.jpg").write_bytes((d / f"{folder}-{i:04d}.jpg").read_bytes())
        for i in range(near_duplicates):
            src = Image.open(d / f"{folder}-{per_class - 1 - i:04d}.jpg")
            buf = io.BytesIO()
            ImageEnhance.Brightness(src).enhance(1.03).save(buf, format="JPEG", quality=80)
            (d / f"{folder}-{per_class - 1 - i:04d}-near.jpg").write_bytes(buf.getvalue())
    return root
