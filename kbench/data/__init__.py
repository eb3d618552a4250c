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
downloaded unless the caller passes `download=True` (recipes: `--download`). `check_data` says
that error without loading anything (kbench compare, before its runs).

Layout: sources.py (folders, network check, downloads, TFDS), cifar.py, mnist.py (+ digits),
synthetic.py, text.py (IMDB, synthetic text), registry.py (names -> arrays), pipeline.py
(tf.data), stream.py (`Stream`: a pipeline and its sizes, what the pipelines return). Everything public is re-exported here: `kbench.data.load_cifar(...)`.
"""

from kbench.data.cifar import CIFAR, load_cifar
from kbench.data.mnist import IDX_FILES, MNIST, load_digits, load_mnist, read_idx
from kbench.data.pipeline import augment_batch, make_datasets, make_pipeline
from kbench.data.registry import (
    DATASETS,
    IMAGE_DATASETS,
    IMAGE_INFO,
    TEXT_DATASETS,
    Dataset,
    check_data,
    image_info,
    load_dataset,
    load_images,
    num_classes,
)
from kbench.data.sources import default_data_dirs
from kbench.data.stream import Stream, as_stream
from kbench.data.synthetic import load_synthetic
from kbench.data.text import (
    IMDB,
    TextDataset,
    load_imdb,
    load_synthetic_text,
    load_text_dataset,
    make_text_datasets,
    make_text_pipeline,
    pad_sequences,
)

__all__ = [
    "CIFAR", "DATASETS", "IDX_FILES", "IMAGE_DATASETS", "IMAGE_INFO", "IMDB", "MNIST",
    "TEXT_DATASETS", "Dataset", "Stream", "TextDataset", "as_stream", "augment_batch", "check_data",
    "default_data_dirs",
    "image_info", "load_cifar", "load_dataset", "load_digits", "load_images", "load_imdb",
    "load_mnist", "load_synthetic", "load_synthetic_text", "load_text_dataset",
    "make_datasets", "make_pipeline", "make_text_datasets", "make_text_pipeline",
    "num_classes", "pad_sequences", "read_idx",
]
