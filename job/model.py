"""MobileNetV2 transfer model: a frozen-or-tunable ImageNet backbone and a new head.

Three Keras models share the same layers:
  extractor:  model input -> backbone (always in inference mode) -> pooled features
  head:       pooled features -> dropout -> Dense(num_classes), float32 logits
  classifier: extractor then head; what is trained end to end and checkpointed
`head` exists on its own so the frozen phase can train on cached features.

BatchNorm never trains here (its ImageNet statistics, scale and offset stay fixed), so each
one is an affine map of its convolution's output. `TransferModel.features` folds it into
that convolution: conv(x, kernel * s) + b instead of conv(x, kernel) then BatchNorm. Same
function (up to float rounding), same variables and gradients for the kernels, but one fused
oneDNN convolution instead of a convolution and several full passes over its activations:
measured 1.5x the inference rate and about 1.2x the fine-tune step on a 2-core CPU. A
ZeroPadding2D equal to "SAME" padding is likewise absorbed by the convolution after it
(identical output; another 1.12x on inference and on the fine-tune step at 96 px). The
Keras models themselves stay stock, so checkpoints and exports do not depend on it.
Both rewrites walk Keras's functional graph through private internals (`_run_through_graph`,
`_inbound_nodes`) and were measured only on that CPU: `model.fold_batchnorm=auto` (the
default) folds on a CPU and not when a GPU is visible, where cuDNN and XLA have fusions of
their own and nothing was measured; `true`/`false` force it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import warnings
from typing import Callable

import h5py
from etils import epy

from job.config import ModelConfig
from job.errors import WeightsError

with epy.lazy_imports():
    # Keras (and TensorFlow behind it) loads on first use, so `check_weights_file` runs in
    # the CLI before TensorFlow's slow start-up.
    import keras
    import tensorflow as tf

log = logging.getLogger(__name__)

WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


@dataclasses.dataclass
class TransferModel:
    backbone: keras.Model
    extractor: keras.Model
    head: keras.Model
    classifier: keras.Model
    # {id(convolution layer): the frozen BatchNormalization applied to its output}; empty: no folding.
    folds: dict = dataclasses.field(default_factory=dict)
    # ids of layers whose work a folded convolution does (its BatchNorm, an absorbed ZeroPadding2D)
    absorbed: set = dataclasses.field(default_factory=set)
    # ids of folded 'valid' convolutions that pad themselves ("SAME") instead of a ZeroPadding2D
    same_padding: set = dataclasses.field(default_factory=set)

    def features(self, images):
        """Pooled backbone features, BatchNorm in inference mode (folded into convolutions if `folds`).

        Inference mode whatever the layers' `trainable`: batch statistics are never used here.
        """
        if not self.folds:
            return self.extractor(images, training=False)
        # Keras walks the backbone's functional graph; we only swap what runs at each layer.
        x = self.backbone._run_through_graph(images, operation_fn=self._folded_operation)
        return self.extractor.get_layer("pool")(x)

    def _folded_operation(self, layer):
        if id(layer) in self.folds:
            padding = "SAME" if id(layer) in self.same_padding else layer.padding.upper()
            return functools.partial(_conv_with_batchnorm, layer, self.folds[id(layer)], padding)
        if id(layer) in self.absorbed:
            return lambda x, **kwargs: x  # its convolution already does this
        return layer

    def _run(self, model: keras.Model, inputs):
        """A functional sub-model of the backbone with BatchNorm in inference mode (folded if `folds`)."""
        if not self.folds:
            return model(inputs, training=False)
        return model._run_through_graph(inputs, operation_fn=self._folded_operation)

    def split(self, unfreeze) -> "BackboneSplit":
        """The backbone cut below its top `unfreeze` layers (as `set_backbone_trainable` counts them).

        Raises ValueError unless the top layers read exactly one tensor of the frozen ones
        (true at a block boundary of MobileNetV2; inside a block the residual branch also crosses).
        """
        layers = self.backbone.layers
        first = first_trainable_layer(self.backbone, unfreeze)
        if first == 0 or first >= len(layers):
            raise ValueError(f"unfreeze={unfreeze!r} leaves no frozen bottom or no trainable top to cut between")
        crossing = _crossing_tensors(layers, first)
        if len(crossing) != 1:
            count = len(layers) - first
            valid = [len(layers) - i for i in range(1, len(layers)) if len(_crossing_tensors(layers, i)) == 1]
            near = [max((n for n in valid if n < count), default=None), min((n for n in valid if n > count), default=None)]
            raise ValueError(f"the top {count} layers read {len(crossing)} tensors of the frozen ones; cut at a block "
                             f"boundary instead, e.g. {' or '.join(str(n) for n in near if n is not None)}")
        (cut,) = crossing
        bottom, top = keras.Model(self.backbone.input, cut), keras.Model(cut, self.backbone.output)
        pool = self.extractor.get_layer("pool")
        return BackboneSplit(layers[first].name, tuple(cut.shape[1:]),
                             bottom=lambda images: self._run(bottom, images),
                             top_features=lambda activations: pool(self._run(top, activations)))

    def logits(self, images, training: bool):
        """Logits with the backbone always in inference mode, the head's dropout per `training`.

        The backbone is called on its own with training=False rather than trusting the flag
        recorded inside nested functional graphs to survive an outer training=True.
        """
        return self.head(self.features(images), training=training)


@dataclasses.dataclass(frozen=True)
class BackboneSplit:
    """The backbone cut where its trainable top begins (`TransferModel.split`): `bottom`
    (images -> activations at the cut, frozen: computable once) and `top_features`
    (activations -> pooled features, what fine-tuning trains)."""

    first_trainable: str  # name of the first layer above the cut
    shape: tuple  # of one image's activations at the cut
    bottom: Callable
    top_features: Callable


def _crossing_tensors(layers: list, first: int) -> list:
    """Distinct tensors that layers[first:] read from layers[:first]."""
    below = {id(layer) for layer in layers[:first]}
    crossing = {}
    for layer in layers[first:]:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                if id(tensor._keras_history.operation) in below:
                    crossing[id(tensor)] = tensor
    return list(crossing.values())


def batchnorm_folds(backbone: keras.Model) -> dict:
    """{id(conv): bn} for every BatchNormalization whose input is a bias-free, linear,
    channels-last Conv2D or DepthwiseConv2D output that nothing else reads."""
    folds = {}
    for bn in backbone.layers:
        if not (isinstance(bn, keras.layers.BatchNormalization) and bn.axis in (-1, 3) and bn.scale and bn.center
                and len(bn._inbound_nodes) == 1):
            continue
        conv = bn._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if (isinstance(conv, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)) and not conv.use_bias
                and conv.data_format == "channels_last" and getattr(conv, "groups", 1) == 1
                and conv.activation is keras.activations.linear and len(conv._outbound_nodes) == 1):
            folds[id(conv)] = bn
    return folds


def same_padding_folds(backbone: keras.Model, folds: dict) -> dict:
    """{id(ZeroPadding2D): conv} where the padding is exactly TensorFlow's "SAME" padding of
    the folded 'valid' convolution that alone reads it (MobileNetV2's stride-2 blocks pad
    (0, 1) on even sizes): the convolution then pads itself, with no Pad op and gradient."""
    result = {}
    for pad in backbone.layers:
        if not (isinstance(pad, keras.layers.ZeroPadding2D) and pad.data_format == "channels_last"
                and len(pad._inbound_nodes) == 1 and len(pad._outbound_nodes) == 1):
            continue
        conv = pad._outbound_nodes[0].operation
        size = tuple(pad._inbound_nodes[0].input_tensors[0].shape[1:3])
        if id(conv) not in folds or conv.padding != "valid" or tuple(conv.dilation_rate) != (1, 1) or None in size:
            continue
        same = []
        for n, k, s in zip(size, conv.kernel_size, conv.strides):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            same.append((total // 2, total - total // 2))
        if tuple(map(tuple, pad.padding)) == tuple(same):
            result[id(pad)] = conv
    return result


def fold_plan(backbone: keras.Model) -> dict:
    """TransferModel's folds, absorbed and same_padding fields for `backbone`."""
    folds = batchnorm_folds(backbone)
    paddings = same_padding_folds(backbone, folds)
    return {"folds": folds, "absorbed": {id(bn) for bn in folds.values()} | set(paddings),
            "same_padding": {id(conv) for conv in paddings.values()}}


