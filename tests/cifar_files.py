"""Write CIFAR fixtures in the published python-pickle format (what cs.toronto.edu serves)."""

import io
import os
import pickle
import tarfile

import numpy as np

LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    label_key=b"labels"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     label_key=b"fine_labels"),
}


def _batch_bytes(name, images, labels):
    """One pickled batch: b'data' is (N, 3072) uint8 in channel-major order, labels a list."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    entry = {b"batch_label": b"fixture", b"data": data,
             LAYOUT[name]["label_key"]: [int(v) for v in labels.reshape(-1)],
             b"filenames": [f"img{i}.png".encode() for i in range(len(images))]}
    if name == "cifar100":
        entry[b"coarse_labels"] = [int(v) // 5 for v in labels.reshape(-1)]
    return pickle.dumps(entry, protocol=4)


def _files(name, train, test, train_batch_sizes):
    """{file name: bytes} of the published layout; train split across len(sizes) batch files."""
    (x_train, y_train), (x_test, y_test) = train, test
    files = {}
    if name == "cifar10":
        start = 0
        for i, size in enumerate(train_batch_sizes, start=1):
            files[f"data_batch_{i}"] = _batch_bytes(name, x_train[start:start + size],
                                                    y_train[start:start + size])
            start += size
        assert start == len(x_train)
        files["test_batch"] = _batch_bytes(name, x_test, y_test)
        files["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]})
    else:
        files["train"] = _batch_bytes(name, x_train, y_train)
        files["test"] = _batch_bytes(name, x_test, y_test)
        files["meta"] = pickle.dumps({b"fine_label_names": [b"f%d" % i for i in range(100)]})
    return files


def write_folder(root, name, train, test, train_batch_sizes=None):
    """Write the extracted folder (e.g. root/cifar-10-batches-py/) and return its path."""
    sizes = train_batch_sizes or [len(train[0])]
    folder = os.path.join(root, LAYOUT[name]["folder"])
    os.makedirs(folder, exist_ok=True)
    for fname, content in _files(name, train, test, sizes).items():
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(content)
    return folder


def write_archive(root, name, train, test, train_batch_sizes=None):
    """Write the .tar.gz as published (one top-level folder) and return its path."""
    sizes = train_batch_sizes or [len(train[0])]
    path = os.path.join(root, LAYOUT[name]["archive"])
    os.makedirs(root, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for fname, content in _files(name, train, test, sizes).items():
            info = tarfile.TarInfo(f"{LAYOUT[name]['folder']}/{fname}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def random_split(n, seed, num_classes=10, label_dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, num_classes, size=(n, 1)).astype(label_dtype))
