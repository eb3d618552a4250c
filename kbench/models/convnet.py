"""A small convnet for small grey images (MNIST, Fashion-MNIST, the 8x8 scikit-learn digits).

keras-io's "Simple MNIST convnet" grown by BatchNorm: stages of two 3x3 conv-BN-ReLU layers and
a 2x2 max pool, then global average pooling and a linear classifier. Any image size that
survives the pools works: 28x28 -> 14 -> 7, 8x8 -> 4 -> 2. Raw 0..255 pixels in, float32 logits
out; weights drawn with NumPy from `seed`, the same under every backend.
"""

import keras
from keras import layers

from kbench.models.layers import SeedSequence, pixel_normalization


def convnet(num_classes=10, input_shape=(28, 28, 1), seed=0, widths=(32, 64), mean=None,
            std=None):
    """Two stages at 32 and 64 filters by default: 65 k parameters, 18 M multiply-adds on a
    28x28 image, 1.2 M on an 8x8 digit."""
    seeds = SeedSequence(seed)
    inputs = keras.Input(input_shape, name="pixels")
    x = pixel_normalization(input_shape[-1], mean, std)(inputs)
    for filters in widths:
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              kernel_initializer=seeds.normal())(x)
            # BatchNorm with PyTorch's defaults, as kbench's ResNets use it.
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_initializer=seeds.normal(scale=1.0),
                           dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name="convnet")
