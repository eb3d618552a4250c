"""Every place kbench works around Keras, in one module, each tied to the Keras versions it was
written and tested for (TESTED_KERAS; pyproject.toml pins the same range).

Outside those versions a workaround is not applied silently: the feature that needs it stops
with one line saying so, since Keras internals it replaces may have changed.

- `multi_worker_build`, `multi_worker_log_reduction`: Keras' TensorFlow trainer under
  MultiWorkerMirroredStrategy reduces whole (x, y) structures and scalar logs with
  `strategy.reduce(..., axis=0)`, which the collective reduce rejects
  (keras-team/keras#20585).
- `sum_repeated_sparse_rows`: under tensorflow an Embedding's gradient reaches the optimizer
  as one slice per token occurrence, and Adam squared each apart (jax and torch square their
  sum), so the backends trained the IMDB transformer differently.
- `ddp_train_step`: Keras' torch trainer knows nothing of DistributedDataParallel
  (keras-team/keras#23418 tracks torch support in keras.distribution), so kbench gives the
  model Keras' own train step with the forward pass run through the DDP wrapper.
"""

from kbench.errors import KbenchError

TESTED_KERAS = ("3.15",)  # major.minor versions these workarounds were written and tested for


def check_tested(feature, issue):
    """Refuse (one line) to apply a workaround to a Keras version it was not tested with."""
    import keras

    version = keras.version()
    if ".".join(version.split(".")[:2]) not in TESTED_KERAS:
        raise KbenchError(f"{feature} needs kbench's workaround for {issue}, written for keras "
                          f"{', '.join(TESTED_KERAS)}; this is keras {version}: install the "
                          "tested version (constraints.txt) or update kbench/keras_fixes.py")


# --------------------------------------------------------------------------- TensorFlow


def multi_worker_build(model):
    """Give `model` a symbolic build that works under MultiWorkerMirroredStrategy."""
    import types

    check_tested("TensorFlow multi-worker training", "keras-team/keras#20585")
    model._maybe_symbolic_build = types.MethodType(_symbolic_build_from_local_replica, model)


