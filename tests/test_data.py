"""kbench.data: CIFAR from archive / folder / TFDS, the offline error, synthetic data, tf.data."""

import json
import os
import time

import numpy as np
import pytest

from kbench import data
from kbench.data import sources
from kbench.errors import KbenchError
from tests import cifar_files

pytestmark = pytest.mark.backend_independent


@pytest.fixture(scope="module")
def cifar10_splits():
    # 3 training batch files of unequal sizes: the loader must not assume 10000 per file.
    return cifar_files.random_split(70, seed=1), cifar_files.random_split(20, seed=2)


def keras_reference(folder, name):
    """What keras.datasets.cifar10/100.load_data() returns for these files: keras' own
    `load_batch` parser, then the same assembly steps keras applies."""
    from keras.src.datasets.cifar import load_batch

    if name == "cifar10":
        names = sorted((f for f in os.listdir(folder) if f.startswith("data_batch_")),
                       key=lambda f: int(f.rsplit("_", 1)[1]))
        parts = [load_batch(os.path.join(folder, f)) for f in names]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([np.asarray(p[1], dtype="uint8") for p in parts])
        x_test, y_test = load_batch(os.path.join(folder, "test_batch"))
        y_test = np.asarray(y_test, dtype="uint8")
    else:
        x_train, y_train = load_batch(os.path.join(folder, "train"), label_key="fine_labels")
        x_test, y_test = load_batch(os.path.join(folder, "test"), label_key="fine_labels")
    y_train = np.reshape(y_train, (len(y_train), 1))
    y_test = np.reshape(y_test, (len(y_test), 1))
    return ((x_train.transpose(0, 2, 3, 1), y_train), (x_test.transpose(0, 2, 3, 1), y_test))


def assert_same_arrays(got, want):
    for g, w in zip(np.asarray(got, dtype=object).ravel(), np.asarray(want, dtype=object).ravel()):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_array_equal(g, w)


def flat(result):
    (a, b), (c, d) = result
    return [a, b, c, d]


@pytest.mark.parametrize("layout", ["folder", "archive", "archive-path", "folder-path"])
def test_load_cifar10_matches_keras(tmp_path, cifar10_splits, layout):
    train, test = cifar10_splits
    folder = cifar_files.write_folder(tmp_path / "ref", "cifar10", train, test, [30, 25, 15])
    root = tmp_path / "data"
    if layout.startswith("archive"):
        archive = cifar_files.write_archive(root, "cifar10", train, test, [30, 25, 15])
        data_dir = archive if layout == "archive-path" else root
    else:
        written = cifar_files.write_folder(root, "cifar10", train, test, [30, 25, 15])
        data_dir = written if layout == "folder-path" else root
    got = data.load_cifar("cifar10", data_dir=str(data_dir))
    assert_same_arrays(flat(got), flat(keras_reference(folder, "cifar10")))
    # ... which are the arrays that were written, with keras' shapes and dtypes.
    assert got[0][0].shape == (70, 32, 32, 3) and got[0][0].dtype == np.uint8
    assert got[0][1].shape == (70, 1) and got[0][1].dtype == np.uint8
    np.testing.assert_array_equal(got[0][0], train[0])
    np.testing.assert_array_equal(got[1][1], test[1])


def test_ten_batch_files_are_read_in_numeric_order(tmp_path):
    train, test = cifar_files.random_split(110, seed=3), cifar_files.random_split(5, seed=4)
    cifar_files.write_folder(tmp_path, "cifar10", train, test, [10] * 11)
    (x_train, y_train), _ = data.load_cifar("cifar10", data_dir=str(tmp_path))
    np.testing.assert_array_equal(x_train, train[0])  # data_batch_10 after data_batch_9


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_load_cifar100_matches_keras(tmp_path, layout):
    train = cifar_files.random_split(40, seed=5, num_classes=100, label_dtype=np.int64)
    test = cifar_files.random_split(10, seed=6, num_classes=100, label_dtype=np.int64)
    folder = cifar_files.write_folder(tmp_path / "ref", "cifar100", train, test)
    writer = cifar_files.write_folder if layout == "folder" else cifar_files.write_archive
    writer(tmp_path / "data", "cifar100", train, test)
    got = data.load_cifar("cifar100", data_dir=str(tmp_path / "data"))
    assert_same_arrays(flat(got), flat(keras_reference(folder, "cifar100")))
    assert got[0][1].dtype == np.int64 and int(got[0][1].max()) < 100