def _conv_with_batchnorm(conv, bn, padding: str, x, **kwargs):
    """bn(conv(x)) for a frozen bn, as one convolution with a scaled kernel plus a bias."""
    # Inference BatchNorm: (y - mean) * gamma / sqrt(var + eps) + beta = y * scale + bias.
    scale = bn.gamma * tf.math.rsqrt(bn.moving_variance + bn.epsilon)
    bias = bn.beta - bn.moving_mean * scale
    x = tf.cast(x, conv.compute_dtype)  # as the Keras layer would (float16/bfloat16 under mixed precision)
    strides, dilations = (1, *conv.strides, 1), (1, *conv.dilation_rate, 1)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        kernel = conv.kernel * tf.reshape(scale, [1, 1, *conv.kernel.shape[2:]])
        y = tf.nn.depthwise_conv2d(x, tf.cast(kernel, x.dtype), strides, padding, dilations=conv.dilation_rate)
    else:
        kernel = conv.kernel * scale
        y = tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides, padding, dilations=dilations)
    return tf.nn.bias_add(y, tf.cast(bias, x.dtype))


def _cached_imagenet_file(alpha: float) -> str:
    fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_224_no_top.h5"
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "models", fname)


def check_weights_file(weights: str, alpha: float) -> None:
    """WeightsError if the weights file is missing or not readable HDF5 (e.g. truncated).

    Needs no TensorFlow, so bad paths fail fast. Whether the file fits MobileNetV2 at this
    alpha is only known when it is loaded. A missing ImageNet file is downloaded later.
    """
    if weights == "none":
        return
    path = _cached_imagenet_file(alpha) if weights == "imagenet" else weights
    if weights != "imagenet" or os.path.isfile(path):
        _check_file(path, weights)


