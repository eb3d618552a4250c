"""Datasets -> NumPy arrays -> tf.data pipelines that feed all three backends.

Sources:
- `cifar10`, `cifar100`: `load_cifar` reads a TFDS data dir, the published
  `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` archive, or its extracted folder, and
  returns the same arrays as `keras.datasets.cifar10.load_data()`.
- `mnist`, `fashion_mnist`: `load_mnist` reads a TFDS data dir, keras' `mnist.npz`, or the
  published IDX files (`train-images-idx3-ubyte.gz`, ...) and returns the arrays
  `keras.datasets.mnist.load_data()` gives.
- `digits`: the 8x8 handwritten digits scikit-learn ships (a fixed stratified split): real data
  that needs no download.
- `imdb` (text): keras' `imdb.npz` (the arrays `keras.datasets.imdb.load_data()` gives) or a
  TFDS data dir with `imdb_reviews` (tokenized with TextVectorization in tf.data).
- `synthetic`: deterministic, learnable, any size, shaped like the real data set a recipe
  trains on (`synthetic_like=`), and a synthetic text task; used only when asked for.

Missing data is a one-line error naming `--data-dir` and `--dataset synthetic`; nothing is
downloaded unless the caller passes `download=True` (recipes: `--download`).
"""

import dataclasses
import glob
import hashlib
import io
import os
import pickle
import re
import socket
import struct
import tarfile
import tempfile
import urllib.request
import zipfile

import numpy as np

from kbench.errors import KbenchError

# What the published archives hold; sha256 digests as keras.datasets checks them.
CIFAR = {
    "cifar10": dict(
        title="CIFAR-10",
        num_classes=10,
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_pattern=r"data_batch_\d+",
        test_files=("test_batch",),
        label_key=b"labels",
        label_dtype=np.uint8,  # keras.datasets.cifar10 returns uint8 labels
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    ),
    "cifar100": dict(
        title="CIFAR-100",
        num_classes=100,
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_pattern=r"train",
        test_files=("test",),
        label_key=b"fine_labels",
        label_dtype=np.int64,  # keras.datasets.cifar100 returns int64 labels
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    ),
}

DATASETS = ("cifar10", "cifar100", "synthetic")  # what the CIFAR ResNet recipe trains on
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


def default_data_dirs():
    """Where CIFAR is looked for when no data dir is given, in order."""
    dirs = []
    if os.environ.get("KBENCH_DATA_DIR"):
        dirs.append(os.environ["KBENCH_DATA_DIR"])
    dirs.append(os.path.expanduser("~/.keras/datasets"))  # keras.datasets' cache
    dirs.append(os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")))
    return dirs


# --------------------------------------------------------------------------- CIFAR


def load_cifar(name, data_dir=None, download=False):
    """CIFAR-10/100 as `((x_train, y_train), (x_test, y_test))`, NHWC uint8 images.

    `data_dir` may be a TFDS data dir, a folder holding the published archive or its
    extracted folder, the archive itself, or the extracted folder itself. Labels have shape
    (N, 1) with keras.datasets' dtypes. Archive and folder sources give exactly the arrays
    `keras.datasets.cifar10.load_data()` gives; TFDS gives TFDS' example order.
    """
    if name not in CIFAR:
        raise KbenchError(f"unknown CIFAR dataset {name!r}; use one of: {', '.join(CIFAR)}")
    spec = CIFAR[name]
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        source = _find_cifar_source(name, os.path.expanduser(directory))
        if source:
            kind, path = source
            if kind == "tfds":
                return _load_tfds(name, path)
            return _load_pickled(spec, path, from_archive=(kind == "archive"))
    if download:
        target = os.path.expanduser(data_dir or default_data_dirs()[0])
        return _load_pickled(spec, _download(spec, target), from_archive=True)
    where = data_dir or ", ".join(searched)
    raise KbenchError(
        f"{spec['title']} not found in {where}: pass --data-dir DIR holding {spec['archive']} "
        f"(or its extracted {spec['folder']}/, or a TFDS data dir), add --download to fetch it, "
        "or use --dataset synthetic to run without data"
    )


def _find_cifar_source(name, path):
    """('archive' | 'folder' | 'tfds', path) for the first CIFAR source found at path, or None."""
    spec = CIFAR[name]
    if os.path.isfile(path):
        return ("archive", path) if tarfile.is_tarfile(path) else None
    if not os.path.isdir(path):
        return None
    if _is_cifar_folder(spec, path):
        return ("folder", path)
    for folder in (
        os.path.join(path, spec["folder"]),
        # keras.datasets' cache (~/.keras/datasets) extracts into a folder of the same name.
        os.path.join(path, spec["folder"], spec["folder"]),
    ):
        if _is_cifar_folder(spec, folder):
            return ("folder", folder)
    for archive in (os.path.join(path, spec["archive"]),
                    os.path.join(path, spec["folder"] + "_archive")):  # keras.datasets' cache
        if os.path.isfile(archive):
            return ("archive", archive)
    # A prepared TFDS dataset: <data_dir>/<name>/<version>/dataset_info.json. Checked by file
    # so that a missing dataset never reaches TFDS' (slow, network-bound) builder lookup.
    if glob.glob(os.path.join(path, name, "*", "dataset_info.json")):
        return ("tfds", path)
    return None


def _is_cifar_folder(spec, path):
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, f)) for f in spec["test_files"]
    )


