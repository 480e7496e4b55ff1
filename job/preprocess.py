"""The one preprocessing function: raw images of the dataset -> MobileNetV2's input.

Training (in the step on the device, or in tf.data on the host), feature extraction, the
benchmark and the exported serving model all call `to_model_input`, so what a model sees
at serving time is exactly what it saw in training (job.export wraps it as a Keras layer).
"""

from __future__ import annotations

from etils import epy

with epy.lazy_imports():
    import tensorflow as tf


def to_rgb(images):
    """Any channel count -> 3: grayscale is repeated, an alpha channel dropped."""
    channels = images.shape[-1]
    if channels == 1:
        return tf.repeat(images, 3, axis=-1)
    if channels == 2:  # grayscale + alpha
        return tf.repeat(images[..., :1], 3, axis=-1)
    if channels == 4:
        return images[..., :3]
    return images


def to_model_input(images, image_size: int, dtype="float32"):
    """A batch of uint8 images (any size, 1-4 channels) -> `image_size` square RGB in [-1, 1].

    Bilinear resizing in float32: resizing uint8 rounds to whole pixel levels.
    """
    images = tf.cast(to_rgb(images), tf.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        images = tf.image.resize(images, (image_size, image_size), method="bilinear")
    return tf.cast(images / 127.5 - 1.0, dtype)

