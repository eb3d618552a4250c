"""The data sets kbench trains on, as (train, test) Streams, from kbench alone.

A recipe's `build_datasets` is one call here, and `kbench evaluate` rebuilds a saved model's
test split with the same functions, so neither depends on a recipe module:

- `image_streams(config)`: CIFAR-10/100, MNIST, Fashion-MNIST, digits or synthetic images,
  augmented as the config asks (`augment`, `crop_padding`, `cutout`, where it has them).
- `text_streams(config)`: IMDB or the synthetic text task, as token ids.
- `test_stream(dataset, model, settings)`: the test split a saved model is evaluated on.
- `check_data(config)`: that the data the two above would load is there, without loading it.

`config` is any object with a recipe Config's data fields: dataset, data_dir, download,
train_examples, test_examples, seed, batch_size (and vocab_size, sequence_length for text).
"""

from kbench import data
from kbench.errors import KbenchError

EVAL_BATCH_SIZE = 128  # when a saved run does not say; evaluation results do not depend on it


def check_data(config):
    """The data `image_streams` / `text_streams` would load is where they would read it (or
    is to be downloaded), found without reading it; else the loader's one-line error. A
    recipe that loads through them offers this as its `check_inputs` (the recipe contract's
    optional check, which kbench compare runs once before any run)."""
    data.check_data(config.dataset, config.data_dir, config.download)


def image_streams(config, shard=(0, 1), synthetic_like="cifar10", synthetic_shape=None,
                  test_only=False):
    """(train, test) Streams of (float32 raw pixels, one-hot labels) for `config.dataset`.

    `synthetic` is shaped like `synthetic_like` (or `synthetic_shape=(shape, classes)`).
    `shard` is this process's part of every training batch under data-parallel training
    (kbench.distribute); evaluation is never sharded. `test_only`: train is None (an
    evaluation, whose batch size need not fit the training split).
    """
    arrays = data.load_images(config.dataset, config.data_dir, download=config.download,
                              train_examples=config.train_examples,
                              test_examples=config.test_examples, seed=config.seed,
                              synthetic_like=synthetic_like, synthetic_shape=synthetic_shape)
    test = data.make_pipeline(arrays.x_test, arrays.y_test, arrays.num_classes,
                              config.batch_size, training=False)
    if test_only:
        return None, test
    train = data.make_pipeline(arrays.x_train, arrays.y_train, arrays.num_classes,
                               config.batch_size, training=True, seed=config.seed,
                               augment=getattr(config, "augment", False),
                               crop_padding=getattr(config, "crop_padding", 4),
                               cutout=getattr(config, "cutout", 0), shard=shard)
    return train, test


def text_streams(config, shard=(0, 1), test_only=False):
    """(train, test) Streams of (int32 token ids, one-hot labels) for `config.dataset`;
    `test_only` as for image_streams."""
    arrays = data.load_text_dataset(config.dataset, config.data_dir, download=config.download,
                                    train_examples=config.train_examples,
                                    test_examples=config.test_examples, seed=config.seed,
                                    vocab_size=config.vocab_size,
                                    sequence_length=config.sequence_length)
    return data.make_text_datasets(arrays, config.batch_size, seed=config.seed, shard=shard,
                                   test_only=test_only)


def test_stream(dataset, model, settings):
    """The test split of `dataset` that `model` is evaluated on, built as training built it.

    `settings`: the saved run's settings (data_dir, test_examples, batch_size, seed,
    train_examples, vocab_size, sequence_length ...), missing ones defaulted. A model that
    takes token ids gets a text task; `synthetic` takes its shape from the model (image
    shape and classes, or sequence length and vocabulary), so it is the stand-in the model
    was trained on.
    """
    import types

    from kbench.models.saving import vocab_size

    takes_ids = "int" in str(model.inputs[0].dtype)
    known = (data.TEXT_DATASETS if takes_ids else data.IMAGE_DATASETS)
    if dataset not in known:
        everything = set(data.IMAGE_DATASETS) | set(data.TEXT_DATASETS)
        what = "token ids" if takes_ids else "images"
        named = (f"dataset {dataset!r} holds {'images' if takes_ids else 'token ids'}, "
                 f"not the {what} this model takes" if dataset in everything else
                 f"kbench has no dataset {dataset!r}")
        raise KbenchError(f"{named} (for {what} it knows: {', '.join(known)}); for your own "
                          "data pass --recipe path/to/recipe.py, whose build_datasets makes it")
    config = types.SimpleNamespace(
        dataset=dataset, data_dir=settings.get("data_dir"), download=settings.get("download", False),
        train_examples=settings.get("train_examples"), test_examples=settings.get("test_examples"),
        seed=settings.get("seed", 0), batch_size=settings.get("batch_size") or EVAL_BATCH_SIZE)
    if takes_ids:
        length = model.inputs[0].shape[1] if len(model.inputs[0].shape) == 2 else None
        config.sequence_length = settings.get("sequence_length") or length or 200
        config.vocab_size = settings.get("vocab_size") or vocab_size(model) or 20_000
        return text_streams(config, test_only=True)[1]
    shape = (tuple(model.inputs[0].shape[1:]), int(model.outputs[0].shape[-1]))
    return image_streams(config, synthetic_shape=shape, test_only=True)[1]
