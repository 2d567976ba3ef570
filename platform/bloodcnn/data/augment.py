"""Offline augmentation of train images, as in the seed paper: brightness, random resized
crop (zoom) and horizontal flip.

Each copy is seeded from (split seed, image sha256, copy number), so re-running the pipeline
produces the same shards and the dataset version stays stable.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

from bloodcnn.config import AugmentConfig


def _rng(seed: int, sha256: str, copy: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(sha256[:15], 16), copy])


def augment_jpeg(jpeg: bytes, sha256: str, copy: int, seed: int, cfg: AugmentConfig) -> bytes:
    rng = _rng(seed, sha256, copy)
    with Image.open(io.BytesIO(jpeg)) as src:
        img = src.convert("RGB")
    w, h = img.size
    # random resized crop: keep an area fraction in [min_crop_area, 1], aspect in [3/4, 4/3]
    area = rng.uniform(cfg.min_crop_area, 1.0) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(w, max(1, int(round(math.sqrt(area * aspect)))))
    ch = min(h, max(1, int(round(math.sqrt(area / aspect)))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if cfg.brightness > 0:
        img = ImageEnhance.Brightness(img).enhance(1.0 + rng.uniform(-cfg.brightness, cfg.brightness))
    if cfg.horizontal_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()
