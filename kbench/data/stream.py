"""`Stream`: a tf.data pipeline together with the sizes the trainer needs to know about it.

kbench's pipelines (make_pipeline, make_text_pipeline) return Streams: the training stream
knows its steps per epoch, example count and global batch, and how to start again at global
step k (exact resume); the evaluation stream knows its example count and batch, which
data-parallel JAX checks against the device count. Keras gets `stream.dataset`, a plain
tf.data.Dataset.

`as_stream` turns whatever a caller brings (a kbench Stream, or a plain tf.data.Dataset) into a
Stream, computing what it can (steps per epoch from the cardinality or --steps-per-epoch) and
saying in one line what a plain dataset cannot give.
"""

import dataclasses
from collections.abc import Callable

from kbench.errors import KbenchError


@dataclasses.dataclass(frozen=True)
class Stream:
    """A tf.data pipeline and its sizes; None where a size is unknown.

    `dataset`: what Keras' fit / evaluate get. `steps_per_epoch`: batches in one epoch of a
    training stream (None for evaluation). `num_examples`: examples in one pass.
    `batch_size`: the global batch (a data-parallel shard's pipeline still names the global
    one). `restart(k)`: the same stream from global step k, as a tf.data.Dataset; None when
    the stream cannot be restarted exactly (see `starting_at`).
    """

    dataset: object
    steps_per_epoch: int | None = None
    num_examples: int | None = None
    batch_size: int | None = None
    restart: Callable | None = dataclasses.field(default=None, repr=False)

    @property
    def exact_restart(self):
        """Whether `starting_at` reproduces the stream exactly (kbench's pipelines)."""
        return self.restart is not None

    def starting_at(self, step):
        """This stream from global step `step` on: where a resumed run continues.

        kbench's streams restart there directly. Another pipeline is replayed with its first
        batches skipped, which continues it exactly only when it is deterministic (seeded)
        and endless: the caller is told so.
        """
        if not step:
            return self
        if self.restart is not None:
            return dataclasses.replace(self, dataset=self.restart(step))
        print(f"note: resuming a plain tf.data pipeline by skipping its first {step} batches; "
              "this is exact only if it is seeded and endless (kbench's pipelines restart "
              "exactly)")
        return dataclasses.replace(self, dataset=self.dataset.skip(step))

    def map_dataset(self, transform):
        """The same stream through `transform` (tf.data.Dataset -> tf.data.Dataset, e.g.
        `lambda ds: ds.with_options(...)`): same sizes, and a restart goes through it too."""
        restart = self.restart
        return dataclasses.replace(
            self, dataset=transform(self.dataset),
            restart=(lambda step: transform(restart(step))) if restart is not None else None)


def as_stream(data, steps_per_epoch=None, training=True):
    """`data` as a Stream: a Stream as it is (with `steps_per_epoch` overriding its own), a
    plain tf.data.Dataset (or anything Keras' fit takes) wrapped with what can be computed.

    Training data without a known epoch length (an endless plain pipeline and no
    --steps-per-epoch) is a one-line error, as Keras would otherwise run one endless epoch.
    """
    if isinstance(data, Stream):
        stream = data
    else:
        cardinality = _cardinality(data)
        batch = _batch_size(data)
        stream = Stream(dataset=data, batch_size=batch,
                        steps_per_epoch=cardinality if training and cardinality else None)
        if training and steps_per_epoch and cardinality and steps_per_epoch > cardinality:
            raise KbenchError(f"--steps-per-epoch {steps_per_epoch} is more than the "
                              f"{cardinality} batches the training data holds: pass at most "
                              f"{cardinality}, or .repeat() the data")
    if training and steps_per_epoch:
        stream = dataclasses.replace(stream, steps_per_epoch=int(steps_per_epoch))
    if training and not stream.steps_per_epoch:
        raise KbenchError("cannot tell how many batches the training data holds; "
                          "pass --steps-per-epoch (or a kbench Stream)")
    return stream


def _cardinality(data):
    """Batches in one pass of a finite tf.data pipeline, else None."""
    cardinality = getattr(data, "cardinality", None)
    if cardinality is None:
        return None
    count = int(cardinality())
    return count if count > 0 else None


def _batch_size(data):
    """The leading (batch) dimension of a tf.data pipeline's elements, when it is static."""
    spec = getattr(data, "element_spec", None)
    first = spec[0] if isinstance(spec, (tuple, list)) else spec
    shape = getattr(first, "shape", None)
    if shape is None or not len(shape):
        return None
    return shape[0] if isinstance(shape[0], int) else None