def test_keras_cache_layout_is_found(tmp_path, cifar10_splits, monkeypatch):
    # keras.datasets.cifar10 caches as ~/.keras/datasets/cifar-10-batches-py/cifar-10-batches-py
    train, test = cifar10_splits
    cache = tmp_path / ".keras" / "datasets" / "cifar-10-batches-py"
    cifar_files.write_folder(cache, "cifar10", train, test)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KBENCH_DATA_DIR", raising=False)
    (x_train, _), _ = data.load_cifar("cifar10")
    np.testing.assert_array_equal(x_train, train[0])


def test_tfds_data_dir(tmp_path):
    """The TFDS path, with examples from tfds.testing.mock_data in a prepared-looking dir."""
    import tensorflow_datasets as tfds

    version_dir = tmp_path / "cifar10" / "3.0.2"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text(json.dumps({"name": "cifar10"}))
    with tfds.testing.mock_data(num_examples=12):
        (x_train, y_train), (x_test, y_test) = data.load_cifar("cifar10", data_dir=str(tmp_path))
    assert x_train.shape == (12, 32, 32, 3) and x_train.dtype == np.uint8
    assert y_train.shape == (12, 1) and y_train.dtype == np.uint8
    assert x_test.shape == (12, 32, 32, 3) and int(y_test.max()) < 10


def test_missing_data_is_one_clear_error_within_seconds(tmp_path):
    start = time.monotonic()
    with pytest.raises(KbenchError) as err:
        data.load_cifar("cifar10", data_dir=str(tmp_path))
    message = str(err.value)
    assert "--data-dir" in message and "--dataset synthetic" in message
    assert "\n" not in message
    assert time.monotonic() - start < 5


def test_check_data_finds_what_a_run_would_load_without_loading_it(tmp_path, cifar10_splits,
                                                                     monkeypatch):
    """kbench compare's check before its first run: the loader's own error when the data is
    missing or damaged, nothing when it is there or is to be downloaded (or is no file)."""
    from kbench.data.registry import check_data

    empty = tmp_path / "empty"
    empty.mkdir()
    for name, title in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"), ("mnist", "MNIST"),
                        ("fashion_mnist", "Fashion-MNIST"), ("imdb", "IMDB")):
        with pytest.raises(KbenchError, match=f"^{title} not found in {empty}: pass --data-dir"):
            check_data(name, str(empty))
    with pytest.raises(KbenchError, match="is not a tar archive, so not cifar-10-python.tar.gz: "
                                          "pass --data-dir PATH, the archive or the folder"):
        check_data("cifar10", __file__)

    def no_reading(*args, **kwargs):
        raise AssertionError("check_data read the data")

    monkeypatch.setattr("kbench.data.cifar._load_pickled", no_reading)
    cifar_files.write_archive(tmp_path / "there", "cifar10", *cifar10_splits)
    for name, data_dir, download in (("cifar10", str(tmp_path / "there"), False),
                                     ("cifar10", str(empty), True),  # the run fetches it
                                     ("imdb", str(empty), True),
                                     ("synthetic", None, False), ("digits", None, False)):
        assert check_data(name, data_dir, download) is None


@pytest.mark.parametrize("content", [b"\x1f\x8b" + b"not really gzip" * 10,
                                     bytes(range(256)) * 20])  # tarfile lists 4 reasons
