"""A test recipe whose host memory grows linearly with the batch: the small convnet on the
digits, plus `ballast_mb_per_example` MB per example of the batch held (and touched, so it is
resident) for the whole run. Its true memory limit under a cap is known to within the
baseline's noise, which tests of `kbench compare --max-memory` / `--max-batch` rely on."""

import dataclasses

import numpy as np

import kbench  # noqa: F401  (validates KERAS_BACKEND, registers layers)
from kbench import data, tasks
from kbench.config import NON_NEGATIVE, TrainConfig, option
from kbench.models import get_model
from kbench.train import Run

BALLAST = []  # alive until the interpreter ends


@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = option("digits", "digits or synthetic")
    model: str = option("convnet", "model name from kbench.models")
    batch_size: int = option(16, "global batch size")
    optimizer: str = option("adam", "optimizer")
    lr: float = option(3e-3, "peak learning rate")
    ballast_mb_per_example: int = option(16, "host MB held per example of the batch",
                                         allowed=NON_NEGATIVE)


def build_datasets(config, shard=(0, 1)):
    BALLAST.append(np.ones(config.batch_size * config.ballast_mb_per_example * 2**20 // 8))
    return tasks.image_streams(config, shard=shard, synthetic_like="mnist")


def build_model(config):
    image_shape, num_classes = data.image_info(config.dataset, synthetic_like="mnist")
    return get_model(config.model, num_classes=num_classes, input_shape=image_shape,
                     seed=config.seed)


def main(config, model=None, datasets=None, callbacks=()):
    with Run(config, "memory_recipe", callbacks) as run:
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)
        model = run.model(build_model, given=model)
        run.fit(model, train_ds, test_ds)
        return run.finish(model)
