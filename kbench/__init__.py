"""kbench: train Keras 3 models on JAX, TensorFlow and PyTorch, and compare the three honestly.

Importing kbench is instant: it validates KERAS_BACKEND (one clear line instead of Keras'
traceback) and loads no framework. Whenever Keras is imported (before or after kbench), kbench's
custom layers are registered so `keras.saving.load_model` can read kbench models; whenever
TensorFlow is, its C++ start-up lines are filtered out (kbench.imports).
"""

__version__ = "0.1.0"

from kbench.errors import KbenchError, install_excepthook  # noqa: E402

install_excepthook()

from kbench import imports as _imports  # noqa: E402
from kbench.backend import requested_backend  # noqa: E402

requested_backend()
_imports.install(_imports.quiet_tensorflow_logs())


def __getattr__(name):
    if name == "models":  # `import kbench; kbench.models.get_model(...)` loads Keras here
        import kbench.models

        return kbench.models
    raise AttributeError(f"module 'kbench' has no attribute {name!r}")


__all__ = ["KbenchError", "__version__", "models"]
