"""What every recipe shares: seeding, optimizer and schedule, compile, fit with timing and logs,
evaluation, and writing results atomically.

A recipe is a short story on top of these: build data, build model, `fit`, `finish`.
"""

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import tempfile
import time

import keras

from kbench import backend
from kbench.errors import KbenchError

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("sgd", "adam", "adamw")


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
    warmup_epochs: float = option(1.0, "linear learning-rate warmup before the cosine decay")
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
    """Seed everything and set the dtype policy before any model is built."""
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


# --------------------------------------------------------------------------- optimizer


def learning_rate_schedule(config, steps_per_epoch):
    """Linear warmup from 0 to `lr` over `warmup_epochs`, then cosine decay to 0."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.lr,
        decay_steps=total - warmup,
        warmup_target=config.lr if warmup else None,
        warmup_steps=warmup,
    )


def build_optimizer(config, steps_per_epoch):
    """SGD with Nesterov momentum (or Adam, `--optimizer adam/adamw`) and decoupled weight
    decay, kept off BatchNorm and biases.

    Keras applies `weight_decay` as `w -= lr * wd * w` before the gradient step; the native
    reference loops do exactly the same for SGD, so the comparison trains the same thing.
    """
    schedule = learning_rate_schedule(config, steps_per_epoch)
    choice = getattr(config, "optimizer", "sgd")
    if choice == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay or None,
        )
    elif choice == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=schedule,
                                          weight_decay=config.weight_decay or None)
    elif choice == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule,
                                           weight_decay=config.weight_decay)
    else:
        raise KbenchError(f"unknown optimizer {choice!r}; use one of: {', '.join(OPTIMIZERS)}")
    # Decay only conv/dense kernels: BN scale/offset and biases are not regularized.
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if config.dtype_policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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


class HistoryCSV(keras.callbacks.Callback):
    """history.csv with one row per finished epoch (`epoch` from 0, then `loss`, then the rest),
    rewritten atomically after every epoch so that a crash never leaves a torn row."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.rows = []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        for key, value in (logs or {}).items():
            row[key] = float(value)
        self.rows.append(row)
        keys = {k for r in self.rows for k in r} - {"epoch", "loss"}
        fields = ["epoch", "loss"] + sorted(keys)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, out.getvalue())


# --------------------------------------------------------------------------- fit / evaluate


def fit(model, train_ds, test_ds, config, steps_per_epoch, callbacks=()):
    """model.fit with kbench's logs and timers; returns (keras History, StepTimer)."""
    timer = StepTimer(config.batch_size)
    all_callbacks = [timer, *callbacks]
    if config.output_dir:
        all_callbacks.append(HistoryCSV(os.path.join(config.output_dir, "history.csv")))
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds if config.validate_every_epoch else None,
        callbacks=all_callbacks,
        shuffle=False,  # tf.data shuffles; Keras would only warn that it cannot
        verbose=config.verbose,
    )
    return history, timer


def train_and_evaluate(config, recipe, build_model, build_datasets, model=None, datasets=None,
                       callbacks=()):
    """The body of a recipe's `main`: seed and dtype policy, data and model (the recipe's own
    builders unless the caller passes theirs), compile, fit, evaluate, write results.

    `recipe` names the default output folder, runs/<recipe>/<backend>. Returns the metrics
    dict that metrics.json holds.
    """
    config = resolve_output_dir(config, recipe)
    setup_run(config)
    train_ds, test_ds = datasets if datasets is not None else build_datasets(config)
    model = model if model is not None else build_model(config)
    steps_per_epoch = steps_per_epoch_of(train_ds, config)
    compile_model(model, config, steps_per_epoch)
    history, timer = fit(model, train_ds, test_ds, config, steps_per_epoch, callbacks)
    return finish(config, model, history, timer, evaluate(model, test_ds))


def evaluate(model, test_ds, verbose=0):
    results = model.evaluate(test_ds, return_dict=True, verbose=verbose)
    return {"test_loss": float(results["loss"]), "test_accuracy": float(results["accuracy"])}


def finish(config, model, history, timer, test_metrics, extra=None):
    """Write metrics.json and model.keras into the output dir (atomically), print the summary
    line, and return the metrics dict."""
    epochs_done = len(history.epoch) if history is not None else 0
    metrics = {
        "backend": backend.name(),
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
        "history": {k: [float(v) for v in vs] for k, vs in (history.history if history else {}).items()},
        "config": dataclasses.asdict(config),
        "versions": backend.versions(),
        "devices": backend.devices(),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    if config.output_dir:
        os.makedirs(config.output_dir, exist_ok=True)
        save_model_atomic(model, os.path.join(config.output_dir, "model.keras"))
        write_json_atomic(os.path.join(config.output_dir, "metrics.json"), metrics)
    speed = metrics["train_examples_per_sec"]
    print(f"{metrics['model']} on {config.dataset} under {metrics['backend']}: "
          f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
          f"{epochs_done} epochs, "
          + (f"{speed:.1f} train examples/s" if speed else "no steady-state steps timed")
          + f", {metrics['num_replicas']} replica(s)"
          + (f"; results in {config.output_dir}" if config.output_dir else ""))
    return metrics


# --------------------------------------------------------------------------- files


def write_text_atomic(path, text):
    """Write via a temp file in the same folder + rename: readers see old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def save_model_atomic(model, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