def test_corrupt_archive_is_a_clear_error(tmp_path, content):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(content)
    with pytest.raises(KbenchError, match="not a readable CIFAR-10") as err:
        data.load_cifar("cifar10", data_dir=str(tmp_path))
    assert "\n" not in str(err.value) and "re-download" in str(err.value)


@pytest.mark.parametrize("where", ["the folder", "its parent", "keras' nested cache"])
def test_a_half_extracted_folder_is_named_as_such_not_as_missing_data(tmp_path, cifar10_splits,
                                                                     where):
    # A folder of CIFAR's name without its test batch is data the user has, damaged: "not
    # found" would send them looking elsewhere.
    nests = {"the folder": 1, "its parent": 1, "keras' nested cache": 2}[where]
    folder = tmp_path.joinpath(*["cifar-10-batches-py"] * nests)
    cifar_files.write_folder(folder.parent, "cifar10", *cifar10_splits)
    (folder / "test_batch").unlink()
    (folder / "readme.html").write_text("<html></html>")
    data_dir = folder if where == "the folder" else tmp_path
    with pytest.raises(KbenchError) as err:
        data.load_cifar("cifar10", data_dir=str(data_dir))
    message = str(err.value)
    assert message.startswith(f"{folder} is an incomplete CIFAR-10 folder (it lacks test_batch)")
    assert "--download" in message and "--dataset synthetic" in message and "\n" not in message


def test_a_data_dir_file_that_is_no_archive_says_so(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_text("an HTML error page, saved as the archive")
    with pytest.raises(KbenchError) as err:
        data.load_cifar("cifar10", data_dir=str(tmp_path / "cifar-10-python.tar.gz"))
    assert str(err.value).startswith(f"{tmp_path / 'cifar-10-python.tar.gz'} is not a tar archive")


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "network_answers", lambda url, timeout=3.0: False)
    with pytest.raises(KbenchError, match="cannot reach"):
        data.load_cifar("cifar10", data_dir=str(tmp_path), download=True)


@pytest.fixture
def web(tmp_path):
    """A local web server for the download path: GET /<name> serves `files[name]` (bytes), or
    stalls after its headers for `files[name] == "stall"`, else answers 404."""
    import http.server
    import threading

    files, release = {}, threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Length", "100" if body == "stall" else str(len(body)))
            self.end_headers()
            if body == "stall":
                self.wfile.flush()
                release.wait(30)  # holds the connection open, sending nothing
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    release.set()
    server.shutdown()
    server.server_close()


def test_download_is_checksummed_and_atomic_and_its_failures_are_one_line(
        tmp_path, web, monkeypatch, capsys):
    import hashlib

    url, files = web
    files["good.tar.gz"] = files["bad.tar.gz"] = b"archive bytes" * 1000
    files["stall.tar.gz"] = "stall"
    target = tmp_path / "data"

    def spec(name):
        return {"url": f"{url}/{name}", "archive": name, "title": "a test archive",
                "sha256": hashlib.sha256(files["good.tar.gz"]).hexdigest()}

    final = sources.fetch_archive(spec("good.tar.gz"), str(target))
    assert final == str(target / "good.tar.gz") and (target / "good.tar.gz").read_bytes() == \
        files["good.tar.gz"]
    assert f"downloading {url}/good.tar.gz" in capsys.readouterr().out
    files["bad.tar.gz"] = b"an HTML error page"
    monkeypatch.setattr(sources, "DOWNLOAD_STALL_S", 1)
    for name, message in [("bad.tar.gz", "download of bad.tar.gz is corrupt (sha256 "),
                          ("missing.tar.gz", f"download of {url}/missing.tar.gz failed (HTTP "
                                             "Error 404: Not Found): retry, or copy "
                                             "missing.tar.gz into a folder and pass --data-dir"),
                          ("stall.tar.gz", f"download of {url}/stall.tar.gz failed (no data "
                                           "for 1 s): retry")]:
        start = time.monotonic()
        with pytest.raises(KbenchError) as err:
            sources.fetch_archive(spec(name), str(target))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
        assert time.monotonic() - start < 10
    # A full disk is the write's failure, said of the archive (errors.write_refused), not
    # the network's.
    import builtins
    import errno

    from kbench.errors import WriteRefused

    class FullDisk:
        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sources, "open", FullDisk, raising=False)
    with pytest.raises(WriteRefused) as err:
        sources.fetch_archive(spec("bad.tar.gz"), str(target))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target / "bad.tar.gz")
    # Nothing half-written is left, and the good archive is untouched.
    assert sorted(os.listdir(target)) == ["good.tar.gz"]
    # A --data-dir that is a file (a README, say) cannot take the download: one line.
    with pytest.raises(KbenchError, match=rf"^--data-dir {tmp_path / 'README'}: cannot write "
                                          r"there \(.* is a file, not a folder\)"):
        (tmp_path / "README").write_text("not a folder")
        sources.fetch_archive(spec("good.tar.gz"), str(tmp_path / "README"))


