"""Fine-tune a trained network on a new task: a new head, then the whole network but BatchNorm.

    KERAS_BACKEND=jax python recipes/cifar_resnet.py --data-dir ~/data/cifar   # CIFAR-10 ResNet-20
    KERAS_BACKEND=jax python recipes/finetune.py --data-dir ~/data/cifar          # -> CIFAR-100
        --init-from runs/cifar_resnet/jax/model.keras
    KERAS_BACKEND=torch python recipes/finetune.py --init-from M.keras --dataset synthetic

Transfer learning as keras-io's guide tells it, as a kbench recipe. The story, top to bottom:

1. Start from a model.keras another recipe trained (--init-from): Keras' format loads under any
   backend, whichever one saved it. (keras-hub / keras.applications backbones would need a
   download; any model that ends in its classifier works the same way.)
2. Replace the head: keep the network up to its last Dense layer's input (the features) and
   put a new classifier for this data set's classes on top (CIFAR-100: 100 classes).
3. Stage 1 (--head-epochs): only the new head trains; the backbone is frozen. A frozen
   BatchNormalization runs in inference mode in Keras 3, normalising with the statistics it
   learned in pretraining.
4. Stage 2 (--epochs): every layer but BatchNorm trains, at a lower learning rate
   (--finetune-lr). BatchNorm stays frozen, as keras-io's guide recommends: otherwise the
   first batches of the new data would replace its moving statistics and undo what the
   network learned, and its small batch statistics would disagree with test-time ones.
5. Results in --output-dir: metrics.json (both stages' history), history.csv (one row per
   epoch of both stages), model.keras (the fine-tuned model; it takes 0..255 pixels).

`--dataset synthetic` is a CIFAR-100-shaped stand-in (100 classes) for offline runs. As a
template: `main(config, model=my_model, datasets=(train_ds, test_ds))`, where `my_model` ends in
its classifier (e.g. `with_new_head(my_pretrained, num_classes)`).
"""

import dataclasses
import os

import kbench  # validates KERAS_BACKEND and registers kbench layers; import before keras
import keras
from kbench import data, tasks
from kbench.config import NON_NEGATIVE, POSITIVE, TrainConfig, option
from kbench.errors import KbenchError
from kbench.flags import run_recipe
from kbench.models.layers import PortableNormal
from kbench.models.saving import load_model
from kbench.train import Run

DATASETS = ("cifar100", "cifar10", "synthetic")


@dataclasses.dataclass
class Config(TrainConfig):
    init_from: str | None = option(None, "the trained model.keras to start from, e.g. "
                                         "runs/cifar_resnet/jax/model.keras")
    dataset: str = option("cifar100", "cifar100, cifar10, synthetic (CIFAR-100-shaped)",
                          choices=DATASETS)
    model: str | None = option(None, "not used: the network comes from --init-from")
    head_epochs: int = option(2, "stage 1: epochs training only the new head",
                             allowed=NON_NEGATIVE)
    epochs: int = option(5, "stage 2: epochs training every layer but BatchNorm",
                         allowed=NON_NEGATIVE)
    batch_size: int = option(128, "global batch size")
    lr: float = option(0.05, "stage 1 peak learning rate (the new head)")
    finetune_lr: float = option(0.005, "stage 2 peak learning rate: lower, so the pretrained "
                                       "features are adjusted, not overwritten",
                                allowed=POSITIVE)
    augment: bool = option(True, "random crop (4 px padding) and horizontal flip")
    cutout: int = option(0, "cutout square size in pixels (0: off)", allowed=NON_NEGATIVE)

    def check_combination(self):
        super().check_combination()
        if self.head_epochs + self.epochs == 0:
            raise KbenchError("--head-epochs and --epochs are both 0: nothing to train")


def build_datasets(config, shard=(0, 1)):
    """(train, test) Streams of (float32 pixels, one-hot labels); `shard` is this process's
    part of every training batch under data-parallel training (kbench.distribute)."""
    return tasks.image_streams(config, shard=shard, synthetic_like="cifar100")


def init_from_exists(path):
    """A one-line error unless `path` (--init-from) names a file."""
    if not path:
        raise KbenchError("pass --init-from PATH, a model.keras another recipe saved (e.g. "
                          "`python recipes/cifar_resnet.py` writes "
                          "runs/cifar_resnet/<backend>/model.keras)")
    if os.path.isdir(path):
        raise KbenchError(f"--init-from {path} is a folder: point to the model.keras in it")
    if not os.path.isfile(path):
        raise KbenchError(f"--init-from {path}: no such file")


