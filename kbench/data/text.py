"""Text data: IMDB (keras' imdb.npz or TFDS imdb_reviews), a learnable synthetic text task,
and their tf.data pipelines."""

import dataclasses
import os
import pickle
import zipfile

import numpy as np

from kbench.data.mnist import KERAS_DATASETS_URL
from kbench.data.pipeline import batched_stream
from kbench.data.registry import Dataset, TEXT_DATASETS, first_examples
from kbench.data.sources import fetch_archive, read_npy, tfds_prepared, default_data_dirs
from kbench.errors import KbenchError, reason


IMDB = dict(title="IMDB", npz="imdb.npz", tfds="imdb_reviews", archive="imdb.npz",
            url=KERAS_DATASETS_URL + "imdb.npz",
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
        train = first_examples(name, "train", train, train_examples)
        test = first_examples(name, "test", test, test_examples)
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
    source = find_imdb(data_dir, download)
    if source is None:  # to be downloaded
        return load_imdb(fetch_archive(IMDB, data_dir), num_words=vocab_size)
    kind, path = source
    if kind == "tfds":
        return _imdb_tfds_ids(path, vocab_size)
    return load_imdb(path, num_words=vocab_size)


def find_imdb(data_dir=None, download=False):
    """Where IMDB is read from, without reading it: ('npz' | 'tfds', path), or None when it
    will be downloaded; not there is a one-line KbenchError, so a caller can check before
    starting work that needs it."""
    searched = [data_dir] if data_dir else default_data_dirs()
    for directory in searched:
        path = os.path.expanduser(directory)
        if os.path.isfile(path) and (data_dir or zipfile.is_zipfile(path)):
            # A file --data-dir names is meant as imdb.npz: say if it is not, not "not found"
            # ($KBENCH_DATA_DIR may name another data set's archive: passed over).
            return ("npz", path)
        if os.path.isfile(os.path.join(path, IMDB["npz"])):
            return ("npz", os.path.join(path, IMDB["npz"]))
        if os.path.isdir(path) and tfds_prepared(path, IMDB["tfds"]):
            return ("tfds", path)
    if download:
        return None
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
            arrays = {os.path.splitext(m)[0]: read_npy(archive.read(m))
                      for m in archive.namelist() if m.endswith(".npy")}
        splits = [(arrays[f"x_{s}"], arrays[f"y_{s}"]) for s in ("train", "test")]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        raise KbenchError(f"{path} is not a readable IMDB imdb.npz "
                          f"({reason(exc)}); re-download it") from None
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


def make_text_pipeline(ids, labels, num_classes, batch_size, training, seed=0, shard=(0, 1)):
    """The text twin of make_pipeline: batches of (int32 token ids, one-hot labels), the same
    seeded endless training stream (no augmentation; `shard` as in make_pipeline), every
    example once for evaluation."""
    import tensorflow as tf

    ids = tf.constant(np.asarray(ids, np.int32))
    return batched_stream(len(ids), lambda index: tf.gather(ids, index), labels, num_classes,
                           batch_size, training, seed, shard=shard)


def make_text_datasets(data, batch_size, seed=0, shard=(0, 1), test_only=False):
    """(train, test) pipelines for a TextDataset; `shard` splits the training stream only;
    `test_only`: train is None."""
    test = make_text_pipeline(data.x_test, data.y_test, data.num_classes, batch_size, False)
    if test_only:
        return None, test
    train = make_text_pipeline(data.x_train, data.y_train, data.num_classes, batch_size, True,
                               seed=seed, shard=shard)
    return train, test