def _batch_order(filename):
    """Sort data_batch_1 .. data_batch_10 numerically, not as strings."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(filename))]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; rebuilding them needs numpy's array globals and nothing else.
    Refusing every other global keeps a tampered file from running code (as keras.datasets)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _decode_batch(spec, raw):
    """One pickled CIFAR batch -> (NHWC uint8 images, labels)."""
    batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(batch[spec["label_key"]], dtype=spec["label_dtype"])
    return images, labels


def _load_pickled(spec, path, from_archive):
    """Read the published python-pickle format, from the .tar.gz or its extracted folder."""
    train, test = [], []
    try:
        if from_archive:
            with tarfile.open(path, "r:*") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                raw = {n: tar.extractfile(m).read() for n, m in members.items()}
        else:
            raw = {}
            for entry in os.listdir(path):
                full = os.path.join(path, entry)
                if os.path.isfile(full):
                    raw[entry] = full  # read lazily below
        train_names = sorted((n for n in raw if re.fullmatch(spec["train_pattern"], n)),
                             key=_batch_order)
        if not train_names:
            raise KbenchError(f"{path} holds no {spec['title']} training batches "
                              f"(expected files like {spec['train_pattern']!r})")
        for names, out in ((train_names, train), (spec["test_files"], test)):
            for n in names:
                content = raw[n]
                if not from_archive:
                    with open(content, "rb") as f:
                        content = f.read()
                out.append(_decode_batch(spec, content))
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        if isinstance(exc, KbenchError):
            raise
        raise KbenchError(f"{path} is not a readable {spec['title']} archive or folder "
                          f"({type(exc).__name__}: {exc}); re-download {spec['archive']}") from None

    def stack(parts):
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts]).reshape(-1, 1)
        return np.ascontiguousarray(x), y

    return stack(train), stack(test)


def _load_tfds(name, data_dir):
    return _tfds_arrays(name, data_dir, CIFAR[name]["label_dtype"])


def _tfds_arrays(name, data_dir, label_dtype):
    """((x_train, y_train), (x_test, y_test)) of a prepared TFDS image data set, (N, 1) labels."""
    import tensorflow_datasets as tfds

    splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, as_supervised=True,
                       download=False, shuffle_files=False)

    def to_numpy(split):
        # Batched iteration, not batch_size=-1: the latter needs split sizes up front.
        xs, ys = zip(*tfds.as_numpy(split.batch(4096)))
        return (np.concatenate(xs).astype(np.uint8),
                np.concatenate(ys).astype(label_dtype).reshape(-1, 1))

    return tuple(to_numpy(split) for split in splits)


def _tfds_prepared(path, name):
    """Whether `path` is a TFDS data dir where `name` is prepared (<name>/[<config>/]<version>/).
    Checked by file so that a missing data set never reaches TFDS' network-bound builder lookup."""
    return bool(glob.glob(os.path.join(path, name, "*", "dataset_info.json"))
                or glob.glob(os.path.join(path, name, "*", "*", "dataset_info.json")))