def _check_file(path: str, setting: str) -> None:
    if not os.path.isfile(path):
        raise WeightsError(f"model.weights={setting!r}: file {path!r} does not exist")
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as err:
        raise WeightsError(f"model.weights={setting!r}: {path!r} is not a readable HDF5 weights file "
                           f"({str(err).splitlines()[0][:160]}); truncated, or not a weights file?") from None


def imagenet_weights_file(alpha: float) -> str:
    """Path of Keras's ImageNet no-top weights for `alpha`, downloading into KERAS_HOME if missing.

    The 224 px file is used for every input size: convolution weights do not depend on it.
    The download happens once per node, under a file lock, into a temporary file renamed into
    place: a second process waits and never reads half a file.
    """
    from filelock import FileLock

    cached = _cached_imagenet_file(alpha)
    fname, models = os.path.basename(cached), os.path.dirname(cached)
    if os.path.isfile(cached):
        return cached
    try:
        os.makedirs(models, exist_ok=True)
        with FileLock(cached + ".lock"):
            if not os.path.isfile(cached):
                with tempfile.TemporaryDirectory(dir=models) as tmp:
                    os.replace(keras.utils.get_file(fname, WEIGHTS_URL + fname, cache_dir=tmp, cache_subdir="."), cached)
    except Exception as err:  # noqa: BLE001 - every failure gets the same advice
        raise WeightsError(
            f"model.weights='imagenet': {fname} is not in {models} and could not be downloaded "
            f"({type(err).__name__}); set KERAS_HOME to a directory holding models/{fname}, "
            "or model.weights=/path/to/weights.h5"
        ) from None
    return cached


