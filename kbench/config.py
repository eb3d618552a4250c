"""A recipe's settings: `TrainConfig`, the knobs every recipe shares, and `option`, a field with
the help text, choices and allowed values (a Range, or the registered model names) its
command-line flag shows (kbench.flags turns a
Config into flags).

A recipe's Config subclasses TrainConfig and sets its own defaults and extra knobs. `check`
runs one validation for every way a Config arrives (flags, `--config FILE`, `main(Config(...))`,
`kbench compare --set`) before any data or model is built: a bad value is one line naming the
flag, the value and what it takes.
"""

import dataclasses
import math
import os
import types
import typing

from kbench import backend
from kbench.backend import FLOAT32_PRECISIONS, MAX_SIMULATED_DEVICES
from kbench.errors import KbenchError
from kbench.flags import flag_of
from kbench.optim import OPTIMIZERS, SCHEDULES

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field takes: low <= x (low < x when low_open), x <= high (x < high when
    high_open); None is no bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x):
        return ((self.low is None or (x > self.low if self.low_open else x >= self.low))
                and (self.high is None or (x < self.high if self.high_open else x <= self.high)))

    def __str__(self):
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        return " and ".join(bounds)


def _number(x):
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # rates and probabilities: 0 <= x < 1


def option(default, help=" ", choices=None, metavar=None, allowed=None):
    """A Config field with the help text and choices its command-line flag shows, and the
    values it takes (`allowed`: a Range of numbers, or an object that answers `in` and prints
    what it takes, such as kbench.models.IMAGE_MODELS; inherited from the base class's field
    when a recipe overrides only the default)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "metavar": metavar, "allowed": allowed})


@dataclasses.dataclass
class TrainConfig:
    """The knobs every recipe shares; a recipe's Config subclasses it and sets its defaults."""

    dataset: str = option("synthetic", "dataset name")
    data_dir: str | None = option(None, "where the dataset lies (archive, folder or TFDS dir)")
    download: bool = option(False, "download the dataset when it is missing and the network answers")
    model: str = option("resnet20", "model name from kbench.models")
    epochs: int = option(1, "training epochs", allowed=Range(1))
    steps_per_epoch: int | None = option(None, "optimizer steps per epoch (default: one pass)",
                                          allowed=Range(1))
    batch_size: int = option(128, "global batch size", allowed=Range(1))
    lr: float = option(0.1, "peak learning rate", allowed=POSITIVE)
    optimizer: str = option("sgd", "sgd: momentum (--momentum, --nesterov); adam / adamw: Adam. "
                                   "Keras decays weights decoupled (AdamW-style) under every "
                                   "optimizer, so adam and adamw train alike; --weight-decay 0 "
                                   "gives plain Adam", choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum", allowed=FRACTION)
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(5e-4, "decoupled weight decay on kernels (0 disables)",
                                  allowed=NON_NEGATIVE)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy",
                                     allowed=FRACTION)
    schedule: str = option("cosine", "learning-rate schedule: constant, step (x decay_rate every "
                                     "decay_epochs), exponential (to lr x decay_rate at the end), "
                                     "cosine (to 0), one_cycle (up over 30%%, then down)",
                           choices=SCHEDULES)
    warmup_epochs: float = option(1.0, "linear learning-rate warmup before the schedule "
                                       "(one_cycle has its own)", allowed=NON_NEGATIVE)
    decay_rate: float = option(0.1, "step / exponential schedules: the decay factor",
                                allowed=Range(0, 1, low_open=True))
    decay_epochs: float | None = option(None, "step schedule: epochs between decays "
                                              "(default: a third of the run)",
                                       allowed=POSITIVE)
    clip_norm: float = option(0.0, "clip gradients to this global norm (0: off)",
                               allowed=NON_NEGATIVE)
    seed: int = option(0, "seeds weights, data order, augmentation and backend RNGs",
                        allowed=Range(0, 2**32 - 1))
    output_dir: str | None = option(None, "where metrics.json, history.csv and model.keras go "
                                          "(default: runs/<recipe>/<backend>)")
    dtype_policy: str = option("float32", "Keras dtype policy", choices=DTYPE_POLICIES)
    jit_compile: str = option("auto", "XLA / torch.compile: auto is Keras' choice (XLA under "
                                      "jax, and under tensorflow where a GPU is present; torch "
                                      "eager), which matches what we measured best",
                              choices=("auto", "on", "off"))
    fast_path: str = option("on", "under torch and tensorflow: BatchNormalization in training "
                                  "through the framework's fused kernel, and under torch 2D "
                                  "convolutions without layout copies (kbench/fast_path.py; "
                                  "same numbers as stock Keras); off: stock Keras. Ignored by "
                                  "jax", choices=("on", "off"))
    float32_precision: str = option(
        "tf32", "float32 convolutions and matmuls on a GPU with TensorFloat-32 units: tf32 "
                "(what JAX and TensorFlow do by default; kbench makes torch do it too) or "
                "highest (full float32 on every backend). Set once per run "
                "(kbench.backend.apply_execution_settings) and recorded; changes nothing on "
                "a CPU", choices=FLOAT32_PRECISIONS)
    cudnn_benchmark: str = option("on", "under torch on CUDA: torch.backends.cudnn.benchmark "
                                        "(cuDNN times its convolution algorithms for each new "
                                        "shape and keeps the fastest); off: cuDNN's "
                                        "heuristics. Recorded; no effect elsewhere",
                                  choices=("on", "off"))
    validate_every_epoch: bool = option(True, "evaluate on the test split after every epoch")
    target_accuracy: float | None = option(
        None, "train until test accuracy reaches this (0 < A <= 1) or the epochs run out, "
              "evaluating on the test split during training; metrics.json's time_to_target "
              "says when (clock from the start of training, compile and evaluations on it)",
        allowed=Range(0, 1, low_open=True))
    eval_every_steps: int = option(0, "with --target-accuracy: evaluate every N optimizer "
                                      "steps (0: after every epoch)", allowed=NON_NEGATIVE)
    train_examples: int | None = option(None, "use the first N training examples "
                                              "(synthetic: generate N; default 10000)",
                                       allowed=Range(1))
    test_examples: int | None = option(None, "use the first N test examples "
                                             "(synthetic: generate N; default 2000)",
                                      allowed=Range(1))
    distribute: str = option("none", "data_parallel: train on every device (JAX DataParallel, "
                                     "TF MirroredStrategy, torch DDP under torchrun)",
                             choices=("none", "data_parallel"))
    simulate_devices: int | None = option(None, "CPU only (jax, tensorflow): split the host "
                                                "CPU into N devices for --distribute",
                                         allowed=Range(1, MAX_SIMULATED_DEVICES))
    resume: bool = option(False, "continue the run in --output-dir from its last checkpoint")
    epoch_checkpoints: bool = option(True, "checkpoint (weights, optimizer, RNG state) at "
                                           "every epoch's end, for --resume; off: only "
                                           "history.csv is written per epoch")
    checkpoint_every: int = option(0, "also checkpoint every N training steps, in the middle "
                                      "of epochs (0: at epoch ends only; a run with an "
                                      "--output-dir stopped by SIGTERM / SIGINT in training "
                                      "checkpoints first anyway)",
                                   allowed=NON_NEGATIVE)
    # What fit logs: every kbench run compiles its loss and accuracy (train.compile_model),
    # with val_ twins when it validates; a name outside these was never logged, and the run
    # wrote no best.keras without a word (with --early-stopping: an error after an epoch).
    monitor: str = option("val_accuracy", "metric that picks best.keras and drives early "
                                          "stopping", choices=("val_accuracy", "val_loss",
                                                               "accuracy", "loss"))
    monitor_mode: str = option("auto", "whether --monitor improves up (max) or down (min); auto: "
                                       "Keras' rule (losses down, a compiled metric its own "
                                       "direction)", choices=("auto", "min", "max"))
    early_stopping: int = option(0, "stop after this many epochs without improvement of "
                                    "--monitor (0: off)", allowed=NON_NEGATIVE)
    tensorboard: bool = option(False, "write TensorBoard logs to <output-dir>/tensorboard")
    verbose: int = option(1, "Keras progress output: 0 silent, 1 progress bar, 2 one line "
                             "per epoch", choices=(0, 1, 2))

    def check_combination(self):
        """Rules between fields, after each field passed its own check (`check`): raise
        KbenchError, one line. A recipe's Config extends it for its own fields."""
        if self.eval_every_steps and self.target_accuracy is None:
            raise KbenchError("--eval-every-steps goes with --target-accuracy A")
        if self.checkpoint_every and not self.epoch_checkpoints:
            raise KbenchError("--checkpoint-every N checkpoints mid-epoch, which "
                              "--no-epoch-checkpoints turns off at epoch ends: drop one")
        if self.early_stopping and self.monitor.startswith("val_") \
                and not self.validate_every_epoch:
            raise KbenchError(f"--early-stopping watches --monitor {self.monitor}, which only "
                              "--validate-every-epoch logs: turn it on, or monitor "
                              f"{self.monitor.removeprefix('val_')}")
        if self.target_accuracy is not None and self.resume:
            raise KbenchError("--target-accuracy times one uninterrupted run, from its first "
                              "step: it cannot --resume; start the run again")