def test_the_network_check_gives_up_on_a_name_lookup_that_hangs(monkeypatch):
    import socket

    def hanging_lookup(*args, **kwargs):
        time.sleep(30)
        raise OSError("no answer")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    start = time.monotonic()
    assert sources.network_answers("https://www.cs.toronto.edu/x.tar.gz", timeout=0.5) is False
    assert time.monotonic() - start < 5


def test_unknown_dataset():
    with pytest.raises(KbenchError, match="unknown dataset 'imagenet'"):
        data.load_dataset("imagenet")


def test_asking_for_more_examples_than_a_split_holds_takes_it_all_with_a_note(capsys):
    digits = data.load_dataset("digits", train_examples=100_000, test_examples=10)
    assert len(digits.x_train) == 1347 and len(digits.x_test) == 10
    out = capsys.readouterr().out
    assert out == ("note: digits has 1347 train examples, fewer than the 100000 asked for "
                   "(--train-examples): all 1347 are used\n")


def test_synthetic_is_deterministic_and_sized():
    a = data.load_synthetic(train_examples=64, test_examples=16, seed=3)
    b = data.load_synthetic(train_examples=64, test_examples=16, seed=3)
    c = data.load_synthetic(train_examples=64, test_examples=16, seed=4)
    for x, y in zip(flat(a), flat(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0][0], c[0][0])
    assert a[0][0].shape == (64, 32, 32, 3) and a[0][0].dtype == np.uint8
    assert a[1][1].shape == (16, 1)


def test_synthetic_is_learnable():
    """A linear classifier on raw pixels separates the classes: the data carries signal."""
    from sklearn.linear_model import LogisticRegression

    (x_train, y_train), (x_test, y_test) = data.load_synthetic(train_examples=2000,
                                                              test_examples=500, seed=0)
    clf = LogisticRegression(max_iter=300).fit(x_train.reshape(2000, -1) / 255.0, y_train.ravel())
    assert clf.score(x_test.reshape(500, -1) / 255.0, y_test.ravel()) > 0.5  # chance: 0.1


def take(ds, n):
    return [(np.asarray(x), np.asarray(y)) for x, y in ds.dataset.take(n)]


def test_pipeline_is_seeded_and_changes_every_epoch():
    arrays = data.load_dataset("synthetic", train_examples=64, test_examples=16)
    train1, _ = data.make_datasets(arrays, batch_size=16, seed=7, cutout=8)
    train2, _ = data.make_datasets(arrays, batch_size=16, seed=7, cutout=8)
    assert train1.steps_per_epoch == 4
    a, b = take(train1, 8), take(train2, 8)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # A new iterator replays the stream from the start (Keras restarts iterators).
    np.testing.assert_array_equal(take(train1, 1)[0][0], a[0][0])
    # Epoch 1 is a different order and different augmentation than epoch 0.
    assert not np.array_equal(a[0][0], a[4][0])
    # Every example appears exactly once per epoch.
    epoch0 = np.concatenate([y.argmax(1) for _, y in a[:4]])
    assert sorted(epoch0.tolist()) == sorted(arrays.y_train.ravel().tolist())


