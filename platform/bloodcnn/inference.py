"""Inference helpers shared by serving, evaluation and the benchmark.

Three pieces, each kept free of Ray so it can be tested and timed on its own:

* **Image decoding and validation** (Pillow). Uploads are untrusted: :func:`inspect_image`
  reads only the header (format, size) so a bad upload is refused before any pixel is
  decoded, and :func:`decode_image` decodes fully to RGB uint8, turning every way an upload
  can be wrong (empty, not an image, unsupported format, truncated or corrupt, decompression
  bomb) into an :class:`ImageError` that carries an HTTP status and a stable error code.
  The RGB array then goes through :func:`bloodcnn.preprocess.resize`, exactly as in training.
* **The compiled predictor** (:class:`Predictor`): one ``tf.function`` with a fixed
  ``[None, S, S, 3]`` input signature, so it is traced once and every batch size reuses the
  same graph. ``model.predict`` per request is ~4x slower per call on CPU.
* **Test-time augmentation** (:class:`FlipAveraging`): a version trained with
  ``train.test_time_augmentation: flips`` answers with the mean probabilities of the image and its
  three flips, in evaluation, calibration, serving and batch scoring alike.
* **Grad-CAM** (:class:`GradCam`): class-activation heatmap from the last convolution of the
  MobileNetV2 backbone, rendered as a PNG overlay.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

#: Pillow format names accepted from clients (JPEG, PNG, BMP, TIFF).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF"})
DEFAULT_MAX_PIXELS = 40_000_000

# Never decode a truncated file as if it were complete.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own guard: a warning above the limit, DecompressionBombError above twice it.
# set_max_pixels() lowers it to the service's limit; we check explicitly as well.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


#: magic numbers of the accepted formats: bytes that start like an image but do not parse are corrupt
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(ValueError):
    """An upload that cannot be used; ``status`` and ``code`` go into the HTTP error."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "status": self.status}


def set_max_pixels(max_pixels: int) -> None:
    """Align Pillow's decompression-bomb guard with the service's pixel limit."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty_image", "the uploaded image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            "too_many_pixels", f"image has more than {max_pixels} pixels (decompression bomb guard)", 413
        ) from None
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES):
            raise ImageError("corrupt_image", "the image is corrupt: its header cannot be read") from None
        raise ImageError("not_an_image", "the upload is not a recognised image (JPEG, PNG, BMP or TIFF)") from None
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise ImageError("corrupt_image", f"the image header cannot be read: {type(exc).__name__}") from None
    if img.format not in ALLOWED_FORMATS:
        fmt = img.format or "unknown"
        img.close()
        raise ImageError(
            "unsupported_image_format", f"image format {fmt} is not accepted; send JPEG, PNG, BMP or TIFF", 415
        )
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt_image", f"image has an invalid size {w}x{h}")
    if w * h > max_pixels:
        img.close()
        raise ImageError(
            "too_many_pixels",
            f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels} (decompression bomb guard)",
            413,
        )
    return img


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Header-only check: format is allowed and the pixel count is within ``max_pixels``."""
    img = _open(data, max_pixels)
    try:
        return ImageInfo(img.format, img.size[0], img.size[1], img.mode)
    finally:
        img.close()


def _fast_jpeg(data: bytes) -> np.ndarray | None:
    """An RGB or grayscale JPEG through simplejpeg (libjpeg-turbo, accurate integer IDCT, fancy
    upsampling: the pixels of Pillow and of training's ``decode_jpeg``, tests/test_decode.py) at
    ~1.6x Pillow's speed. None for anything else, or a JPEG libjpeg warns about (truncated,
    corrupt): Pillow then decodes it, or words the error."""
    if not data.startswith(b"\xff\xd8"):
        return None
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> RGB uint8 array (H, W, 3); the first frame of multi-frame files."""
    img = _open(data, max_pixels)  # format, size and pixel-count checks for every decoder
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        fast = _fast_jpeg(data)
        if fast is not None:
            img.close()
            return fast
    try:
        img.load()
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # composite on white rather than letting transparent pixels turn black
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                img = img.convert("RGB")
        array = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("too_many_pixels", f"image has more than {max_pixels} pixels (decompression bomb guard)", 413) from None
    except MemoryError:
        raise ImageError("too_many_pixels", "image is too large to decode", 413) from None
    except Exception as exc:  # OSError("image file is truncated"), SyntaxError, ValueError, struct.error ...
        raise ImageError("corrupt_image", f"the image is truncated or corrupt ({type(exc).__name__}: {exc})"[:300]) from None
    finally:
        img.close()
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageError("corrupt_image", f"decoded image has an unexpected shape {array.shape}")
    return array


def preprocess(array: np.ndarray, image_size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (S, S, 3) in 0..255, with the training resize.

    An image already at (S, S) skips the TF call: the antialiased bilinear resize at scale
    1 is exactly the identity (asserted in tests/test_serving_units.py), and skipping it
    saves ~2 ms of CPU per 224 px image.
    """
    if array.shape[0] == image_size and array.shape[1] == image_size:
        return array.astype(np.float32)
    from bloodcnn.preprocess import resize

    return resize(array, image_size).numpy()


