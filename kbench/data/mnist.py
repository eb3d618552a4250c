"""MNIST and Fashion-MNIST (TFDS dir, keras' mnist.npz, or the published IDX files) and the
8x8 handwritten digits scikit-learn ships (a fixed stratified split)."""

import os
import struct
import zipfile

import numpy as np

from kbench.data.sources import fetch_archive, tfds_arrays, tfds_prepared, default_data_dirs
from kbench.errors import KbenchError, reason


KERAS_DATASETS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


# The published IDX files (yann.lecun.com, zalandoresearch); both data sets use these names.
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


MNIST = {
    "mnist": dict(title="MNIST", npz="mnist.npz", folders=("mnist",), tfds="mnist",
                  archive="mnist.npz", url=KERAS_DATASETS_URL + "mnist.npz",
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
    source = find_mnist(name, data_dir, download)
    spec = MNIST[name]
    if source is None:  # to be downloaded
        return _load_mnist_npz(spec, fetch_archive(spec, data_dir))
    kind, path = source
    if kind == "tfds":
        (x_train, y_train), (x_test, y_test) = tfds_arrays(spec["tfds"], path, np.uint8)
        return (x_train[..., 0], y_train[:, 0]), (x_test[..., 0], y_test[:, 0])
    return _load_mnist_npz(spec, path) if kind == "npz" else _load_idx_folder(spec, path)


def find_mnist(name, data_dir=None, download=False):
    """Where load_mnist reads `name` from, without reading it: ('npz' | 'idx' | 'tfds', path),
    or None when it will download it; not there is a one-line KbenchError (what load_mnist
    raises), so a caller can check before starting work that needs it."""
    if name not in MNIST:
        raise KbenchError(f"unknown MNIST data set {name!r}; use one of: {', '.join(MNIST)}")
    spec = MNIST[name]
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        source = _find_mnist_source(spec, os.path.expanduser(directory), explicit=bool(data_dir))
        if source:
            return source
    if download and "url" in spec:
        return None
    for directory in searched:
        damaged = _damaged_mnist_source(spec, os.path.expanduser(directory), bool(data_dir))
        if damaged:
            raise KbenchError(damaged)
    where = data_dir or ", ".join(searched)
    npz = f", {spec['npz']}" if spec["npz"] else ""
    fetch = (", add --download to fetch it" if "url" in spec else
             f" (--download cannot fetch {spec['title']}: kbench knows no archive of it; "
             "tfds or keras.datasets can)" if download else "")
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
    for folder in _idx_folders(spec, path, explicit):
        if all(_idx_path(folder, f) for f in IDX_FILES):
            return ("idx", folder)
    if spec["npz"] and os.path.isfile(os.path.join(path, spec["npz"])):
        return ("npz", os.path.join(path, spec["npz"]))
    if tfds_prepared(path, spec["tfds"]):
        return ("tfds", path)
    return None


def _damaged_mnist_source(spec, path, explicit):
    """Why what sits at `path` looks meant as this data set but cannot be read, or None.

    A folder holding some of the four IDX files, or a file that is no .npz, would otherwise
    read as "not found", which sends the user looking for data they already have."""
    if os.path.isfile(path):  # a default place may hold another data set's archive
        if not explicit:
            return None
        return (f"{path} is not a zip archive, so not a .npz of {spec['title']}: pass --data-dir "
                "PATH, the .npz or the folder holding it, or use --dataset synthetic to run "
                "without data")
    if not os.path.isdir(path):
        return None
    for folder in _idx_folders(spec, path, explicit):
        missing = [f for f in IDX_FILES if not _idx_path(folder, f)]
        if 0 < len(missing) < len(IDX_FILES):
            return (f"{folder} holds {len(IDX_FILES) - len(missing)} of the four {spec['title']} "
                    f"IDX files (it lacks {', '.join(missing)}, .gz or not): add them, or use "
                    "--dataset synthetic to run without data")
    return None


def _idx_folders(spec, path, explicit):
    """The folders at `path` that may hold the IDX files: keras' cache subfolders, and `path`
    itself only where --data-dir names it (MNIST and Fashion-MNIST share the file names)."""
    return ([path] if explicit else []) + [os.path.join(path, f) for f in spec["folders"]]


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
                          f"({reason(exc)}); re-download them") from None
    return (x_train, y_train), (x_test, y_test)


def _load_mnist_npz(spec, path):
    if not zipfile.is_zipfile(path):  # np.load would call it "pickled data" and cite allow_pickle
        raise KbenchError(f"{path} is not a readable {spec['title']} .npz (not a zip archive); "
                          f"re-download {spec['npz']}")
    try:
        with np.load(path, allow_pickle=False) as f:
            return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise KbenchError(f"{path} is not a readable {spec['title']} .npz "
                          f"({reason(exc)}); re-download {spec['npz']}") from None


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
