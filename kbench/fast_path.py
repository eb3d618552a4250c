"""kbench's fast path: Keras training on torch and TensorFlow at their own frameworks' speed.

Keras builds BatchNormalization in training from generic ops (moments, then subtract, rsqrt,
multiply...: a pass over the activation each, forward and backward) where PyTorch and
TensorFlow each have one fused kernel (keras-team/keras PR 18793). Its torch backend also
copies every NHWC input of a 2D convolution or pooling to contiguous NCHW, and a convolution
then copies it back to channels_last memory (`_transpose_spatial_inputs`, then
`_maybe_convert_to_channels_last`; PR 22324, PR 23199, issue 23649), although an NHWC tensor
permuted to NCHW already is channels_last memory.

This module replaces exactly those things, and nothing else, while `enabled`:
  - `BatchNormalization.call` in training (`training and trainable`, no mask, no renorm, not
    synchronized, the class's own moments, channels on the last axis) runs the framework's
    fused kernel: under torch, on the NHWC->NCHW permuted view (any rank), `torch.batch_norm`
    for images (nn.BatchNorm2d's call: on a CUDA GPU cuDNN's kernel where cuDNN takes the
    case, as in plain PyTorch), else `torch.native_batch_norm` (ATen's kernel; also where
    the kernel cannot move the moving statistics itself and kbench moves them); under
    tensorflow `FusedBatchNormV3` (4D NHWC float16, bfloat16 or float32 inputs; others stay
    Keras'; a 16-bit input goes in uncast, as in the native twin). The
    moving statistics move as Keras moves them: `moving * momentum + batch * (1 - momentum)`
    with the biased batch variance, in float32 under mixed precision. Inference is Keras'.
  - under torch, `keras.src.backend.torch.nn._transpose_spatial_inputs` returns the permuted
    view for 2D inputs (2D convolution, transposed convolution and pooling), without
    `.contiguous()`; 1D and 3D ones are Keras' own.
  - under torch, a functional model (or Sequential) made only of the layers in
    DIRECT_LAYERS runs as a kbench.torch_plan.Plan: its graph walked once into a flat list of
    steps, each layer's own `call()` where Keras would run `Layer.__call__` around it (about
    0.5 ms of Python per layer call on our CPU: argument binding, call context, masks,
    nn.Module hooks, tree walks), and the common layers' calls lowered to the torch calls
    Keras' ops end in, rank-4 values kept channels first between them. At small batches that
    Python is most of a Keras-torch step, and on a GPU it is what the GPU waits for
    (docs/compare.md, "Host overhead"). What `__call__` does that matters for those layers
    is kept: the input cast to the layer's dtype, the autocast scope of a mixed policy, the
    `training` argument. Under torch.compile the plan is traced like any Python (one graph
    before loss.backward() and one after, as before; tests/test_torch_compile.py), so the
    compiled step is the lowered one too. Any other layer in the model, a mask, a layer
    with an activity regularizer, torch forward or backward hooks (a layer's or global
    ones), rematerialization or quantization, a distribution, or a symbolic call: the whole
    model runs Keras' own way. The outermost call of such a model (train_step's
    `self(x, training=True)`, predict's) skips Layer.__call__ as well, keeping what it does
    for one (`_outermost_call`).
  - under torch, a channels_last Conv2D's kernel is laid out in memory as torch's
    channels_last convolution weight from its build on, and optimizer variables made from it
    alike (`_install_kernel_layout`): no copy of the kernel or of its gradient per call.
  - under torch, Keras' train_step for such a model walks its layer tree once a
    step instead of five times (kbench.torch_step).
  - under torch, eagerly, Keras' SGD computes its learning rate once per step, not twice,
    and reads no device scalar (kbench.torch_sgd); nor does any optimizer's learning-rate
    schedule of Keras' or kbench's (CosineDecay's warmup `ops.cond`:
    kbench.keras_fixes.select_in_schedules); mixed_float16's LossScaleOptimizer reads one
    device value a step (whether the gradients are finite), not two
    (kbench.keras_fixes.select_in_loss_scaling).
  - under torch on a CUDA GPU, eagerly, Keras' conversions of Python numbers, shapes and host
    batches to device tensors make no blocking copy, each of which synchronized the stream
    (kbench.torch_transfers).
Each computes the same function as stock Keras, to float32 round-off (the tests compare
outputs, gradients and moving statistics); where a channel's mean is far larger than its
spread, the fused kernels are the more accurate (Keras' torch moments compute
E[x^2] - E[x]^2, which cancels). Neither touches what is saved: a model.keras written with the
fast path loads and predicts the same under stock Keras on every backend.

A kbench Run turns it on for its lifetime (`--fast-path off` runs stock Keras; `kbench compare
--backends torch,torch-stock,tensorflow,tensorflow-stock` shows both), only for the Keras
versions it was tested with (kbench.keras_fixes.TESTED_KERAS); with another, one line says so
and Keras runs as it is. JAX has nothing to replace: XLA fuses Keras' ops itself.
"""

