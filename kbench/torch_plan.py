"""The fast path's eager forward under torch: a functional model's call as a flat list of steps.

Keras runs a functional model by walking its graph (`Functional._run_through_graph`: a dict of
tensors by id, each node's arguments filled in through `tree` functions) and each layer by
`Layer.__call__`; inside a layer, every `keras.ops` call converts its arguments, standardizes
its settings and dispatches to the backend. On our CPU that Python is most of a Keras-torch
step at small batches, and on a GPU it is what the GPU waits for (docs/compare.md, "Host
overhead"). A `Plan` does that walk once, when a model first runs under the fast path: it keeps
the nodes in Keras' order, each with the slots its inputs come from and its outputs go to, and
each layer either *lowered* (its `call()` for the case at hand written as the torch calls that
Keras' own ops end in, with the arguments Keras would compute fixed once) or, for any other
listed layer, its own `call()`.

Lowered, only in the cases written out below (any other configuration runs the layer's
`call()`):
  - Conv2D: channels_last, padding "valid" or "same", linear or relu, no LoRA: Keras' torch
    conv (`conv2d` on the NCHW view, a "same" padding torch cannot express, as for stride 2,
    an explicit `pad` first), the bias added and the activation applied as Keras does;
  - BatchNormalization (rank 4): kbench.fast_path's fused kernel in training, else its call();
  - ReLU (no slope, cap or threshold) and Activation(relu / linear): `torch.relu` / itself;
  - Add: `torch.add` in input order, as Keras' Add (inputs of one rank);
  - Dense (rank 2, linear or relu): `torch.matmul` and the bias, where ops.matmul casts nothing;
  - GlobalAveragePooling2D (channels_last, no keepdims): `torch.mean` in float32, as ops.mean;
  - Normalization (not inverted): its division, the denominator computed once per variance;
  - ShortcutPad (kbench's): the strided slice and channel `pad` its call() makes.
Rank-4 values stay channels first between lowered layers that take them (see `build`). Each
lowering runs the same torch ops on the same numbers as Keras' path, so the results are the
same bits (tests/test_fast_path.py compares losses and weights with Keras' __call__ path).

What `Layer.__call__` does that matters in an eager step is kept for every step: the input
cast to the layer's dtype, the autocast scope of a mixed policy (variables read through
`Variable.value`, which casts them in that scope), the `training` argument.
"""

import torch
import torch.nn.functional as F
from keras.src import backend
from keras.src.backend.common.variables import get_autocast_scope

ONE, LIST, ARGS = 0, 1, 2  # how a node's inputs are given: one tensor, a list, anything else
LAST, FIRST = "channels_last", "channels_first"  # a rank-4 value's layout between steps
TO_FIRST, TO_LAST = (0, 3, 1, 2), (0, 2, 3, 1)  # NHWC -> NCHW view and back


