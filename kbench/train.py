"""What every recipe shares: seeding, optimizer and schedule, compile, fit with timing and logs,
evaluation, and writing results atomically.

A recipe is a short story on top of these: build data, build model, `fit`, `finish`.
"""

import contextlib
import dataclasses
import math
import os
import statistics
import subprocess
import time

import keras

from kbench import backend, checkpoint
from kbench.errors import KbenchError
from kbench.files import (save_model_atomic, write_json_atomic,  # noqa: F401 (re-exported)
                          write_text_atomic)
from kbench.optim import (OPTIMIZERS, SCHEDULES, build_optimizer,  # noqa: F401 (re-exported)
                          learning_rate_schedule)

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


# --------------------------------------------------------------------------- config


def option(default, help=" ", choices=None, metavar=None):
    """A Config field with the help text and choices its command-line flag shows."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclasses.dataclass
class TrainConfig:
    """The knobs every recipe shares; a recipe's Config subclasses it and sets its defaults."""

    dataset: str = option("synthetic", "dataset name")
    data_dir: str | None = option(None, "where the dataset lies (archive, folder or TFDS dir)")
    download: bool = option(False, "download the dataset when it is missing and the network answers")
    model: str = option("resnet20", "model name from kbench.models")
    epochs: int = option(1, "training epochs")
    steps_per_epoch: int | None = option(None, "optimizer steps per epoch (default: one pass)")
    batch_size: int = option(128, "global batch size")
    lr: float = option(0.1, "peak learning rate")
    optimizer: str = option("sgd", "sgd: momentum (--momentum, --nesterov); adam / adamw: Adam. "
                                   "Keras decays weights decoupled (AdamW-style) under every "
                                   "optimizer, so adam and adamw train alike; --weight-decay 0 "
                                   "gives plain Adam", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "decoupled weight decay on kernels (0 disables)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    schedule: str = option("cosine", "learning-rate schedule: constant, step (x decay_rate every "
                                     "decay_epochs), exponential (to lr x decay_rate at the end), "
                                     "cosine (to 0), one_cycle (up over 30%%, then down)",
                           choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear learning-rate warmup before the schedule "
                                       "(one_cycle has its own)")
    decay_rate: float = option(0.1, "step / exponential schedules: the decay factor")
    decay_epochs: float | None = option(None, "step schedule: epochs between decays "
                                              "(default: a third of the run)")
    clip_norm: float = option(0.0, "clip gradients to this global norm (0: off)")
    seed: int = option(0, "seeds weights, data order, augmentation and backend RNGs")
    output_dir: str | None = option(None, "where metrics.json, history.csv and model.keras go "
                                          "(default: runs/<recipe>/<backend>)")
    dtype_policy: str = option("float32", "Keras dtype policy", choices=DTYPE_POLICIES)
    jit_compile: str = option("auto", "XLA / torch.compile: auto picks the measured best "
                                      "for this backend and device", choices=("auto", "on", "off"))
    validate_every_epoch: bool = option(True, "evaluate on the test split after every epoch")
    train_examples: int | None = option(None, "use the first N training examples "
                                              "(synthetic: generate N; default 10000)")
    test_examples: int | None = option(None, "use the first N test examples "
                                             "(synthetic: generate N; default 2000)")
    distribute: str = option("none", "data_parallel: train on every device (JAX DataParallel, "
                                     "TF MirroredStrategy, torch DDP under torchrun)",
                             choices=("none", "data_parallel"))
    simulate_devices: int | None = option(None, "CPU only (jax, tensorflow): split the host "
                                                "CPU into N devices for --distribute")
    resume: bool = option(False, "continue the run in --output-dir from its last finished epoch")
    monitor: str = option("val_accuracy", "metric that picks best.keras and drives early stopping")
    early_stopping: int = option(0, "stop after this many epochs without improvement of "
                                    "--monitor (0: off)")
    tensorboard: bool = option(False, "write TensorBoard logs to <output-dir>/tensorboard")
    verbose: int = option(1, "Keras progress output: 0 silent, 1 progress bar, 2 one line "
                             "per epoch", choices=(0, 1, 2))


def resolve_output_dir(config, recipe):
    """Fill in the default output dir, runs/<recipe>/<backend>."""
    if config.output_dir is None:
        config = dataclasses.replace(config,
                                     output_dir=os.path.join("runs", recipe, backend.name()))
    return config


# --------------------------------------------------------------------------- setup


def setup_run(config):
    """Seed everything and set the dtype policy before any model is built.

    Seeds Python, NumPy, the backend and TensorFlow (which runs every tf.data pipeline)."""
    if config.dtype_policy not in DTYPE_POLICIES:
        raise KbenchError(f"unknown dtype policy {config.dtype_policy!r}; "
                          f"use one of: {', '.join(DTYPE_POLICIES)}")
    backend.set_seed(config.seed)
    keras.config.set_dtype_policy(config.dtype_policy)


def resolve_jit_compile(setting):
    """'auto' -> the measured per-backend default (see backend.default_jit_compile)."""
    if setting == "auto":
        return backend.default_jit_compile()
    if setting in ("on", "off"):
        return setting == "on"
    raise KbenchError(f"--jit-compile must be auto, on or off, not {setting!r}")


def steps_per_epoch_of(train_ds, config):
    """Optimizer steps in one epoch: --steps-per-epoch, else one pass over the training data."""
    if config.steps_per_epoch:
        return int(config.steps_per_epoch)
    if getattr(train_ds, "steps_per_epoch", None):  # kbench's endless training pipelines
        return train_ds.steps_per_epoch
    cardinality = int(train_ds.cardinality()) if hasattr(train_ds, "cardinality") else -1
    if cardinality <= 0:
        raise KbenchError("cannot tell how many batches the training data holds; "
                          "pass --steps-per-epoch")
    return cardinality


# --------------------------------------------------------------------------- compile


def compile_model(model, config, steps_per_epoch):
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                  label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=resolve_jit_compile(config.jit_compile),
    )
    return model


