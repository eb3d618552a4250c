"""The fast path's train step under torch: Keras' own, without its repeated tree walks.

Keras' TorchTrainer.train_step walks the model's layer tree five times a step to find the
same few lists: `zero_grad()` (torch's walk of every submodule for its parameters),
`trainable_weights` twice (each a recursive walk building and deduplicating lists at every
level), `losses` in compute_loss (another walk for the layers' own losses, one more for the
weights' regularizers), and `v.value` for each gradient (a stateless-scope and autocast
check per variable). On a batch-2 ResNet-20 step that was about 0.5 ms of the 4 that Keras
added to plain PyTorch here (docs/compare.md, "Host overhead").

For a direct model (kbench.fast_path: a functional model the plan runs), while the fast
path is on, `train_step` below does what Keras' does, in its order, with one walk of the
layer tree for the weights (Keras' `weights` order: each layer's own variables, then its
sublayers' in order, first occurrence kept) and one more for `losses`; under torch DDP
(kbench.distribute) the same step runs its forward pass through the DDP wrapper. It
reads the tree on every step (nothing is cached: a weight made trainable or not, or a
regularizer set, counts from the next step, as in Keras). What the model's class overrides
(compute_loss, compute_metrics, the optimizer) runs as Keras calls it; a model whose class
overrides `train_step`, `zero_grad`, `trainable_weights` or `losses` runs Keras' own. Where
the model's loss and metrics are the recipes' standard ones and nothing else is asked of
them, they run as kbench.torch_objective computes them (Keras' numbers, without keras.ops).
"""

import torch
from keras.src import tree
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.common.variables import get_autocast_scope
from keras.src.layers.layer import Layer
from keras.src.trainers.data_adapters import data_adapter_utils

from kbench import torch_objective


_walks = {"skippable": lambda model: False}  # install sets it (False while the path is off)


def install(state, planned):
    """Wrap TorchTrainer.train_step and Functional.losses; `planned(model)` says whether a
    functional model's layers were found directly callable (kbench.fast_path.planned: its
    structure, decided once; what the steps below need of it)."""
    from keras.src.backend.torch.trainer import TorchTrainer
    from keras.src.models import functional

    stock_train_step = TorchTrainer.train_step
    stock_losses = Layer.losses.fget

    def walkable(model):
        # Keras' own weights, read the way the walks read them, outside a stateless scope
        cls = type(model)
        return (state["enabled"] and cls.trainable_weights is Layer.trainable_weights
                and cls.weights is Layer.weights and not in_stateless_scope()
                and planned(model))

    def skippable(model):
        cls = type(model)
        return (isinstance(model, functional.Functional)
                and cls.zero_grad is torch.nn.Module.zero_grad
                and cls.losses is functional.Functional.losses and walkable(model))

    def train_step(self, data):
        if type(self).train_step is train_step and skippable(self):
            return keras_train_step(self, data, walk=True)
        return stock_train_step(self, data)

    def losses(self):
        if walkable(self):
            layers = layers_in_order(self)
            return model_losses(self, layers, _weights(layers))
        return stock_losses(self)

    TorchTrainer.train_step = train_step
    functional.Functional.losses = property(losses, doc=Layer.losses.__doc__)
    _walks["skippable"] = skippable


def walks_skippable(model):
    """Whether keras_train_step may walk `model`'s layer tree once instead of Keras' walks:
    the fast path is on, `model` is a direct functional model, and its class overrides none
    of zero_grad, trainable_weights, weights or losses."""
    return _walks["skippable"](model)


def keras_train_step(model, data, forward=None, walk=False):
    """TorchTrainer.train_step (Keras 3.15, keras/src/backend/torch/trainer.py), with the
    forward pass through `forward` (the model itself by default; DDP's wrapper under data
    parallel, so that loss.backward() fires DDP's hooks and every gradient is averaged over
    the ranks before the optimizer sees it) and, with `walk` (walks_skippable), the layer
    tree walked once where Keras walks it five times (see the module doc)."""
    import warnings

    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    call = model if forward is None else forward
    if model._call_has_training_arg:
        y_pred = call(x, training=True)
    else:
        y_pred = call(x)
    objective = None  # kbench.torch_objective's, where the model's objective is standard
    if walk:
        layers = layers_in_order(model)
        weights = _weights(layers)
        _zero_grad(layers)  # torch's Module.zero_grad(): every parameter is a layer's variable
        objective = torch_objective.standard(
            model, layers, lambda: has_losses(model, layers, weights), y, y_pred,
            sample_weight)
    else:
        model.zero_grad()
    batch_size = next(i for i in tree.flatten(x) if i is not None).shape[0]
    if objective is not None:
        loss = objective.loss(y_pred)
        objective.track(loss, batch_size)
    else:
        loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                   training=True)
        model._loss_tracker.update_state(loss, sample_weight=batch_size)
    if model.optimizer is not None:
        loss = model.optimizer.scale_loss(loss)
    if walk:
        trainable_weights = [v for v in weights if v.trainable] if model.trainable else []
    else:
        trainable_weights = model.trainable_weights[:]
    if trainable_weights:
        loss.backward()  # under DDP: each gradient bucket all-reduced as it is ready
        # v.value, outside a stateless or autocast scope, is the variable's own tensor
        direct = get_autocast_scope() is None and not in_stateless_scope()
        gradients = [v._value.grad if direct else v.value.grad for v in trainable_weights]
        with torch.no_grad():
            model.optimizer.apply(gradients, trainable_weights)
    else:
        warnings.warn("The model does not have any trainable weights.")
    if objective is not None:
        return objective.metrics(y_pred)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def layers_in_order(model):
    """The model and every layer in it, each before its sublayers, in `_layers` order: the
    order Layer.weights visits them in."""
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(reversed(layer._layers))
    return found


def _weights(layers):
    """Layer.weights of the first of `layers` (layers_in_order): each variable once, where
    it first occurs."""
    found, seen = [], set()
    for layer in layers:
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def _zero_grad(layers):
    for layer in layers:
        for variable in layer._trainable_variables + layer._non_trainable_variables:
            value = variable._value
            if value is not None and value.grad is not None:
                value.grad = None


def has_losses(model, layers, weights):
    """Whether model_losses(model, layers, weights) would give any loss, without computing
    one (a regularizer's is a pass over its weight)."""
    return bool(model._losses_override or model._losses
                or any(layer._losses for layer in layers[1:])
                or (model.trainable and any(v.trainable and v.regularizer is not None
                                            for v in weights)))


def model_losses(model, layers, weights):
    """Layer.losses outside a stateless scope, given the model's `layers`
    (layers_in_order) and `weights` (_weights): the model's and its layers' own losses
    (in Keras' _flatten_layers order, walked only when a layer has one), then each
    trainable weight's regularization loss."""
    if model._losses_override:
        return model._losses_override
    losses = model._losses[:]
    if any(layer._losses for layer in layers[1:]):
        for layer in model._flatten_layers(include_self=False):
            losses.extend(layer._losses)
    if model.trainable:
        for variable in weights:
            if variable.trainable and variable.regularizer is not None:
                losses.append(variable.regularizer(variable))
    return losses