# What config.json holds beside the settings (train.write_config): labels, not settings
CONFIG_LABELS = ("recipe", "backend", "data_given")
FREE_TEXT = ("data_dir", "output_dir", "init_from")  # paths: any string (checked where opened)


def check(config):
    """Raise KbenchError, one line, for the first field of `config` that holds a value of the
    wrong type, outside its choices or its allowed values, or a float that is not finite. Flags name
    the field (`--steps-per-epoch`), as a user sets it in any of the ways a Config arrives.
    Returns `config`, with NumPy numbers (a loop over np.array values) made Python's."""
    hints = typing.get_type_hints(type(config))
    config = dataclasses.replace(config, **{
        f.name: getattr(config, f.name).item() for f in dataclasses.fields(config)
        if type(getattr(config, f.name)).__module__ == "numpy"
        and hasattr(getattr(config, f.name), "item")})
    for field in dataclasses.fields(config):
        _check_field(type(config), field.name, getattr(config, field.name), hints)
    config.check_combination()
    return config


def check_values(config_cls, values):
    """`check`'s rule for each field of `config_cls` in the dict `values` (other keys are left
    alone), without building a Config: for settings read back from a file, such as a run's
    metrics.json. Raises KbenchError, one line, for the first bad value."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    for name, value in values.items():
        if name in names:
            _check_field(config_cls, name, value, hints)


FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max, without importing NumPy


def _check_field(config_cls, name, value, hints):
    flag = flag_of(name)
    kinds, optional = _kinds(hints[name])
    if value is None:
        if optional:
            return
        raise KbenchError(f"{flag} must be set ({_describe(kinds)})")
    if not _is_instance(value, kinds) or (isinstance(value, str) and not value.strip()
                                          and name not in FREE_TEXT):
        raise KbenchError(f"{flag} {value!r} is not allowed: it takes {_describe(kinds)}"
                          + _unquoted_hint(value, kinds))
    choices = field_setting(config_cls, name, "choices")
    if choices is not None and value not in choices:
        raise KbenchError(f"{flag} {value!r} is not allowed: it takes one of "
                          f"{', '.join(map(str, choices))}")
    allowed = field_setting(config_cls, name, "allowed")
    # Beyond float32's range a setting overflows to inf in the variables it becomes.
    # (Python compares an int of any size with a float exactly; inf is refused below.)
    overflows = (float in kinds and not isinstance(value, bool)
                 and isinstance(value, (int, float)) and value == value
                 and FLOAT32_MAX < abs(value) < math.inf)
    in_range = allowed is None or value in allowed
    if (isinstance(value, float) and not math.isfinite(value)) or overflows or not in_range:
        unset = ", or leave it unset" if optional else ""
        why = getattr(allowed, "why_not", lambda value: "")(value)  # a hint of its own
        if overflows and in_range:  # else the range is the reason
            why = f" (float32, which training computes in, holds at most {FLOAT32_MAX:.4g})"
        raise KbenchError(f"{flag} {value!r} is not allowed: it takes "
                          f"{_describe(kinds, allowed)}{unset}{why}")


def _kinds(annotation):
    """(the types a field holds, whether None is allowed) from `int`, `float | None`..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (annotation,), False


