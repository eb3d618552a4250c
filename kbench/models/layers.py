"""kbench's custom layers and initializers, registered so `keras.saving.load_model` finds them
after `import kbench`."""

import math

import keras
import numpy as np
from keras import ops

# Per-channel statistics of the CIFAR-10 training set, in raw 0..255 pixels.
CIFAR_MEAN = (125.307, 122.950, 113.865)
CIFAR_STD = (62.993, 62.089, 66.705)


@keras.saving.register_keras_serializable(package="kbench")
class PortableNormal(keras.initializers.Initializer):
    """Zero-mean normal weights with std sqrt(scale / fan_in), drawn with NumPy.

    Keras' own initializers draw from each backend's RNG, so one seed gives three different
    networks; this one gives the same weights under JAX, TensorFlow and PyTorch, which is what
    a fair cross-backend comparison starts from. scale=2 is He-normal, scale=1 LeCun-normal.
    """

    def __init__(self, seed=0, scale=2.0):
        self.seed = int(seed)
        self.scale = float(scale)

    def __call__(self, shape, dtype=None):
        fan_in = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
        rng = np.random.default_rng(self.seed)
        values = rng.normal(0.0, math.sqrt(self.scale / fan_in), size=shape)
        return ops.convert_to_tensor(values.astype("float32"), dtype=dtype or "float32")

    def get_config(self):
        return {"seed": self.seed, "scale": self.scale}


class SeedSequence:
    """Hands out a distinct, reproducible seed to each layer of one model."""

    def __init__(self, seed):
        self._sequence = np.random.SeedSequence(int(seed))

    def __call__(self):
        return int(self._sequence.spawn(1)[0].generate_state(1)[0])

    def normal(self, scale=2.0):
        return PortableNormal(self(), scale)


@keras.saving.register_keras_serializable(package="kbench")
class ShortcutPad(keras.layers.Layer):
    """He et al. (2016) CIFAR shortcut "option A": subsample by `stride`, zero-pad channels.

    Parameter-free, which is why ResNet-20 has 0.27 M parameters and not more.
    """

    def __init__(self, filters, stride=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.stride = int(stride)

    def call(self, x):
        s = self.stride
        x = x[:, ::s, ::s, :]
        extra = self.filters - x.shape[-1]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        s = self.stride
        ceil = lambda n: None if n is None else -(-n // s)  # noqa: E731
        return (batch, ceil(height), ceil(width), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "stride": self.stride}


def pixel_normalization(channels, mean=None, std=None):
    """Raw 0..255 pixels -> standardized inputs, inside the model so a saved model needs nothing
    else. Defaults: CIFAR statistics for 3 channels, mid-grey (127.5 +- 64) otherwise."""
    if mean is None:
        mean = CIFAR_MEAN if channels == 3 else (127.5,) * channels
    if std is None:
        std = CIFAR_STD if channels == 3 else (64.0,) * channels
    return keras.layers.Normalization(
        mean=list(mean), variance=[s * s for s in std], name="normalize_pixels")