def _network_answers(url, timeout=3.0):
    host = urllib.request.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download(spec, target_dir):
    """Fetch the published archive into target_dir (atomically, checksum verified)."""
    if not _network_answers(spec["url"]):
        raise KbenchError(
            f"cannot reach {urllib.request.urlparse(spec['url']).hostname} to download "
            f"{spec['title']}: copy {spec['archive']} into a folder and pass --data-dir, "
            "or use --dataset synthetic"
        )
    os.makedirs(target_dir, exist_ok=True)
    final = os.path.join(target_dir, spec["archive"])
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".part")
    os.close(fd)
    try:
        print(f"downloading {spec['url']} -> {final}")
        urllib.request.urlretrieve(spec["url"], tmp)
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != spec["sha256"]:
            raise KbenchError(f"download of {spec['archive']} is corrupt (sha256 {digest}); retry")
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


# --------------------------------------------------------------------------- MNIST, digits

_KERAS_DATASETS = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# The published IDX files (yann.lecun.com, zalandoresearch); both data sets use these names.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST = {
    "mnist": dict(title="MNIST", npz="mnist.npz", folders=("mnist",), tfds="mnist",
                  archive="mnist.npz", url=_KERAS_DATASETS + "mnist.npz",
                  sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"),
    # keras.datasets.fashion_mnist caches the IDX files in ~/.keras/datasets/fashion-mnist/.
    "fashion_mnist": dict(title="Fashion-MNIST", npz=None,
                          folders=("fashion-mnist", "fashion_mnist"), tfds="fashion_mnist"),
}


def load_mnist(name="mnist", data_dir=None, download=False):
    """MNIST or Fashion-MNIST as `((x_train, y_train), (x_test, y_test))`: (N, 28, 28) uint8
    images and (N,) uint8 labels, the arrays `keras.datasets.mnist.load_data()` gives.

    `data_dir` may be a TFDS data dir, keras' `mnist.npz` (or a folder holding it), or a folder
    holding the four published IDX files (`train-images-idx3-ubyte.gz`, ..., gzipped or not),
    directly or in a `mnist/` / `fashion-mnist/` subfolder as keras.datasets caches them.
    Without `data_dir`, the default data dirs are searched (bare IDX files only in a folder
    named after the data set, since MNIST and Fashion-MNIST use the same file names).
    """
    if name not in MNIST:
        raise KbenchError(f"unknown MNIST data set {name!r}; use one of: {', '.join(MNIST)}")
    spec = MNIST[name]
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        source = _find_mnist_source(spec, os.path.expanduser(directory), explicit=bool(data_dir))
        if source:
            kind, path = source
            if kind == "tfds":
                (x_train, y_train), (x_test, y_test) = _tfds_arrays(spec["tfds"], path, np.uint8)
                return (x_train[..., 0], y_train[:, 0]), (x_test[..., 0], y_test[:, 0])
            return _load_mnist_npz(spec, path) if kind == "npz" else _load_idx_folder(spec, path)
    if download and "url" in spec:
        target = os.path.expanduser(data_dir or default_data_dirs()[0])
        return _load_mnist_npz(spec, _download(spec, target))
    where = data_dir or ", ".join(searched)
    npz = f", {spec['npz']}" if spec["npz"] else ""
    fetch = ", add --download to fetch it" if "url" in spec else ""
    raise KbenchError(
        f"{spec['title']} not found in {where}: pass --data-dir DIR holding the four IDX files "
        f"(train-images-idx3-ubyte.gz, ...){npz} or a TFDS data dir{fetch}, "
        "or use --dataset digits (ships with scikit-learn) or --dataset synthetic to run "
        "without a download"
    )


