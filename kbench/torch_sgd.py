"""The fast path's SGD update under torch: Keras' own torch SGD step, less its repeated work.

Keras' `_backend_apply_gradients` computes the learning rate twice per step (once for the
weight decay, once for the update: a schedule is a dozen keras.ops calls each time), looks up
every variable's momentum by id on every step, and passes the learning rate to the foreach
ops as `alpha=-learning_rate`, which for a 0-d tensor is a `.item()`: on a GPU, a wait for
the device in every step (it would otherwise run ahead of the host). This replacement:
  - computes the learning rate once per step (the same value: both calls read the same step
    counter, which moves only after the update);
  - keeps, per list of variables, which of them take weight decay and where their momenta
    are (Keras' own `_use_weight_decay` and `_get_variable_index`, asked once);
  - on a CPU (and for a Python-number rate) runs Keras' foreach ops exactly, alpha and all:
    the same bits as stock Keras; on another device, with a tensor rate, multiplies the
    gradients by it as a tensor instead (no wait; each value then rounds once more, within
    float32 round-off of Keras' fused multiply-add).
It applies to keras.optimizers.SGD under torch while the fast path is on, eagerly, without
gradient accumulation or EMA; anything else is Keras' own step. Clipping, weight decay
exclusions, the momentum and nesterov rules and the update order are Keras'.
"""

import torch


def install(state):
    """Wrap Keras' torch SGD once; the wrapper defers to Keras unless `state["enabled"]`."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope
    from keras.src.backend.torch.optimizers import torch_sgd

    stock = torch_sgd.SGD._backend_apply_gradients

    def apply_gradients(self, grads, trainable_variables):
        if (not state["enabled"] or self.gradient_accumulation_steps or self.use_ema
                or torch.compiler.is_compiling() or in_stateless_scope()):
            return stock(self, grads, trainable_variables)
        with torch.no_grad():
            _step(self, self._clip_gradients(grads), trainable_variables)

    torch_sgd.SGD._backend_apply_gradients = apply_gradients


def _step(optimizer, grads, variables):
    from keras.src.backend import get_autocast_scope

    learning_rate = optimizer._get_current_learning_rate()
    decayed, momenta = _layout(optimizer, variables)
    # Variable.value is its tensor itself here (eager, not stateless, no autocast scope, not
    # symbolic); reading it through the property costs a few microseconds a variable.
    direct = get_autocast_scope() is None and grads and grads[0].device.type != "meta"
    values = [v._value if direct else v.value for v in variables]
    if optimizer.weight_decay is not None:  # TorchOptimizer._apply_weight_decay
        torch._foreach_mul_([values[i] for i in decayed],
                            1 - optimizer.weight_decay * learning_rate)
    scaled = None  # -lr * g as tensors, where lr may not be read as a number
    if isinstance(learning_rate, torch.Tensor):
        if learning_rate.device.type == "cpu":
            learning_rate = learning_rate.item()  # no device to wait for
        else:
            scaled = torch._foreach_mul(grads, -learning_rate)
    # keras.src.backend.torch.optimizers.torch_sgd.SGD._parallel_update_step
    if optimizer.momentum != 0:
        bufs = [optimizer.momentums[i]._value if direct else optimizer.momentums[i].value
                for i in momenta]
        torch._foreach_mul_(bufs, optimizer.momentum)
        _add_scaled(bufs, grads, learning_rate, scaled)
        if optimizer.nesterov:
            _add_scaled(values, grads, learning_rate, scaled)
            torch._foreach_add_(values, bufs, alpha=optimizer.momentum)
        else:
            torch._foreach_add_(values, bufs)
    else:
        _add_scaled(values, grads, learning_rate, scaled)


def _add_scaled(targets, grads, learning_rate, scaled):
    if scaled is None:
        torch._foreach_add_(targets, grads, alpha=-learning_rate)
    else:
        torch._foreach_add_(targets, scaled)


def _layout(optimizer, variables):
    """(indices of the variables that take weight decay, their momenta's indices), kept on the
    optimizer per list of variables."""
    key = tuple(map(id, variables))
    cache = optimizer.__dict__.setdefault("_kbench_layouts", {})
    layout = cache.get(key)
    if layout is None:
        decayed = [i for i, v in enumerate(variables)
                   if optimizer.weight_decay is not None and optimizer._use_weight_decay(v)]
        momenta = [optimizer._get_variable_index(v) for v in variables]
        layout = cache[key] = (decayed, momenta)
    return layout
