"""Image preprocessing shared by the data reader, training and serving.

Why one module: a model is only as good as the match between how training and serving
resize pixels. Both call :func:`resize` on decoded RGB uint8 images; scaling to MobileNetV2's
[-1, 1] range happens inside the model (a Rescaling layer), so serving feeds raw 0..255
pixels and can never forget it.
"""

from __future__ import annotations

import tensorflow as tf

RESIZE_METHOD = "bilinear"


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """RGB uint8 (H, W, 3) or batch -> float32 0..255 at (image_size, image_size), antialiased."""
    image = tf.image.resize(image, (image_size, image_size), method=RESIZE_METHOD, antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def decode_jpeg(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG bytes -> float32 0..255 (image_size, image_size, 3).

    ``INTEGER_ACCURATE`` is libjpeg's default IDCT, the one PIL (serving) uses; TF's own default
    (fast integer) gives pixels up to ~20 levels apart from what serving sees.
    """
    image = tf.io.decode_jpeg(jpeg, channels=3, dct_method="INTEGER_ACCURATE")
    return resize(image, image_size)
