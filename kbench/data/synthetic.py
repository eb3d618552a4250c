"""Synthetic image data: deterministic, learnable, any size; used only when asked for."""

import numpy as np


def load_synthetic(num_classes=10, train_examples=10_000, test_examples=2_000,
                   image_shape=(32, 32, 3), seed=0):
    """A learnable stand-in for CIFAR: uint8 images, (N, 1) uint8 labels, same seed -> same arrays.

    Each class has a smooth random colour pattern; an example is its class pattern at a random
    contrast plus per-pixel noise, so a model must average over many pixels to classify it and
    flips/crops keep the task solvable. It is no substitute for real data: use it to check that
    code runs and learns, and to time it.
    """
    rng = np.random.default_rng(seed)
    height, width, channels = image_shape
    coarse = rng.normal(size=(num_classes, 4, 4, channels))
    patterns = coarse.repeat(-(-height // 4), axis=1).repeat(-(-width // 4), axis=2)
    patterns = patterns[:, :height, :width]

    def make(n):
        labels = rng.integers(0, num_classes, size=n)
        contrast = rng.uniform(0.25, 1.0, size=(n, 1, 1, 1))
        noise = rng.normal(size=(n, height, width, channels)).astype(np.float32)
        images = 128.0 + 48.0 * contrast * patterns[labels] + 48.0 * noise
        return (np.clip(images, 0, 255).astype(np.uint8),
                labels.astype(np.uint8).reshape(-1, 1))

    return make(train_examples), make(test_examples)