class Plan:
    """A functional model's graph as steps: (run, kind, inputs, output slots, kwargs), where
    an input is (slot, permutation or None) and, for ARGS, (tensor id, slot, permutation)."""

    def __init__(self, model, steps, slots, input_slots, outputs, moves):
        self.model = model
        self.moves = moves  # the BatchNormalization steps' deferred writes (fast_path)
        self.steps = steps
        self.slots = slots
        self.input_slots = input_slots
        self.outputs = outputs

    def describe(self):
        """[(layer class name, how its step runs: lowered, taking rank-4 values
        "channels_first", "channels_last" (Keras' layout) or "any" (elementwise); or "call",
        its own call())], in the plan's order."""
        return [(type(run.layer).__name__, getattr(run, "lowered", "call"))
                for run, *_ in self.steps]

    def run(self, inputs, training):
        from kbench import fast_path

        try:
            return self._run(inputs, training)
        finally:  # the deferred writes of the layers that ran, whether or not all did
            fast_path.finish_moves(self.moves)

    def _run(self, inputs, training):
        from keras import tree
        from keras.src.models.functional import unpack_singleton

        values = [None] * self.slots
        for slot, x in zip(self.input_slots, tree.flatten(inputs)):
            if not isinstance(x, torch.Tensor):  # an array given to call() itself: a step may
                from keras.src.backend.torch.core import convert_to_tensor  # permute it first

                x = convert_to_tensor(x)
            values[slot] = x
        for run, kind, ins, outs, template in self.steps:
            if kind == ONE:
                slot, perm = ins
                x = values[slot]
                y = run((x if perm is None else x.permute(perm),), template, training)
            elif kind == LIST:
                xs = [values[slot] if perm is None else values[slot].permute(perm)
                      for slot, perm in ins]
                y = run((xs,), template, training)
            else:
                args, kwargs = template.fill_in({
                    key: values[slot] if perm is None else values[slot].permute(perm)
                    for key, slot, perm in ins})
                y = run(args, kwargs, training)
            if len(outs) == 1:
                values[outs[0]] = y
            else:
                for slot, value in zip(outs, tree.flatten(y)):
                    values[slot] = value
        outputs = [values[slot] if perm is None else values[slot].permute(perm)
                   for slot, perm in self.outputs]
        # Functional.call's own return: a one-output list is its output
        return unpack_singleton(tree.pack_sequence_as(self.model._outputs_struct, outputs))


def build(model, direct_call):
    """The Plan of functional `model` (every layer already checked to be directly callable);
    `direct_call(layer)` gives a layer's non-lowered step.

    Lowered layers that take rank-4 inputs keep them channels first (the NCHW view of NHWC
    memory, what torch's convolutions and batch norm take), and elementwise ones keep the
    layout they are given, so a chain of them never permutes back and forth: a value changes
    layout only where a step needs the other one (a permuted view; no copy)."""
    from keras import tree
    from keras.src.backend import KerasTensor

    slot_of, layout = {}, {}

    def slot(tensor, tensor_layout=LAST):
        layout[id(tensor)] = tensor_layout
        return slot_of.setdefault(id(tensor), len(slot_of))

    def given(tensor, wanted):  # (slot, the permutation that gives it in layout `wanted`)
        have = layout[id(tensor)]
        if have == wanted or len(tensor.shape) != 4:
            return slot_of[id(tensor)], None
        return slot_of[id(tensor)], TO_FIRST if wanted == FIRST else TO_LAST

    input_slots = [slot(x) for x in model.inputs]
    steps, moves = [], []
    for depth in sorted(model._nodes_by_depth, reverse=True):  # Keras' own order
        for node in model._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(x) not in slot_of for x in node.input_tensors):
                continue  # not computable from the inputs: Keras skips it too
            arguments = node.arguments
            layer = model._get_operation_for_node(node)
            args, kwargs = arguments.args, arguments.kwargs
            constant_kwargs = not any(isinstance(x, KerasTensor) for x in tree.flatten(kwargs))
            if len(args) == 1 and isinstance(args[0], KerasTensor) and constant_kwargs:
                kind, tensors, template = ONE, [args[0]], dict(kwargs)
            elif (len(args) == 1 and isinstance(args[0], (list, tuple)) and constant_kwargs
                  and all(isinstance(x, KerasTensor) for x in args[0])):
                kind, tensors, template = LIST, list(args[0]), dict(kwargs)
            else:
                kind, tensors, template = ARGS, arguments.keras_tensors, arguments
            run, mode = None, None
            if kind != ARGS and all(v is None for v in template.values()):
                # a lowering takes the inputs alone: a recorded mask=None is no mask
                run, mode = lowered(layer, [len(x.shape) for x in tensors], moves)
                if run is not None:
                    template = {}
            if run is None:
                run = direct_call(layer)
            # the layout the step takes its inputs in, and gives its outputs in
            wanted = FIRST if mode == FIRST else (
                layout[id(tensors[0])] if mode == "any" else LAST)
            ins = [given(x, wanted) for x in tensors]
            if kind == ONE:
                ins = ins[0]
            elif kind == ARGS:
                ins = [(id(x), *slot_perm) for x, slot_perm in zip(tensors, ins)]
            outs = [slot(x, wanted if len(x.shape) == 4 else LAST) for x in node.outputs]
            steps.append((run, kind, ins, outs, template))
    outputs = [given(x, LAST) for x in model.outputs]
    return Plan(model, steps, len(slot_of), input_slots, outputs, moves)