def _symbolic_build_from_local_replica(self, iterator=None, data_batch=None):
    """Keras' TensorFlowTrainer._maybe_symbolic_build (keras 3.15) for MultiWorkerMirrored.

    Keras builds the metrics from the first distributed batch, which it first averages with
    strategy.reduce over the whole (x, y) structure; MultiWorkerMirroredStrategy's collective
    reduce takes only single tensors and fails (keras-team/keras#20585). The build needs
    shapes and dtypes only, so take this worker's first replica's part instead.
    """
    import tensorflow as tf
    from keras.src import tree

    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: (self.distribute_strategy.experimental_local_results(v)[0]
                           if isinstance(v, tf.distribute.DistributedValues) else v), batch)
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def multi_worker_log_reduction():
    """Make Keras average per-replica step logs over all workers correctly; returns the
    function that puts Keras' own reduction back (the distribution's shutdown calls it).

    Each replica's logs are its own metric results; Keras averages them with
    strategy.reduce("MEAN", v, axis=0), which under MultiWorkerMirroredStrategy fails for a
    scalar (there is no axis 0). axis=None is the mean over every replica of every worker:
    with equal slices, the metric over the global batch. Only multi-worker strategies take
    the new path; every other call goes to Keras' function.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    check_tested("TensorFlow multi-worker training", "keras-team/keras#20585")
    original = trainer.reduce_per_replica
    if getattr(original, "_kbench", False):
        return lambda: None

    def reduce_per_replica(values, strategy, reduction):
        if (reduction in ("auto", "mean")
                and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)):
            return tree.map_structure(
                lambda v: (strategy.reduce("MEAN", v, axis=None)
                           if isinstance(v, tf.distribute.DistributedValues) else v), values)
        return original(values, strategy, reduction)

    reduce_per_replica._kbench = True
    trainer.reduce_per_replica = reduce_per_replica

    def restore():
        trainer.reduce_per_replica = original

    return restore


_state = {}  # what a fix has noted once per process


def sum_repeated_sparse_rows():
    """Under tensorflow Keras hands the optimizer an Embedding's gradient as tf.IndexedSlices,
    one slice per occurrence of a token id in the batch; jax and torch hand it the dense sum.
    An update that is not linear in the gradient then differs: Adam's and AdamW's second
    moment (`ops.square(gradient)`, scattered slice by slice) took the sum of the squares of
    a repeated row's slices where the other backends square their sum. An Embedding row seen
    twice with gradients 1 and 3 moved by 0.1 * 4 / sqrt(10) at Adam's first step (lr 0.1),
    not 0.1; the IMDB transformer's losses parted from jax's and torch's at the second step.
    kbench sums each row's slices (tf.unique, unsorted_segment_sum): the gradient the other
    backends get, still sparse, for every optimizer (SGD's update is linear: the same up to
    the order of float additions). Twice: as the optimizer gets them (`apply`), before
    `--clip-norm`'s global norm, which over separate slices was sqrt(10), not 4; and after
    a MirroredStrategy's all-reduce, which joins the replicas' slices (a row seen on two
    replicas is two slices again). Installed once, for the process; keras 3.15 only
    (TESTED_KERAS): on another version a note says, once, that it is not applied."""
    import keras

    if _state.get("sparse_rows_noted"):
        return
    if ".".join(keras.version().split(".")[:2]) not in TESTED_KERAS:
        _state["sparse_rows_noted"] = True
        print(f"note: keras {keras.version()}: kbench's fix for sparse Embedding gradients "
              "under tensorflow (kbench/keras_fixes.py) is written for keras "
              f"{', '.join(TESTED_KERAS)} and not applied: Adam's updates of repeated "
              "Embedding rows may differ from jax's and torch's", flush=True)
        return
    # Keras internals: imported once the version is known to have them
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    if getattr(TFOptimizer.apply, "_kbench", False):
        return
    stock_apply, stock_all_reduce = TFOptimizer.apply, TFOptimizer._all_reduce_sum_gradients

    def apply(self, grads, trainable_variables=None):
        return stock_apply(self, [_summed_rows(g) for g in grads], trainable_variables)

    def all_reduce_sum_gradients(self, grads_and_vars):
        reduced = stock_all_reduce(self, grads_and_vars)
        if self._distribution_strategy.num_replicas_in_sync == 1:
            return reduced  # nothing joined: apply's sums stand
        return [(_summed_rows(g), v) for g, v in reduced]

    apply._kbench = True
    TFOptimizer.apply = apply
    TFOptimizer._all_reduce_sum_gradients = all_reduce_sum_gradients


def _summed_rows(grad):
    import tensorflow as tf

    if not isinstance(grad, tf.IndexedSlices):
        return grad
    rows, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, grad.dense_shape)


# --------------------------------------------------------------------------- PyTorch


def ddp_train_step(ddp):
    """Keras' TorchTrainer.train_step (keras 3.15) with one change: the forward pass runs
    through the DDP wrapper, so that loss.backward() fires DDP's hooks and every gradient is
    averaged over the ranks before the optimizer sees it. The step itself is
    kbench.torch_step.keras_train_step, the one Keras train step kbench runs under torch
    (the fast path's too): with the fast path on it walks the layer tree once a step."""
    check_tested("torch data-parallel training", "keras-team/keras#23418")
    from kbench import torch_step

    def train_step(self, data):
        return torch_step.keras_train_step(self, data, forward=ddp,
                                           walk=torch_step.walks_skippable(self))

    return train_step


# --------------------------------------------------------------------------- torch.compile
#
# Keras' torch trainer wraps its train, test and predict steps in torch.compile when
# `jit_compile=True` (keras/src/backend/torch/trainer.py), and dynamo then traces Keras' own
# Python. In keras 3.15 three things in that Python stop it (a graph break each, in every
# layer call; the pieces between them are compiled apart, recompiled as layers flip `built`
# and `_called`, and inductor finally fails on the dynamic shapes those recompiles
# introduce: "cannot determine truth value of Relational"):
#   - Layer.__call__ binds its arguments with inspect.Signature.bind, which reads the
#     signature's mappingproxy; dynamo refuses that once any existing dict has been mutated
#     in the trace (pytorch/pytorch#147162; keras-team/keras#23198 proposed a binder of its
#     own, not merged);
#   - data layers (Normalization, Rescaling) ask `backend_utils.in_tf_graph()`, which calls
#     tf.executing_eagerly() whenever TensorFlow is imported (kbench's tf.data pipelines
#     import it), a function dynamo will not trace;
#   - their DynamicBackend looks each op up with importlib.import_module, which dynamo
#     will not trace either;
#   - dot_product_attention (MultiHeadAttention) probes flash attention with a pybind11
#     SDPAParams object at every call (keras-team/keras#23327 fixed it after 3.15: under a
#     trace it answers "no" and torch's scaled_dot_product_attention picks its kernel);
#   - BatchNormalization (stock Keras, with the fast path off: the fast path lowers it)
#     hands its reduction axes to moments as the list Keras' tracker wrapped (TrackedList),
#     which dynamo cannot pass to torch.mean: a break inside Keras' name_scope, which sent
#     each layer call of the ResNets out of the graph and recompiled Functional.call to
#     dynamo's limit. Under a trace moments gets them as a tuple. (Its masked path, a
#     mask from an Embedding(mask_zero=True) before it, passes them to ops.sum and still
#     breaks there; no kbench model has one.)
# One more recompiles the step at every call: keras.ops such as pad (ResNet-20's shortcut)
# and cond create an Operation per call, named from a global counter that dynamo guards on.
# Inside a trace such an operation is transient and its name unused: it gets the plain name.
# Two more break the optimizer's part of the step:
#   - keras.ops.cond (CosineDecay's warmup; under mixed_float16 also LossScaleOptimizer's
#     finite check and growth rule) is a Python `if` on a tensor under torch
#     (`select_in_schedules` and `select_in_loss_scaling`, below, which the fast path uses
#     eagerly too);
#   - torch SGD passes the learning rate, a tensor, as `alpha=` of torch._foreach_add_,
#     which takes a Python number: a .item() per step, data-dependent.
# `torch_compile_ready` replaces these, for the traced code only: outside a
# torch.compile trace every call goes to Keras' own function. What stays is the one break
# every compiled train step that calls loss.backward() has: dynamo compiles the forward
# pass and loss as one graph (AOTAutograd compiles its backward), then the update.


def torch_compile_ready(model):
    """Make Keras' compiled torch steps of `model` traceable by dynamo without graph breaks
    (keras 3.15; see above). Call after model.compile(jit_compile=True)."""
    import torch

    check_tested("--jit-compile on under torch", "pytorch/pytorch#147162")
    _install_torch_compile_fixes()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        signature = layer.__dict__.get("_call_signature")
        if signature is not None and not isinstance(signature, _TraceableSignature):
            # object.__setattr__: a plain attribute, not one for Keras' tracker
            object.__setattr__(layer, "_call_signature", _TraceableSignature(signature))
    # Build the optimizer's variables now, not inside the first compiled step.
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # a LossScaleOptimizer's inner too
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # loss scaling
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        # Which weights decay: Keras decides at the first update and caches it in a dict
        # (a regex over names, kbench.optim's exclusion), a guard that changes after step 1.
        for variable in model.trainable_variables:
            optimizer._use_weight_decay(variable)
    # The step's zero_grad() reads `grad is None` of every weight, a guard: None at the first
    # step only, so the second would compile the forward pass again. Start with zeros.
    for variable in model.trainable_variables:
        if variable.value.grad is None:
            variable.value.grad = torch.zeros_like(variable.value)


def _install_torch_compile_fixes():
    import torch
    from keras.src.backend import torch as torch_backend
    from keras.src.utils import backend_utils

    if getattr(backend_utils.in_tf_graph, "_kbench", False):
        return
    keras_in_tf_graph = backend_utils.in_tf_graph
    keras_getattr = backend_utils.DynamicBackend.__getattr__

    def in_tf_graph():
        if torch.compiler.is_compiling():
            return False  # a torch.compile trace is never inside a TensorFlow graph
        return keras_in_tf_graph()

    def dynamic_backend_getattr(self, name):
        if self._backend == "torch" and torch.compiler.is_compiling():
            return getattr(torch_backend, name)  # what import_module would have returned
        return keras_getattr(self, name)

    in_tf_graph._kbench = True
    backend_utils.in_tf_graph = in_tf_graph
    backend_utils.DynamicBackend.__getattr__ = dynamic_backend_getattr

    from keras.src.utils import naming

    keras_uniquify = naming.uniquify

    def uniquify(name):
        if torch.compiler.is_compiling():
            return name  # an operation made inside the step: never saved, never looked up
        return keras_uniquify(name)

    naming.uniquify = uniquify

    install_selects()
    from keras.src.backend.torch.optimizers import torch_sgd

    keras_sgd_update = torch_sgd.SGD._parallel_update_step

    def sgd_update(self, grads, variables, learning_rate):
        if not torch.compiler.is_compiling():
            return keras_sgd_update(self, grads, variables, learning_rate)
        _traceable_sgd_update(self, grads, variables, learning_rate)

    torch_sgd.SGD._parallel_update_step = sgd_update

    from keras.src.backend.torch import nn as torch_nn

    keras_can_use_flash = torch_nn._can_use_flash_attention

    def can_use_flash_attention(*args, raise_error=False, **kwargs):
        if torch.compiler.is_compiling() and not raise_error:
            return False
        return keras_can_use_flash(*args, raise_error=raise_error, **kwargs)

    torch_nn._can_use_flash_attention = can_use_flash_attention

    keras_moments = torch_nn.moments

    def moments(x, axes, keepdims=False, synchronized=False):
        if torch.compiler.is_compiling() and isinstance(axes, list):
            axes = tuple(axes)  # BatchNormalization's: a list Keras' tracker made its own
        return keras_moments(x, axes, keepdims=keepdims, synchronized=synchronized)

    moments.__doc__ = keras_moments.__doc__
    torch_nn.moments = moments  # keras.ops.moments looks it up at each call
    _hand_compiled_steps_tensors()


# Keras' train_on_batch, test_on_batch and predict_on_batch hand their arguments to the
# compiled step as they come. NumPy arrays there are converted inside the trace, where
# dynamo will not read an ndarray's dtype: a graph break where the step converts them, the
# rest of the step in pieces (ResNet-20's train step: 21 breaks, ten graphs to compile
# instead of two; its steady step on our CPU at batch 64 was within noise of the tensor-fed
# one, 125 against 123 ms in one process; one-off scripts). fit, evaluate and predict over
# arrays or tf.data feed torch tensors (Keras' DataLoader); these calls, `class_weight`'s
# NumPy sample weights, a Grain dataset or a DataLoader of yours yielding NumPy met it.
# Installed once, on Keras' class: every model with jit_compile in the process gets it, and
# a train_step of yours sees the tensors.
def _hand_compiled_steps_tensors():
    """Wrap the step functions Keras compiles (jit_compile) so that NumPy arrays in a
    step's data reach them as torch tensors, converted outside the trace by Keras' own
    convert_to_tensor (Keras' dtype mapping, Keras' device), as eager layers convert them;
    and so that they compile with static shapes."""
    import numpy as np
    import torch
    from keras.src import ops, tree
    from keras.src.backend.torch.trainer import TorchTrainer

    dynamo_config = torch._dynamo.config

    def as_tensor(leaf):  # numbers only (ml_dtypes' bfloat16 has kind "V"); others as they came
        if isinstance(leaf, np.ndarray) and (leaf.dtype.kind in "biufc"
                                             or leaf.dtype.name == "bfloat16"):
            return ops.convert_to_tensor(leaf)
        return leaf

    def as_tensors(data):
        return tree.map_structure(as_tensor, data)

    def wrapped(make, attribute):
        def make_function(self, force=False):
            make(self, force)
            function = getattr(self, attribute)
            if (function is None or not self.jit_compile
                    or getattr(function, "_kbench_tensors", False)):
                return function

            def step_on_tensors(data):
                # Each new input shape compiles anew with static shapes (the last partial
                # batch of an evaluation: one more graph), instead of dynamo's "automatic
                # dynamic" recompile with symbolic shapes, where inductor failed on the
                # ResNets ("cannot determine truth value of Relational: 1 < s87"). Set for
                # Keras' steps only: the process's other torch.compile calls keep the default.
                # (What torch.compile(dynamic=False) does per call. Saved and put back by
                # hand: a shared config.patch() object is re-entrant only in recent torch
                # (2.13's keeps a stack; older ones assert), e.g. for a compiled step that
                # predicts with another compiled model.)
                dynamic = dynamo_config.automatic_dynamic_shapes
                dynamo_config.automatic_dynamic_shapes = False
                try:
                    return function(as_tensors(data))
                finally:
                    dynamo_config.automatic_dynamic_shapes = dynamic

            step_on_tensors._kbench_tensors = True
            setattr(self, attribute, step_on_tensors)
            return step_on_tensors

        return make_function

    for kind in ("train", "test", "predict"):
        name = f"make_{kind}_function"
        setattr(TorchTrainer, name, wrapped(getattr(TorchTrainer, name), f"{kind}_function"))


# A learning-rate schedule's keras.ops.cond (CosineDecay's warmup, CosineDecayRestarts) is a
# Python `if` on a tensor under torch. The step counter it tests lives on the device, so
# eagerly on a GPU that `if` waits for the device at every step: the host stops queueing
# work until the step so far has run (the one device read left in the fast path's eager
# step; tests/test_fast_path.py looks for others); under torch.compile it is a graph break.
# A schedule is a pure function of the step, so both branches can be computed and the value
# selected with torch.where: the same value, nothing read. (torch.cond refuses the branches:
# Keras' name_scope mutates a stack; and Keras' own ops.cond makes a new Cond operation per
# call, whose unique name is a dynamo guard: a recompile every step.)
# `eager()`: whether eager steps select too (the fast path gives its `enabled`); under
# torch.compile they always do. `installed`: the selects installed so far.
_selects = {"eager": lambda: False, "installed": set()}


def install_selects(eager=None):
    """Under torch, compute instead of branching on device values where Keras' optimizers
    branch with keras.ops.cond: select_in_schedules and select_in_loss_scaling, each
    installed once; with `eager`, what says whether eager steps select as well."""
    if eager is not None:
        _selects["eager"] = eager
    select_in_schedules()
    select_in_loss_scaling()


def select_in_schedules():
    """Make keras.ops.cond select instead of branching inside an optimizer's learning-rate
    schedule: always under torch.compile, and in eager steps while `_selects["eager"]()` is
    true for Keras' own and kbench's schedules (a schedule of yours may have branches that
    must not both run: Keras' cond)."""
    if "schedules" in _selects["installed"]:
        return
    import threading

    import torch
    from keras.src import ops, tree
    from keras.src.optimizers.base_optimizer import BaseOptimizer
    from keras.src.optimizers.schedules.learning_rate_schedule import LearningRateSchedule

    keras_cond = ops.cond
    keras_learning_rate = BaseOptimizer._get_current_learning_rate

    class Depth(threading.local):
        # > 0 while this thread computes a learning-rate schedule with selects (another
        # thread's ops.cond, outside any schedule, stays Keras'). Set in every thread at its
        # first use (threading.local runs __init__ per thread): at ed91b83 an attribute that
        # appeared after the first compiled step failed dynamo's guard on it and compiled the
        # optimizer's graph again (no longer seen on 2026-12-06 with torch 2.13:
        # docs/compare.md).
        def __init__(self):
            self.depth = 0

    in_schedule = Depth()

    def cond(pred, true_fn, false_fn):
        if in_schedule.depth and isinstance(pred, torch.Tensor):
            return tree.map_structure(lambda a, b: torch.where(pred, a, b), true_fn(),
                                      false_fn())
        return keras_cond(pred, true_fn, false_fn)

    def selects(schedule):
        if torch.compiler.is_compiling():
            return True
        return (isinstance(schedule, LearningRateSchedule) and _selects["eager"]()
                and type(schedule).__module__.startswith(
                    ("keras.src.optimizers.schedules.", "kbench.")))

    def current_learning_rate(self):
        if not selects(self._learning_rate):
            return keras_learning_rate(self)
        in_schedule.depth += 1
        try:
            return keras_learning_rate(self)
        finally:
            in_schedule.depth -= 1

    ops.cond = cond
    BaseOptimizer._get_current_learning_rate = current_learning_rate
    _selects["installed"].add("schedules")


# Keras' LossScaleOptimizer (mixed_float16) reads the device twice a step under torch, each
# a keras.ops.cond, a Python `if` on a device tensor: whether the gradients are finite (apply
# the update, or skip it and halve the scale), and, after a finite step, whether it is the
# dynamic_growth_steps-th in a row (double the scale and reset the counter, or count the
# step). torch.amp.GradScaler, the native twin's, reads the device once, for the first
# question. The second needs no read: both outcomes are a select between two values of the
# counter and of the scale. Under torch.compile each `if` is also a graph break, the first
# one sending the update out of the graph: there the first is a select too, as optax's
# apply_if_finite does it: the update is computed either way and every variable it changed
# keeps its old value where the gradients were not finite (for the tests' small model,
# inductor made the update, finite check and selects one fused kernel on a CPU).


def select_in_loss_scaling():
    """Under torch, LossScaleOptimizer's growth rule as selects instead of a branch on its
    step counter, always under torch.compile and in eager steps while `_selects["eager"]()`
    is true; and under torch.compile, its skip of a non-finite step as selects too. The same
    variables after every step."""
    if "loss_scaling" in _selects["installed"]:
        return
    import torch
    from keras.src import backend, ops
    from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer

    keras_handle_finite_grads = LossScaleOptimizer._stateful_handle_finite_grads
    keras_common_apply = LossScaleOptimizer._common_apply

    def common_apply(self, grads, trainable_variables=None):
        if backend.backend() != "torch" or not torch.compiler.is_compiling():
            return keras_common_apply(self, grads, trainable_variables)
        finite = self.check_finite(grads)
        inner = self.inner_optimizer
        # What the update may change: the variables given, every variable the inner
        # optimizer was built for (its EMA overwrite writes them all), its own variables.
        changed = list({id(v): v for v in (*(trainable_variables or self._trainable_variables),
                                           *inner._trainable_variables,
                                           *inner.variables)}.values())
        before = [variable.value.clone() for variable in changed]
        scale = self.dynamic_scale.value.clone()
        self._stateful_handle_finite_grads(grads, trainable_variables)
        for variable, old in zip(changed, before):
            variable.assign(torch.where(finite, variable.value, old))
        # Keras' non-finite branch: counter 0, scale halved
        counter = self.step_counter.value
        self.step_counter.assign(torch.where(finite, counter, torch.zeros_like(counter)))
        self.dynamic_scale.assign(torch.where(finite, self.dynamic_scale.value, scale * 0.5))

    def handle_finite_grads(self, grads, trainable_variables):
        if backend.backend() != "torch" or not (
                torch.compiler.is_compiling() or _selects["eager"]()):
            return keras_handle_finite_grads(self, grads, trainable_variables)
        # Keras 3.15's method up to its cond: unscale, then the inner optimizer's update.
        scale = self.dynamic_scale
        tvs = trainable_variables or self._trainable_variables
        unscaled_grads = [
            g if g is None or self._overwrite_variable_with_gradient(v)
            else ops.divide(g, scale)
            for g, v in zip(grads, tvs)]
        self.inner_optimizer.apply(unscaled_grads, trainable_variables=trainable_variables)
        # Its cond's two branches, upscale (counter 0, scale doubled) and increment (counter
        # + 1), as selects (Python numbers as operands: no number made a device tensor).
        counter = self.step_counter.value
        grow = counter == self.dynamic_growth_steps - 1
        self.step_counter.assign(torch.where(grow, torch.zeros_like(counter), counter + 1))
        value = self.dynamic_scale.value
        self.dynamic_scale.assign(torch.where(grow, value * 2.0, value))

    LossScaleOptimizer._stateful_handle_finite_grads = handle_finite_grads
    LossScaleOptimizer._common_apply = common_apply
    _selects["installed"].add("loss_scaling")


def _traceable_sgd_update(optimizer, grads, variables, learning_rate):
    """Keras' torch SGD update (keras/src/backend/torch/optimizers/torch_sgd.py, 3.15) with
    the learning rate multiplied in as a tensor instead of passed as `alpha=`."""
    import torch

    params = [v.value for v in variables]
    lr = learning_rate.to(params[0].dtype) if isinstance(learning_rate, torch.Tensor) \
        else learning_rate
    step = torch._foreach_mul(grads, -lr)
    if optimizer.momentum != 0:
        bufs = [optimizer.momentums[optimizer._get_variable_index(v)].value for v in variables]
        torch._foreach_mul_(bufs, optimizer.momentum)
        torch._foreach_add_(bufs, step)
        if optimizer.nesterov:
            torch._foreach_add_(params, step)
            torch._foreach_add_(params, bufs, alpha=optimizer.momentum)
        else:
            torch._foreach_add_(params, bufs)
    else:
        torch._foreach_add_(params, step)


class _TraceableSignature:
    """A layer's call signature whose `bind` dynamo can trace: under torch.compile it binds
    from a plain tuple of parameters made once, outside the trace; otherwise it is
    inspect.Signature.bind itself. Layer.__call__'s CallSpec uses only `parameters`
    (membership) and `bind(...)` -> `.arguments`, `.apply_defaults()`."""

    def __init__(self, signature):
        self.signature = signature
        self.parameters = dict(signature.parameters)  # a dict, not a mappingproxy
        self._params = tuple((p.name, p.kind, p.default) for p in signature.parameters.values())

    def bind(self, *args, **kwargs):
        import torch

        if not torch.compiler.is_compiling():
            return self.signature.bind(*args, **kwargs)
        return _Bound(_bind(self._params, args, kwargs), self._params)


class _Bound:
    def __init__(self, arguments, params):
        self.arguments = arguments
        self._params = params

    def apply_defaults(self):
        """inspect.BoundArguments.apply_defaults: every parameter, in order, with defaults."""
        import inspect

        filled = {}
        for name, kind, default in self._params:
            if name in self.arguments:
                filled[name] = self.arguments[name]
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                filled[name] = ()
            elif kind == inspect.Parameter.VAR_KEYWORD:
                filled[name] = {}
            elif default is not inspect.Parameter.empty:
                filled[name] = default
        self.arguments = filled


def _bind(params, args, kwargs):
    """inspect.Signature.bind over (name, kind, default) tuples: positional arguments fill
    positional parameters in order, the rest go to *args; keywords fill parameters by name,
    the rest go to **kwargs. Errors as Python's own binding would raise them."""
    import inspect

    P = inspect.Parameter
    arguments = {}
    kwargs = dict(kwargs)
    position = 0
    for name, kind, default in params:
        if kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if position < len(args):
                if name in kwargs and kind == P.POSITIONAL_OR_KEYWORD:
                    raise TypeError(f"multiple values for argument {name!r}")
                arguments[name] = args[position]
                position += 1
            elif kind == P.POSITIONAL_OR_KEYWORD and name in kwargs:
                arguments[name] = kwargs.pop(name)
            elif default is P.empty:
                raise TypeError(f"missing a required argument: {name!r}")
        elif kind == P.VAR_POSITIONAL:
            if position < len(args):
                arguments[name] = tuple(args[position:])
                position = len(args)
        elif kind == P.KEYWORD_ONLY:
            if name in kwargs:
                arguments[name] = kwargs.pop(name)
            elif default is P.empty:
                raise TypeError(f"missing a required argument: {name!r}")
        elif kind == P.VAR_KEYWORD:
            if kwargs:
                arguments[name] = kwargs
                kwargs = {}
    if position < len(args):
        raise TypeError("too many positional arguments")
    if kwargs:
        raise TypeError(f"got an unexpected keyword argument {next(iter(kwargs))!r}")
    return arguments
