"""Text classifiers over token ids: a small Transformer encoder and an LSTM.

Both take (batch, sequence_length) int32 ids (0 pads) and return float32 logits. The
Transformer is keras-io's "Text classification with Transformer": token + position embedding,
encoder blocks of multi-head self-attention and a feed-forward network (each with a residual
connection, dropout and LayerNormalization), average pooling over positions, a linear
classifier. Weights are drawn with NumPy from `seed`, as for every kbench model, so a seed
gives the same initial network under JAX, TensorFlow and PyTorch.
"""

import math

import keras
from keras import layers, ops

from kbench.models.layers import PortableNormal, SeedSequence


@keras.saving.register_keras_serializable(package="kbench")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per position to a (batch, length, dim) sequence."""

    def __init__(self, initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=tuple(input_shape[-2:]), name="embeddings",
                                          initializer=self.initializer)

    def call(self, x):
        return x + ops.cast(self.embeddings, x.dtype)

    def get_config(self):
        return {**super().get_config(),
                "initializer": keras.initializers.serialize(self.initializer)}


def _table_init(seeds, rows, stddev=0.05):
    """Normal(0, stddev) for a (rows, dim) table, drawn with NumPy (PortableNormal's standard
    deviation is sqrt(scale / rows))."""
    return PortableNormal(seeds(), scale=stddev * stddev * rows)


def _redraw_attention_kernels(attention, seeds):
    """MultiHeadAttention clones its one kernel initializer for query, key, value and output,
    so a seeded initializer would start all three projections equal: draw each kernel with its
    own seed (LeCun normal over its true fan-in)."""
    for dense, fan_in_dims in ((attention.query_dense, 1), (attention.key_dense, 1),
                               (attention.value_dense, 1), (attention.output_dense, 2)):
        shape = tuple(dense.kernel.shape)
        fan_in = math.prod(shape[:fan_in_dims])
        values = PortableNormal(seeds(), scale=1.0)((fan_in, math.prod(shape) // fan_in))
        dense.kernel.assign(ops.reshape(values, shape))


def _dropout(rate, seeds):
    # Dropout masks come from each backend's own RNG (they differ across backends); the seed
    # must fit an int32 for PyTorch's.
    return layers.Dropout(rate, seed=seeds() % 2**31)


def _embed(inputs, vocab_size, embed_dim, seeds):
    return layers.Embedding(vocab_size, embed_dim, name="token_embedding",
                            embeddings_initializer=_table_init(seeds, vocab_size))(inputs)


def _classifier(x, num_classes, seeds, dropout):
    x = _dropout(dropout, seeds)(x)
    return layers.Dense(num_classes, kernel_initializer=seeds.normal(scale=1.0),
                        dtype="float32", name="logits")(x)


def encoder_block(x, seeds, num_heads=2, ff_dim=32, dropout=0.1):
    """Post-norm Transformer encoder block (Vaswani et al. 2017), as in keras-io's example."""
    dim = x.shape[-1]
    attention = layers.MultiHeadAttention(num_heads, key_dim=dim // num_heads)
    y = attention(x, x)
    _redraw_attention_kernels(attention, seeds)
    y = _dropout(dropout, seeds)(y)
    x = layers.LayerNormalization(epsilon=1e-6)(layers.Add()([x, y]))
    y = layers.Dense(ff_dim, activation="relu", kernel_initializer=seeds.normal())(x)
    y = layers.Dense(dim, kernel_initializer=seeds.normal(scale=1.0))(y)
    y = _dropout(dropout, seeds)(y)
    return layers.LayerNormalization(epsilon=1e-6)(layers.Add()([x, y]))


def text_transformer(num_classes=2, input_shape=(200,), seed=0, vocab_size=20_000,
                     embed_dim=32, num_heads=2, ff_dim=32, num_blocks=1, dropout=0.1):
    """keras-io's IMDB Transformer: 32-dim embeddings, one block of 2 heads, 0.65 M
    parameters at a 20 k vocabulary (almost all in the token embedding)."""
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
    seeds = SeedSequence(seed)
    (length,) = input_shape
    inputs = keras.Input((length,), dtype="int32", name="tokens")
    x = _embed(inputs, vocab_size, embed_dim, seeds)
    x = PositionEmbedding(_table_init(seeds, length), name="position_embedding")(x)
    for _ in range(num_blocks):
        x = encoder_block(x, seeds, num_heads, ff_dim, dropout)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = _classifier(x, num_classes, seeds, dropout)
    return keras.Model(inputs, outputs, name="text_transformer")


def text_lstm(num_classes=2, input_shape=(200,), seed=0, vocab_size=20_000, embed_dim=32,
              units=32, dropout=0.1):
    """Embedding, one LSTM layer read front to back (reviews are padded in front, so its last
    state has just read the review's end), a linear classifier."""
    seeds = SeedSequence(seed)
    (length,) = input_shape
    inputs = keras.Input((length,), dtype="int32", name="tokens")
    x = _embed(inputs, vocab_size, embed_dim, seeds)
    x = layers.LSTM(units, kernel_initializer=seeds.normal(scale=1.0),
                    recurrent_initializer=seeds.normal(scale=1.0))(x)
    outputs = _classifier(x, num_classes, seeds, dropout)
    return keras.Model(inputs, outputs, name="text_lstm")