def test_augmentation_crops_flips_and_cuts():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, size=(32, 32, 32, 3)).astype(np.float32)
    out = data.augment_batch(tf.constant(x), tf.constant([3, 4], tf.int64), crop_padding=4,
                             cutout=0).numpy()
    padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
    for i in range(len(x)):
        # Each output is a 32x32 window of the zero-padded image, possibly mirrored.
        found = any(np.array_equal(out[i], win)
                    for dy in range(9) for dx in range(9)
                    for win in (padded[i, dy:dy + 32, dx:dx + 32],
                                padded[i, dy:dy + 32, dx:dx + 32][:, ::-1]))
        assert found, f"example {i} is not a crop of its padded input"
    assert len({out[i].tobytes() for i in range(len(x))}) == len(x)
    cut = data.augment_batch(tf.constant(x), tf.constant([3, 4], tf.int64), crop_padding=0,
                             cutout=8).numpy()
    zero_pixels = (cut == 0).all(axis=-1).sum(axis=(1, 2))
    assert (zero_pixels > 0).all() and (zero_pixels <= 64).all()


def test_eval_pipeline_covers_each_example_once_in_order():
    arrays = data.load_dataset("synthetic", train_examples=32, test_examples=21)
    _, test = data.make_datasets(arrays, batch_size=8)
    batches = take(test, 10)
    assert [len(x) for x, _ in batches] == [8, 8, 5]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]),
                                  arrays.x_test.astype(np.float32))


def test_impossible_batch_size():
    arrays = data.load_dataset("synthetic", train_examples=32, test_examples=8)
    with pytest.raises(KbenchError, match="batch size 64 is impossible"):
        data.make_datasets(arrays, batch_size=64)


@pytest.mark.backend_independent
def test_streams_carry_their_sizes_and_restart_exactly(capsys):
    import tensorflow as tf

    arrays = data.load_dataset("synthetic", train_examples=64, test_examples=20)
    train, test = data.make_datasets(arrays, batch_size=16, seed=3)
    assert (train.steps_per_epoch, train.num_examples, train.batch_size) == (4, 64, 16)
    assert (test.steps_per_epoch, test.num_examples, test.batch_size) == (None, 20, 16)
    assert train.exact_restart and not test.exact_restart
    later = take(train, 7)[5:]
    np.testing.assert_array_equal(take(train.starting_at(5), 2)[0][0], later[0][0])
    # A derived pipeline keeps the sizes and still restarts exactly, through the transform.
    options = tf.data.Options()
    derived = train.map_dataset(lambda ds: ds.with_options(options))
    assert derived.steps_per_epoch == 4 and derived.exact_restart
    np.testing.assert_array_equal(take(derived.starting_at(6), 1)[0][0], later[1][0])
    # A plain tf.data pipeline: what can be computed is, the rest is said in one line.
    plain = tf.data.Dataset.from_tensor_slices(
        (arrays.x_train.astype(np.float32), np.eye(10, dtype=np.float32)[
            arrays.y_train.ravel()])).batch(16, drop_remainder=True)
    stream = data.as_stream(plain)
    assert (stream.steps_per_epoch, stream.batch_size, stream.num_examples) == (4, 16, None)
    assert data.as_stream(plain, steps_per_epoch=2).steps_per_epoch == 2
    resumed = stream.starting_at(3)
    assert len(list(resumed.dataset)) == 1
    assert "exact only if it is seeded and endless" in capsys.readouterr().out
    with pytest.raises(KbenchError, match="pass --steps-per-epoch"):
        data.as_stream(plain.repeat())
    assert data.as_stream(plain.repeat(), training=False).dataset is not None
