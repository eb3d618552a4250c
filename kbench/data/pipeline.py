"""tf.data pipelines that feed all three backends: seeded, restartable training streams with
batched augmentation, and in-order evaluation batches."""

import numpy as np

from kbench.errors import KbenchError


def make_pipeline(images, labels, num_classes, batch_size, training, seed=0, augment=True,
                  crop_padding=4, cutout=0):
    """A tf.data pipeline of (float32 raw-pixel images, one-hot labels) batches.

    Training: an endless stream of epochs. Epoch e visits the examples in a permutation drawn
    from (seed, e) and drops its last partial batch; batch i is augmented as a whole
    (pad-and-random-crop, horizontal flip, optional cutout) with stateless ops seeded from
    (seed, i). The stream is a pure function of the seed: every new iterator replays it from
    the start, so JAX and PyTorch (where Keras peeks at one batch and restarts the iterator)
    see exactly the batches TensorFlow sees. `ds.steps_per_epoch` tells fit how long an
    epoch is. Evaluation: every example once, in order. Pixels stay 0..255: normalisation
    lives in the model.
    """
    import tensorflow as tf

    images = tf.constant(images)  # kept uint8: the pipeline moves indices, not pixels

    def pixels(index):
        return tf.cast(tf.gather(images, index), tf.float32)

    def augment_fn(x, batch_seed):
        return augment_batch(x, batch_seed, crop_padding, cutout)

    return batched_stream(len(images), pixels, labels, num_classes, batch_size, training, seed,
                           augment_fn if augment else None)


def batched_stream(n, inputs, labels, num_classes, batch_size, training, seed, transform=None):
    """What the image and text pipelines share: batches of (inputs(index), one-hot labels).

    Training: the endless, seeded stream of epochs make_pipeline describes, each batch passed
    through `transform(x, batch_seed)` when given; evaluation: every example once, in order.
    """
    import tensorflow as tf

    if batch_size < 1 or (training and batch_size > n):
        raise KbenchError(f"batch size {batch_size} is impossible for {n} examples; "
                          f"use --batch-size between 1 and {n}")
    labels = tf.constant(np.asarray(labels).reshape(-1).astype(np.int32))

    def gather(index):
        return inputs(index), tf.one_hot(tf.gather(labels, index), num_classes)

    if not training:
        ds = tf.data.Dataset.range(n).batch(batch_size)
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.argsort(keys)
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)

    def gather_and_transform(step, index):
        x, y = gather(index)
        if transform is not None:
            x = transform(x, tf.stack([tf.constant(seed, tf.int64) + 1, step]))
        return x, y

    ds = tf.data.Dataset.counter().flat_map(epoch_batches).enumerate()
    ds = ds.map(gather_and_transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds.steps_per_epoch = n // batch_size
    return ds


def augment_batch(x, batch_seed, crop_padding=4, cutout=0):
    """Per-example random crop (after zero padding), horizontal flip and cutout, as batched ops."""
    import tensorflow as tf

    batch, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    # Three independent streams (crop, flip, cutout) from one batch seed.
    seeds = tf.random.experimental.stateless_split(batch_seed, num=3)
    seed = lambda k: seeds[k]  # noqa: E731
    if crop_padding:
        p = crop_padding
        padded = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        offsets = tf.random.stateless_uniform([batch, 2], seed(0), 0, 2 * p + 1, tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None, :]  # (B, H)
        cols = offsets[:, 1:] + tf.range(width)[None, :]  # (B, W)
        x = tf.gather(padded, rows, axis=1, batch_dims=1)
        x = tf.gather(x, cols, axis=2, batch_dims=1)
    flip = tf.random.stateless_uniform([batch], seed(1)) < 0.5
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if cutout:
        centers = tf.random.stateless_uniform([batch, 2], seed(2), 0, height, tf.int32)
        ys = tf.range(height)[None, :] - centers[:, :1]
        xs = tf.range(width)[None, :] - centers[:, 1:]
        half = cutout // 2
        inside_y = (ys >= -half) & (ys < cutout - half)
        inside_x = (xs >= -half) & (xs < cutout - half)
        hole = inside_y[:, :, None] & inside_x[:, None, :]
        x = tf.where(hole[..., None], tf.zeros_like(x), x)
    return x


def make_datasets(data, batch_size, seed=0, augment=True, cutout=0):
    """(train, test) pipelines for a Dataset."""
    train = make_pipeline(data.x_train, data.y_train, data.num_classes, batch_size, True,
                          seed=seed, augment=augment, cutout=cutout)
    test = make_pipeline(data.x_test, data.y_test, data.num_classes, batch_size, False)
    return train, test
