"""Train a ResNet on CIFAR-10 / CIFAR-100 under JAX, TensorFlow or PyTorch.

    KERAS_BACKEND=jax python recipes/cifar_resnet.py --data-dir ~/data/cifar
    KERAS_BACKEND=torch python recipes/cifar_resnet.py --dataset synthetic --epochs 1

The same file trains under every backend: Keras 3 reads KERAS_BACKEND once, at import. The
story, top to bottom:

1. Data: CIFAR arrays (from a TFDS dir, the published archive or its folder) become a tf.data
   pipeline that shuffles, augments whole batches (random crop + flip, optional cutout) and
   prefetches. tf.data feeds all three backends.
2. Model: a ResNet from the kbench registry (ResNet-20 by default, He et al. 2016). It takes
   raw 0..255 pixels; normalisation is its first layer, so the saved model needs nothing else.
3. Training (`main`, through kbench's `Run`): `run.fit` compiles the model with SGD with
   Nesterov momentum, linear warmup then cosine decay, label smoothing and weight decay on
   kernels (XLA where Keras' `jit_compile="auto"` picks it), then calls `model.fit`; the Run
   owns devices, seeding, checkpoints (`--resume`) and timing.
4. Results in --output-dir: metrics.json, history.csv (one row per epoch), model.keras.

As a template: `main(config, model=my_model, datasets=(train_ds, test_ds))` trains your own
network and/or data with everything else unchanged.
"""

import dataclasses

import kbench  # validates KERAS_BACKEND and registers kbench layers; import before keras
from kbench import data, tasks
from kbench.config import NON_NEGATIVE, TrainConfig, option
from kbench.flags import run_recipe
from kbench.models import IMAGE_MODELS, get_model
from kbench.train import Run


@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = option("cifar10", "dataset", choices=data.DATASETS)
    model: str = option("resnet20", "model name (for CIFAR: resnet20/32/44/56/110, "
                                    "preact_resnet18, resnet9)", allowed=IMAGE_MODELS)
    epochs: int = option(30, "training epochs")
    batch_size: int = option(128, "global batch size")
    lr: float = option(0.1, "peak learning rate (SGD, batch 128)")
    augment: bool = option(True, "random crop (4 px padding) and horizontal flip")
    cutout: int = option(0, "cutout square size in pixels (0: off)", allowed=NON_NEGATIVE)


def build_datasets(config, shard=(0, 1)):
    """(train, test) Streams of (float32 pixels, one-hot labels); `shard` is this process's
    part of every training batch under data-parallel training (kbench.distribute)."""
    return tasks.image_streams(config, shard=shard)


check_inputs = tasks.check_data  # the data is there: kbench compare asks once, before any run


def build_model(config):
    return get_model(config.model, num_classes=data.num_classes(config.dataset),
                     seed=config.seed)


def main(config, model=None, datasets=None, callbacks=()):
    """Train and evaluate; returns the metrics dict that metrics.json holds.

    `model` (a compiled or uncompiled keras.Model taking 0..255 pixels) and `datasets` (a
    (train, test) pair of Streams or tf.data pipelines yielding one-hot labels) replace the
    defaults; `callbacks` are Keras callbacks added to fit's.
    """
    with Run(config, "cifar_resnet", callbacks) as run:  # devices, seed, dtype policy, resume
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)
        model = run.model(build_model, given=model)
        run.fit(model, train_ds, test_ds)  # compile (SGD, schedule, loss), then model.fit
        return run.finish(model)  # evaluate; metrics.json, eval.json, model.keras


if __name__ == "__main__":
    run_recipe(main, Config, description=__doc__.split("\n")[0])
