"""tf.data pipelines that feed all three backends: seeded, restartable training streams with
batched augmentation, and in-order evaluation batches."""

import numpy as np

from kbench.data.stream import Stream
from kbench.errors import KbenchError


def make_pipeline(images, labels, num_classes, batch_size, training, seed=0, augment=True,
                  crop_padding=4, cutout=0, shard=(0, 1)):
    """A tf.data pipeline of (float32 raw-pixel images, one-hot labels) batches.

    Training: an endless stream of epochs. Epoch e visits the examples in a permutation drawn
    from (seed, e) and drops its last partial batch; batch i is augmented as a whole
    (pad-and-random-crop, horizontal flip, optional cutout) with stateless ops seeded from
    (seed, i). The stream is a pure function of the seed: every new iterator replays it from
    the start, so JAX and PyTorch (where Keras peeks at one batch and restarts the iterator)
    see exactly the batches TensorFlow sees. Returns a `Stream`: `.dataset` is the tf.data
    pipeline, `.steps_per_epoch` tells fit how long an epoch is, `.starting_at(k)` is the
    same stream from global step k (a resumed run).
    Evaluation: a Stream of every example once, in order. Pixels stay 0..255: normalisation
    lives in the model.

    `shard=(index, count)` (training only) is for data-parallel processes that each feed their
    own replicas (torch DDP, multi-host JAX and TensorFlow): `batch_size` stays the global batch
    and this process gets rows [index * b, (index + 1) * b) of every global batch, b =
    batch_size / count, augmented exactly as those rows are in the unsharded stream. The union
    of the shards is the single-process stream, step for step. Evaluation is never sharded.
    """
    import tensorflow as tf

    images = tf.constant(images)  # kept uint8: the pipeline moves indices, not pixels

    def pixels(index):
        return tf.cast(tf.gather(images, index), tf.float32)

    def augment_fn(x, batch_seed, rows=None):
        return augment_batch(x, batch_seed, crop_padding, cutout, rows=rows)

    return batched_stream(len(images), pixels, labels, num_classes, batch_size, training, seed,
                           augment_fn if augment else None, shard=shard)


