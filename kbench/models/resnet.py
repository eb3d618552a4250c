"""ResNets for 32x32 images: the CIFAR ResNets of He et al. (2016), PreAct ResNet-18, ResNet-9.

All pure Keras 3 (functional API), channels-last, raw 0..255 pixels in, logits out (float32 even
under a mixed-precision policy, so the loss is computed in full precision).
"""

import keras
from keras import layers

from kbench.models.layers import SeedSequence, ShortcutPad, pixel_normalization

# BatchNorm as PyTorch defaults it (momentum 0.1 == Keras momentum 0.9, eps 1e-5): the native
# reference loops use the same numbers, and 0.9 suits short CIFAR runs better than Keras' 0.99.
BN = dict(momentum=0.9, epsilon=1e-5)


def _conv(filters, kernel, seeds, stride=1, name=None):
    return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                         kernel_initializer=seeds.normal(), name=name)


def _head(x, num_classes, seeds, pool="avg", scale=None):
    pooled = layers.GlobalAveragePooling2D() if pool == "avg" else layers.GlobalMaxPooling2D()
    x = pooled(x)
    x = layers.Dense(num_classes, kernel_initializer=seeds.normal(scale=1.0),
                     use_bias=scale is None, dtype="float32", name="logits")(x)
    if scale is not None:
        x = layers.Rescaling(scale, dtype="float32", name="logit_scale")(x)
    return x


def cifar_resnet(depth, num_classes=10, input_shape=(32, 32, 3), seed=0, width=16,
                 mean=None, std=None):
    """ResNet-{20,32,44,56,110} as in He et al. (2016), section 4.2.

    Three stages of (depth - 2) / 6 basic blocks at widths 16, 32, 64, parameter-free
    "option A" shortcuts; ResNet-20 has 0.27 M parameters.
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    blocks = (depth - 2) // 6
    seeds = SeedSequence(seed)
    inputs = keras.Input(input_shape, name="pixels")
    x = pixel_normalization(input_shape[-1], mean, std)(inputs)
    x = _conv(width, 3, seeds)(x)
    x = layers.ReLU()(layers.BatchNormalization(**BN)(x))
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x if stride == 1 else ShortcutPad(filters, stride)(x)
            y = _conv(filters, 3, seeds, stride)(x)
            y = layers.ReLU()(layers.BatchNormalization(**BN)(y))
            y = _conv(filters, 3, seeds)(y)
            y = layers.BatchNormalization(**BN)(y)
            x = layers.ReLU()(layers.Add()([shortcut, y]))
    outputs = _head(x, num_classes, seeds)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")


def preact_resnet18(num_classes=10, input_shape=(32, 32, 3), seed=0, mean=None, std=None):
    """PreAct ResNet-18 (He et al., "Identity Mappings", 2016) in its common CIFAR form:
    3x3 stem, stages of 2 pre-activation blocks at 64/128/256/512, 1x1 projection shortcuts."""
    seeds = SeedSequence(seed)
    inputs = keras.Input(input_shape, name="pixels")
    x = pixel_normalization(input_shape[-1], mean, std)(inputs)
    x = _conv(64, 3, seeds)(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            pre = layers.ReLU()(layers.BatchNormalization(**BN)(x))
            if stride != 1 or x.shape[-1] != filters:
                shortcut = _conv(filters, 1, seeds, stride)(pre)
            else:
                shortcut = x
            y = _conv(filters, 3, seeds, stride)(pre)
            y = layers.ReLU()(layers.BatchNormalization(**BN)(y))
            y = _conv(filters, 3, seeds)(y)
            x = layers.Add()([shortcut, y])
    x = layers.ReLU()(layers.BatchNormalization(**BN)(x))
    outputs = _head(x, num_classes, seeds)
    return keras.Model(inputs, outputs, name="preact_resnet18")


def resnet9(num_classes=10, input_shape=(32, 32, 3), seed=0, width=64, mean=None, std=None):
    """The small, fast residual net of the DAWNBench-winning CIFAR-10 trainers (Page, 2018):
    prep conv, three conv-pool layers (two with a residual pair of convs), global max pool and
    a bias-free classifier scaled by 1/8. 6.6 M parameters at width 64."""
    seeds = SeedSequence(seed)

    def conv_bn(x, filters):
        x = _conv(filters, 3, seeds)(x)
        return layers.ReLU()(layers.BatchNormalization(**BN)(x))

    def residual(x, filters):
        return layers.Add()([x, conv_bn(conv_bn(x, filters), filters)])

    inputs = keras.Input(input_shape, name="pixels")
    x = pixel_normalization(input_shape[-1], mean, std)(inputs)
    x = conv_bn(x, width)
    x = residual(layers.MaxPooling2D(2)(conv_bn(x, 2 * width)), 2 * width)
    x = layers.MaxPooling2D(2)(conv_bn(x, 4 * width))
    x = residual(layers.MaxPooling2D(2)(conv_bn(x, 8 * width)), 8 * width)
    outputs = _head(x, num_classes, seeds, pool="max", scale=0.125)
    return keras.Model(inputs, outputs, name="resnet9")