def check_inputs(config):
    """What must exist before training (the recipe contract's optional part, which `kbench
    compare` calls once before any run): the --init-from file, and the data."""
    init_from_exists(config.init_from)
    tasks.check_data(config)


def load_pretrained(path):
    """The trained model at `path`; a missing or unreadable file is a one-line error."""
    init_from_exists(path)
    try:
        return load_model(path)
    except KbenchError as exc:
        raise KbenchError(f"--init-from {exc}") from None


def with_new_head(pretrained, num_classes, seed=0):
    """`pretrained` up to its last Dense layer's input, then a new classifier."""
    dense = [layer for layer in pretrained.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise KbenchError(f"model {pretrained.name!r} has no Dense classifier to replace")
    features = dense[-1].input
    logits = keras.layers.Dense(num_classes, kernel_initializer=PortableNormal(seed, scale=1.0),
                                dtype="float32", name="logits")(features)
    return keras.Model(pretrained.inputs, logits, name=f"{pretrained.name}_finetuned")


def build_model(config):
    """The --init-from network with a new head for this data set's classes."""
    if config.model:
        raise KbenchError("finetune takes its network from --init-from; drop --model")
    image_shape, num_classes = data.image_info(config.dataset, synthetic_like="cifar100")
    pretrained = load_pretrained(config.init_from)
    if len(pretrained.inputs) != 1:  # input_shape would be a list, one shape per input
        raise KbenchError(f"--init-from {config.init_from} takes {len(pretrained.inputs)} "
                          "inputs; finetune trains a model of one image input")
    if tuple(pretrained.input_shape[1:]) != image_shape:
        raise KbenchError(f"--init-from {config.init_from} takes inputs of shape "
                          f"{tuple(pretrained.input_shape[1:])}, --dataset {config.dataset} "
                          f"has images of shape {image_shape}")
    return with_new_head(pretrained, num_classes, seed=config.seed)


def freeze_all_but_head(model):
    """Stage 1: only the last layer (the head) trains."""
    model.trainable = True
    for layer in model.layers:
        layer.trainable = layer is model.layers[-1]


def unfreeze_all_but_batchnorm(model):
    """Stage 2: every layer trains but BatchNormalization, which stays in inference mode.

    Each layer is set one by one: under TensorFlow, `model.trainable = True` on a model that
    is already trainable does nothing (TF's attribute tracking skips assigning the value an
    attribute already holds), so its frozen layers would stay frozen.
    """
    model.trainable = True
    for layer in _all_layers(model):  # outer layers before the layers they hold
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        yield from _all_layers(layer) if hasattr(layer, "layers") else ()


def main(config, model=None, datasets=None, callbacks=()):
    """Fine-tune in two stages and evaluate; returns the metrics dict that metrics.json holds.

    `model` (a keras.Model taking 0..255 pixels whose last layer is its classifier) and
    `datasets` (a (train, test) pair of Streams or tf.data pipelines yielding one-hot labels)
    replace the defaults. `callbacks` see both stages; the reported step times are the last
    stage's. Each `run.fit` is a stage with its own optimizer: epochs are numbered across
    both (stage 2 follows stage 1 in history.csv), every epoch is checkpointed, and
    `--resume` continues in the stage the checkpoint is from (early stopping ends a stage).
    """
    run = Run(config, "finetune", callbacks)  # its settings checked, nothing set up yet
    if model is None:  # before the output folder is locked and the data loaded, not after
        init_from_exists(config.init_from)
    with run:  # devices, seed, dtype policy, resume
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)
        model = run.model(build_model, given=model)
        freeze_all_but_head(model)  # stage 1: the new head learns the new classes
        run.fit(model, train_ds, test_ds, epochs=config.head_epochs, lr=config.lr)
        unfreeze_all_but_batchnorm(model)  # stage 2: everything but BatchNorm, gently
        run.fit(model, train_ds, test_ds, epochs=config.epochs, lr=config.finetune_lr)
        return run.finish(model, init_from=config.init_from, head_epochs=config.head_epochs,
                          finetune_epochs=config.epochs)


if __name__ == "__main__":
    run_recipe(main, Config, description=__doc__.split("\n")[0])