# --------------------------------------------------------------------------- callbacks


class StepTimer(keras.callbacks.Callback):
    """Wall-clock time of every training step, synchronized with the device.

    Defining `on_train_batch_end` turns off Keras' asynchronous callback dispatch, so Keras
    converts each step's logs to Python floats before calling it: the step's device work is
    finished when the clock is read. The first step of each epoch also waits for the input
    iterator to start, and the first step of the run includes tracing/compilation, so both are
    kept apart: `compile_s` is the time to the end of the first step, `step_times` the rest.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size
        self.compile_s = None
        self.step_times = []  # seconds, steady-state steps only
        self._last = None

    def on_train_begin(self, logs=None):
        self._train_begin = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.compile_s is None:
            self.compile_s = now - self._train_begin
        elif self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    @property
    def examples_per_sec(self):
        if not self.step_times:
            return None
        return self.batch_size * len(self.step_times) / sum(self.step_times)


# --------------------------------------------------------------------------- fit / evaluate


def run_callbacks(config, steps_per_epoch, state):
    """kbench's per-run callbacks: NaN guard, and with an output dir the epoch recorder
    (checkpoint, history.csv, best.keras, early stopping) and TensorBoard when asked for."""
    found = [checkpoint.StopOnNaN(config.output_dir)]
    if config.early_stopping < 0:
        raise KbenchError("--early-stopping must be >= 0 (epochs of patience; 0 turns it off)")
    if state is not None:  # without an output dir (data-parallel non-chief) it only tracks
        found.append(checkpoint.EpochRecorder(
            config.output_dir, state, steps_per_epoch,
            save_model=save_model_float32,
            monitor=config.monitor, patience=config.early_stopping))
    elif config.early_stopping:
        raise KbenchError("--early-stopping needs an --output-dir to keep its state in")
    # TensorBoard last: it reads the logs the recorder and the distribution's sync settled.
    if config.tensorboard:
        if not config.output_dir:
            raise KbenchError("--tensorboard needs an --output-dir to write its logs to")
        found.append(keras.callbacks.TensorBoard(os.path.join(config.output_dir, "tensorboard"),
                                                 write_graph=False, profile_batch=0))
    return found


def fit(model, train_ds, test_ds, config, steps_per_epoch, callbacks=(), state=None,
        initial_epoch=0):
    """model.fit with kbench's timer and callbacks, for epochs initial_epoch .. config.epochs;
    returns (keras History, StepTimer).

    `state` (a checkpoint.RunState) records every finished epoch in config.output_dir, and
    fit continues after the epochs it holds.
    """
    timer = StepTimer(config.batch_size)
    first_epoch = state.epochs_done if state is not None else initial_epoch
    last_epoch = first_epoch if state is not None and state.stopped_early else config.epochs
    history = model.fit(
        train_ds,
        initial_epoch=first_epoch,
        epochs=last_epoch,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds if config.validate_every_epoch else None,
        callbacks=[timer, *callbacks, *run_callbacks(config, steps_per_epoch, state)],
        shuffle=False,  # tf.data shuffles; Keras would only warn that it cannot
        verbose=config.verbose,
    )
    return history, timer


def start_or_resume(config, recipe, model_name, write=True):
    """The RunState this run records into: a fresh one (forgetting any previous run's
    checkpoint in the output dir), or with --resume the checkpoint's, checked against this run.
    Also writes config.json, the run's resolved settings, before any training. `write=False`
    (a data-parallel process other than the chief) reads but never writes."""
    if not config.output_dir:
        if config.resume:
            raise KbenchError("--resume needs the --output-dir of the run to continue")
        return None
    if config.resume:
        state = checkpoint.state_to_resume(config.output_dir, recipe, model_name,
                                           config.dataset)
    else:
        state = checkpoint.RunState(recipe=recipe, model=model_name, dataset=config.dataset)
    if not write:
        return state
    os.makedirs(config.output_dir, exist_ok=True)
    if not config.resume:
        checkpoint.clear(config.output_dir)
    write_json_atomic(os.path.join(config.output_dir, "config.json"),
                      {"recipe": recipe, "backend": backend.name(), **dataclasses.asdict(config)})
    return state


def resume_from_checkpoint(model, train_ds, state, config, recipe, announce=True):
    """Load the checkpoint into the compiled model (on every replica) and return the training
    stream where the checkpointed stage left it."""
    checkpoint.restore(model, state, config.output_dir)
    if announce:
        print(f"resuming {recipe} from {config.output_dir} after epoch {state.epochs_done - 1} "
              f"({state.batches_done} batches)")
    return resume_data(train_ds, state.stage_batches_done)


def resume_data(train_ds, batches_done):
    """The training stream after its first `batches_done` batches.

    kbench's pipelines restart there directly (`starting_at`); another tf.data pipeline is
    replayed and the first batches dropped, which continues it exactly when it is
    deterministic (seeded) and endless.
    """
    if not batches_done:
        return train_ds
    if hasattr(train_ds, "starting_at"):
        return train_ds.starting_at(batches_done)
    resumed = train_ds.skip(batches_done)
    resumed.steps_per_epoch = getattr(train_ds, "steps_per_epoch", None)
    return resumed


def train_and_evaluate(config, recipe, build_model, build_datasets, model=None, datasets=None,
                       callbacks=()):
    """The body of a recipe's `main`: distribution engine, seed and dtype policy, data and
    model (the recipe's own builders unless the caller passes theirs), compile, fit (or resume),
    evaluate, write results.

    `recipe` names the default output folder, runs/<recipe>/<backend>. Returns the metrics
    dict that metrics.json holds. With --distribute data_parallel every process runs this;
    only the chief writes files and prints (a caller's `model` must be built after this
    starts the engine, so pass a builder instead where that matters).
    """
    config = resolve_output_dir(config, recipe)
    with distributed(config) as dist:
        setup_run(config)
        train_ds, test_ds = dist.distribute_datasets(
            *(datasets if datasets is not None else sharded_datasets(build_datasets, config, dist)))
        with dist.scope():  # TF strategies create the variables of what is built in here
            model = model if model is not None else build_model(config)
            state = start_or_resume(config, recipe, model.name, write=dist.is_chief)
            steps_per_epoch = steps_per_epoch_of(train_ds, config)
            compile_model(model, config, steps_per_epoch)
            if state is not None and state.epochs_done:
                train_ds = resume_from_checkpoint(model, train_ds, state, config, recipe,
                                                  announce=dist.is_chief)
        dist.prepare(model)
        run_config = process_config(config, dist)
        history, timer = fit(model, train_ds, test_ds, run_config, steps_per_epoch,
                             [*dist.callbacks(), *callbacks], state)
        return finish(run_config, model, history, timer,
                      final_evaluation(model, test_ds, run_config, dist), recipe=recipe,
                      state=state, extra=dist.describe(), announce=dist.is_chief)


@contextlib.contextmanager
def distributed(config):
    """The run's distribution engine (kbench.distribute; one replica with --distribute none),
    started before anything else touches the backend's runtime, shut down at the end."""
    from kbench import distribute

    if config.simulate_devices:  # before anything starts the backend's runtime
        distribute.simulate_devices(config.simulate_devices)
    dist = distribute.setup(config.distribute, config.simulate_devices, config.batch_size)
    try:
        yield dist
    finally:
        dist.shutdown()


def sharded_datasets(build_datasets, config, dist):
    """The recipe's (train, test) pipelines, the training stream cut to this process's share
    of every global batch when the engine has several processes feed it (torch DDP)."""
    shard = dist.data_shard()
    return build_datasets(config, shard=shard) if shard != (0, 1) else build_datasets(config)


def process_config(config, dist):
    """The config this process trains with: the chief's as given; every other data-parallel
    process silent and writing nothing (one writer per run)."""
    if dist.is_chief:
        return config
    return dataclasses.replace(config, output_dir=None, verbose=0, tensorboard=False)


def evaluate(model, test_ds, verbose=0):
    """Keras' own evaluation: test loss (the compiled loss, label smoothing included) and
    accuracy."""
    results = model.evaluate(test_ds, return_dict=True, verbose=verbose)
    return {"test_loss": float(results["loss"]), "test_accuracy": float(results["accuracy"])}


def final_evaluation(model, test_ds, config, dist=None):
    """The end-of-training evaluation every recipe runs, from one pass over the test split:
    eval.json + confusion_matrix.png in the output dir (what `kbench evaluate` writes for a
    saved model), and metrics.json's test figures. `test_loss` stays the training objective
    (label smoothing included, as model.evaluate reports it); eval.json's `loss` is the plain
    cross-entropy."""
    from kbench import evaluation
    from kbench.data.registry import class_names

    if dist is not None and dist.num_processes > 1 and backend.name() == "jax":
        # model.predict cannot gather arrays that live on other hosts' devices; Keras'
        # evaluate reduces across them. `kbench evaluate model.keras` writes eval.json later.
        return evaluate(model, test_ds)
    logits, labels = evaluation.predict_all(model, test_ds)
    try:
        names = class_names(config.dataset)
    except KbenchError:  # a dataset the caller brought: classes are numbered
        names = None
    if names is not None and len(names) != logits.shape[1]:
        names = None
    result = evaluation.evaluate_predictions(logits, labels, names)
    if config.output_dir:
        result.update(model=model.name, dataset=config.dataset, backend=backend.name())
        evaluation.write_evaluation(result, config.output_dir)
    found = {"test_loss": evaluation.smoothed_loss(logits, labels, config.label_smoothing),
             "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"]}
    if "top5_accuracy" in result:
        found["test_top5_accuracy"] = result["top5_accuracy"]
    return found


