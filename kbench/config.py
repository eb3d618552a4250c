"""A recipe's settings: `TrainConfig`, the knobs every recipe shares, and `option`, a field with
the help text and choices its command-line flag shows (kbench.flags turns a Config into flags).

A recipe's Config subclasses TrainConfig and sets its own defaults and extra knobs.
"""

import dataclasses
import os

from kbench import backend
from kbench.optim import OPTIMIZERS, SCHEDULES

DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


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
    jit_compile: str = option("auto", "XLA / torch.compile: auto is Keras' choice (XLA under "
                                      "jax, and under tensorflow where a GPU is present; torch "
                                      "eager), which matches what we measured best",
                              choices=("auto", "on", "off"))
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
    monitor_mode: str = option("auto", "whether --monitor improves up (max) or down (min); auto: "
                                       "Keras' rule (losses down, a compiled metric its own "
                                       "direction)", choices=("auto", "min", "max"))
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
