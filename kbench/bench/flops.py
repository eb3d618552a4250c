"""Analytic FLOP counts for Keras models, so achieved FLOP/s can be compared across backends.

Counts the multiply-adds of convolutions and dense layers (2 FLOPs each), which dominate conv
nets; a training step is taken as 3x the forward pass (forward, gradient w.r.t. activations,
gradient w.r.t. weights), the usual approximation. BatchNorm, activations, pooling and the
optimizer update are left out, so this is a slight undercount. The native twins report this same
count of the Keras model they copy their weights from, so every row's TFLOP/s is on one basis;
native JAX also records XLA's own count (cost analysis) as `xla_flops_per_step`.
"""

import math

import keras

SOURCE = "analytic: 3 x forward conv/dense multiply-adds x 2"  # a record's flops_source


def forward_flops(model):
    """FLOPs of one example's forward pass through the conv and dense layers of `model`."""
    total = 0
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D) and not isinstance(
                layer, keras.layers.DepthwiseConv2D):
            _, height, width, out_channels = layer.output.shape
            kh, kw, in_per_group, _ = layer.kernel.shape
            total += 2 * height * width * out_channels * kh * kw * in_per_group
        elif isinstance(layer, keras.layers.Dense):
            in_features, out_features = layer.kernel.shape
            positions = math.prod(d for d in layer.output.shape[1:-1] if d)  # dense on sequences
            total += 2 * in_features * out_features * positions
    return int(total)


def training_flops(model, batch_size):
    """FLOPs of one training step on a batch (3x forward), or None if nothing was countable."""
    forward = forward_flops(model)
    return 3 * forward * batch_size if forward else None


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer
