"""The fast path's loss, loss tracker and metrics under torch: Keras' numbers, as the torch
calls its ops end in.

Around the model, each eager Keras-torch train step computes its compiled loss (CompileLoss ->
Loss.__call__ -> categorical_crossentropy -> keras.ops), moves its loss tracker (Mean), updates
its compiled metrics (CompileMetrics -> CategoricalAccuracy -> Mean) and reads every metric's
result for the logs, after a walk of the layer tree for the layers' own metrics: some 60
keras.ops calls, each converting and checking its arguments. On our CPU that was up to 0.58 ms
of a 14.8 ms batch-2 ResNet-20 step (docs/compare.md, "Host overhead"); on a GPU, some 30 small
kernels launched one by one from Python.

For the objective kbench's recipes compile (kbench.train.compile_model: CategoricalCrossentropy
on logits, with or without label smoothing, and CategoricalAccuracy), when nothing else is
asked of it, the fast path's train step (kbench.torch_step) runs the same computations as the
torch calls Keras' ops end in, in the same order, with what Keras recomputes each step (the
class count, the batch size) made on the logits' device (`torch.full`: no host-to-device copy).
"Nothing else" is checked at every step: a model whose class overrides compute_loss,
_compute_loss, compute_metrics, get_metrics_result or metrics; one loss, unweighted, of that
exact class with Keras' default reduction and float32; metrics exactly [CategoricalAccuracy]
in float32, none weighted; no sample weights, no mask on the output, no losses added by layers
or regularizers, no metrics of the model's or its layers' own; 2-D float32 labels and logits of
one shape, a non-empty batch. Anything else is Keras' own path. tests/test_fast_path.py holds it
to Keras' losses, logs and metric variables to the bit.
"""

import numpy as np
import torch
import torch.nn.functional as F
from keras.src.losses.losses import CategoricalCrossentropy
from keras.src.metrics.accuracy_metrics import CategoricalAccuracy
from keras.src.metrics.reduction_metrics import Mean
from keras.src.trainers.compile_utils import CompileLoss, CompileMetrics
from keras.src.trainers.trainer import Trainer


class Objective:
    """One step's loss, tracker and metrics for a model whose objective is standard()."""

    def __init__(self, model, loss_fn, accuracy, y):
        self.model = model
        self.label_smoothing = loss_fn._fn_kwargs["label_smoothing"]
        self.accuracy = accuracy
        self.y = y  # the labels as a tensor (Keras' loss converts them so)

    def loss(self, y_pred):
        """CompileLoss(y, y_pred): categorical_crossentropy (label smoothing, log_softmax,
        the per-example sum), then Loss' "sum_over_batch_size" (a sum over the batch, divided
        by its size through divide_no_nan)."""
        y_true = self.y
        if self.label_smoothing:
            num_classes = _number(y_true.shape[-1], y_pred)
            # Keras' own expression: `ls / num_classes` is torch's __rtruediv__ of a tensor
            # (its reciprocal times ls), which these same operands reproduce bit for bit
            y_true = y_true * (1.0 - self.label_smoothing) + (
                self.label_smoothing / num_classes)
        log_prob = F.log_softmax(y_pred, dim=-1)
        values = -torch.sum(y_true * log_prob, dim=-1)
        return _divide_no_nan(torch.sum(values), _number(values.shape[0], values))

    def track(self, loss, batch_size):
        """model._loss_tracker.update_state(loss, sample_weight=batch_size): Mean's total
        moves by loss * batch_size, its count by batch_size."""
        tracker = self.model._loss_tracker
        with torch.no_grad():
            weight = _number(batch_size, loss)
            _add(tracker.total, loss * weight)
            _add(tracker.count, weight)

    def metrics(self, y_pred):
        """model.compute_metrics(x, y, y_pred): CategoricalAccuracy's update (argmax of each,
        their equality as float32; Mean's total by their sum, count by the batch size), then
        get_metrics_result()'s logs: every metric's result through divide_no_nan."""
        accuracy = self.accuracy
        with torch.no_grad():
            hits = torch.eq(torch.argmax(self.y, dim=-1).to(y_pred.dtype),
                            torch.argmax(y_pred, dim=-1).to(y_pred.dtype)).to(torch.float32)
            _add(accuracy.total, torch.sum(hits))
            _add(accuracy.count, _number(hits.shape[0], hits))
            tracker = self.model._loss_tracker
            return {tracker.name: _result(tracker), accuracy.name: _result(accuracy)}