# --------------------------------------------------------------------------- the steps


def layer_step(layer, body):
    """A step running `body(*args, **kwargs)` for `layer` with what Layer.__call__ does for it
    in an eager step: the input cast, the `training` argument, the autocast scope."""
    from keras.src.backend.torch.core import to_torch_dtype

    input_dtype = to_torch_dtype(layer.input_dtype) if layer._convert_input_args else None
    pass_training = layer._call_has_context_arg.get("training", False)
    float_compute = backend.is_float_dtype(layer.compute_dtype)
    mixed = layer.compute_dtype != layer.variable_dtype

    def step(args, kwargs, training):
        if input_dtype is not None:
            if len(args) != 1:
                args = tuple(_converted(layer, input_dtype, arg) for arg in args)
            elif not (isinstance(args[0], torch.Tensor) and args[0].dtype == input_dtype):
                args = (_converted(layer, input_dtype, args[0]),)
        if training is not None and pass_training:
            kwargs = {**kwargs, "training": training}
        if not mixed and get_autocast_scope() is None:  # no scope to enter: the usual case
            return body(*args, **kwargs)
        scope = _scope(layer, float_compute, mixed)
        if scope is None:
            return body(*args, **kwargs)
        with scope:
            return body(*args, **kwargs)

    step.layer = layer
    return step


def autocast_scope(layer):
    """The autocast scope Layer.__call__ enters around `layer`'s call, or None."""
    return _scope(layer, backend.is_float_dtype(layer.compute_dtype),
                  layer.compute_dtype != layer.variable_dtype)


def _scope(layer, float_compute, mixed):
    # The autocast scope exactly as Layer.__call__ chooses it (mixed policies read their
    # float32 variables in the compute dtype).
    current = get_autocast_scope()
    if current is not None:
        if not layer.autocast or not float_compute:
            return backend.AutocastScope(None)
        if current.dtype != layer.compute_dtype:
            return backend.AutocastScope(layer.compute_dtype)
        return None
    return backend.AutocastScope(layer.compute_dtype) if mixed else None


def _converted(layer, dtype, arg):
    """The input cast of Layer.__call__ (DTypePolicy.convert_input: arrays to tensors, float
    tensors to the layer's input dtype), skipped, as Keras skips it, for a tensor already in
    that dtype."""
    if isinstance(arg, torch.Tensor) and arg.dtype == dtype:
        return arg
    if isinstance(arg, (list, tuple)):
        return type(arg)(_converted(layer, dtype, x) for x in arg)
    return layer.dtype_policy.convert_input(arg, layer.autocast, layer.input_dtype)


def lowered(layer, ranks, moves):
    """(`layer`'s step with its call() lowered to torch calls, the layout it works in:
    FIRST (rank-4 inputs and outputs channels first), "any" (elementwise: the layout it is
    given) or None), or (None, None) where no lowering is written for its class and
    configuration and input ranks. `moves`: the plan's list of deferred moving-statistics
    writes (kbench.fast_path.finish_moves runs them at the end of each run)."""
    lower = LOWERINGS.get((type(layer).__module__, type(layer).__name__))
    found = lower(layer, ranks, moves) if lower is not None else None
    if found is None:
        return None, None
    body, mode = found
    step = layer_step(layer, body)
    step.lowered = mode or LAST  # what Plan.describe reports
    return step, mode


