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


def resize_matrix(size_in, size_out: int, method: str):
    """tf.image.resize along one axis as a (size_out, size_in) matrix: the resized basis vectors.

    Every method of tf.image.resize without antialiasing resizes each axis independently and
    linearly, so a whole resize is `rows @ image @ columns.T` (`size_in` may be a tensor).
    """
    basis = tf.eye(size_in)[:, :, None, None]  # size_in images of size_in x 1, one hot each
    return tf.transpose(tf.image.resize(basis, (size_out, 1), method=method)[:, :, 0, 0])


def box_blur_matrix(size: int, box: int):
    """The box average of tf.nn.avg_pool2d(box, stride 1, "SAME") along one axis, as a matrix:
    the box shrinks at the borders (padding is not counted), so each row sums to 1."""
    index = tf.range(size)
    band = tf.cast(tf.abs(index[:, None] - index[None, :]) <= box // 2, tf.float32)
    return band / tf.reduce_sum(band, axis=1, keepdims=True)


def _apply_per_axis(images, rows, columns):
    """rows @ image @ columns.T for each image and channel of a (batch, h, w, c) float batch.

    No transposes: `columns` multiplies each pixel row's (w, c) matrix, `rows` each image's
    (h, W * c) one (1.3-1.9x faster than transposing channels first, on a 2-core CPU).
    """
    x = tf.matmul(columns, images)  # (batch, h, W, c)
    shape = tf.shape(x)
    x = tf.matmul(rows, tf.reshape(x, [shape[0], shape[1], -1]))  # (batch, H, W * c)
    return tf.reshape(x, [shape[0], rows.shape[0], columns.shape[0], images.shape[-1]])


def upscale(images, image_size: int, method: str, sharpen: float = 0.0, sharpen_size: int = 5):
    """float images -> `image_size` square: resized with `method`, then an unsharp mask
    `up + sharpen * (up - box_blur(up))` over a sharpen_size box, clipped to [0, 255].

    Upscaling a 32x32 image blurs it; ImageNet features expect sharp edges. Measured on
    CIFAR-10 at 96 px, frozen backbone, 5 head epochs on 10k images: bilinear 75.4%, bicubic
    77.2%, bicubic + unsharp mask (2.0, 5) 80.0%; at 128 px bilinear 81.4%, sharpened 84.7%.

    Both steps are linear, so they run as small matrix products per axis, one clip at the end:
    1.4-1.7x faster than tf.image.resize then avg_pool2d on a 2-core CPU (32 -> 128 px
    bicubic, sharpened). Images already `image_size` pass unchanged (not sharpened).
    """
    if images.shape[1] is not None and images.shape[2] is not None:
        # A size known when tracing (training, a LiteRT file): the matrices are computed now,
        # eagerly, and enter the graph as constants. Left as ops on constants, the LiteRT
        # converter folded some but kept a 32 -> 128 ResizeBicubic, an op it has no kernel for.
        height, width = int(images.shape[1]), int(images.shape[2])
        with tf.init_scope():
            rows, columns = (resize_matrix(n, image_size, method).numpy() for n in (height, width))
            blur = box_blur_matrix(image_size, sharpen_size).numpy() if sharpen else None
        rows, columns = tf.constant(rows), tf.constant(columns)
        amount = 0.0 if (height, width) == (image_size, image_size) else sharpen
        blur = None if blur is None else tf.constant(blur)
    else:
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        rows, columns = resize_matrix(height, image_size, method), resize_matrix(width, image_size, method)
        blur = box_blur_matrix(image_size, sharpen_size) if sharpen else None
        # A batch of unknown size at trace time (serving) may turn out to be image_size already.
        amount = tf.where((height == image_size) & (width == image_size), 0.0, sharpen)
    up = _apply_per_axis(images, rows, columns)
    if sharpen:
        blurred = _apply_per_axis(images, blur @ rows, blur @ columns)
        up = up + amount * (up - blurred)
    return tf.clip_by_value(up, 0.0, 255.0)  # bicubic, lanczos and sharpening overshoot


def to_model_input(images, image_size: int, dtype="float32", method: str = "bilinear", sharpen_amount: float = 0.0,
                   sharpen_size: int = 5):
    """A batch of uint8 images (any size, 1-4 channels) -> `image_size` square RGB in [-1, 1]:
    upscaled with `method` and an optional unsharp mask (`upscale`), in float32: resizing
    uint8 would round to whole pixel levels."""
    images = tf.cast(to_rgb(images), tf.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        images = upscale(images, image_size, method, sharpen_amount, sharpen_size)
    return tf.cast(images / 127.5 - 1.0, dtype)


def model_input_fn(data, image_size: int, dtype="float32"):
    """images -> to_model_input(images, image_size) with `data`'s (a DataConfig's) upscaling settings."""
    return lambda images: to_model_input(images, image_size, dtype, data.resize_method, data.sharpen, data.sharpen_size)
