"""Classify IMDB movie reviews with a small Transformer encoder (or an LSTM), on any backend.

    KERAS_BACKEND=jax python recipes/imdb_transformer.py --data-dir ~/.keras/datasets
    KERAS_BACKEND=torch python recipes/imdb_transformer.py --arch lstm --data-dir ~/data/tfds
    KERAS_BACKEND=tensorflow python recipes/imdb_transformer.py --dataset synthetic --epochs 1

keras-io's "Text classification with Transformer", as a kbench recipe. The story:

1. Data: IMDB's 25 000 training and 25 000 test reviews, positive or negative, from keras'
   imdb.npz (word ids, the arrays `keras.datasets.imdb.load_data(num_words=...)` gives) or
   from a TFDS dir (`imdb_reviews`: raw text, tokenized in tf.data by a TextVectorization
   layer adapted to the training reviews). Each review keeps its last --sequence-length
   tokens, padded with 0 in front; ids at or above --vocab-size become the rare-word id.
   `--dataset synthetic` is a learnable stand-in: keyword ids of each class hidden in filler.
2. Model: token + position embedding, a Transformer encoder block (multi-head self-attention
   and a feed-forward network, residual connections, LayerNormalization), average pooling
   over positions, a linear classifier; `--arch lstm` swaps in an LSTM. Token ids in, logits
   out.
3. Training: AdamW, a short warmup then cosine decay, label smoothing; two epochs, as
   keras-io trains it (we could not measure real IMDB offline: run it and see).
4. Results in --output-dir: metrics.json, history.csv (one row per epoch), model.keras.

As a template: `main(config, model=my_model, datasets=(train_ds, test_ds))` trains your own
network and/or data with everything else unchanged.
"""

import dataclasses

import kbench  # validates KERAS_BACKEND and registers kbench layers; import before keras
from kbench import data, tasks
from kbench.config import FRACTION, Range, TrainConfig, option
from kbench.errors import KbenchError
from kbench.flags import run_recipe
from kbench.models import TEXT_MODELS, get_model
from kbench.optim import OPTIMIZERS
from kbench.train import Run

ARCHS = {"transformer": "text_transformer", "lstm": "text_lstm"}
NUM_CLASSES = 2  # negative, positive (the synthetic stand-in too)


@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = option("imdb", "imdb, or synthetic (learnable, no data needed)",
                          choices=data.TEXT_DATASETS)
    arch: str = option("transformer", "transformer encoder or recurrent (LSTM) model",
                       choices=tuple(ARCHS))
    model: str | None = option(None, "a model name (default: text_<arch>)", allowed=TEXT_MODELS)
    vocab_size: int = option(20_000, "keep the most frequent words; rarer ones share one id",
                             allowed=Range(3))
    sequence_length: int = option(200, "tokens per review (its last ones, padded in front)",
                                  allowed=Range(1))
    embed_dim: int = option(32, "token embedding size", allowed=Range(1))
    num_heads: int = option(2, "attention heads (transformer)", allowed=Range(1))
    ff_dim: int = option(32, "feed-forward hidden size (transformer)",
                         allowed=Range(1))
    dropout: float = option(0.1, "dropout rate", allowed=FRACTION)
    epochs: int = option(2, "training epochs")
    batch_size: int = option(32, "global batch size")
    optimizer: str = option("adamw", "sgd, adam or adamw", choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(1e-2, "decoupled weight decay on kernels and embeddings")
    warmup_epochs: float = option(0.1, "linear learning-rate warmup before the cosine decay")

    def check_combination(self):
        super().check_combination()
        if self.model and self.arch != "transformer" and ARCHS[self.arch] != self.model:
            raise KbenchError(f"--model {self.model} and --arch {self.arch} name different "
                              "models: drop one")
        if (self.model or ARCHS[self.arch]) == "text_transformer" \
                and self.embed_dim % self.num_heads:
            raise KbenchError(f"--embed-dim {self.embed_dim} is not a multiple of --num-heads "
                              f"{self.num_heads}: each head takes an equal share of it")


def build_datasets(config, shard=(0, 1)):
    """(train, test) Streams of (int32 token ids, one-hot labels); `shard` is this process's
    part of every training batch under data-parallel training (kbench.distribute)."""
    return tasks.text_streams(config, shard=shard)


check_inputs = tasks.check_data  # the data is there: kbench compare asks once, before any run


def build_model(config):
    name = config.model or ARCHS[config.arch]
    sizes = dict(embed_dim=config.embed_dim, dropout=config.dropout)
    if name == "text_transformer":
        sizes.update(num_heads=config.num_heads, ff_dim=config.ff_dim)
    elif name == "text_lstm":
        sizes.update(units=config.embed_dim)
    return get_model(name, num_classes=NUM_CLASSES,
                     input_shape=(config.sequence_length,), seed=config.seed,
                     vocab_size=config.vocab_size, **sizes)


def main(config, model=None, datasets=None, callbacks=()):
    """Train and evaluate; returns the metrics dict that metrics.json holds.

    `model` (a compiled or uncompiled keras.Model taking int32 token ids) and `datasets` (a
    (train, test) pair of Streams or tf.data pipelines yielding one-hot labels) replace the
    defaults; `callbacks` are Keras callbacks added to fit's.
    """
    with Run(config, "imdb_transformer", callbacks) as run:  # devices, seed, policy, resume
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)
        model = run.model(build_model, given=model)
        run.fit(model, train_ds, test_ds)  # compile (AdamW, schedule, loss), then model.fit
        return run.finish(model)  # evaluate; metrics.json, eval.json, model.keras


if __name__ == "__main__":
    run_recipe(main, Config, description=__doc__.split("\n")[0])