def _unquoted_hint(value, kinds):
    """What to write instead, when a switch or a number came as a string (`"false"` in a JSON
    file, `--set augment=False`): the refusal alone reads as a contradiction."""
    if not isinstance(value, str) or str in kinds:
        return ""
    if bool in kinds and value.strip().lower() in ("true", "false"):
        return f" (write {value.strip().lower()}: lowercase, without quotes)"
    try:
        float(value)
    except ValueError:
        return ""
    return " (write the number without quotes)" if int in kinds or float in kinds else ""


def _is_instance(value, kinds):
    if isinstance(value, bool):  # bool is an int to Python, not to a flag
        return bool in kinds
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, tuple(k for k in kinds if k is not bool))


def _describe(kinds, allowed=None):
    name = {int: "an integer", float: "a finite number", str: "a name", bool: "true or false"}
    text = " or ".join(name.get(k, k.__name__) for k in kinds)
    return f"{text} {allowed}" if allowed else text


def field_setting(config_cls, name, key):
    """Field metadata `key` of `name`, from the nearest class in the MRO that declares it."""
    for cls in config_cls.__mro__:
        for field in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            if field.name == name and field.metadata.get(key) is not None:
                return field.metadata[key]
    return None


def default_output_dir(recipe):
    """Where a run of `recipe` under the running backend goes unless told otherwise:
    runs/<recipe>/<backend>."""
    return os.path.join("runs", recipe, backend.name())


def resolve_output_dir(config, recipe):
    """Fill in the default output dir (default_output_dir)."""
    if config.output_dir is None:
        config = dataclasses.replace(config, output_dir=default_output_dir(recipe))
    return config
