"""Datasets -> NumPy arrays -> tf.data pipelines that feed all three backends.

Sources:
- `cifar10`, `cifar100`: `load_cifar` reads a TFDS data dir, the published
  `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` archive, or its extracted folder, and
  returns the same arrays as `keras.datasets.cifar10.load_data()`.
- `synthetic`: deterministic, learnable, CIFAR-shaped, any size; used only when asked for.

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
import tarfile
import tempfile
import urllib.request

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

DATASETS = ("cifar10", "cifar100", "synthetic")


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
    import tensorflow_datasets as tfds

    splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, as_supervised=True,
                       download=False, shuffle_files=False)
    label_dtype = CIFAR[name]["label_dtype"]

    def to_numpy(split):
        # Batched iteration, not batch_size=-1: the latter needs split sizes up front.
        xs, ys = zip(*tfds.as_numpy(split.batch(4096)))
        return (np.concatenate(xs).astype(np.uint8),
                np.concatenate(ys).astype(label_dtype).reshape(-1, 1))

    return tuple(to_numpy(split) for split in splits)


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
        (x_train, y_train), (x_test, y_test) = load_synthetic(
            train_examples=train_examples or 10_000, test_examples=test_examples or 2_000,
            seed=seed)
        return Dataset(name, x_train, y_train, x_test, y_test, num_classes=10)
    if name in CIFAR:
        (x_train, y_train), (x_test, y_test) = load_cifar(name, data_dir, download=download)
        if train_examples:
            x_train, y_train = x_train[:train_examples], y_train[:train_examples]
        if test_examples:
            x_test, y_test = x_test[:test_examples], y_test[:test_examples]
        return Dataset(name, x_train, y_train, x_test, y_test, CIFAR[name]["num_classes"])
    raise KbenchError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")


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

    n = len(images)
    if batch_size < 1 or (training and batch_size > n):
        raise KbenchError(f"batch size {batch_size} is impossible for {n} examples; "
                          f"use --batch-size between 1 and {n}")
    images = tf.constant(images)  # kept uint8: the pipeline moves indices, not pixels
    labels = tf.constant(np.asarray(labels).reshape(-1).astype(np.int32))

    def gather(index):
        x = tf.cast(tf.gather(images, index), tf.float32)
        y = tf.one_hot(tf.gather(labels, index), num_classes)
        return x, y

    if not training:
        ds = tf.data.Dataset.range(n).batch(batch_size)
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.argsort(keys)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)

    def gather_and_augment(step, index):
        x, y = gather(index)
        if augment:
            batch_seed = tf.stack([tf.constant(seed, tf.int64) + 1, step])
            x = augment_batch(x, batch_seed, crop_padding, cutout)
        return x, y

    ds = tf.data.Dataset.counter().flat_map(epoch_batches).enumerate()
    ds = ds.map(gather_and_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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


def num_classes(name):
    """Number of classes of a dataset, known without loading it."""
    if name == "synthetic":
        return 10
    if name in CIFAR:
        return CIFAR[name]["num_classes"]
    raise KbenchError(f"unknown dataset {name!r}; use one of: {', '.join(DATASETS)}")