def batched_stream(n, inputs, labels, num_classes, batch_size, training, seed, transform=None,
                   shard=(0, 1)):
    """What the image and text pipelines share: batches of (inputs(index), one-hot labels).

    Training: the endless, seeded stream of epochs make_pipeline describes, each batch passed
    through `transform(x, batch_seed)` when given; evaluation: every example once, in order.
    With `shard=(index, count)`, count > 1, a training batch is this process's slice of the
    global batch and the transform is called as `transform(x, batch_seed, rows=(start,
    batch_size))`: x holds rows start.. of a global batch of batch_size, so random draws are
    made for the global batch and sliced (a shard sees what the single process would).
    """
    import tensorflow as tf

    if batch_size < 1 or (training and batch_size > n):
        raise KbenchError(f"batch size {batch_size} is impossible for {n} examples; "
                          f"use --batch-size between 1 and {n}")
    shard_index, shard_count = check_shard(shard, batch_size)
    labels = tf.constant(np.asarray(labels).reshape(-1).astype(np.int32))

    def gather(index):
        return inputs(index), tf.one_hot(tf.gather(labels, index), num_classes)

    if not training:
        ds = tf.data.Dataset.range(n).batch(batch_size)
        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Sizes for kbench.distribute, which checks that every batch splits over the devices.
        return Stream(ds.prefetch(tf.data.AUTOTUNE), num_examples=n, batch_size=batch_size)

    local = batch_size // shard_count
    start = shard_index * local

    def epoch_batches(epoch):
        keys = tf.random.stateless_uniform([n], tf.stack([tf.constant(seed, tf.int64), epoch]))
        order = tf.argsort(keys)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True)
        if shard_count > 1:
            # Slice the index batch, not the pixels: a shard gathers and augments only its rows.
            batches = batches.map(lambda index: index[start:start + local])
        return batches

    def gather_and_transform(step, index):
        x, y = gather(index)
        if transform is not None:
            batch_seed = tf.stack([tf.constant(seed, tf.int64) + 1, step])
            if shard_count > 1:
                x = transform(x, batch_seed, rows=(start, batch_size))
            else:
                x = transform(x, batch_seed)
        return x, y

    def stream_from(first_step=0):
        ds = tf.data.Dataset.counter().flat_map(epoch_batches).enumerate()
        if first_step:
            # Skips index batches only (a permutation per epoch): no pixels are gathered.
            ds = ds.skip(first_step)
        ds = ds.map(gather_and_transform, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    # steps_per_epoch counts global steps (the same for every shard); batch_size is the global
    # batch, not this shard's; restart(k) is the same stream from global step k on.
    return Stream(stream_from(), steps_per_epoch=n // batch_size, num_examples=n,
                  batch_size=batch_size, restart=stream_from)


def check_shard(shard, batch_size):
    """(index, count) validated: count processes split every global batch of batch_size."""
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise KbenchError(f"shard must be a pair (index, count), not {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise KbenchError(f"shard {(index, count)} is impossible; index must be in 0..count-1")
    if batch_size % count:
        raise KbenchError(f"global batch size {batch_size} does not split among {count} "
                          f"processes; use a --batch-size that is a multiple of {count}")
    return index, count


def augment_batch(x, batch_seed, crop_padding=4, cutout=0, rows=None):
    """Per-example random crop (after zero padding), horizontal flip and cutout, as batched ops.

    `rows=(start, global_batch)`: x holds rows start.. of a batch of global_batch (a data-parallel
    shard); every random draw is made for the whole global batch and sliced, so each row is
    augmented exactly as in the unsharded batch.
    """
    import tensorflow as tf

    batch, height, width = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    sharded = rows is not None
    start, drawn = rows if sharded else (0, batch)
    # Three independent streams (crop, flip, cutout) from one batch seed.
    seeds = tf.random.experimental.stateless_split(batch_seed, num=3)
    seed = lambda k: seeds[k]  # noqa: E731

    def draw(shape, stream, *args):
        # Same shape and seed as the unsharded batch -> the same numbers; keep this shard's rows.
        values = tf.random.stateless_uniform([drawn, *shape], seed(stream), *args)
        return values[start:start + batch] if sharded else values

    if crop_padding:
        p = crop_padding
        padded = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
        offsets = draw([2], 0, 0, 2 * p + 1, tf.int32)
        rows = offsets[:, :1] + tf.range(height)[None, :]  # (B, H)
        cols = offsets[:, 1:] + tf.range(width)[None, :]  # (B, W)
        x = tf.gather(padded, rows, axis=1, batch_dims=1)
        x = tf.gather(x, cols, axis=2, batch_dims=1)
    flip = draw([], 1) < 0.5
    x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if cutout:
        centers = draw([2], 2, 0, height, tf.int32)
        ys = tf.range(height)[None, :] - centers[:, :1]
        xs = tf.range(width)[None, :] - centers[:, 1:]
        half = cutout // 2
        inside_y = (ys >= -half) & (ys < cutout - half)
        inside_x = (xs >= -half) & (xs < cutout - half)
        hole = inside_y[:, :, None] & inside_x[:, None, :]
        x = tf.where(hole[..., None], tf.zeros_like(x), x)
    return x


def make_datasets(data, batch_size, seed=0, augment=True, cutout=0, shard=(0, 1)):
    """(train, test) pipelines for a Dataset; `shard` splits the training stream only (see
    make_pipeline): every process evaluates the whole test split."""
    train = make_pipeline(data.x_train, data.y_train, data.num_classes, batch_size, True,
                          seed=seed, augment=augment, cutout=cutout, shard=shard)
    test = make_pipeline(data.x_test, data.y_test, data.num_classes, batch_size, False)
    return train, test
