"""A small training run through kbench.distribute, for tests/test_distribute.py.

    python -m tests.distribute_driver OUT_DIR [--distribute data_parallel] [--simulate 4] ...

Follows the call order kbench.train uses (simulate_devices, setup, seed, sharded data, model
and compile in scope, prepare, fit with the distribution's callbacks, evaluate) on synthetic
CIFAR-shaped data, and writes OUT_DIR/process-<index>.json: the distribution's description,
the history, the batch sizes each replica saw, test metrics and a checksum of every weight.
"""

import argparse
import json
import os
import sys
import time

START = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import kbench  # noqa: E402,F401  (validates KERAS_BACKEND)
from kbench import distribute  # noqa: E402
from kbench.errors import KbenchError  # noqa: E402

SEEN = set()  # (where, replica or device id, batch size)


def tiny_model(seed):
    """Rescaling -> Dense -> Dense, plus a BatchNormalization side branch that adds exactly 0
    to the logits: its moving statistics are per-replica state the engines must keep
    consistent, while the gradients stay exactly those of a single-device run (the branch
    contributes none), so N replicas must match one replica to float round-off."""
    import keras

    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((32, 32, 3))
    x = record_batch_layer()(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.Flatten()(x)
    side = keras.layers.BatchNormalization(name="side_bn")(x[:, :8])
    x = keras.layers.Dense(32, activation="relu", kernel_initializer=init)(x)
    logits = keras.layers.Dense(10, kernel_initializer=init)(x)
    # x * 0, not zeros_like(x): the branch stays in the autograd graph (DDP insists that every
    # trainable weight takes part in the loss) with gradients of exactly 0.
    zero = keras.ops.sum(side * 0.0, axis=-1, keepdims=True)
    return keras.Model(inputs, logits + zero, name="tiny")


def record_batch_layer():
    import keras

    class RecordBatch(keras.layers.Layer):
        """Identity that notes the batch size it is called with: every step in eager torch;
        under TensorFlow once per replica while tracing, with the replica's id."""

        def call(self, x):
            replica = None
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                context = tf.distribute.get_replica_context()
                if context is not None:
                    replica = tf.get_static_value(context.replica_id_in_sync_group)
            size = x.shape[0]
            if isinstance(size, int):  # not symbolic shape inference, not a dynamic dim
                SEEN.add(("model", None if replica is None else int(replica), size))
            return x

    return RecordBatch()


def watch_jax_sharding():
    """Record how Keras' JAX trainer lays each image batch out over the devices."""
    from keras.src.backend.jax import distribution_lib

    original = distribution_lib.distribute_data_input

    def recording(per_process_batch, layout, batch_dim_name):
        array = original(per_process_batch, layout, batch_dim_name)
        if len(array.shape) == 4:
            SEEN.add(("global", None, int(array.shape[0])))
            for shard in array.addressable_shards:
                SEEN.add(("device", shard.device.id, int(shard.data.shape[0])))
        return array

    distribution_lib.distribute_data_input = recording


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--distribute", default="none")
    parser.add_argument("--simulate", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--test-examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--try-batch-size", type=int, default=None,
                        help="first try setup() with this global batch and record its error")
    args = parser.parse_args(argv)

    if args.simulate:
        distribute.simulate_devices(args.simulate)
    errors = {}
    if args.try_batch_size:
        try:
            distribute.setup(args.distribute, args.simulate, args.try_batch_size).shutdown()
        except KbenchError as exc:
            errors["batch"] = str(exc)
    dist = distribute.setup(args.distribute, args.simulate, args.batch_size)
    if args.simulate:
        try:  # the runtime is up now: a different split must be refused
            distribute.simulate_devices(args.simulate + 1)
        except KbenchError as exc:
            errors["too_late"] = str(exc)

    import keras
    import numpy as np

    from kbench import backend, data
    from kbench.models import get_model

    backend.set_seed(args.seed)
    arrays = data.load_dataset("synthetic", train_examples=args.train_examples,
                               test_examples=args.test_examples, seed=args.seed)
    train_ds, test_ds = data.make_datasets(arrays, args.batch_size, seed=args.seed,
                                           shard=dist.data_shard())
    train_ds, test_ds = dist.distribute_datasets(train_ds, test_ds)
    with dist.scope():
        model = (tiny_model(args.seed) if args.model == "tiny"
                 else get_model(args.model, num_classes=10, seed=args.seed))
        model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.9),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    dist.prepare(model)
    if backend.name() == "jax":
        watch_jax_sharding()
    started = time.perf_counter()
    history = model.fit(train_ds.dataset, epochs=args.epochs, steps_per_epoch=args.steps,
                        validation_data=test_ds.dataset, callbacks=dist.callbacks(),
                        shuffle=False, verbose=0)
    fit_s = time.perf_counter() - started
    test = model.evaluate(test_ds.dataset, return_dict=True, verbose=0)

    def checksum(variable):
        value = np.asarray(keras.ops.convert_to_numpy(variable.value), np.float64)
        return float(np.sum(np.abs(value)))

    result = {**dist.describe(), "is_chief": dist.is_chief, "data_shard": dist.data_shard(),
              "process_index": dist.process_index, "history": history.history, "test": test,
              "weights": {v.path: checksum(v) for v in model.weights},
              "trainable": [v.path for v in model.trainable_weights],
              "seen": sorted(SEEN, key=str), "errors": errors,
              "setup_s": started - START, "fit_s": fit_s}
    dist.barrier()
    dist.shutdown()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"process-{dist.process_index}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