def _load_backbone_weights(backbone: keras.Model, path: str, setting: str) -> None:
    _check_file(path, setting)
    # A file for another model makes Keras warn once per layer before it fails: one line instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(path)
        except Exception as err:  # noqa: BLE001 - h5py, shape and layout errors all mean "wrong file"
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            what = "it" if path == setting else repr(path)
            raise WeightsError(
                f"model.weights={setting!r}: cannot load {what} into MobileNetV2(alpha={getattr(backbone, 'alpha', '?')}) "
                f"({type(err).__name__}: {first_line}); is it a MobileNetV2 no-top weights file for this alpha?"
            ) from None
    if caught:
        log.warning("loading %s: %d warning(s), the first: %s", path, len(caught), caught[0].message)


@contextlib.contextmanager
def _dtype_policy(precision: str):
    """Keras's dtype policy is global: set it for the layers built inside, then put it back."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(model: ModelConfig, num_classes: int, precision: str = "float32",
                weights: str | None = None) -> TransferModel:
    """The three models, their layers computing in `precision`'s dtype (variables stay float32).

    `weights` overrides model.weights (export and evaluate pass "none": the checkpoint has them all).
    Built inside the caller's distribution scope, if any.
    """
    weights = model.weights if weights is None else weights
    size = model.image_size
    with _dtype_policy(precision):
        backbone = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=model.alpha, include_top=False,
                                                  weights=None)
        backbone.alpha = model.alpha
        if weights == "imagenet":
            _load_backbone_weights(backbone, imagenet_weights_file(model.alpha), weights)
        elif weights != "none":
            _load_backbone_weights(backbone, weights, weights)

        inputs = keras.Input((size, size, 3), name="image")
        # BatchNorm keeps its ImageNet statistics while fine-tuning (small-batch statistics would
        # wreck them). training=False here is not enough: a Keras 3 functional call passes the
        # outer `training` down to every layer; set_backbone_trainable keeps BN layers frozen.
        features = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs, training=False))
        extractor = keras.Model(inputs, features, name="extractor")

        feature_input = keras.Input((features.shape[-1],), name="features")
        x = keras.layers.Dropout(model.dropout, name="dropout")(feature_input)
        # float32 logits even under mixed precision: softmax and loss stay numerically stable.
        logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
        head = keras.Model(feature_input, logits, name="head")

        classifier = keras.Model(inputs, head(extractor(inputs)), name="classifier")
    return TransferModel(backbone, extractor, head, classifier,
                         **(fold_plan(backbone) if folds_batchnorm(model.fold_batchnorm) else {}))


def folds_batchnorm(setting) -> bool:
    """model.fold_batchnorm resolved: "auto" folds where folding was measured to help, on a
    CPU; with a GPU visible it is off (not measured there)."""
    if setting == "auto":
        return not tf.config.list_physical_devices("GPU")
    return bool(setting)


def first_trainable_layer(backbone: keras.Model, unfreeze) -> int:
    """Index of the first backbone layer `unfreeze` (False / "all" / N) makes trainable."""
    if unfreeze is False:
        return len(backbone.layers)
    if unfreeze == "all":
        return 0
    return max(len(backbone.layers) - int(unfreeze), 0)


def set_backbone_trainable(model: TransferModel, unfreeze) -> None:
    """False / "all" / N: freeze the backbone, unfreeze all of it, or only its top N layers."""
    layers = model.backbone.layers
    first = first_trainable_layer(model.backbone, unfreeze)
    # Set every layer explicitly: a container's `trainable = True` does not undo an earlier
    # per-layer freeze.
    model.backbone.trainable = first < len(layers)
    for index, layer in enumerate(layers):
        # A frozen BatchNormalization runs in inference mode. Trained, its moving statistics
        # would follow each worker's own batches and MultiWorkerMirrored replicas would diverge.
        layer.trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)

