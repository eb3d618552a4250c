"""Image data sets by name: which exist, their shapes and classes, and `load_dataset`."""

import dataclasses

import numpy as np

from kbench.data.cifar import CIFAR, find_cifar, load_cifar
from kbench.data.mnist import MNIST, find_mnist, load_digits, load_mnist
from kbench.data.synthetic import load_synthetic
from kbench.errors import KbenchError


DATASETS = ("cifar10", "cifar100", "synthetic")  # the CIFAR-shaped image data sets


IMAGE_DATASETS = DATASETS + ("mnist", "fashion_mnist", "digits")  # every name load_dataset knows


TEXT_DATASETS = ("imdb", "synthetic")  # what load_text_dataset knows


# Image shape and class count of each real image data set, known without loading it.
IMAGE_INFO = {
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "digits": ((8, 8, 1), 10),
}


@dataclasses.dataclass
class Dataset:
    """Arrays of one dataset, as every recipe consumes them."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])


def load_dataset(name, data_dir=None, download=False, train_examples=None, test_examples=None,
                 seed=0):
    """Load a dataset by name. `train_examples`/`test_examples` take the first N examples of a
    real dataset (a deterministic subset, asked for explicitly) and set the synthetic sizes."""
    if name == "synthetic":
        return load_images("synthetic", train_examples=train_examples,
                           test_examples=test_examples, seed=seed)
    if name in CIFAR:
        train, test = load_cifar(name, data_dir, download=download)
    elif name in MNIST:
        (x_train, y_train), (x_test, y_test) = load_mnist(name, data_dir, download=download)
        train = (x_train[..., None], y_train.reshape(-1, 1))  # NHWC, (N, 1) labels
        test = (x_test[..., None], y_test.reshape(-1, 1))
    elif name == "digits":
        train, test = load_digits()
    else:
        raise KbenchError(f"unknown dataset {name!r}; use one of: {', '.join(IMAGE_DATASETS)}")
    (x_train, y_train), (x_test, y_test) = (first_examples(name, "train", train, train_examples),
                                            first_examples(name, "test", test, test_examples))
    return Dataset(name, x_train, y_train, x_test, y_test, IMAGE_INFO[name][1])


def check_data(name, data_dir=None, download=False):
    """The one-line KbenchError a run would end with when the real data set `name` is not
    where it would be read from (and is not to be downloaded), found without reading it:
    for work that checks before it starts (kbench compare, before its first run). Names no
    loader knows (synthetic, digits, a recipe's own) pass: the run says what is wrong."""
    if name in CIFAR:
        find_cifar(name, data_dir, download)
    elif name in MNIST:
        find_mnist(name, data_dir, download)
    elif name == "imdb":
        from kbench.data.text import find_imdb  # (kbench.data.text imports this module)

        find_imdb(data_dir, download)


def first_examples(name, split, arrays, wanted):
    """The first `wanted` examples of a real dataset's split (all of them when None), as
    `--train-examples` / `--test-examples` ask. Asking for more than the split holds takes
    the whole split, with a note: the run's config still says the number asked for."""
    held = len(arrays[0])
    if wanted and wanted > held:
        print(f"note: {name} has {held} {split} examples, fewer than the {wanted} asked for "
              f"(--{split}-examples): all {held} are used", flush=True)
    return tuple(a[:wanted] for a in arrays) if wanted else tuple(arrays)


def load_images(name, data_dir=None, download=False, train_examples=None, test_examples=None,
                seed=0, synthetic_like="cifar10", synthetic_shape=None):
    """`load_dataset`, with `synthetic` shaped like the real data set `synthetic_like` (its image
    shape and number of classes), so a recipe's synthetic stand-in fits the model it trains;
    `synthetic_shape=(image_shape, num_classes)` gives the shape directly instead."""
    if name != "synthetic":
        return load_dataset(name, data_dir, download=download, train_examples=train_examples,
                            test_examples=test_examples, seed=seed)
    shape, classes = synthetic_shape or image_info(synthetic_like)
    (x_train, y_train), (x_test, y_test) = load_synthetic(
        num_classes=classes, train_examples=train_examples or 10_000,
        test_examples=test_examples or 2_000, image_shape=shape, seed=seed)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes=classes)


def image_info(name, synthetic_like="cifar10"):
    """(image shape (H, W, C), number of classes) of an image data set, without loading it."""
    if name == "synthetic":
        name = synthetic_like
    if name not in IMAGE_INFO:
        raise KbenchError(f"unknown dataset {name!r}; use one of: {', '.join(IMAGE_DATASETS)}")
    return IMAGE_INFO[name]


def num_classes(name):
    """Number of classes of a dataset, known without loading it."""
    if name == "synthetic":
        return 10
    if name in CIFAR:
        return CIFAR[name]["num_classes"]
    if name in IMAGE_INFO:
        return IMAGE_INFO[name][1]
    if name == "imdb":
        return 2
    raise KbenchError(f"unknown dataset {name!r}; use one of: "
                      f"{', '.join(IMAGE_DATASETS + TEXT_DATASETS[:-1])}")


# Class names in label order, as the published data sets define them (CIFAR-100: the 100
# fine labels, in the order of the archive's `fine_label_names`).
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
    "cifar100": (
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
        "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
        "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
        "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
        "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
        "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
        "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
        "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
        "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
        "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
        "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    ),
    "mnist": tuple(str(d) for d in range(10)),
    "digits": tuple(str(d) for d in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "imdb": ("negative", "positive"),
}


def class_names(name):
    """The class names of a dataset in label order, or None where classes have no names
    (`synthetic`: its classes are just numbered)."""
    if name == "synthetic":
        return None
    if name not in CLASS_NAMES:
        raise KbenchError(f"unknown dataset {name!r}; use one of: "
                          f"{', '.join(IMAGE_DATASETS + TEXT_DATASETS[:-1])}")
    return list(CLASS_NAMES[name])
