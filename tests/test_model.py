"""The transfer model: freezing, mixed precision dtypes, the serving wrapper."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from job.config import ModelConfig, load_config
from job.errors import WeightsError
from job.export import serving_model
from job.model import build_model as build
from job.model import set_backbone_trainable
from job.preprocess import to_model_input
from tests.conftest import WEIGHTS


def build_model(image_size, alpha, weights, num_classes, dropout, fold_batchnorm=True, precision="float32"):
    config = ModelConfig(image_size=image_size, alpha=alpha, weights=weights, dropout=dropout, fold_batchnorm=fold_batchnorm)
    return build(config, num_classes, precision)


@pytest.fixture
def model():
    return build_model(image_size=32, alpha=0.35, weights="none", num_classes=10, dropout=0.5)


def test_freeze_and_unfreeze_top_layers(model):
    set_backbone_trainable(model, False)
    assert len(model.classifier.trainable_variables) == 2  # Dense kernel and bias only
    set_backbone_trainable(model, 10)
    layers = model.backbone.layers
    trainable = [i for i, layer in enumerate(layers) if layer.trainable and layer.weights]
    assert trainable and min(trainable) >= len(layers) - 10
    set_backbone_trainable(model, "all")
    # 52 conv kernels and the head's 2; BatchNorm stays frozen (inference mode).
    assert len(model.classifier.trainable_variables) == 54


def test_head_shares_variables_with_classifier(model):
    features = model.extractor(np.zeros((2, 32, 32, 3), "float32"))
    np.testing.assert_allclose(model.head(features), model.classifier(np.zeros((2, 32, 32, 3), "float32")), rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_logits_stay_float32_under_mixed_precision(policy):
    m = build_model(32, 0.35, "none", 10, 0.2, precision=policy)
    assert m.extractor(np.zeros((1, 32, 32, 3), "float32")).dtype.name == policy.split("_")[1]
    assert m.features(np.zeros((1, 32, 32, 3), "float32")).dtype.name == policy.split("_")[1]  # folded BatchNorm
    assert m.classifier(np.zeros((1, 32, 32, 3), "float32")).dtype.name == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was


def test_serving_model_takes_raw_uint8_of_any_size(model):
    served = serving_model(model, load_config(None, ["model.image_size=32"]))
    images = np.random.randint(0, 255, (3, 20, 20, 3)).astype("uint8")
    probabilities = np.asarray(served(images))
    assert probabilities.shape == (3, 10)
    np.testing.assert_array_equal(probabilities, np.asarray(served(images)))  # no dropout at serving time
    expected = keras.ops.softmax(model.logits(to_model_input(images, 32), training=False))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-6)  # same as training's eval
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_serving_model_upscales_sharpens_and_averages_mirror_images_as_training_does(model):
    config = load_config(None, ["model.image_size=32", "data.resize_method=bicubic", "data.sharpen=2.0",
                                "model.flip_tta=true"])
    served = serving_model(model, config)
    images = np.random.randint(0, 255, (3, 16, 16, 3)).astype("uint8")
    prepare = lambda x: to_model_input(x, 32, method="bicubic", sharpen_amount=2.0, sharpen_size=5)  # noqa: E731
    plain = keras.ops.softmax(model.logits(prepare(images), training=False))
    mirrored = keras.ops.softmax(model.logits(prepare(images[:, :, ::-1]), training=False))
    np.testing.assert_allclose(np.asarray(served(images)), (plain + mirrored) / 2, rtol=1e-4, atol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_model(32, 1.0, str(tmp_path / "nope.h5"), 10, 0.0)


@pytest.mark.real_data
def test_training_forward_keeps_batchnorm_in_inference_mode():
    """Fine-tuning must neither use nor update batch statistics. Real weights: with random
    ones the features are ~0 and any comparison is vacuous."""
    if not WEIGHTS.is_file():
        pytest.skip("offline ImageNet weights not found")
    model = build_model(64, 1.0, str(WEIGHTS), 10, dropout=0.0)
    set_backbone_trainable(model, "all")
    images = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype("float32")
    moving = [v.numpy().copy() for v in model.backbone.non_trainable_variables]
    inference = np.asarray(model.logits(images, training=False))
    assert np.abs(inference).max() > 1e-3
    np.testing.assert_allclose(model.logits(images, training=True), inference, rtol=1e-4, atol=1e-5)
    for before, after in zip(moving, model.backbone.non_trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())


def test_head_dropout_is_active_only_in_training(model):
    features = np.random.default_rng(0).uniform(0, 1, (8, 1280)).astype("float32")
    assert np.abs(np.asarray(model.head(features, training=True)) - np.asarray(model.head(features, training=False))).max() > 1e-3


def _randomize_batchnorm(model, seed=0):
    """Random statistics, scale and offset: fresh ones (0, 1, 1, 0) make BatchNorm almost the identity."""
    rng = np.random.default_rng(seed)
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.2, shape),
                               rng.normal(0, 0.2, shape), rng.uniform(0.5, 2.0, shape)])


def test_folded_batchnorm_computes_the_stock_function_and_gradients():
    model = build_model(32, 0.35, "none", 10, 0.0)
    assert len(model.folds) == 52  # every BatchNorm of MobileNetV2 follows a bias-free convolution
    assert len(model.same_padding) == 4  # the stride-2 blocks' ZeroPadding2D is "SAME" padding
    _randomize_batchnorm(model)
    set_backbone_trainable(model, "all")
    images = tf.constant(np.random.default_rng(1).uniform(-1, 1, (4, 32, 32, 3)).astype("float32"))

    def stock(x):
        return model.extractor(x, training=False)

    def value_and_gradients(forward):
        with tf.GradientTape() as tape:
            features = forward(images)
            loss = tf.reduce_sum(features * tf.range(features.shape[-1], dtype=tf.float32) / features.shape[-1])
        return features.numpy(), [g.numpy() for g in tape.gradient(loss, model.backbone.trainable_variables)]

    (stock_features, stock_grads), (folded_features, folded_grads) = value_and_gradients(stock), value_and_gradients(model.features)
    scale = np.abs(stock_features).max()
    assert scale > 1e-2
    np.testing.assert_allclose(folded_features, stock_features, atol=1e-4 * scale)
    assert len(folded_grads) == 52
    for a, b in zip(folded_grads, stock_grads):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max() + 1e-7)


def test_folding_can_be_turned_off():
    model = build_model(32, 0.35, "none", 10, 0.0, fold_batchnorm=False)
    assert model.folds == {} and not model.absorbed
    images = np.zeros((1, 32, 32, 3), "float32")
    np.testing.assert_array_equal(model.features(images), model.extractor(images, training=False))


def test_folding_is_on_by_default_only_where_it_was_measured_to_help(monkeypatch):
    from job.model import folds_batchnorm

    assert ModelConfig().fold_batchnorm == "auto"
    assert folds_batchnorm("auto") and folds_batchnorm(True) and not folds_batchnorm(False)  # this CPU
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert not folds_batchnorm("auto") and folds_batchnorm(True)


def test_split_bottom_then_top_is_the_backbone():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    m = build_model(64, 0.35, "none", 10, 0.2)
    split = m.split(100)  # MobileNetV2's top 100 layers start at block_6_expand
    assert split.first_trainable == "block_6_expand"
    activations = split.bottom(images)
    assert tuple(activations.shape[1:]) == split.shape
    np.testing.assert_allclose(split.top_features(activations), m.features(images), rtol=1e-4, atol=1e-5)


def test_split_inside_a_residual_block_names_the_nearest_boundaries(model):
    # The top 102 layers start at block_5_project_BN: they read its convolution's output and,
    # through block_5_add, the block's input too.
    with pytest.raises(ValueError, match=r"read 2 tensors .* e\.g\. 100 or 109"):
        model.split(102)
