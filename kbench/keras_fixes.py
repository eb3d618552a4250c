"""Every place kbench works around Keras, in one module, each tied to the Keras versions it was
written and tested for (TESTED_KERAS; pyproject.toml pins the same range).

Outside those versions a workaround is not applied silently: the feature that needs it stops
with one line saying so, since Keras internals it replaces may have changed.

- `multi_worker_build`, `multi_worker_log_reduction`: Keras' TensorFlow trainer under
  MultiWorkerMirroredStrategy reduces whole (x, y) structures and scalar logs with
  `strategy.reduce(..., axis=0)`, which the collective reduce rejects
  (keras-team/keras#20585).
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


# --------------------------------------------------------------------------- PyTorch


def ddp_train_step(ddp):
    """Keras' TorchTrainer.train_step (keras 3.15, keras/src/backend/torch/trainer.py) with
    one change: the forward pass runs through the DDP wrapper, so that loss.backward()
    fires DDP's hooks and every gradient is averaged over the ranks before the optimizer
    sees it."""
    import warnings

    import torch

    check_tested("torch data-parallel training", "keras-team/keras#23418")
    from keras.src import tree
    from keras.src.trainers.data_adapters import data_adapter_utils

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        if self._call_has_training_arg:
            y_pred = ddp(x, training=True)
        else:
            y_pred = ddp(x)
        self.zero_grad()
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                  training=True)
        self._loss_tracker.update_state(
            loss, sample_weight=next(i for i in tree.flatten(x) if i is not None).shape[0])
        if self.optimizer is not None:
            loss = self.optimizer.scale_loss(loss)
        if self.trainable_weights:
            loss.backward()  # DDP all-reduces each gradient bucket as it is ready
            trainable_weights = self.trainable_weights[:]
            gradients = [v.value.grad for v in trainable_weights]
            with torch.no_grad():
                self.optimizer.apply(gradients, trainable_weights)
        else:
            warnings.warn("The model does not have any trainable weights.")
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return train_step
