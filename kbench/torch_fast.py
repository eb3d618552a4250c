"""The torch fast path: Keras training on the torch backend at PyTorch's own speed.

Keras' torch backend (3.15) pays two costs that plain PyTorch does not
(keras-team/keras PR 18793, PR 22324, PR 23199, issue 23649):
  - BatchNormalization in training builds its moments and the normalisation from generic ops
    (mean, square, subtract, rsqrt, multiply...), a pass over the activation each, where
    PyTorch runs one fused kernel forward and one backward;
  - convolutions and pooling copy every NHWC input to a contiguous NCHW tensor, and a
    convolution then copies it back to channels_last memory (`_transpose_spatial_inputs`, then
    `_maybe_convert_to_channels_last`). An NHWC tensor permuted to NCHW already is
    channels_last memory: the permuted view needs neither copy.

This module replaces exactly those two things, and nothing else, while `enabled`:
  - `BatchNormalization.call` in training (`training and trainable`, no mask, no renorm, not
    synchronized, channels on the last axis) runs `torch.native_batch_norm` on the permuted
    view, and updates the moving statistics as Keras does: `moving * momentum + batch * (1 -
    momentum)` with the biased batch variance, in float32 under mixed precision. Anything
    else, inference included, is Keras' own code.
  - `keras.src.backend.torch.nn._transpose_spatial_inputs` returns the permuted view for 2D
    inputs (2D convolution, transposed convolution and pooling), without `.contiguous()`;
    1D and 3D ones are Keras' own.
Both compute the same function as stock Keras, to float32 round-off (the tests compare
outputs, gradients and moving statistics); where a channel's mean is far larger than its
spread, PyTorch's kernel is the more accurate of the two (Keras' torch moments compute
E[x^2] - E[x]^2, which cancels). Neither touches what is saved: a model.keras
written with the fast path loads and predicts the same under stock Keras on every backend.

It is on by default under torch (`--torch-fast-path off` runs stock Keras; `kbench compare
--backends torch,torch-stock` shows both), and only for the Keras versions it was tested with
(kbench.keras_fixes.TESTED_KERAS); with another, one line says so and Keras runs as it is.
"""

import sys

from kbench.keras_fixes import TESTED_KERAS

_state = {"installed": False, "enabled": False, "warned": False}


def enabled():
    return _state["enabled"]


def set_enabled(on):
    """Turn the fast path on or off for this process (torch backend only; a no-op elsewhere).
    Returns whether it is on."""
    import keras

    if keras.backend.backend() != "torch":
        _state["enabled"] = False
        return False
    if on and not _tested(keras.version()):
        if not _state["warned"]:
            print(f"note: kbench's torch fast path is written for keras {', '.join(TESTED_KERAS)}"
                  f"; this is keras {keras.version()}: training runs stock Keras (as "
                  "--torch-fast-path off)", file=sys.stderr)
            _state["warned"] = True
        on = False
    if on and not _state["installed"]:
        _install()
    _state["enabled"] = bool(on)
    return _state["enabled"]


def _tested(version):
    return ".".join(version.split(".")[:2]) in TESTED_KERAS


def _install():
    """Wrap the two Keras functions once; the wrappers defer to Keras when not enabled."""
    from keras.src.backend.torch import nn as torch_nn
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    stock_transpose = torch_nn._transpose_spatial_inputs

    def transpose_spatial_inputs(inputs):
        if _state["enabled"] and inputs.ndim == 4:
            return inputs.permute(0, 3, 1, 2)  # channels_last memory already: no copy
        return stock_transpose(inputs)

    stock_call = BatchNormalization.call
    stock_moments = BatchNormalization._moments

    def call(self, inputs, training=None, mask=None):
        if (_state["enabled"] and training and self.trainable and mask is None
                and type(self)._moments is stock_moments  # a subclass's own moments: Keras'
                and not getattr(self, "renorm", False)
                and not getattr(self, "synchronized", False)
                and self.axis in (-1, len(inputs.shape) - 1) and 2 <= len(inputs.shape) <= 5):
            return _batch_norm_training(self, inputs)
        return stock_call(self, inputs, training=training, mask=mask)

    torch_nn._transpose_spatial_inputs = transpose_spatial_inputs
    BatchNormalization.call = call
    _state["installed"] = True


def _batch_norm_training(layer, inputs):
    """Keras' BatchNormalization.call in training, through PyTorch's fused kernels."""
    import keras
    import torch

    x = keras.ops.convert_to_tensor(inputs)
    # Keras computes BatchNormalization in float32 when its inputs are float16/bfloat16.
    compute = torch.promote_types(x.dtype, torch.float32)
    x = x.to(compute)
    ndim = x.ndim
    # Channels from the last axis to axis 1 as a view: NHWC -> NCHW is channels_last memory.
    to_channels_first = (0, ndim - 1, *range(1, ndim - 1))
    to_channels_last = (0, *range(2, ndim), 1)
    weight = layer.gamma.value.to(compute) if layer.scale else None
    bias = layer.beta.value.to(compute) if layer.center else None
    out, batch_mean, batch_invstd = torch.native_batch_norm(
        x.permute(to_channels_first), weight, bias, None, None, True, 0.0, layer.epsilon)
    with torch.no_grad():
        # The biased batch variance, as Keras' moments give it: invstd = 1 / sqrt(var + eps);
        # in float64 where the device has it (not Apple's MPS), so little is lost to eps.
        wide = batch_invstd.double() if batch_invstd.device.type != "mps" else batch_invstd
        variance = (wide.pow(-2) - layer.epsilon).clamp_(min=0)
        momentum = layer.momentum
        moving_mean = layer.moving_mean.value.to(compute)
        moving_variance = layer.moving_variance.value.to(compute)
        layer.moving_mean.assign(moving_mean * momentum + batch_mean * (1.0 - momentum))
        layer.moving_variance.assign(
            moving_variance * momentum + variance.to(compute) * (1.0 - momentum))
    return out.permute(to_channels_last).to(getattr(torch, layer.compute_dtype))
