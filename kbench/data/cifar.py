"""CIFAR-10/100 from a TFDS data dir, the published python-pickle archive, or its extracted
folder: the same arrays `keras.datasets.cifar10.load_data()` gives."""

import glob
import io
import os
import pickle
import re
import tarfile

import numpy as np

from kbench.data.sources import NumpyOnlyUnpickler, fetch_archive, tfds_arrays, default_data_dirs
from kbench.errors import KbenchError, reason


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


def load_cifar(name, data_dir=None, download=False):
    """CIFAR-10/100 as `((x_train, y_train), (x_test, y_test))`, NHWC uint8 images.

    `data_dir` may be a TFDS data dir, a folder holding the published archive or its
    extracted folder, the archive itself, or the extracted folder itself. Labels have shape
    (N, 1) with keras.datasets' dtypes. Archive and folder sources give exactly the arrays
    `keras.datasets.cifar10.load_data()` gives; TFDS gives TFDS' example order.
    """
    source = find_cifar(name, data_dir, download)
    if source is None:  # to be downloaded
        return _load_pickled(CIFAR[name], fetch_archive(CIFAR[name], data_dir), from_archive=True)
    kind, path = source
    if kind == "tfds":
        return _load_tfds(name, path)
    return _load_pickled(CIFAR[name], path, from_archive=(kind == "archive"))


def find_cifar(name, data_dir=None, download=False):
    """Where load_cifar reads `name` from, without reading it: ('archive' | 'folder' |
    'tfds', path), or None when it will download it; not there is a one-line KbenchError
    (what load_cifar raises), so a caller can check before starting work that needs it."""
    if name not in CIFAR:
        raise KbenchError(f"unknown CIFAR dataset {name!r}; use one of: {', '.join(CIFAR)}")
    spec = CIFAR[name]
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        source = _find_cifar_source(name, os.path.expanduser(directory))
        if source:
            return source
    if download:
        return None
    for directory in searched:
        damaged = _damaged_cifar_source(spec, os.path.expanduser(directory), bool(data_dir))
        if damaged:
            raise KbenchError(damaged)
    where = data_dir or ", ".join(searched)
    raise KbenchError(
        f"{spec['title']} not found in {where}: pass --data-dir DIR holding {spec['archive']} "
        f"(or its extracted {spec['folder']}/, or a TFDS data dir), add --download to fetch it, "
        "or use --dataset synthetic to run without data"
    )


def _damaged_cifar_source(spec, path, explicit):
    """Why what sits at path looks meant as CIFAR but cannot be read, or None if nothing does.

    A half-extracted folder or a file that is no archive would otherwise read as "not found",
    which sends the user looking for data they already have in the wrong place."""
    if os.path.isfile(path):  # a default place may hold another data set's archive
        if not explicit:
            return None
        return (f"{path} is not a tar archive, so not {spec['archive']}: pass --data-dir PATH, "
                "the archive or the folder holding it, or use --dataset synthetic to run "
                "without data")
    # The deepest folder of CIFAR's name: keras.datasets' cache nests one in another.
    folders = [f for f in _cifar_folders(spec, path)
               if os.path.basename(os.path.normpath(f)) == spec["folder"] and os.path.isdir(f)]
    if not folders:
        return None
    folder = folders[-1]
    missing = [f for f in spec["test_files"] if not os.path.isfile(os.path.join(folder, f))]
    return (f"{folder} is an incomplete {spec['title']} folder (it lacks {', '.join(missing)}): "
            f"extract {spec['archive']} into {os.path.dirname(os.path.normpath(folder))} again, "
            "add --download to fetch it, or use --dataset synthetic to run without data")


def _find_cifar_source(name, path):
    """('archive' | 'folder' | 'tfds', path) for the first CIFAR source found at path, or None."""
    spec = CIFAR[name]
    if os.path.isfile(path):
        try:
            return ("archive", path) if tarfile.is_tarfile(path) else None
        except OSError as exc:  # unreadable (permissions): its reason, not a traceback
            raise KbenchError(f"cannot read {path} ({reason(exc)}): pass --data-dir a readable "
                              "archive or folder, or use --dataset synthetic to run without "
                              "data") from None
    if not os.path.isdir(path):
        return None
    for folder in _cifar_folders(spec, path):
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


def _cifar_folders(spec, path):
    """Where the extracted batches may be: `path` itself, its extracted folder, and that
    folder's namesake inside it (keras.datasets' cache, ~/.keras/datasets, extracts so)."""
    return (path, os.path.join(path, spec["folder"]),
            os.path.join(path, spec["folder"], spec["folder"]))


def _is_cifar_folder(spec, path):
    return os.path.isdir(path) and all(
        os.path.isfile(os.path.join(path, f)) for f in spec["test_files"]
    )


def _batch_order(filename):
    """Sort data_batch_1 .. data_batch_10 numerically, not as strings."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(filename))]


def _decode_batch(spec, raw):
    """One pickled CIFAR batch -> (NHWC uint8 images, labels)."""
    batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
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
                          f"({reason(exc)}); re-download {spec['archive']}") from None

    def stack(parts):
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts]).reshape(-1, 1)
        return np.ascontiguousarray(x), y

    return stack(train), stack(test)


def _load_tfds(name, data_dir):
    return tfds_arrays(name, data_dir, CIFAR[name]["label_dtype"])