def _find_mnist_source(spec, path, explicit):
    """('npz' | 'idx' | 'tfds', path) for the first source found at `path`, or None."""
    if os.path.isfile(path):
        return ("npz", path) if zipfile.is_zipfile(path) else None
    if not os.path.isdir(path):
        return None
    candidates = [os.path.join(path, f) for f in spec["folders"]]
    if explicit:
        candidates.insert(0, path)
    for folder in candidates:
        if all(_idx_path(folder, f) for f in IDX_FILES):
            return ("idx", folder)
    if spec["npz"] and os.path.isfile(os.path.join(path, spec["npz"])):
        return ("npz", os.path.join(path, spec["npz"]))
    if _tfds_prepared(path, spec["tfds"]):
        return ("tfds", path)
    return None


def _idx_path(folder, stem):
    for candidate in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def read_idx(path):
    """One IDX file (the format MNIST is published in), gzipped or not, as a uint8 array.

    Header: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, then each
    dimension as a big-endian uint32; the data follow.
    """
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{os.path.basename(path)} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    values = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{os.path.basename(path)} holds {values.size} values, "
                         f"its header says {'x'.join(map(str, dims))}")
    return values.reshape(dims)


def _load_idx_folder(spec, folder):
    try:
        x_train, y_train, x_test, y_test = (read_idx(_idx_path(folder, f)) for f in IDX_FILES)
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError("image and label files hold different numbers of examples")
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise KbenchError(f"{folder} holds unreadable {spec['title']} IDX files "
                          f"({type(exc).__name__}: {exc}); re-download them") from None
    return (x_train, y_train), (x_test, y_test)


def _load_mnist_npz(spec, path):
    try:
        with np.load(path, allow_pickle=False) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise KbenchError(f"{path} is not a readable {spec['title']} .npz "
                          f"({type(exc).__name__}: {exc}); re-download {spec['npz']}") from None


def load_digits(test_fraction=0.25):
    """The 1797 8x8 handwritten digits scikit-learn ships (UCI optical recognition of digits),
    as ((x_train, y_train), (x_test, y_test)): (N, 8, 8, 1) uint8 images scaled from their
    0..16 intensities to 0..255, (N, 1) uint8 labels. The split is fixed and stratified (every
    digit in the same proportion in both parts): 1347 training and 450 test examples."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.uint8).reshape(-1, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=0)
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------------------- synthetic


def load_synthetic(num_classes=10, train_examples=10_000, test_examples=2_000,
                   image_shape=(32, 32, 3), seed=0):
    """A learnable stand-in for CIFAR: uint8 images, (N, 1) uint8 labels, same seed -> same arrays.

    Each class has a smooth random colour pattern; an example is its class pattern at a random
    contrast plus per-pixel noise, so a model must average over many pixels to classify it and
    flips/crops keep the task solvable. It is no substitute for real data: use it to check that
    code runs and learns, and to time it.
    """
    rng = np.random.default_rng(seed)
    height, width, channels = image_shape
    coarse = rng.normal(size=(num_classes, 4, 4, channels))
    patterns = coarse.repeat(-(-height // 4), axis=1).repeat(-(-width // 4), axis=2)
    patterns = patterns[:, :height, :width]

    def make(n):
        labels = rng.integers(0, num_classes, size=n)
        contrast = rng.uniform(0.25, 1.0, size=(n, 1, 1, 1))
        noise = rng.normal(size=(n, height, width, channels)).astype(np.float32)
        images = 128.0 + 48.0 * contrast * patterns[labels] + 48.0 * noise
        return (np.clip(images, 0, 255).astype(np.uint8),
                labels.astype(np.uint8).reshape(-1, 1))

    return make(train_examples), make(test_examples)


# --------------------------------------------------------------------------- registry


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
    (x_train, y_train), (x_test, y_test) = train, test
    if train_examples:
        x_train, y_train = x_train[:train_examples], y_train[:train_examples]
    if test_examples:
        x_test, y_test = x_test[:test_examples], y_test[:test_examples]
    return Dataset(name, x_train, y_train, x_test, y_test, IMAGE_INFO[name][1])


def load_images(name, data_dir=None, download=False, train_examples=None, test_examples=None,
                seed=0, synthetic_like="cifar10"):
    """`load_dataset`, with `synthetic` shaped like the real data set `synthetic_like` (its image
    shape and number of classes), so a recipe's synthetic stand-in fits the model it trains."""
    if name != "synthetic":
        return load_dataset(name, data_dir, download=download, train_examples=train_examples,
                            test_examples=test_examples, seed=seed)
    shape, classes = image_info(synthetic_like)
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