import sys

from kbench.keras_fixes import TESTED_KERAS

BACKENDS = ("tensorflow", "torch")  # where it changes anything

_state = {"installed": False, "enabled": False, "warned": False}
# Where torch.native_batch_norm takes a float16/bfloat16 input with float32 weights.
MIXED_TYPE_DEVICES = ("cpu", "cuda")
# torch dtype -> the dtype BatchNormalization computes in (backend.result_type(x, float32));
# filled at install, under torch
_COMPUTE = {}
_TORCH_DTYPES = {}  # Keras' float dtype names -> torch dtypes; filled at install, under torch


def enabled():
    return _state["enabled"]


def set_enabled(on):
    """Turn the fast path on or off for this process (torch and tensorflow; a no-op under
    jax). Returns whether it is on."""
    import keras

    if keras.backend.backend() not in BACKENDS:
        _state["enabled"] = False
        return False
    if on and not _tested(keras.version()):
        if not _state["warned"]:
            print(f"note: kbench's fast path is written for keras {', '.join(TESTED_KERAS)}; "
                  f"this is keras {keras.version()}: training runs stock Keras (as "
                  "--fast-path off)", file=sys.stderr)
            _state["warned"] = True
        on = False
    if on and not _state["installed"]:
        _install(keras.backend.backend())
    _state["enabled"] = bool(on)
    return _state["enabled"]


def _tested(version):
    return ".".join(version.split(".")[:2]) in TESTED_KERAS


def _install(backend):
    """Wrap the Keras functions once; the wrappers defer to Keras when not enabled."""
    import keras
    from keras.src.layers.normalization.batch_normalization import BatchNormalization

    stock_call = BatchNormalization.call
    _state["stock_moments"] = BatchNormalization._moments
    # the input ranks and dtypes the fused kernel takes (FusedBatchNormV3: NHWC only, in
    # float16, bfloat16 or float32: not float64, which Keras would compute in, nor integers;
    # torch.native_batch_norm takes every float)
    _state["fused_ranks"] = (2, 3, 4, 5) if backend == "torch" else (4,)
    fused_dtypes = None if backend == "torch" else ("float16", "bfloat16", "float32")
    fused = _torch_batch_norm if backend == "torch" else _tensorflow_batch_norm

    def call(self, inputs, training=None, mask=None):
        if (_state["enabled"] and fusable(self, len(inputs.shape), training, mask)
                and (fused_dtypes is None
                     or keras.backend.standardize_dtype(inputs.dtype) in fused_dtypes)):
            return fused(self, inputs)
        return stock_call(self, inputs, training=training, mask=mask)

    BatchNormalization.call = call
    if backend == "torch":
        from keras.src.backend.torch import nn as torch_nn

        stock_transpose = torch_nn._transpose_spatial_inputs

        def transpose_spatial_inputs(inputs):
            if _state["enabled"] and inputs.ndim == 4:
                return inputs.permute(0, 3, 1, 2)  # channels_last memory already: no copy
            return stock_transpose(inputs)

        torch_nn._transpose_spatial_inputs = transpose_spatial_inputs
        import torch

        # (filled now, not at a first call: dynamo guards on them, and a dict changed
        # between compiled steps recompiles the step)
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        _COMPUTE.update({dtype: torch.promote_types(dtype, torch.float32) for dtype in floats})
        _TORCH_DTYPES.update({str(dtype)[6:]: dtype for dtype in floats})
        _install_direct_calls()
        _install_kernel_layout()
        from kbench import keras_fixes, torch_sgd, torch_transfers

        torch_sgd.install(_state)
        keras_fixes.install_selects(eager=lambda: _state["enabled"])
        torch_transfers.install(lambda: _state["enabled"])
        from kbench import torch_step

        torch_step.install(_state, planned)
    _state["installed"] = True


