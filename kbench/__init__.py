"""kbench: train Keras 3 models on JAX, TensorFlow and PyTorch, and compare the three honestly.

Importing kbench validates KERAS_BACKEND (one clear line instead of Keras' traceback) and
registers kbench's custom layers so `keras.saving.load_model` can read kbench models.
"""

import os

__version__ = "0.1.0"

from kbench.errors import KbenchError, install_excepthook

install_excepthook()
# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) buries real output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kbench.backend import keep_tensorflow_off_the_gpus, requested_backend  # noqa: E402

requested_backend()
keep_tensorflow_off_the_gpus()  # before anything runs a TensorFlow op

from kbench import models  # noqa: E402,F401  (registers custom layers)

__all__ = ["KbenchError", "__version__", "models"]
