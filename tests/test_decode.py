"""Serving's JPEG decoder (simplejpeg) gives exactly the pixels of Pillow and of training's
``tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE")``: on JPEGs made here in every chroma
subsampling, progressive and grayscale, at odd sizes, and on images of the ALL dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcnn import inference
from serving import devtools

DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "all-leukemia"


def _jpeg(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _made_here() -> dict[str, bytes]:
    rgb = devtools.smear_like(53, seed=1)[:, :37]  # odd sizes: partial MCUs on both axes
    out = {f"subsampling-{s}": _jpeg(rgb, quality=q, subsampling=s) for s, q in ((0, 95), (1, 80), (2, 60))}
    out["progressive"] = _jpeg(rgb, quality=90, progressive=True)
    out["grayscale"] = _jpeg(np.asarray(Image.fromarray(rgb).convert("L")), quality=85)
    out["large"] = _jpeg(devtools.smear_like(257, seed=2), quality=92)
    return out


def _dataset(n: int = 12) -> dict[str, bytes]:
    files = sorted(DATASET.rglob("*.jpg"))
    if not files:
        pytest.fail(f"the ALL dataset is missing at {DATASET} (../shared/data)")
    return {f.name: f.read_bytes() for f in files[:: max(1, len(files) // n)][:n]}


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _training(data: bytes) -> np.ndarray:
    import tensorflow as tf

    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()


@pytest.mark.parametrize("source", ["made-here", "dataset"])
def test_fast_jpeg_decode_is_pixel_identical_to_pillow_and_training(source):
    images = _made_here() if source == "made-here" else _dataset()
    for name, data in images.items():
        fast = inference._fast_jpeg(data)
        assert fast is not None, name  # this path really ran
        assert np.array_equal(fast, _pillow(data)), name
        assert np.array_equal(fast, _training(data)), name
        assert np.array_equal(inference.decode_image(data), fast), name


def test_what_the_fast_path_does_not_take_still_decodes_or_fails_clearly():
    rgb = devtools.smear_like(40, seed=3)
    png = devtools.encode(rgb, "PNG")
    assert inference._fast_jpeg(png) is None and np.array_equal(inference.decode_image(png), rgb)
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    assert inference.decode_image(cmyk.getvalue()).shape == (40, 40, 3)  # Pillow decodes CMYK
    jpeg = _jpeg(rgb, quality=90)
    assert inference._fast_jpeg(jpeg[: len(jpeg) // 2]) is None  # truncated: left to Pillow's checks
    with pytest.raises(inference.ImageError) as err:
        inference.decode_image(jpeg[: len(jpeg) // 2])
    assert err.value.code == "corrupt_image"