def _install_kernel_layout():
    """Under torch, a channels_last Conv2D's kernel (Keras' HWIO shape) is laid out in memory
    as torch's channels_last convolution weight (O, H, W, I order), so that its OIHW view,
    which torch convolves with, is a channels_last tensor as it stands: no copy of it in the
    forward pass, none of its gradient in the backward pass. Keras' kernel is an HWIO
    contiguous tensor, whose OIHW view torch copies into its own layout on every call and
    whose gradient autograd copies back into HWIO (about 1 ms of a batch-2 ResNet-20 step
    here, 3 copies per convolution; tools/step_ops.py counts them). Same values, same shape,
    the same Parameter (only `.data` changes): what reads or saves the variable sees no
    difference. Optimizer variables made from such a kernel (momentum, Adam's moments, EMA)
    get its layout too, so torch's foreach ops keep their fast route (on CUDA it needs the
    same strides in every list)."""
    import torch
    from keras.src.layers.convolutional.conv2d import Conv2D
    from keras.src.optimizers import base_optimizer

    stock_build = Conv2D.build

    def build(self, input_shape):
        stock_build(self, input_shape)
        if _state["enabled"] and type(self) is Conv2D and self.data_format == "channels_last":
            kernel = self._kernel._value
            if kernel is not None and kernel.ndim == 4:
                h, w, i, o = kernel.shape
                _lay_out(self._kernel, (w * i, i, 1, h * w * i))

    Conv2D.build = build
    stock_reference = base_optimizer.BaseOptimizer.add_variable_from_reference

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        variable = stock_reference(self, reference_variable, name, initializer)
        # (whether or not the fast path is on now: the kernel's layout was set at its build)
        reference = getattr(reference_variable, "_value", None)
        if (isinstance(reference, torch.Tensor) and variable._value is not None
                and reference.shape == variable._value.shape
                and _dense(reference)):
            _lay_out(variable, reference.stride())
        return variable

    base_optimizer.BaseOptimizer.add_variable_from_reference = add_variable_from_reference


def _dense(tensor):
    """Whether `tensor` fills its memory without gaps or overlaps (a contiguous tensor with
    its dimensions permuted), so that a tensor of its shape can be laid out as it is."""
    order = sorted(range(tensor.ndim), key=lambda d: -tensor.stride(d))
    return tensor.permute(order).is_contiguous()


def _lay_out(variable, strides):
    """Give torch `variable`'s tensor `strides` (a dense layout of its shape), in place."""
    import torch

    value = variable._value
    strides = tuple(strides)
    if value.stride() == strides:
        return
    laid_out = torch.empty_strided(value.shape, strides, dtype=value.dtype, device=value.device)
    with torch.no_grad():
        laid_out.copy_(value)
    value.data = laid_out  # the same Parameter object: Keras' and torch's references hold


def fusable(layer, rank, training, mask=None):
    """Whether BatchNormalization `layer`'s call on an input of `rank` takes the fused kernel:
    in training, with no mask, renorm or synchronization, the class's own moments, channels
    on the last axis, a rank the kernel takes (FusedBatchNormV3: NHWC only)."""
    return bool(training and layer.trainable and mask is None
                and type(layer)._moments is _state["stock_moments"]  # a subclass's: Keras'
                and not getattr(layer, "renorm", False)
                and not getattr(layer, "synchronized", False)
                and rank in _state["fused_ranks"] and layer.axis in (-1, rank - 1))


