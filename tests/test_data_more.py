"""kbench.data beyond CIFAR: MNIST / Fashion-MNIST files, the scikit-learn digits, IMDB (keras'
imdb.npz and TFDS), synthetic images of other shapes, the synthetic text task, text pipelines.

Fixtures are written in the published formats: IDX files (gzipped as served), keras' mnist.npz
and imdb.npz (ragged object arrays, pickled inside the .npz), prepared-looking TFDS dirs."""

import gzip
import json
import os
import struct
import time

import numpy as np
import pytest

from kbench import data
from kbench.data import sources
from kbench.errors import KbenchError

pytestmark = pytest.mark.backend_independent


# --------------------------------------------------------------------------- fixtures


def write_idx(path, array):
    """The IDX format: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def mnist_like(n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
             rng.integers(0, 10, n_train).astype(np.uint8)),
            (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
             rng.integers(0, 10, n_test).astype(np.uint8)))


def write_idx_folder(folder, splits, gz=True):
    (x_train, y_train), (x_test, y_test) = splits
    os.makedirs(folder, exist_ok=True)
    suffix = ".gz" if gz else ""
    for stem, array in zip(data.IDX_FILES, (x_train, y_train, x_test, y_test)):
        write_idx(os.path.join(folder, stem + suffix), array)
    return folder


def keras_fashion_reference(folder):
    """What keras.datasets.fashion_mnist.load_data() does with the four files (its own code)."""
    def labels(name):
        with gzip.open(os.path.join(folder, name), "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=8)

    def images(name, n):
        with gzip.open(os.path.join(folder, name), "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=16).reshape(n, 28, 28)

    y_train, y_test = labels("train-labels-idx1-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")
    return ((images("train-images-idx3-ubyte.gz", len(y_train)), y_train),
            (images("t10k-images-idx3-ubyte.gz", len(y_test)), y_test))


def assert_same(got, want):
    (a, b), (c, d) = got
    (e, f), (g, h) = want
    for x, y in ((a, e), (b, f), (c, g), (d, h)):
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
        np.testing.assert_array_equal(x, y)


def prepared_tfds_dir(root, name, version="1.0.0"):
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"name": name.split("/")[0]}))
    return root


# --------------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_published_idx_files_matches_keras(tmp_path, gz):
    splits = mnist_like()
    write_idx_folder(tmp_path / "ref", splits, gz=True)
    write_idx_folder(tmp_path / "data", splits, gz=gz)
    got = data.load_mnist("fashion_mnist", data_dir=str(tmp_path / "data"))
    assert_same(got, keras_fashion_reference(tmp_path / "ref"))
    assert_same(got, splits)


def test_keras_mnist_npz_matches_keras(tmp_path, monkeypatch):
    import keras.src.datasets.mnist as keras_mnist

    splits = mnist_like(seed=1)
    path = tmp_path / "mnist.npz"
    (x_train, y_train), (x_test, y_test) = splits
    np.savez_compressed(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    monkeypatch.setattr(keras_mnist, "get_file", lambda *args, **kwargs: str(path))
    want = keras_mnist.load_data()
    assert_same(data.load_mnist("mnist", data_dir=str(tmp_path)), want)  # the folder
    assert_same(data.load_mnist("mnist", data_dir=str(path)), want)  # the file itself


def test_keras_cache_layouts_are_found_and_not_confused(tmp_path, monkeypatch):
    """keras caches ~/.keras/datasets/mnist.npz and ~/.keras/datasets/fashion-mnist/*.gz; the
    IDX files of one are never taken for the other (both use the same file names)."""
    cache = tmp_path / ".keras" / "datasets"
    fashion = mnist_like(seed=2)
    write_idx_folder(cache / "fashion-mnist", fashion)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KBENCH_DATA_DIR", "")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert_same(data.load_mnist("fashion_mnist"), fashion)
    with pytest.raises(KbenchError, match="MNIST not found"):
        data.load_mnist("mnist")


def test_mnist_tfds_dir(tmp_path):
    import tensorflow_datasets as tfds

    prepared_tfds_dir(tmp_path, "mnist", "3.0.1")
    with tfds.testing.mock_data(num_examples=12):
        (x_train, y_train), (x_test, y_test) = data.load_mnist("mnist", data_dir=str(tmp_path))
    assert x_train.shape == (12, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (12,) and y_train.dtype == np.uint8 and int(y_test.max()) < 10


def test_load_dataset_gives_nhwc_images_and_column_labels(tmp_path):
    write_idx_folder(tmp_path, mnist_like(n_train=30, n_test=10))
    arrays = data.load_dataset("mnist", data_dir=str(tmp_path), train_examples=20)
    assert arrays.x_train.shape == (20, 28, 28, 1) and arrays.y_train.shape == (20, 1)
    assert arrays.x_test.shape == (10, 28, 28, 1) and arrays.num_classes == 10
    assert data.image_info("mnist") == ((28, 28, 1), 10) and data.num_classes("mnist") == 10


def test_missing_mnist_is_one_clear_error_within_seconds(tmp_path):
    start = time.monotonic()
    for name in ("mnist", "fashion_mnist"):
        with pytest.raises(KbenchError) as err:
            data.load_dataset(name, data_dir=str(tmp_path))
        message = str(err.value)
        assert "--data-dir" in message and "--dataset synthetic" in message
        assert "--dataset digits" in message and "\n" not in message
    assert time.monotonic() - start < 5


def test_corrupt_idx_and_npz_are_clear_errors(tmp_path):
    folder = write_idx_folder(tmp_path / "idx", mnist_like())
    with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 28, 28) + b"short")
    with pytest.raises(KbenchError, match="unreadable Fashion-MNIST IDX files"):
        data.load_mnist("fashion_mnist", data_dir=str(folder))
    (tmp_path / "npz").mkdir()
    for content in (b"PK\x03\x04 not really a zip", bytes(range(256)) * 20):
        (tmp_path / "npz" / "mnist.npz").write_bytes(content)
        with pytest.raises(KbenchError, match="not a readable MNIST") as err:
            data.load_mnist("mnist", data_dir=str(tmp_path / "npz"))
        # not numpy's advice to load it with allow_pickle
        assert "\n" not in str(err.value) and "pickle" not in str(err.value)


@pytest.mark.parametrize("where", ["the folder", "its parent"])
def test_an_idx_folder_missing_a_file_is_named_as_such_not_as_missing_data(tmp_path, where):
    folder = write_idx_folder(tmp_path / "fashion-mnist", mnist_like(), gz=False)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte"))
    data_dir = folder if where == "the folder" else tmp_path
    with pytest.raises(KbenchError) as err:
        data.load_mnist("fashion_mnist", data_dir=str(data_dir))
    message = str(err.value)
    assert message.startswith(f"{folder} holds 3 of the four Fashion-MNIST IDX files (it lacks "
                              "t10k-labels-idx1-ubyte, .gz or not)")
    assert "--dataset synthetic" in message and "\n" not in message


def test_a_data_dir_file_that_is_no_npz_says_so(tmp_path):
    (tmp_path / "mnist.npz").write_text("an HTML error page, saved as the archive")
    with pytest.raises(KbenchError) as err:
        data.load_mnist("mnist", data_dir=str(tmp_path / "mnist.npz"))
    assert str(err.value).startswith(f"{tmp_path / 'mnist.npz'} is not a zip archive")


def test_a_data_dir_variable_naming_another_data_set_s_file_is_passed_over(tmp_path,
                                                                           monkeypatch):
    # $KBENCH_DATA_DIR may name the CIFAR archive: no other data set takes it for its own,
    # damaged or not; the search goes on (IMDB in keras' cache) or ends in "not found".
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\x1f\x8b not read here")
    (tmp_path / ".keras" / "datasets").mkdir(parents=True)
    write_imdb_npz(tmp_path / ".keras" / "datasets" / "imdb.npz")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KBENCH_DATA_DIR", str(archive))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert data.load_text_dataset("imdb", vocab_size=100, sequence_length=8).x_train.shape[1] == 8
    with pytest.raises(KbenchError, match="^MNIST not found in "):
        data.load_mnist("mnist")


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "network_answers", lambda url, timeout=3.0: False)
    with pytest.raises(KbenchError, match="cannot reach"):
        data.load_mnist("mnist", data_dir=str(tmp_path), download=True)
    with pytest.raises(KbenchError, match="cannot reach"):
        data.load_text_dataset("imdb", data_dir=str(tmp_path), download=True)


# --------------------------------------------------------------------------- digits


def test_digits_is_sklearns_data_in_a_fixed_stratified_split():
    from sklearn.datasets import load_digits

    (x_train, y_train), (x_test, y_test) = data.load_digits()
    assert x_train.shape == (1347, 8, 8, 1) and x_test.shape == (450, 8, 8, 1)
    assert x_train.dtype == np.uint8 and y_train.shape == (1347, 1) and y_test.dtype == np.uint8
    # Every example of scikit-learn's set, once, its 0..16 intensities scaled to 0..255.
    digits = load_digits()
    ours = np.concatenate([x_train, x_test])[..., 0].astype(np.float64) * 16 / 255
    ours = sorted(map(bytes, np.round(ours).astype(np.uint8).reshape(len(ours), -1)))
    theirs = sorted(map(bytes, digits.images.astype(np.uint8).reshape(len(digits.images), -1)))
    assert ours == theirs and int(x_train.max()) == 255
    # Stratified: each digit's share of the test split is its share of the whole (+-1 example).
    whole = np.bincount(digits.target, minlength=10) * 450 / len(digits.target)
    assert np.abs(np.bincount(y_test.ravel(), minlength=10) - whole).max() <= 1
    # Fixed: the same split every time, whatever the seed.
    again = data.load_dataset("digits", seed=7)
    np.testing.assert_array_equal(again.x_test, x_test)
    assert again.num_classes == 10 and data.image_info("digits") == ((8, 8, 1), 10)


# --------------------------------------------------------------------------- synthetic images


def test_synthetic_images_take_the_shape_of_the_data_they_stand_in_for():
    like_mnist = data.load_images("synthetic", train_examples=40, test_examples=8,
                                  synthetic_like="mnist")
    assert like_mnist.x_train.shape == (40, 28, 28, 1) and like_mnist.num_classes == 10
    like_c100 = data.load_images("synthetic", train_examples=40, test_examples=8, seed=2,
                                 synthetic_like="cifar100")
    assert like_c100.x_train.shape == (40, 32, 32, 3) and like_c100.num_classes == 100
    assert int(like_c100.y_train.max()) < 100
    assert data.image_info("synthetic", synthetic_like="digits") == ((8, 8, 1), 10)
    # The default stays what it was: CIFAR-shaped, 10 classes, load_synthetic's arrays.
    default = data.load_dataset("synthetic", train_examples=40, test_examples=8, seed=3)
    (x_train, y_train), _ = data.load_synthetic(train_examples=40, test_examples=8, seed=3)
    np.testing.assert_array_equal(default.x_train, x_train)
    np.testing.assert_array_equal(default.y_train, y_train)


# --------------------------------------------------------------------------- IMDB


def write_imdb_npz(path, seed=0, n_train=40, n_test=24, words=300):
    """keras' imdb.npz layout: ragged object arrays of word-rank lists (1-based), int64 labels."""
    rng = np.random.default_rng(seed)

    def reviews(n):
        out = np.empty(n, dtype=object)
        for i in range(n):
            out[i] = [int(w) for w in rng.integers(1, words, size=rng.integers(3, 30))]
        return out, rng.integers(0, 2, n).astype(np.int64)

    (x_train, y_train), (x_test, y_test) = reviews(n_train), reviews(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def keras_imdb(monkeypatch, path, **kwargs):
    import keras.src.datasets.imdb as keras_imdb_module

    monkeypatch.setattr(keras_imdb_module, "get_file", lambda *args, **kw: str(path))
    return keras_imdb_module.load_data(**kwargs)


@pytest.mark.parametrize("num_words", [None, 100])
def test_imdb_npz_matches_keras(tmp_path, monkeypatch, num_words):
    path = write_imdb_npz(tmp_path / "imdb.npz")
    want = keras_imdb(monkeypatch, path, num_words=num_words)
    got = data.load_imdb(str(path), num_words=num_words)
    for (gx, gy), (wx, wy) in zip(got, want):
        assert [list(r) for r in gx] == [list(r) for r in wx]
        assert gy.dtype == wy.dtype
        np.testing.assert_array_equal(gy, wy)


def test_imdb_text_dataset_pads_and_cuts_like_pad_sequences(tmp_path, monkeypatch):
    import keras

    path = write_imdb_npz(tmp_path / "imdb.npz", seed=1)
    (x_train, y_train), (x_test, _) = keras_imdb(monkeypatch, path, num_words=120)
    arrays = data.load_text_dataset("imdb", data_dir=str(tmp_path), vocab_size=120,
                                    sequence_length=16, train_examples=30)
    assert arrays.x_train.dtype == np.int32 and arrays.x_train.shape == (30, 16)
    assert arrays.x_test.shape == (24, 16) and arrays.y_train.shape == (30, 1)
    assert arrays.num_classes == 2 and arrays.vocab_size == 120 and arrays.sequence_length == 16
    np.testing.assert_array_equal(arrays.x_train,
                                  keras.utils.pad_sequences(list(x_train[:30]), maxlen=16))
    np.testing.assert_array_equal(arrays.x_test, keras.utils.pad_sequences(list(x_test), 16))
    np.testing.assert_array_equal(arrays.y_train.ravel(), y_train[:30])
    assert int(arrays.x_train.max()) < 120


def test_tampered_imdb_npz_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = np.empty(1, dtype=object)
    bad[0] = Exploit()
    np.savez(tmp_path / "imdb.npz", x_train=bad, y_train=np.zeros(1, np.int64),
             x_test=bad, y_test=np.zeros(1, np.int64))
    with pytest.raises(KbenchError, match="not a readable IMDB"):
        data.load_text_dataset("imdb", data_dir=str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_imdb_from_tfds_is_tokenized_by_text_vectorization(tmp_path):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    reviews = {"train": [b"A great, great film.<br />Great cast!", b"Awful plot; awful acting.",
                         b"great fun", b"awful"],
               "test": [b"Great!", b"unseen words awful"]}

    def as_dataset(self, split, *args, **kwargs):
        texts = reviews["train" if "train" in str(split) else "test"]
        labels = [i % 2 for i in range(len(texts))]
        return tf.data.Dataset.from_tensor_slices({"text": texts, "label": labels})

    prepared_tfds_dir(tmp_path, "imdb_reviews/plain_text")
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        arrays = data.load_text_dataset("imdb", data_dir=str(tmp_path), vocab_size=20,
                                        sequence_length=6)
    # Vocabulary by frequency: 0 pads, 1 is the rare-word id, then "great" (4x), "awful" (4x).
    great, awful = arrays.x_test[0][-1], arrays.x_test[1][-1]
    assert {great, awful} == {2, 3}
    # "a great great film great cast": six words, "<br />" and punctuation are no tokens.
    first = arrays.x_train[0].tolist()
    assert first[1] == first[2] == first[4] == great and min(first) > 1 and len(set(first)) == 4
    assert arrays.x_test[1].tolist() == [0, 0, 0, 1, 1, awful]  # unseen words -> 1
    assert arrays.y_train.ravel().tolist() == [0, 1, 0, 1]


def test_missing_imdb_is_one_clear_error_within_seconds(tmp_path):
    start = time.monotonic()
    with pytest.raises(KbenchError) as err:
        data.load_text_dataset("imdb", data_dir=str(tmp_path))
    message = str(err.value)
    assert message.startswith("IMDB not found") and "imdb.npz" in message
    assert "--data-dir" in message and "--dataset synthetic" in message and "\n" not in message
    assert time.monotonic() - start < 5
    junk = tmp_path / "imdb.npz"  # named by --data-dir itself: a damaged file, not "not found"
    junk.write_text("an HTML error page, saved as the archive")
    with pytest.raises(KbenchError, match=rf"^{junk} is not a readable IMDB imdb.npz"):
        data.load_text_dataset("imdb", data_dir=str(junk))
    with pytest.raises(KbenchError, match="unknown text dataset 'yelp'"):
        data.load_text_dataset("yelp")


# --------------------------------------------------------------------------- synthetic text


def test_synthetic_text_is_deterministic_and_laid_out_like_reviews():
    a = data.load_text_dataset("synthetic", train_examples=64, test_examples=16, seed=3,
                               vocab_size=500, sequence_length=40)
    b = data.load_text_dataset("synthetic", train_examples=64, test_examples=16, seed=3,
                               vocab_size=500, sequence_length=40)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.x_train.shape == (64, 40) and a.x_train.dtype == np.int32
    assert int(a.x_train.max()) < 500 and set(np.unique(a.y_train)) <= {0, 1}
    for row in a.x_train:  # zeros in front, then the start mark 1, then words (never 0 or 1)
        start = int(np.argmax(row != 0))
        assert row[start] == 1 and (row[:start] == 0).all() and (row[start + 1:] > 2).all()
        assert 40 - start >= 10


def test_synthetic_text_is_learnable():
    """A linear classifier on word counts separates the classes: the data carries signal."""
    import scipy.sparse
    from sklearn.linear_model import LogisticRegression

    arrays = data.load_text_dataset("synthetic", train_examples=2000, test_examples=500)

    def counts(ids):
        rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        return scipy.sparse.csr_matrix((np.ones(ids.size), (rows, ids.ravel())),
                                       shape=(len(ids), arrays.vocab_size))

    clf = LogisticRegression(max_iter=300).fit(counts(arrays.x_train), arrays.y_train.ravel())
    assert clf.score(counts(arrays.x_test), arrays.y_test.ravel()) > 0.9  # chance: 0.5


def test_text_pipeline_keeps_ids_and_visits_every_example_once_per_epoch():
    arrays = data.load_text_dataset("synthetic", train_examples=48, test_examples=20,
                                    vocab_size=200, sequence_length=12)
    train, test = data.make_text_datasets(arrays, batch_size=16, seed=5)
    assert train.steps_per_epoch == 3
    batches = [(np.asarray(x), np.asarray(y)) for x, y in train.dataset.take(6)]
    again = [(np.asarray(x), np.asarray(y)) for x, y in train.dataset.take(6)]
    for (xa, ya), (xb, yb) in zip(batches, again):  # a new iterator replays the stream
        np.testing.assert_array_equal(xa, xb)
    assert batches[0][0].dtype == np.int32 and batches[0][1].shape == (16, 2)
    epoch = np.concatenate([x for x, _ in batches[:3]])
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, arrays.x_train))
    assert not np.array_equal(batches[0][0], batches[3][0])  # epoch 2: another order
    ordered = np.concatenate([np.asarray(x) for x, _ in test.dataset])
    np.testing.assert_array_equal(ordered, arrays.x_test)
    with pytest.raises(KbenchError, match="batch size 64 is impossible"):
        data.make_text_datasets(arrays, batch_size=64)


def test_pad_sequences_matches_keras():
    import keras

    sequences = [[5, 6, 7], [], list(range(1, 20)), [9]]
    np.testing.assert_array_equal(data.pad_sequences(sequences, 8),
                                  keras.utils.pad_sequences(sequences, maxlen=8))