def save_model_float32(model, path):
    """Save model.keras so that it loads and predicts in float32 whatever policy trained it:
    a mixed-precision model is saved as a float32 copy with the same (float32) weights."""
    if any(layer.dtype_policy.name != "float32" for layer in model.layers):
        from kbench.models.saving import float32_copy

        model = float32_copy(model)
    save_model_atomic(model, path)


def finish(config, model, history, timer, test_metrics, extra=None, recipe=None, state=None,
           announce=True):
    """Write metrics.json and model.keras into the output dir (atomically), print the summary
    line (when `announce`), and return the metrics dict. With a RunState, the epochs and
    history are the whole run's, resumed sessions included. `extra` (e.g. the distribution's
    description, num_replicas included) is merged in last."""
    if state is not None:
        epochs_done, history_dict = state.epochs_done, state.history
    else:
        epochs_done = len(history.epoch) if history is not None else 0
        history_dict = history.history if history is not None else {}
    metrics = {
        "backend": backend.name(),
        "recipe": recipe,
        "model": model.name,
        "dataset": config.dataset,
        **test_metrics,
        "epochs": epochs_done,
        "train_examples_per_sec": timer.examples_per_sec,
        "compile_s": timer.compile_s,
        "step_time_ms": (1000 * statistics.median(timer.step_times)) if timer.step_times else None,
        "num_replicas": 1,
        "params": model.count_params(),
        "jit_compile": resolve_jit_compile(config.jit_compile),
        "dtype_policy": config.dtype_policy,
        "history": {k: [float(v) for v in vs] for k, vs in history_dict.items()},
        "config": dataclasses.asdict(config),
        "versions": backend.versions(),
        "devices": backend.devices(),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    if state is not None:
        metrics["best"] = {"monitor": state.monitor, "value": state.best, "epoch": state.best_epoch,
                           "stopped_early": state.stopped_early}
    if config.output_dir:
        os.makedirs(config.output_dir, exist_ok=True)
        save_model_float32(model, os.path.join(config.output_dir, "model.keras"))
        write_json_atomic(os.path.join(config.output_dir, "metrics.json"), metrics)
    speed = metrics["train_examples_per_sec"]
    if not announce:
        return metrics
    print(f"{metrics['model']} on {config.dataset} under {metrics['backend']}: "
          f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
          f"{epochs_done} epochs, "
          + (f"{speed:.1f} train examples/s" if speed else "no steady-state steps timed")
          + f", {metrics['num_replicas']} replica(s)"
          + (f"; results in {config.output_dir}" if config.output_dir else ""))
    return metrics


# --------------------------------------------------------------------------- helpers


def git_commit():
    """The kbench checkout's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