def _torch_batch_norm(layer, inputs):
    """Keras' BatchNormalization.call in training, through PyTorch's fused kernel."""
    import keras
    import torch

    x = inputs if isinstance(inputs, torch.Tensor) else keras.ops.convert_to_tensor(inputs)
    ndim = x.ndim
    # Channels from the last axis to axis 1 as a view: NHWC -> NCHW is channels_last memory.
    to_channels_first = (0, ndim - 1, *range(1, ndim - 1))
    to_channels_last = (0, *range(2, ndim), 1)
    return torch_batch_norm_channels_first(layer, x.permute(to_channels_first)).permute(
        to_channels_last)


def torch_batch_norm_channels_first(layer, x, deferred=None):
    """_torch_batch_norm on channels-first `x` (N, C, ...), returning channels first: what
    kbench.torch_plan runs between layers that keep that layout. With a list `deferred`, the
    moving variance's last write (a multiply and a copy) is appended to it, for
    `finish_moves` to do for all the layers of a forward pass at once (two ops, not two per
    layer; the same numbers)."""
    import torch

    # Keras computes BatchNormalization in float32 when its inputs are float16/bfloat16.
    # PyTorch's kernel does the same for a float16/bfloat16 input given float32 weights (it
    # computes and returns the statistics in float32, the output in the input's dtype, on
    # CPU and CUDA): casting the activation to float32 and the output back, as this did
    # first, cost two more passes over it each way and kept a float32 copy for backward.
    compute = _COMPUTE.get(x.dtype) or torch.promote_types(x.dtype, torch.float32)
    # (Only with both weights: without one the kernel runs in the input's dtype throughout.)
    mixed = layer.scale and layer.center and x.device.type in MIXED_TYPE_DEVICES
    if x.dtype != compute and not mixed:
        x = x.to(compute)
    output_dtype = _torch_dtype(layer.compute_dtype)
    stateless = _stateless()
    # (Each `.to` only where the dtype differs: a call that changes nothing still costs.)
    weight = _as(_read(layer.gamma, stateless), compute) if layer.scale else None
    bias = _as(_read(layer.beta, stateless), compute) if layer.center else None
    n = x.numel() // x.shape[1]  # values per channel
    moving_mean, moving_variance = layer.moving_mean._value, layer.moving_variance._value
    if n > 1 and moving_mean.dtype == compute and moving_variance.dtype == compute \
            and not stateless:
        # The kernel moves the statistics itself (no op of ours): the mean as Keras does,
        # the variance with the unbiased batch variance, n/(n-1) times Keras' biased one.
        # Given the moving variance times n/(n-1), it moves that by Keras' rule times
        # n/(n-1): one multiply before and one after, instead of the ten ops of
        # recovering the variance from the kernel's 1/std and moving both in Python.
        bessel = n / (n - 1)
        scaled = moving_variance * bessel
        # Images (rank 4, and 5): torch.batch_norm, nn.BatchNorm2d's call, which on a CUDA
        # GPU picks cuDNN's kernel where cuDNN takes the case (float32, or float16 with
        # float32 weights; channels_last training in its persistent mode) and ATen's own
        # otherwise (bfloat16 in torch 2.x), as plain PyTorch does. Rank 3: ATen's, which
        # takes the permuted NLC view as it is (cuDNN would copy it to contiguous first).
        # On a CPU both are ATen's kernel.
        batch_norm = torch.batch_norm if x.ndim >= 4 else _native_batch_norm_output
        out = batch_norm(
            x, weight, bias, moving_mean, scaled, True, 1.0 - layer.momentum,
            layer.epsilon, torch.backends.cudnn.enabled)  # torch's momentum weighs the batch
        if deferred is None:
            moving_variance.copy_(scaled * (1.0 / bessel))  # (scaled is saved for backward)
        else:
            deferred.append((moving_variance, scaled, 1.0 / bessel))
        return _as(out, output_dtype)
    out, batch_mean, batch_invstd = torch.native_batch_norm(
        x, weight, bias, None, None, True, 0.0, layer.epsilon)
    with torch.no_grad():
        # The biased batch variance, as Keras' moments give it: invstd = 1 / sqrt(var + eps);
        # in float64 where the device has it (not Apple's MPS), so little is lost to eps.
        wide = batch_invstd.double() if batch_invstd.device.type != "mps" else batch_invstd
        variance = (wide.pow(-2) - layer.epsilon).clamp_(min=0).to(compute)
        _torch_move(layer, batch_mean, variance)
    return out.to(output_dtype)


