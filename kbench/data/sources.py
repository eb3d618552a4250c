"""Where data sets come from: default folders, the network check, checksummed downloads,
TFDS data dirs and safe unpickling. Shared by the CIFAR, MNIST and IMDB loaders."""

import glob
import hashlib
import http.client
import io
import os
import pickle
import socket
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from kbench.errors import KbenchError
from kbench.files import writable_folder, write_error


def default_data_dirs():
    """Where CIFAR is looked for when no data dir is given, in order."""
    dirs = []
    if os.environ.get("KBENCH_DATA_DIR"):
        dirs.append(os.environ["KBENCH_DATA_DIR"])
    dirs.append(os.path.expanduser("~/.keras/datasets"))  # keras.datasets' cache
    dirs.append(os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")))
    return dirs


class NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; rebuilding them needs numpy's array globals and nothing else.
    Refusing every other global keeps a tampered file from running code (as keras.datasets)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def tfds_arrays(name, data_dir, label_dtype):
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


def tfds_prepared(path, name):
    """Whether `path` is a TFDS data dir where `name` is prepared (<name>/[<config>/]<version>/).
    Checked by file so that a missing data set never reaches TFDS' network-bound builder lookup."""
    return bool(glob.glob(os.path.join(path, name, "*", "dataset_info.json"))
                or glob.glob(os.path.join(path, name, "*", "*", "dataset_info.json")))


def network_answers(url, timeout=3.0):
    """Whether `url`'s host takes a connection within `timeout` seconds. The name lookup runs
    in a thread that is given up on at the deadline: the socket's timeout does not bound it,
    and an unreachable resolver can hold it for 10 s or more."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered = []

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


# A download that delivers no byte for this long is given up (urllib waits forever otherwise).
DOWNLOAD_STALL_S = 60


def fetch_archive(spec, data_dir=None):
    """Fetch the published archive into `data_dir` (--data-dir; default the first of
    default_data_dirs) atomically, checksum verified; the folder is made if needed (and taken
    back if the download fails: kbench.errors.exit_on_error)."""
    target_dir = os.path.expanduser(data_dir or default_data_dirs()[0])
    writable_folder(target_dir, "--data-dir")  # a file in the way is one line, as for outputs
    host = urllib.parse.urlsplit(spec["url"]).hostname
    if not network_answers(spec["url"]):
        raise KbenchError(
            f"cannot reach {host} to download {spec['title']}: copy {spec['archive']} into a "
            "folder and pass --data-dir, or use --dataset synthetic"
        )
    final = os.path.join(target_dir, spec["archive"])
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".part")
    os.close(fd)
    try:
        print(f"downloading {spec['url']} -> {final}")
        digest = hashlib.sha256()
        with _downloading(spec, urllib.request.urlopen, spec["url"],
                          timeout=DOWNLOAD_STALL_S) as response, open(tmp, "wb") as part:
            while chunk := _downloading(spec, response.read, 1 << 20):
                digest.update(chunk)
                try:
                    part.write(chunk)
                except OSError as exc:  # a full disk: said of the archive, not the temp file
                    raise write_error(exc, final) from None
        if digest.hexdigest() != spec["sha256"]:
            raise KbenchError(f"download of {spec['archive']} is corrupt (sha256 "
                              f"{digest.hexdigest()}); retry")
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def _downloading(spec, network_call, *args, **kwargs):
    """network_call(*args, **kwargs), its failure one line: whatever the connection or a read
    raises (a refused or reset connection, an HTTP error, TLS, a stall) is the network's, as
    only network calls run here (the local write does not)."""
    try:
        return network_call(*args, **kwargs)
    except (OSError, http.client.HTTPException) as exc:
        # URLError wraps the connection's own error (a connect timeout too); HTTPError says
        # itself best ("HTTP Error 404: Not Found").
        why = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        if isinstance(why, TimeoutError):
            why = f"no data for {DOWNLOAD_STALL_S} s"
        raise KbenchError(f"download of {spec['url']} failed ({why}): retry, or copy "
                          f"{spec['archive']} into a folder and pass --data-dir") from None


def read_npy(raw):
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
        return NumpyOnlyUnpickler(buffer).load()