# --------------------------------------------------------------------------- tf.data


def make_pipeline(images, labels, num_classes, batch_size, training, seed=0, augment=True,
                  crop_padding=4, cutout=0):
    """A tf.data pipeline of (float32 raw-pixel images, one-hot labels) batches.

    Training: an endless stream of epochs. Epoch e visits the examples in a permutation drawn
    from (seed, e) and drops its last partial batch; batch i is augmented as a whole
    (pad-and-random-crop, horizontal flip, optional cutout) with stateless ops seeded from
    (seed, i). The stream is a pure function of the seed: every new iterator replays it from
    the start, so JAX and PyTorch (where Keras peeks at one batch and restarts the iterator)
    see exactly the batches TensorFlow sees. `ds.steps_per_epoch` tells fit how long an
    epoch is. Evaluation: every example once, in order. Pixels stay 0..255: normalisation
    lives in the model.
    """
    import tensorflow as tf

    images = tf.constant(images)  # kept uint8: the pipeline moves indices, not pixels

    def pixels(index):
        return tf.cast(tf.gather(images, index), tf.float32)

    def augment_fn(x, batch_seed):
        return augment_batch(x, batch_seed, crop_padding, cutout)

    return _batched_stream(len(images), pixels, labels, num_classes, batch_size, training, seed,
                           augment_fn if augment else None)


