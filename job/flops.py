"""What a train step computes, in FLOPs, and what this machine's matmul reaches: the two
halves of the benchmark's utilization (job/benchmark.py, row (e)).

FLOPs per image are counted by TensorFlow's profiler on the inference graph, per Keras layer
(`layer_forward_flops`); a train step is then the forward of the layers that run, the weight
gradient of each trained layer and the input gradient of each layer above the lowest trained
one (`step_flops`): a head on cached features is 2x its forward, not 3x; a top fine-tuned on
cached activations of a frozen bottom counts the top alone. The peak is the best of several
TensorFlow matmul sizes and repeats (`matmul_rates`, `peak_summary`) with its spread and the
machine's load average, so a shared machine's noise shows instead of passing as a peak.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time

import keras
import tensorflow as tf

from job.config import Config
from job.model import build_model, first_trainable_layer, set_backbone_trainable


def _profiled_ops(model: keras.Model, input_shape: tuple) -> list[tuple[str, int]]:
    """(op name, FLOPs) of one image through `model` (inference), counted by TensorFlow's profiler."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *input_shape), tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)  # the v1 profiler warns that it is v1
    try:
        root = tf.compat.v1.profiler.profile(graph, options=options)
    finally:
        tf_log.setLevel(level)
    ops, stack = [], [root]
    while stack:
        node = stack.pop()
        if node.float_ops:
            ops.append((node.name, int(node.float_ops)))
        stack.extend(node.children)
    return ops


def forward_flops(model: keras.Model, input_shape: tuple) -> int:
    """FLOPs of one image through `model` (inference), counted by TensorFlow's profiler."""
    return sum(flops for _, flops in _profiled_ops(model, input_shape))


def layer_forward_flops(model: keras.Model, input_shape: tuple) -> dict:
    """{layer name: forward FLOPs of one image} for the layers of `model` (nested models' layers
    by their own names), from the profiler's ops and the Keras layer name scope each op sits in
    (`<layer>` or `<layer>_<n>`; the innermost layer wins). Ops in no layer's scope: key None."""
    names = {layer.name for layer in _layers(model)}
    per_layer: dict = {}
    for op, flops in _profiled_ops(model, input_shape):
        owner = None
        for part in op.split("/")[:-1]:
            base = re.sub(r"_\d+$", "", part)
            owner = part if part in names else base if base in names else owner
        per_layer[owner] = per_layer.get(owner, 0) + flops
    return per_layer


def _layers(model: keras.Model) -> list:
    """The layers of `model` in order, nested functional models replaced by their own layers."""
    result = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            result.extend(_layers(layer))
        elif not isinstance(layer, keras.layers.InputLayer):
            result.append(layer)
    return result


def _producers(layer) -> list:
    return [t._keras_history.operation for node in layer._inbound_nodes for t in node.input_tensors]


def step_flops(layers: list, forward: dict, runs_from: int = 0) -> dict:
    """FLOPs of one image through a train step over `layers` (in order, as `trainable` as the
    phase sets them), those below index `runs_from` not running at all (their output cached).

    Forward: every layer that runs. Backward: the weight gradient of every trained layer (a
    convolution's or matmul's kernel gradient costs what its forward does) and the input
    gradient (again about its forward's cost) of every layer reading a tensor that a gradient
    flows back through, i.e. every layer above a trained one. Nothing below the lowest trained
    layer, nor that layer's own input gradient. With every layer trained this is the usual
    3x forward, less the first layer's input gradient.
    """
    position = {id(layer): i for i, layer in enumerate(layers)}
    carries = set()  # ids of layers whose output a gradient flows back through
    fwd = weights = inputs = 0
    lowest = None
    for i, layer in enumerate(layers):
        # A tensor from outside `layers` (a nested model's input) comes from the layer before.
        sources = {id(p) if id(p) in position else id(layers[i - 1]) for p in _producers(layer)} if i else set()
        trained, upstream = bool(layer.trainable_weights), bool(sources & carries)
        if trained or upstream:
            carries.add(id(layer))
        if i < runs_from:
            continue
        flops = forward.get(layer.name, 0)
        fwd += flops
        inputs += flops if upstream else 0
        weights += flops if trained else 0
        lowest = lowest or (layer.name if trained else None)
    return {"forward": fwd, "backward_weights": weights, "backward_inputs": inputs, "train": fwd + weights + inputs,
            "lowest_trained": lowest}


def model_flops(config: Config, num_classes: int, phases: list) -> dict:
    """Forward FLOPs per image of backbone and head, and what a train step computes per phase.

    `phases`: (name, inputs, unfreeze); inputs "images", "features" (the head on cached
    features) or "activations" (the top, on cached activations of the frozen bottom);
    unfreeze False (frozen backbone) or train.finetune.unfreeze. A fresh float32 copy outside
    any strategy: FLOPs depend on shapes, not on weights or dtype. Counted on the stock Keras
    layers: a folded BatchNorm (model.fold_batchnorm) is counted as the layer it replaces.
    """
    size = config.model.image_size
    model = build_model(config.model, num_classes, "float32", weights="none")
    backbone = layer_forward_flops(model.extractor, (size, size, 3))
    head = layer_forward_flops(model.head, tuple(model.head.input_shape[1:]))
    result = {"forward_backbone": sum(backbone.values()), "forward_head": sum(head.values()),
              # FLOPs of ops in no layer's name scope: not attributed, so not counted in a phase.
              "outside_layers": backbone.get(None, 0) + head.get(None, 0), "phases": {}}
    layers = _layers(model.extractor) + _layers(model.head)
    names = [layer.name for layer in layers]
    for name, inputs, unfreeze in phases:
        set_backbone_trainable(model, unfreeze)
        if inputs == "features":
            runs_from = names.index(model.head.layers[1].name)
        elif inputs == "activations":
            runs_from = names.index(model.backbone.layers[first_trainable_layer(model.backbone, unfreeze)].name)
        else:
            runs_from = 0
        result["phases"][name] = {"inputs": inputs, "unfreeze": unfreeze, "runs_from": names[runs_from],
                                  **step_flops(layers, {**backbone, **head}, runs_from)}
    return result


def matmul_rates(dtype: str, sizes: tuple, repeats: int) -> list[tuple[int, float]]:
    """(size, FLOP/s) of TensorFlow's own matmul kernel in `dtype` on this machine: `repeats`
    timed runs of each square size after an untimed one."""
    matmul = tf.function(tf.matmul)
    rates = []
    for n in sizes:
        a = tf.cast(tf.random.normal([n, n]), dtype)
        b = tf.cast(tf.random.normal([n, n]), dtype)
        matmul(a, b).numpy()
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).numpy()
            rates.append((n, 2 * n**3 / (time.perf_counter() - start)))
    return rates


def load_average() -> float:
    """The machine's 1-minute load average: above its core count, other processes compete
    for the cores (a shared machine), and every rate here, the peak included, is low."""
    return os.getloadavg()[0]


def peak_summary(dtype: str, rates: list[tuple[int, float]], loads: tuple = ()) -> dict:
    """The peak to compare a step against: the best of every size and repeat (measured before
    and after the phases, so one busy stretch of a shared machine does not lower it), with
    the spread (median, slowest) that says how busy the machine was, and the best per size."""
    values = [r for _, r in rates]
    by_size: dict = {}
    for n, r in rates:
        by_size[str(n)] = max(by_size.get(str(n), 0.0), r)
    return {"dtype": dtype, "best": max(values), "median": statistics.median(values), "min": min(values),
            "runs": len(values), "best_by_size": by_size, "load_average": list(loads), "cores": os.cpu_count()}