def preprocess_many(arrays: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """Decoded RGB images -> float32 [N, S, S, 3], the pixels of :func:`preprocess` on each.

    Images of one shape are resized in one TF call: per image, the eager call's overhead is most
    of the cost (a 32 px image to 224 px: ~3.4 ms alone, ~1.1 ms in a batch of 300, measured).
    Batch scoring feeds it a batch at a time; serving decodes per request and keeps :func:`preprocess`.
    """
    from bloodcnn.preprocess import resize

    out = np.empty((len(arrays), image_size, image_size, 3), np.float32)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape[:2], []).append(i)
    for (h, w), where in by_shape.items():
        batch = np.stack([arrays[i] for i in where])
        # at (S, S) the resize is the identity, which preprocess skips too
        out[where] = batch if (h, w) == (image_size, image_size) else resize(batch, image_size).numpy()
    return out


def load_for_model(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize; returns (model input float32 (S, S, 3), decoded RGB uint8)."""
    rgb = decode_image(data, max_pixels)
    return preprocess(rgb, image_size), rgb


# --------------------------------------------------------------------------- predictor


class Predictor:
    """A compiled, batched forward pass: ``predict(batch float32 [B,S,S,3]) -> probs [B,C]``.

    The ``tf.function`` has a fixed input signature with a free batch dimension, so it is
    traced exactly once; different batch sizes reuse the graph (check ``trace_count``).
    """

    def __init__(self, model, image_size: int | None = None):
        import tensorflow as tf

        self.model = model
        self.image_size = int(image_size or model.input_shape[1])
        self.num_classes = int(model.output_shape[-1])
        self.trace_count = 0
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32, name="images")

        def forward(images):
            self.trace_count += 1  # runs only while tracing
            return model(images, training=False)

        self._fn = tf.function(forward, input_signature=[spec], jit_compile=False)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        return self._fn(batch).numpy()

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for n in sorted(set(int(b) for b in batch_sizes if b >= 1)):
            self.predict(np.zeros((n, self.image_size, self.image_size, 3), np.float32))


# --------------------------------------------------------------------------- test-time augmentation

#: forward passes per image for each ``test_time_augmentation`` setting
TTA_VIEWS = {"none": 1, "flips": 4}


def flip_views(batch: np.ndarray) -> np.ndarray:
    """[B,S,S,3] -> [4B,S,S,3]: the batch, then its left-right, up-down and both flips.

    A smear has no up or left, and training saw every rotation and flip, so each view is an
    equally good look at the cell; their mean answer is steadier than any one of them."""
    batch = np.asarray(batch, dtype=np.float32)
    return np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1], batch[:, ::-1, ::-1]])


def average_views(probs: np.ndarray, views: int) -> np.ndarray:
    """[views*B, C] in :func:`flip_views` order -> the mean over the views, [B, C]."""
    probs = np.asarray(probs, dtype=np.float32)
    return probs.reshape(views, -1, probs.shape[-1]).mean(axis=0)


class FlipAveraging:
    """Wraps a predictor (TensorFlow or OpenVINO) so that ``predict`` averages the four flips of each
    image in one forward pass of 4x the batch: what a version with ``test_time_augmentation: flips``
    was evaluated and calibrated with."""

    def __init__(self, inner):
        self.inner = inner
        self.image_size = inner.image_size

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        return average_views(self.inner.predict(flip_views(batch)), TTA_VIEWS["flips"])

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        self.inner.warmup([TTA_VIEWS["flips"] * int(b) for b in batch_sizes])


def with_tta(predictor, test_time_augmentation: str):
    """The predictor that answers as the version was evaluated: as is, or averaging flips."""
    if test_time_augmentation not in TTA_VIEWS:
        raise ValueError(f"unknown test_time_augmentation {test_time_augmentation!r}; use one of {sorted(TTA_VIEWS)}")
    return FlipAveraging(predictor) if test_time_augmentation == "flips" else predictor


# --------------------------------------------------------------------------- Grad-CAM


def last_conv_layer(backbone):
    """The last 2-D convolution (not depthwise) of a Keras backbone: ``Conv_1`` in MobileNetV2."""
    import tf_keras as keras

    for layer in reversed(backbone.layers):
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.DepthwiseConv2D):
            return layer
    raise ValueError(f"no Conv2D layer in {backbone.name}")


def _jet(x: np.ndarray) -> np.ndarray:
    """Matplotlib-like 'jet' colormap for x in [0, 1] -> uint8 RGB (no matplotlib import)."""
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0).astype(np.uint8)


class GradCam:
    """Grad-CAM on the last convolution of the MobileNetV2 backbone.

    The classifier is ``input -> Rescaling -> backbone (a nested Model) -> head``. A nested
    Model's inner layers are not connected to the outer graph, so the gradient model is
    built in two parts: a sub-model of the *backbone* that returns both the last conv
    activation and the backbone output, and the outer layers applied around it by hand.
    The class score is the pre-softmax logit when the last layer is a softmax Dense.
    """

    def __init__(self, model, image_size: int | None = None):
        import tensorflow as tf
        import tf_keras as keras

        from bloodcnn.model import base_model

        self.image_size = int(image_size or model.input_shape[1])
        backbone = base_model(model)
        conv = last_conv_layer(backbone)
        self.layer_name = conv.name
        inner = keras.Model(backbone.inputs, [conv.output, backbone.output], name="gradcam_backbone")
        idx = model.layers.index(backbone)
        pre = [l for l in model.layers[1:idx]]  # after the InputLayer, before the backbone
        post = list(model.layers[idx + 1:])
        last = post[-1] if post else None
        use_logits = (
            isinstance(last, keras.layers.Dense)
            and getattr(last.activation, "__name__", "") == "softmax"
        )
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)

        def cam(images):
            x = images
            for layer in pre:
                x = layer(x, training=False)
            with tf.GradientTape() as tape:
                conv_out, feats = inner(x, training=False)
                tape.watch(conv_out)
                h = feats
                for layer in post[:-1] if use_logits else post:
                    h = layer(h, training=False)
                if use_logits:
                    logits = tf.matmul(h, last.kernel) + last.bias
                    probs = tf.nn.softmax(logits)
                else:
                    probs = h
                    logits = h
                top = tf.argmax(probs, axis=-1, output_type=tf.int32)
                score = tf.gather(logits, top, axis=1, batch_dims=1)
            grads = tape.gradient(score, conv_out)
            weights = tf.reduce_mean(grads, axis=(1, 2))  # [B, K]
            heat = tf.nn.relu(tf.einsum("bhwk,bk->bhw", conv_out, weights))
            peak = tf.reduce_max(heat, axis=(1, 2), keepdims=True)
            heat = tf.math.divide_no_nan(heat, peak)
            return heat, probs

        self._fn = tf.function(cam, input_signature=[spec])
        self._lock = threading.Lock()

    def heatmap(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (S, S, 3) 0..255 -> (heatmap (h, w) in 0..1, probabilities (C,))."""
        batch = np.asarray(image, np.float32)[None]
        heat, probs = self._fn(batch)
        return heat.numpy()[0], probs.numpy()[0]

    @staticmethod
    def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, min_side: int = 224) -> bytes:
        """Blend a jet-coloured heatmap over the model input; PNG bytes, at least ``min_side`` px."""
        base = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "RGB")
        side = max(min_side, base.width)
        if base.width != side:
            base = base.resize((side, side), Image.BICUBIC)
        heat_img = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8), "L").resize(
            base.size, Image.BICUBIC
        )
        colored = Image.fromarray(_jet(np.asarray(heat_img, np.float32) / 255.0), "RGB")
        blended = Image.blend(base, colored, alpha)
        buf = io.BytesIO()
        blended.save(buf, format="PNG", optimize=False)
        return buf.getvalue()

    def explain(self, image: np.ndarray) -> tuple[bytes, np.ndarray]:
        """float32 (S, S, 3) -> (PNG overlay bytes, probabilities)."""
        heat, probs = self.heatmap(image)
        return self.overlay(image, heat), probs