def _native_batch_norm_output(x, weight, bias, running_mean, running_var, training, momentum,
                              epsilon, cudnn_enabled):
    """torch.batch_norm's output, always from ATen's own kernel (torch.native_batch_norm)."""
    import torch

    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, training,
                                   momentum, epsilon)[0]


def finish_moves(deferred):
    """The moving-variance writes torch_batch_norm_channels_first deferred, in their order:
    `variance.copy_(scaled * factor)` for each, as two foreach ops."""
    import torch

    if deferred:
        variances, scaled, factors = zip(*deferred)
        deferred.clear()
        torch._foreach_copy_(variances, torch._foreach_mul(scaled, factors))


def _as(tensor, dtype):
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _read(variable, stateless):
    """`variable.value` of a BatchNormalization weight (autocast=False: never cast): its
    tensor, read directly outside a stateless scope."""
    return variable.value if stateless or variable._value is None else variable._value


def _torch_dtype(name):
    found = _TORCH_DTYPES.get(name)
    if found is None:  # not a float dtype: not met in a BatchNormalization, but say it right
        import torch

        found = getattr(torch, name)
    return found


def _stateless():
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()



def _tensorflow_batch_norm(layer, inputs):
    """Keras' BatchNormalization.call in training, through TensorFlow's fused kernel. In
    training it normalizes with the biased batch variance and returns the unbiased one
    (Bessel-corrected, for TF1's moving average); Keras moves with the biased one."""
    import tensorflow as tf

    # Keras computes BatchNormalization in float32 and casts the result to the layer's
    # compute dtype. The kernel does the same for a float16 or bfloat16 input with float32
    # scale and offset (its statistics and arithmetic are float32, its output rounded once
    # to the input's dtype), so such an input in the layer's own compute dtype goes in
    # uncast: casting it to float32 and back cost two passes over the activation each
    # way: Keras-TF took 1.49x the native twin's step under mixed_bfloat16 on our CPU,
    # 1.04x without (docs/compare.md, "The fast path").
    x = tf.convert_to_tensor(inputs)
    if x.dtype not in (tf.float16, tf.bfloat16) or x.dtype != layer.compute_dtype:
        x = tf.cast(x, tf.float32)
    channels = x.shape[-1]
    scale = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    offset = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    empty = tf.constant([], tf.float32)
    y, batch_mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=layer.epsilon,
        data_format="NHWC", is_training=True)
    n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
    _move(layer, batch_mean, unbiased * ((n - 1.0) / n), "float32")
    return tf.cast(y, layer.compute_dtype)


def _torch_move(layer, batch_mean, batch_variance):
    """_move's arithmetic in torch ops on the variables' tensors: Keras' cast and assign
    around it cost more Python than the update itself (a fifth of a batch-2 ResNet step)."""
    if _stateless():  # updates are collected, not written: Keras' way
        return _move(layer, batch_mean, batch_variance, str(batch_mean.dtype)[6:])
    momentum = layer.momentum
    for variable, batch in ((layer.moving_mean, batch_mean),
                            (layer.moving_variance, batch_variance)):
        moving = variable._value  # what Variable.assign writes
        moving.copy_(moving.to(batch.dtype) * momentum + batch * (1.0 - momentum))


def _move(layer, batch_mean, batch_variance, dtype):
    """The moving statistics, as Keras' BatchNormalization moves them."""
    import keras

    momentum = layer.momentum
    moving_mean = keras.ops.cast(layer.moving_mean, dtype)
    moving_variance = keras.ops.cast(layer.moving_variance, dtype)
    layer.moving_mean.assign(moving_mean * momentum + batch_mean * (1.0 - momentum))
    layer.moving_variance.assign(moving_variance * momentum + batch_variance * (1.0 - momentum))


