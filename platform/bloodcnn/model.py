"""The classifier: ImageNet MobileNetV2 base -> global average pooling -> dropout -> softmax.

Built with ``tf_keras`` (Keras 2) because Keras 3 fails under MultiWorkerMirroredStrategy.
Inputs are float32 pixels in 0..255; the model rescales them to [-1, 1] itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tf_keras as keras

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file is missing or does not fit MobileNetV2 (alpha 1.0, no top)."""


#: what ``weights="imagenet"`` downloads (tf_keras picks the 224 px file for other input sizes)
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
                "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5")


def imagenet_url(image_size: int) -> str:
    return IMAGENET_URL.format(rows=image_size if image_size in (96, 128, 160, 192, 224) else 224)


def missing_weights_file(weights: str | None) -> str | None:
    """The configured local weights file when it does not exist (then Keras's ImageNet
    download is used instead), else None."""
    if not weights or weights in ("imagenet", "none") or weights.startswith("s3://"):
        return None
    return None if Path(weights).expanduser().is_file() else weights


def resolve_weights(weights: str) -> str:
    """``weights`` itself, or "imagenet" when it names a local file that does not exist."""
    missing = missing_weights_file(weights)
    if missing is not None:
        log.warning("weights file %s not found: using Keras's ImageNet download instead (%s, cached in "
                    "~/.keras/models)", missing, imagenet_url(224))
        return "imagenet"
    return weights


def _base_weights(weights: str, cache_dir: str | Path | None = None) -> str | None:
    """Map the config value to what keras.applications takes: "imagenet", None or a local path."""
    if weights in ("imagenet",):
        return "imagenet"
    if weights in ("none", "", None):
        return None
    if weights.startswith("s3://"):
        from bloodcnn import storage

        import tempfile

        local = Path(cache_dir or tempfile.gettempdir()) / "bloodcnn-weights" / Path(weights).name
        if not local.exists():
            storage.store_for(weights).download_file(weights, local)
        return str(local)
    return resolve_weights(weights)


def build_model(
    num_classes: int,
    image_size: int = 224,
    weights: str = "imagenet",
    dropout: float = 0.2,
    cache_dir: str | Path | None = None,
) -> keras.Model:
    local = _base_weights(weights, cache_dir)
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(image_size, image_size, 3), include_top=False, weights=local, alpha=1.0
        )
    except Exception as exc:
        if local == "imagenet":  # tf_keras' get_file raises a bare Exception when the download fails
            raise _download_failed(weights, image_size, exc) from None
        if isinstance(exc, (ValueError, OSError)):
            raise WeightsError(f"weights {weights!r} do not fit MobileNetV2 alpha=1.0 without top: {exc}") from None
        raise
    base.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus1_1")(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="bloodcnn")


def _download_failed(weights: str, image_size: int, exc: BaseException) -> WeightsError:
    missing = missing_weights_file(weights)
    url = imagenet_url(image_size)
    reason = str(exc)
    if "URL fetch failure" in reason and " -- " in reason:  # tf_keras: "URL fetch failure on URL: code -- reason"
        reason = reason.rsplit(" -- ", 1)[1]
    if missing:
        return WeightsError(
            f"weights file not found: {missing}; the fallback, Keras's ImageNet download {url}, failed "
            f"too ({reason}). Put the weights file at that path (train.weights, BLOODCNN__TRAIN__WEIGHTS) "
            "or run once with internet access (Keras caches the download in ~/.keras/models)."
        )
    return WeightsError(f"the Keras ImageNet download {url} failed ({reason}); set train.weights to a local "
                        "weights file or run once with internet access (cached in ~/.keras/models)")


def base_model(model: keras.Model) -> keras.Model:
    """The MobileNetV2 backbone inside the classifier (its name carries the input size)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def unfreeze_top_blocks(model: keras.Model, blocks: int) -> int:
    """Make the top ``blocks`` inverted-residual blocks (and the final conv) trainable.

    BatchNorm layers stay frozen, as keras.io's fine-tuning guide advises for small data.
    Returns the number of trainable layers.
    """
    base = base_model(model)
    base.trainable = True
    block_ids = sorted({int(l.name.split("_")[1]) for l in base.layers if l.name.startswith("block_")})
    keep = {f"block_{i}_" for i in block_ids[-blocks:]} if blocks > 0 else set()
    count = 0
    for layer in base.layers:
        top = layer.name.startswith(("Conv_1", "out_relu")) and blocks > 0
        trainable = (top or any(layer.name.startswith(p) for p in keep)) and not isinstance(
            layer, keras.layers.BatchNormalization
        )
        layer.trainable = trainable
        count += trainable
    return count


def load_model(path: str | Path, compile: bool = False) -> keras.Model:
    """Load a ``.keras`` model (registered, or a training checkpoint with ``compile=True`` to
    keep its optimizer state) in safe mode: no pickle, no arbitrary code.

    Only the zip-based ``.keras`` format honours ``safe_mode``: tf_keras hands anything else
    (an HDF5 file, even one named ``model.keras``) to its legacy loader, which rebuilds Lambda
    layers from marshalled bytecode and so runs code from the file. Such files are refused.
    """
    import zipfile

    path = Path(path)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise ValueError(
            f"refusing to load {path.name}: not a zip-based .keras model file (legacy HDF5/SavedModel "
            "files can run code when loaded)"
        )
    return keras.models.load_model(str(path), compile=compile, safe_mode=True)