def _conv2d(layer, ranks, moves):
    from keras import activations
    from keras.src.backend.torch import nn as torch_nn

    if (ranks != [4] or layer.data_format != "channels_last"
            or layer.padding not in ("valid", "same")
            or layer.activation not in (None, activations.linear, activations.relu)):
        return None
    strides, dilation = tuple(layer.strides), tuple(layer.dilation_rate)
    kernel_size = tuple(layer.kernel_size)
    relu = layer.activation is activations.relu
    padding_for = {}  # input (height, width) -> ("arg" or "pad", torch's padding)

    def same_padding(spatial):
        # torch_nn._apply_same_padding's decision, made once per input size
        pads = [torch_nn._compute_padding_length(n, k, s, d)
                for n, k, s, d in zip(spatial, kernel_size, strides, dilation)]
        if all(left == right for left, right in pads):
            return "arg", [left for left, _ in pads]
        return "pad", tuple(p for pair in reversed(pads) for p in pair)

    def call(x):  # x: NCHW
        if layer.lora_enabled:  # enabled since: its kernel is no longer the variable
            return layer.call(x.permute(TO_LAST)).permute(TO_FIRST)
        # torch_nn.conv after the fast path's view transpose (kbench.fast_path)
        x = torch_nn._maybe_convert_to_channels_last(x)
        # HWIO -> OIHW as a view: Keras then copies it to channels_last memory, which the
        # convolution does itself for a channels_last input (the same bits, one autograd
        # node less).
        value = layer._kernel.value
        kernel = value.permute(3, 2, 0, 1)
        if torch.compiler.is_compiling():
            # The same view, spelt as strides: inductor copies a permuted weight into a new
            # buffer before every convolution (its conv lowering takes a view with a known
            # layout only), and a strided one as it is. On this CPU that copy was 30% of a
            # compiled PreAct ResNet-18 step at batch 2 (205 -> 144 ms/step).
            kernel = torch.as_strided(value, kernel.shape, kernel.stride())
        padding = 0
        if layer.padding == "same":
            spatial = tuple(x.shape[2:])
            how = padding_for.get(spatial)
            if how is None:
                how = padding_for[spatial] = same_padding(spatial)
            if how[0] == "arg":
                padding = how[1]
            else:
                x = F.pad(x, pad=how[1], mode="constant")
        groups = x.shape[1] // kernel.shape[1]
        outputs = F.conv2d(x, kernel, stride=strides, padding=padding, dilation=dilation,
                           groups=groups)
        if layer.use_bias:  # BaseConv.call: ops.add(outputs, ops.reshape(bias, (1, 1, 1, -1)))
            outputs = torch.add(outputs, layer.bias.value.reshape(1, layer.filters, 1, 1))
        return torch.relu(outputs) if relu else outputs

    return call, FIRST


def _batch_norm(layer, ranks, moves):
    from kbench import fast_path

    if ranks != [4] or layer.axis not in (-1, 3):
        return None
    # A layer called at one place only (one node) writes its moving variance at the end of
    # the run, with the others'; one called twice must see its first call's write.
    deferred = moves if len(layer._inbound_nodes) == 1 else None

    def call(x, training=None):  # x: NCHW
        if fast_path.fusable(layer, 4, training):
            return fast_path.torch_batch_norm_channels_first(layer, x, deferred)
        return layer.call(x.permute(TO_LAST), training=training).permute(TO_FIRST)

    return call, FIRST


def _relu_layer(layer, ranks, moves):
    if layer.negative_slope != 0 or layer.max_value is not None or layer.threshold != 0:
        return None
    return torch.relu, "any"  # activations.relu -> ReLU.static_call -> backend.nn.relu


def _activation(layer, ranks, moves):
    from keras import activations

    if layer.activation is activations.relu:
        return torch.relu, "any"
    if layer.activation is activations.linear:
        return (lambda x: x), "any"
    return None


def _add(layer, ranks, moves):
    if layer._reshape_required or len(set(ranks)) != 1:
        return None

    def call(inputs):  # Add._merge_function: ops.add from the first input on
        output = inputs[0]
        for x in inputs[1:]:
            output = torch.add(output, x)
        return output

    return call, "any"