def standard(model, layers, has_losses, y, y_pred, sample_weight):
    """The step's Objective, or None where Keras' own path must run (the module doc says
    when). `layers`: kbench.torch_step.layers_in_order(model); `has_losses()`: whether the
    model has losses of its own (torch_step.has_losses: added ones, regularizers), asked last.
    Eager steps only: under torch.compile Keras' path is traced as it is."""
    if sample_weight is not None or torch.compiler.is_compiling():
        return None
    labels = y  # train_on_batch's may be a NumPy array, converted below as Keras' loss does
    if isinstance(y, np.ndarray):
        if y.dtype != np.float32:
            return None
        # Only its dtype and rank are checked first: an empty array of them (a view of y
        # would make torch warn once per process when y is read-only, as tf.data's are)
        y = torch.from_numpy(np.empty((0, *y.shape[1:]), y.dtype))
    if (not isinstance(y, torch.Tensor) or not isinstance(y_pred, torch.Tensor)
            or y.ndim != 2 or labels.shape != y_pred.shape or y_pred.shape[0] == 0
            or y.dtype != torch.float32 or y_pred.dtype != torch.float32
            or (y.device != y_pred.device and not isinstance(labels, np.ndarray))
            or getattr(y_pred, "_keras_mask", None) is not None):
        return None
    cls = type(model)
    if not (model.compiled and cls.compute_loss is Trainer.compute_loss
            and cls._compute_loss is Trainer._compute_loss
            and cls.compute_metrics is Trainer.compute_metrics
            and cls.get_metrics_result is Trainer.get_metrics_result
            and cls.metrics is Trainer.metrics and not model._metrics
            and not any(layer._metrics for layer in layers[1:])):
        return None
    compiled = model._compile_loss
    if type(compiled) is not CompileLoss or not compiled.built or compiled.dtype != "float32" \
            or len(compiled._flat_losses) != 1 or compiled.metrics:
        return None
    path, loss_fn, loss_weight, _ = compiled._flat_losses[0]
    if (path != () or loss_weight is not None or type(loss_fn) is not CategoricalCrossentropy
            or loss_fn.reduction != "sum_over_batch_size" or loss_fn.dtype != "float32"
            or loss_fn._fn_kwargs.get("from_logits") is not True
            or loss_fn._fn_kwargs.get("axis") != -1):
        return None
    tracker, metrics = model._loss_tracker, model._compile_metrics
    if type(tracker) is not Mean or tracker.dtype != "float32" \
            or type(metrics) is not CompileMetrics or not metrics.built:
        return None
    lists = [m for m in metrics._flat_metrics if m]
    if len(metrics._flat_metrics) != 1 or len(lists) != 1 or lists[0].output_name \
            or any(m for m in metrics._flat_weighted_metrics) or len(lists[0].metrics) != 1:
        return None
    accuracy = lists[0].metrics[0]
    if type(accuracy) is not CategoricalAccuracy or accuracy.dtype != "float32" \
            or accuracy.name == tracker.name or has_losses():
        return None
    if isinstance(labels, np.ndarray):
        from keras.src.backend.torch.core import convert_to_tensor

        labels = convert_to_tensor(labels)
        if labels.device != y_pred.device:
            return None
    return Objective(model, loss_fn, accuracy, labels)


def _number(value, like):
    """A float32 0-d tensor of `value` on `like`'s device (keras.ops.cast of a Python
    number to float32, without its host-to-device copy)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _add(variable, value):
    """variable.assign_add(value) of a Keras torch Variable: its value plus `value`,
    copied into it."""
    current = variable._value
    current.copy_(torch.add(current, value))


def _divide_no_nan(x1, x2):
    """keras.ops.divide_no_nan of two float32 tensors, as Keras' torch backend computes it."""
    safe_x2 = torch.where(x2 == 0, torch.ones_like(x2), x2)
    return torch.where(x2 == 0, 0, torch.divide(x1, safe_x2))


def _result(mean):
    """Mean.result(): divide_no_nan(total, count)."""
    return _divide_no_nan(mean.total._value, mean.count._value)