def _batched_stream(n, inputs, labels, num_classes, batch_size, training, seed, transform=None):
    """What the image and text pipelines share: batches of (inputs(index), one-hot labels).

    Training: the endless, seeded stream of epochs make_pipeline describes, each batch passed
    through `transform(x, batch_seed)` when given; evaluation: every example once, in order.
    """
    import tensorflow as tf

    if batch_size < 1 or (training and batch_size > n):
        raise KbenchError(f"batch size {batch_size} is impossible for {n} examples; "
                          f"use --batch-size between 1 and {n}")
    labels = tf.constant(np.asarray(labels).reshape(-1).astype(np.int32))

    def gather(index):
        return inputs(index), tf.one_hot(tf.gather(labels, index), num_classes)

    if not training:
        ds = tf.data.Dataset.range(n).batch(batch_size)
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.argsort(keys)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)

    def gather_and_transform(step, index):
        x, y = gather(index)
        if transform is not None:
            x = transform(x, tf.stack([tf.constant(seed, tf.int64) + 1, step]))
        return x, y

    ds = tf.data.Dataset.counter().flat_map(epoch_batches).enumerate()
    ds = ds.map(gather_and_transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds.steps_per_epoch = n // batch_size
    return ds


def augment_batch(x, batch_seed, crop_padding=4, cutout=0):
    """Per-example random crop (after zero padding), horizontal flip and cutout, as batched ops."""
    import tensorflow as tf

    batch, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    # Three independent streams (crop, flip, cutout) from one batch seed.
    seeds = tf.random.experimental.stateless_split(batch_seed, num=3)
    seed = lambda k: seeds[k]  # noqa: E731
    if crop_padding:
        p = crop_padding
        padded = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        offsets = tf.random.stateless_uniform([batch, 2], seed(0), 0, 2 * p + 1, tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None, :]  # (B, H)
        cols = offsets[:, 1:] + tf.range(width)[None, :]  # (B, W)
        x = tf.gather(padded, rows, axis=1, batch_dims=1)
        x = tf.gather(x, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([batch], seed(1)) < 0.5
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if cutout:
        centers = tf.random.stateless_uniform([batch, 2], seed(2), 0, height, tf.int32)
        ys = tf.range(height)[None, :] - centers[:, :1]
        xs = tf.range(width)[None, :] - centers[:, 1:]
        half = cutout // 2
        inside_y = (ys >= -half) & (ys < cutout - half)
        inside_x = (xs >= -half) & (xs < cutout - half)
        hole = inside_y[:, :, None] & inside_x[:, None, :]
        x = tf.where(hole[..., None], tf.zeros_like(x), x)
    return x


def make_datasets(data, batch_size, seed=0, augment=True, cutout=0):
    """(train, test) pipelines for a Dataset."""
    train = make_pipeline(data.x_train, data.y_train, data.num_classes, batch_size, True,
                          seed=seed, augment=augment, cutout=cutout)
    test = make_pipeline(data.x_test, data.y_test, data.num_classes, batch_size, False)
    return train, test


# --------------------------------------------------------------------------- text

IMDB = dict(title="IMDB", npz="imdb.npz", tfds="imdb_reviews", archive="imdb.npz",
            url=_KERAS_DATASETS + "imdb.npz",
            sha256="69664113be75683a8fe16e3ed0ab59fda8886cb3cd7ada244f7d9544e4676b9f")


@dataclasses.dataclass
class TextDataset(Dataset):
    """Token ids (N, sequence_length) int32, padded with 0 at the front (keras' pad_sequences
    convention), and (N, 1) labels. Ids are < vocab_size; 0 is padding."""

    vocab_size: int = 0

    @property
    def sequence_length(self):
        return self.x_train.shape[1]


def load_text_dataset(name, data_dir=None, download=False, train_examples=None,
                      test_examples=None, seed=0, vocab_size=20_000, sequence_length=200):
    """A text classification data set as token ids: `imdb` or `synthetic`.

    IMDB from keras' imdb.npz is word ids as `keras.datasets.imdb.load_data(num_words=
    vocab_size)` gives them (1 starts a review, 2 is a rare word); from a TFDS dir
    (`imdb_reviews`) the reviews are tokenized with a TextVectorization layer adapted to the
    training split (1 is a rare word). Either way each review is cut to its last
    `sequence_length` tokens and padded with 0 in front, as `keras.utils.pad_sequences` does.
    """
    if name == "synthetic":
        train, test = load_synthetic_text(
            num_classes=2, vocab_size=vocab_size, sequence_length=sequence_length,
            train_examples=train_examples or 10_000, test_examples=test_examples or 2_000,
            seed=seed)
    elif name == "imdb":
        train, test = _load_imdb_ids(data_dir, download, vocab_size)
        if train_examples:
            train = (train[0][:train_examples], train[1][:train_examples])
        if test_examples:
            test = (test[0][:test_examples], test[1][:test_examples])
        train, test = ((pad_sequences(x, sequence_length), np.asarray(y).reshape(-1, 1))
                       for x, y in (train, test))
    else:
        raise KbenchError(f"unknown text dataset {name!r}; use one of: {', '.join(TEXT_DATASETS)}")
    (x_train, y_train), (x_test, y_test) = train, test
    return TextDataset(name, x_train, y_train, x_test, y_test, num_classes=2,
                       vocab_size=vocab_size)


def pad_sequences(sequences, length):
    """Sequences of ids -> (N, length) int32: keep the last `length` ids, pad with 0 in front
    (the defaults of keras.utils.pad_sequences: padding="pre", truncating="pre")."""
    out = np.zeros((len(sequences), length), np.int32)
    for row, sequence in zip(out, sequences):
        tail = np.asarray(sequence[-length:], np.int32)
        if len(tail):
            row[-len(tail):] = tail
    return out


def _load_imdb_ids(data_dir, download, vocab_size):
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        path = os.path.expanduser(directory)
        if os.path.isfile(path) and zipfile.is_zipfile(path):
            return load_imdb(path, num_words=vocab_size)
        if os.path.isfile(os.path.join(path, IMDB["npz"])):
            return load_imdb(os.path.join(path, IMDB["npz"]), num_words=vocab_size)
        if os.path.isdir(path) and _tfds_prepared(path, IMDB["tfds"]):
            return _imdb_tfds_ids(path, vocab_size)
    if download:
        target = os.path.expanduser(data_dir or default_data_dirs()[0])
        return load_imdb(_download(IMDB, target), num_words=vocab_size)
    raise KbenchError(
        f"IMDB not found in {data_dir or ', '.join(searched)}: pass --data-dir DIR holding "
        "imdb.npz (as keras.datasets.imdb downloads it) or a TFDS data dir with imdb_reviews, "
        "add --download to fetch imdb.npz, or use --dataset synthetic to run without data"
    )


def load_imdb(path, num_words=None, seed=113, start_char=1, oov_char=2, index_from=3):
    """keras' imdb.npz as `keras.datasets.imdb.load_data(path, num_words=...)` reads it:
    the same shuffle (seed 113), start mark, id offset and rare-word id, so the same arrays:
    object arrays of lists of word ids and int64 labels. The ragged arrays are pickles;
    only numpy's array globals may be unpickled, so a tampered file cannot run code."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {os.path.splitext(m)[0]: _read_npy(archive.read(m))
                      for m in archive.namelist() if m.endswith(".npy")}
        splits = [(arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        raise KbenchError(f"{path} is not a readable IMDB imdb.npz "
                          f"({type(exc).__name__}: {exc}); re-download it") from None
    rng = np.random.RandomState(seed)
    shuffled = []
    for x, y in splits:
        order = np.arange(len(x))
        rng.shuffle(order)
        shuffled.append((x[order], y[order]))
    (x_train, y_train), (x_test, y_test) = shuffled
    xs = [[start_char] + [w + index_from for w in x] for x in (*x_train, *x_test)]
    num_words = num_words or max(max(x) for x in xs)
    xs = [[w if w < num_words else oov_char for w in x] for x in xs]
    split = len(x_train)
    return ((np.array(xs[:split], dtype="object"), y_train),
            (np.array(xs[split:], dtype="object"), y_test))


def _read_npy(raw):
    """One .npy member: numeric arrays without pickle, object arrays with numpy globals only."""
    buffer = io.BytesIO(raw)
    try:
        return np.lib.format.read_array(buffer, allow_pickle=False)
    except ValueError:
        buffer.seek(0)
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(buffer)
        else:
            np.lib.format.read_array_header_2_0(buffer)  # 3.0 differs only in its encoding
        return _NumpyOnlyUnpickler(buffer).load()


def _standardize_review(text, label):
    """Lower case, `<br />` line breaks and punctuation to spaces: a tf.data step, so that it
    runs the same under every Keras backend (Keras hands a callable `standardize` NumPy
    strings outside TensorFlow, which cannot run inside tf.data)."""
    import tensorflow as tf

    text = tf.strings.regex_replace(tf.strings.lower(text), "<br\\s*/?>", " ")
    return tf.strings.regex_replace(text, "[^a-z0-9' ]", " "), label


def _imdb_tfds_ids(data_dir, vocab_size):
    """IMDB reviews from a TFDS dir, tokenized in tf.data by a TextVectorization layer adapted
    to the training reviews: ((ids, labels), (ids, labels)), ids as lists without padding."""
    import keras
    import tensorflow_datasets as tfds

    train, test = (split.map(_standardize_review) for split in tfds.load(
        IMDB["tfds"], split=["train", "test"], data_dir=data_dir, as_supervised=True,
        download=False, shuffle_files=False))
    vectorize = keras.layers.TextVectorization(max_tokens=vocab_size, standardize=None)
    vectorize.adapt(train.map(lambda text, label: text).batch(1024))

    def to_ids(split):
        ids, labels = [], []
        batches = split.batch(1024).map(lambda text, label: (vectorize(text), label))
        for batch_ids, batch_labels in tfds.as_numpy(batches):
            ids += [row[row != 0] for row in batch_ids]  # 0 only pads a batch to one length
            labels.append(batch_labels)
        return ids, np.concatenate(labels).astype(np.int64)

    return to_ids(train), to_ids(test)


def load_synthetic_text(num_classes=2, vocab_size=20_000, sequence_length=200,
                        train_examples=10_000, test_examples=2_000, seed=0):
    """A learnable stand-in for IMDB, as ((ids, labels), (ids, labels)) with (N, L) int32 ids
    laid out as load_text_dataset lays out reviews, and (N, 1) uint8 labels.

    Each class owns 10 keyword ids. A "review" has a random length (a quarter to all of
    `sequence_length`), starts with 1 and is filler words, among which sit 4 keywords of its
    class and 2 of another class at random places: a model must find the keywords wherever
    they are and weigh them, as sentiment words in a review. Same seed, same arrays.
    """
    if vocab_size < 100 + 10 * num_classes or sequence_length < 8:
        raise KbenchError(f"synthetic text needs --vocab-size >= {100 + 10 * num_classes} "
                          "and --sequence-length >= 8")
    rng = np.random.default_rng(seed)
    words = rng.permutation(np.arange(3, vocab_size))  # 0 pads, 1 starts, 2 is a rare word
    keywords = words[:10 * num_classes].reshape(num_classes, 10)
    filler = words[10 * num_classes:]
    length = sequence_length

    def make(n):
        labels = rng.integers(0, num_classes, size=n)
        others = (labels + rng.integers(1, num_classes, size=n)) % num_classes
        sizes = rng.integers(max(8, length // 4), length + 1, size=n)
        ids = rng.choice(filler, size=(n, length)).astype(np.int32)
        starts = length - sizes
        positions = np.arange(length)[None, :]
        # Six distinct places after the start mark: 4 keywords of the class, 2 of another.
        keys = np.where(positions > starts[:, None], rng.random((n, length)), np.inf)
        places = np.argsort(keys, axis=1)[:, :6]
        kinds = np.concatenate([np.repeat(labels[:, None], 4, 1),
                                np.repeat(others[:, None], 2, 1)], axis=1)
        ids[np.arange(n)[:, None], places] = keywords[kinds, rng.integers(0, 10, size=(n, 6))]
        ids[positions < starts[:, None]] = 0
        ids[np.arange(n), starts] = 1
        return ids, labels.astype(np.uint8).reshape(-1, 1)

    return make(train_examples), make(test_examples)


def make_text_pipeline(ids, labels, num_classes, batch_size, training, seed=0):
    """The text twin of make_pipeline: batches of (int32 token ids, one-hot labels), the same
    seeded endless training stream (no augmentation), every example once for evaluation."""
    import tensorflow as tf

    ids = tf.constant(np.asarray(ids, np.int32))
    return _batched_stream(len(ids), lambda index: tf.gather(ids, index), labels, num_classes,
                           batch_size, training, seed)


def make_text_datasets(data, batch_size, seed=0):
    """(train, test) pipelines for a TextDataset."""
    train = make_text_pipeline(data.x_train, data.y_train, data.num_classes, batch_size, True,
                               seed=seed)
    test = make_text_pipeline(data.x_test, data.y_test, data.num_classes, batch_size, False)
    return train, test


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