def _shortcut_pad(layer, ranks, moves):
    if ranks != [4]:
        return None
    stride = layer.stride

    def call(x):  # ShortcutPad.call (strided slice, ops.pad on the channels), x: NCHW
        # On the NHWC view, as the layer's call() does: slicing the NCHW view instead (the
        # same values) made the slice's gradient a contiguous NCHW tensor, which autograd
        # added to the other branch's channels_last one, so the block's input gradient and
        # the ReLU backward after it ran in mixed memory formats (0.2 ms of a 14 ms
        # ResNet-20 step at batch 2 here; a slow strided pass over the activation on a GPU).
        x = x.permute(TO_LAST)[:, ::stride, ::stride, :]
        extra = layer.filters - x.shape[-1]
        return F.pad(x, pad=[extra // 2, extra - extra // 2], mode="constant").permute(TO_FIRST)

    return call, FIRST


def _dense(layer, ranks, moves):
    from keras import activations

    if ranks != [2] or layer.activation not in (None, activations.linear, activations.relu):
        return None
    relu = layer.activation is activations.relu

    def call(x, training=None):  # Dense.call: ops.matmul, ops.add(bias), the activation
        kernel = None if layer.lora_enabled else layer._kernel.value
        if kernel is None or kernel.dtype != x.dtype or (
                x.dtype == torch.float16 and x.device.type == "cpu"):
            return layer.call(x, training=training)  # LoRA, or ops.matmul's own casts
        outputs = torch.matmul(x, kernel)
        if layer.bias is not None:
            outputs = torch.add(outputs, layer.bias.value)
        return torch.relu(outputs) if relu else outputs

    return call, None


def _global_average_pooling(layer, ranks, moves):
    if ranks != [4] or layer.data_format != "channels_last" or layer.keepdims:
        return None

    def call(x):  # ops.mean(x, axis=[1, 2]) on NHWC, in float32 (float64 for float64)
        if not x.is_floating_point():
            return layer.call(x.permute(TO_LAST))  # ops.mean's own integer rules
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.mean(x.to(compute), (2, 3)).to(x.dtype)

    return call, FIRST


def _normalization(layer, ranks, moves):
    if layer.invert:
        return None
    kept = {}  # x's device -> (the layer's variance, max(sqrt(variance), epsilon))

    def call(x):  # Normalization.call, its denominator computed once per variance and device
        if layer.mean is None or layer.backend.name != "torch":
            return layer.call(x)  # not built, or inside tf.data: Keras' errors and rules
        from keras.src.backend.torch import core, numpy

        x = core.convert_to_tensor(x, dtype=layer.compute_dtype)
        variance = layer.variance
        found = kept.get(x.device)
        if found is None or found[0] is not variance:
            from keras.src import backend

            found = kept[x.device] = (variance, numpy.maximum(numpy.sqrt(variance),
                                                              backend.epsilon()))
        return torch.divide(torch.subtract(x, layer.mean), found[1])

    return call, None


# (module, class name) -> lowering; exact classes, as fast_path.DIRECT_LAYERS
LOWERINGS = {
    ("keras.src.layers.convolutional.conv2d", "Conv2D"): _conv2d,
    ("keras.src.layers.normalization.batch_normalization", "BatchNormalization"): _batch_norm,
    ("keras.src.layers.activations.relu", "ReLU"): _relu_layer,
    ("keras.src.layers.activations.activation", "Activation"): _activation,
    ("keras.src.layers.merging.add", "Add"): _add,
    ("kbench.models.layers", "ShortcutPad"): _shortcut_pad,
    ("keras.src.layers.core.dense", "Dense"): _dense,
    ("keras.src.layers.pooling.global_average_pooling2d", "GlobalAveragePooling2D"):
        _global_average_pooling,
    ("keras.src.layers.preprocessing.normalization", "Normalization"): _normalization,
}