# Keras layers whose `__call__` adds nothing to `call()` in an eager training or inference
# step beyond what a plan step keeps (kbench.torch_plan.layer_step: no masks made or consumed,
# no nested layers, no state
# set in `__call__`). Exact classes: a subclass may rely on `__call__`.
DIRECT_LAYERS = ("Activation", "Add", "AveragePooling2D", "BatchNormalization", "Conv1D",
                 "Conv2D", "Conv2DTranspose", "Dense", "DepthwiseConv2D", "Dropout", "Flatten",
                 "GlobalAveragePooling2D", "GlobalMaxPooling2D", "MaxPooling2D",
                 "Normalization", "ReLU", "Rescaling", "ZeroPadding2D",
                 "ShortcutPad")  # kbench.models.layers' own


def _install_direct_calls():
    import torch
    from keras import distribution
    from keras.src.models import functional

    stock_call = functional.Functional.call

    def call(self, inputs, training=None, mask=None, **kwargs):
        if (not _state["enabled"] or mask is not None or kwargs
                or distribution.distribution() is not None
                or not _direct_model(self) or not _eager_tensors(inputs)):
            return stock_call(self, inputs, training=training, mask=mask, **kwargs)
        return _plan(self).run(_standard_inputs(self, inputs), training)

    functional.Functional.call = call
    # The outermost call of such a model (train_step's `self(x, training=True)`) skips
    # Layer.__call__ too (Functional defines no __call__ of its own): what it does for a
    # direct model, in an eager call from outside any other layer, is done in
    # _outermost_call, at a sixth of its cost (about 0.6 ms a step here).
    Functional = functional.Functional

    def dunder(self, *args, **kwargs):
        if _state["enabled"] and type(self).call is call and _outermost(self, args, kwargs):
            return _outermost_call(self, args[0], kwargs.get("training"))
        # Layer.__call__ as it is now (a profiler may have wrapped it since)
        return super(Functional, self).__call__(*args, **kwargs)

    functional.Functional.__call__ = dunder


def _outermost(model, args, kwargs):
    """Whether `model(*args, **kwargs)` may skip Layer.__call__: one input argument (a
    tensor, an array or a structure of them, none carrying a mask) and at most `training`;
    no layer call around it (Keras' call context), no stateless or symbolic scope, no
    distribution; torch hooks on neither the model nor any module; and a direct model."""
    from keras import distribution
    from keras.src.backend.common import global_state
    from keras.src.backend.common.symbolic_scope import in_symbolic_scope

    return (len(args) == 1 and (not kwargs or list(kwargs) == ["training"])
            and global_state.get_global_attribute("current_call_ctx") is None
            and _direct_layer(model) and not _stateless() and not in_symbolic_scope()
            and distribution.distribution() is None
            and _eager_tensors(args[0]) and not _masked(args[0]) and _direct_model(model))


def _outermost_call(model, inputs, training):
    """Layer.__call__ of a direct functional model, outermost and eager: what it does for
    one is kept. Functional converts no arguments itself (its `_standardize_inputs` does);
    the input spec is checked (once per input shape and dtype: the check depends on nothing
    else); build is done; `training` given, or the call signature's default, None (no outer
    call to inherit it from); the losses the model's layers added in their last call are
    cleared, as a new call context clears them; the autocast scope Layer.__call__ would
    enter; no mask to compute (Functional has no compute_mask) and no node to record."""
    from kbench import torch_plan

    from kbench.torch_step import layers_in_order

    _check_input_spec(model, inputs)
    for layer in layers_in_order(model):  # read afresh: a layer may be attached later
        if layer._losses:
            layer._clear_losses()
    standard = _standard_inputs(model, inputs)
    scope = torch_plan.autocast_scope(model)
    if scope is None:
        return _plan(model).run(standard, training)
    with scope:
        return _plan(model).run(standard, training)


def _check_input_spec(model, inputs):
    """Keras' input spec check of the model, skipped when the inputs' shapes and dtypes are
    those it last passed (the check depends on nothing else); under torch.compile always run,
    as Keras runs it (no cached state for dynamo to guard on)."""
    import torch
    from keras import tree

    if torch.compiler.is_compiling():
        model._assert_input_compatibility(inputs)
        return
    key = (id(getattr(model, "_manual_input_spec", None)),
           tuple((tuple(x.shape), str(x.dtype)) for x in tree.flatten(inputs)))
    if model.__dict__.get("_kbench_checked_input") != key:
        model._assert_input_compatibility(inputs)  # raises Keras' own error
        object.__setattr__(model, "_kbench_checked_input", key)


def _standard_inputs(model, inputs):
    """Functional._standardize_inputs, short for its usual case: one input, a tensor of the
    input's rank (else Keras' own: structures, arrays, rank adjustment and its errors)."""
    import torch

    if (len(model._inputs) == 1 and isinstance(inputs, torch.Tensor)
            and inputs.ndim == len(model._inputs[0].shape) and not model._inputs[0].sparse):
        from keras.src.backend.torch.core import convert_to_tensor

        # (to the default device and the input's dtype, as Keras converts it)
        return [convert_to_tensor(inputs, dtype=model._inputs[0].dtype)]
    return model._standardize_inputs(inputs)


def _masked(inputs):
    from keras import tree

    return any(getattr(x, "_keras_mask", None) is not None for x in tree.flatten(inputs))


def planned(model):
    """Whether functional `model`'s layers were found directly callable (by _direct_model,
    once: the model's structure); the per-call conditions (hooks, scopes) are not asked."""
    layers = model.__dict__.get("_kbench_direct_layers")
    # len, not bool(): torch 2.11's dynamo cannot trace bool() of a tuple (a graph break in
    # every compiled step); 2.13's can
    return layers is not None and len(layers) > 0


def _plan(model):
    """The model's kbench.torch_plan.Plan, built at its first direct call."""
    plan = model.__dict__.get("_kbench_plan")
    if plan is None:
        from kbench import torch_plan

        plan = torch_plan.build(model, _direct_step)
        object.__setattr__(model, "_kbench_plan", plan)  # past Keras' tracking
    return plan


def _direct_step(layer):
    """A plan's step for `layer` without a lowering: its own call()."""
    from kbench import torch_plan

    return torch_plan.layer_step(layer, layer.call)


def _direct_model(model):
    """Whether every layer of the functional `model` may run its `call()` directly (a
    functional or Sequential model inside it may, when its own layers may); decided once per
    model (its layers are fixed), with the per-layer conditions that can change (hooks, a
    regularizer set later) checked on every call."""
    layers = model.__dict__.get("_kbench_direct_layers")  # None: not decided yet
    if layers is None:
        layers = _layers(model)
        if not all(_direct_class(layer) for layer in layers):
            layers = ()  # not direct: Keras' way, every call
        object.__setattr__(model, "_kbench_direct_layers", layers)  # past Keras' tracking
    if not layers:
        return False
    from torch.nn.modules import module

    hooked = (module._global_forward_hooks or module._global_forward_pre_hooks  # on every module
              or module._global_backward_hooks or module._global_backward_pre_hooks)
    return not hooked and all(_direct_layer(layer) for layer in layers)


def _layers(model):
    import keras

    return tuple(op for op in model._operations if not isinstance(op, keras.layers.InputLayer))


def _direct_class(layer):
    import keras
    from keras.src.models import functional

    if type(layer) is functional.Functional:
        return _direct_model(layer)
    if type(layer) is keras.Sequential:  # its call() runs the functional model it builds
        return layer._functional is not None and _direct_model(layer._functional)
    return (type(layer).__name__ in DIRECT_LAYERS
            and type(layer).__module__.startswith(("keras.src.layers.", "kbench.models.layers")))


def _direct_layer(layer):
    return (layer.built and layer._called and layer.activity_regularizer is None
            and not layer._remat_mode
            and getattr(layer, "quantization_mode", None) is None
            and not (layer._forward_hooks or layer._forward_pre_hooks
                     or layer._backward_hooks or layer._backward_pre_hooks))


def _eager_tensors(inputs):
    """Tensors or arrays (what train_on_batch may pass), not Keras' symbolic ones."""
    import numpy as np
    import torch
    from keras import tree

    return all(isinstance(x, (torch.Tensor, np.ndarray)) for x in tree.flatten(inputs))
