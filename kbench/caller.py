"""What a caller hands a recipe's `main` (or `kbench.train.Run`), checked before any work.

A recipe is a template: `main(config, model=..., datasets=..., callbacks=...)` takes the
caller's own network, data and callbacks. Handed the wrong thing (integer labels where the
training takes one-hot ones, unbatched data, a model with another number of classes, a
softmax output trained as logits, a builder function instead of the model it builds), Keras
fails deep in `fit` with a long traceback, or, worse, trains without a word on a wrong loss.
Each check here turns one such mistake into one `error:` line that says what to pass, before
anything is trained. Whatever cannot be checked (a subclassed model before it is built, a
pipeline that is not tf.data) is left to Keras.
"""

import inspect
from collections.abc import Mapping

import keras

from kbench.data.stream import Stream
from kbench.errors import KbenchError


def check_config(config, recipe):
    """`config` must be a recipe's Config (a kbench.config.TrainConfig dataclass)."""
    from kbench.config import TrainConfig

    if not isinstance(config, TrainConfig):
        raise KbenchError(f"{recipe} takes its Config (a dataclass of settings), not "
                          f"{_a(config)}: pass {recipe}.Config(**settings)")
    from kbench.flags import check_config_class

    check_config_class(type(config), f"{recipe}'s Config")  # one left without @dataclass
    # Another of kbench's recipes' Config (its module: recipes.<name>, or kbench_recipe_<name>
    # as kbench.recipe loads it) would train that recipe's model under this one's name. Only
    # kbench's own names are compared: a copied recipe may take any Config it likes.
    from kbench.recipe import installed_recipes

    origin = type(config).__module__.rpartition(".")[2].removeprefix("kbench_recipe_")
    own = installed_recipes()
    if origin != recipe and origin in own and recipe in own:
        raise KbenchError(f"{recipe} was handed {origin}'s Config: pass "
                          f"{recipe}.Config(**settings)")


def callback_list(callbacks):
    """The caller's callbacks as a list of Keras callbacks (one callback alone is taken as a
    list of one)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.Callback):
        return [callbacks]
    if isinstance(callbacks, (str, bytes, Mapping)):
        raise KbenchError(f"callbacks takes a list of keras.callbacks.Callback, not "
                          f"{_a(callbacks)}")
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise KbenchError(f"callbacks takes a list of keras.callbacks.Callback, not "
                          f"{_a(callbacks)}") from None
    for callback in callbacks:
        if not isinstance(callback, keras.callbacks.Callback):
            hint = (": wrap a function in keras.callbacks.LambdaCallback"
                    if callable(callback) else "")
            raise KbenchError(f"callbacks takes keras.callbacks.Callback objects, not "
                              f"{_a(callback)}{hint}")
    return callbacks


def data_pair(data, builder=None):
    """`data` (main's `datasets=`, or what `builder`, a recipe's datasets builder, returned)
    as a (train, test) pair, or a one-line error."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tuple(data)
    what = (f"a {type(data).__name__} of {len(data)}" if isinstance(data, (tuple, list))
            else _a(data))
    where = f"{builder} must return" if builder else "datasets= takes"
    raise KbenchError(f"{where} a (train, test) pair of tf.data Datasets or kbench Streams, "
                      f"not {what}")


def check_model(model, source="model="):
    """`model` must be a keras.Model (`source`: where it came from, for the message)."""
    if isinstance(model, keras.Model):
        return model
    if model is None:
        raise KbenchError(f"{source} returned None: it must return the keras.Model it builds")
    hint = ""
    if any(kind.__module__.startswith("torch.nn") for kind in type(model).__mro__):
        hint = ": wrap a torch.nn.Module in keras.layers.TorchModuleWrapper inside a keras.Model"
    elif inspect.isclass(model) or inspect.isfunction(model) or inspect.ismethod(model):
        name = getattr(model, "__name__", "it")
        hint = f": pass the model it builds, {name}(...), not {name} itself"
    raise KbenchError(f"{source} takes a keras.Model, not {_a(model)}{hint}")


def check_pipeline(data, which):
    """The caller's `which` ("training" or "test") data, read once per epoch: one line for
    what cannot serve as that (a kbench Stream always can). A Python generator is read once,
    so the evaluation after the first epoch would find it used up; arrays would be taken by
    Keras as the model's inputs; an empty pipeline trains or evaluates nothing; an endless
    test pipeline's evaluation never ends."""
    if isinstance(data, Stream):
        return
    if inspect.isgenerator(data) or (hasattr(data, "__next__")
                                     and not hasattr(data, "element_spec")):
        raise KbenchError(f"the {which} data is a Python generator or iterator, which can be "
                          "read only once: pass tf.data.Dataset.from_generator(...) (or a "
                          "kbench Stream)")
    kind = type(data).__name__
    if isinstance(data, (tuple, list, dict)) or kind == "ndarray":
        what = "an array" if kind == "ndarray" else f"a {kind}"
        raise KbenchError(f"the {which} data is {what}, not a pipeline: wrap (x, y) arrays as "
                          "tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)")
    cardinality = getattr(data, "cardinality", None)
    count = int(cardinality()) if callable(cardinality) else None
    if count == 0:
        raise KbenchError(f"the {which} data is empty (it holds no batch)")
    if count == -1 and which == "test":  # tf.data.INFINITE_CARDINALITY
        raise KbenchError("the test data repeats without end, so evaluating on it would never "
                          "end: drop its .repeat(), or .take(n) batches of it")


def element_spec(data):
    """The element spec of `data` (a Stream's pipeline, or a pipeline) when it is a tf.data
    pipeline; None for another kind (a torch DataLoader, a distribution's wrapper)."""
    import tensorflow as tf

    dataset = data.dataset if isinstance(data, Stream) else data
    return dataset.element_spec if isinstance(dataset, tf.data.Dataset) else None


def check_data_fits_model(model, specs):
    """The data's elements (`specs`: {"training": spec, "test": spec}, tf.data element specs
    or None) against the model's one input and one output: (inputs, one-hot labels) pairs,
    batched, of the model's input shape, over as many classes as the model has outputs."""
    inputs, outputs = _only(model, "inputs"), _only(model, "outputs")
    for which, spec in specs.items():
        if spec is None:
            continue
        if not isinstance(spec, tuple) or len(spec) not in (2, 3):  # (x, y[, sample weights])
            raise KbenchError(f"the {which} data's elements are {_describe(spec)}: main() "
                              "trains on a tf.data.Dataset of (inputs, one-hot labels) batches")
        x, y = spec[0], spec[1]
        if inputs is not None and _shape(x) is not None:
            _check_inputs(_shape(x), tuple(inputs.shape), which)
        if outputs is not None and _shape(y) is not None:
            _check_labels(_shape(y), tuple(outputs.shape), which)


def check_logits_output(model):
    """kbench trains on logits (CategoricalCrossentropy(from_logits=True)): a model ending in
    a softmax would be trained on a wrong loss without a word."""
    last = _output_layer(model)
    if type(last).__name__ == "Softmax":  # keras.layers.Softmax, or keras.ops.softmax
        remedy = "end the model before it"
    elif getattr(getattr(last, "activation", None), "__name__", "") == "softmax":
        remedy = "drop its activation=\"softmax\""
    else:
        return
    if keras.config.dtype_policy().name.startswith("mixed"):
        remedy += ("; keep the output float32 under the mixed policy, e.g. "
                   "keras.layers.Activation(\"linear\", dtype=\"float32\")")
    raise KbenchError(f"the model's output comes from a softmax ({last.name}), but kbench "
                      "trains on logits (from_logits=True; predictions take the softmax "
                      f"themselves): {remedy}")


def _output_layer(model):
    """The layer (or op) that makes the model's one output, or None where it cannot be told
    (several outputs, a subclassed model)."""
    history = getattr(_only(model, "outputs"), "_keras_history", None)
    if history is not None:
        return history.operation
    layers = getattr(model, "layers", None)
    return layers[-1] if isinstance(model, keras.Sequential) and layers else None


def note_recompiled(model, config):
    """A model the caller compiled is compiled again with the recipe's settings: say so."""
    if getattr(model, "compiled", False):
        print(f"note: the model you passed was compiled already; kbench compiles it again with "
              f"the run's optimizer ({config.optimizer}), schedule and loss, not yours")


def _check_inputs(got, want, which):
    if len(got) == len(want) - 1 and _compatible(got, want[1:]):
        raise KbenchError(f"the {which} data is not batched (its elements have shape "
                          f"{_fmt(got)}; the model takes batches of {_fmt(want[1:])}): call "
                          ".batch(batch_size) on it")
    if not (_compatible(got, want) or _one_axis_apart(got, want)):
        raise KbenchError(f"the {which} data's inputs have shape {_fmt(got)}, but the model "
                          f"takes {_fmt(want)}: pass a model and data that match")


def _one_axis_apart(got, want):
    """Images without their channel axis for a model of one channel, or the reverse: a
    functional Keras model adds or drops a trailing axis of size 1 itself."""
    if len(got) == len(want) + 1 and got[-1] == 1:
        return _compatible(got[:-1], want)
    if len(want) == len(got) + 1 and want[-1] == 1:
        return _compatible(got, want[:-1])
    return False


def _check_labels(labels, outputs, which):
    if len(outputs) != 2 or not isinstance(outputs[1], int):
        return  # not a classifier's (batch, classes) output: nothing to say
    classes = outputs[1]
    if classes == 1:  # a softmax over one class: the loss is 0 whatever the weights
        raise KbenchError("the model has 1 output, but kbench trains a softmax over the "
                          "classes (categorical cross-entropy on logits): build it with 2 "
                          "outputs for two classes, with one-hot labels (tf.one_hot(label, 2))")
    if len(labels) == 1 or (len(labels) == 2 and labels[1] == 1 and classes > 1):
        raise KbenchError(f"the {which} data's labels have shape {_fmt(labels)} (class "
                          f"indices?), but kbench trains on one-hot labels for the model's "
                          f"{classes} outputs: map them with tf.one_hot(label, {classes}) "
                          "(keras.utils.to_categorical for arrays)")
    if len(labels) == 2 and isinstance(labels[1], int) and labels[1] != classes:
        raise KbenchError(f"the {which} data's labels are one-hot over {labels[1]} classes, "
                          f"but the model has {classes} outputs: build the model with "
                          f"{labels[1]} outputs")


def _only(model, attribute):
    """The model's one input or output tensor, or None (several, or not built yet)."""
    try:
        tensors = getattr(model, attribute)
    except (AttributeError, ValueError):  # a Sequential without an Input, a subclassed model
        return None
    if isinstance(tensors, (list, tuple)) and len(tensors) == 1:
        tensors = tensors[0]
    return tensors if hasattr(tensors, "shape") else None


def _shape(spec):
    """A TensorSpec's shape as a tuple of ints and Nones; None for another kind of element
    (a dict of inputs, a ragged or sparse spec) or an unknown rank."""
    shape = getattr(spec, "shape", None)
    if shape is None or getattr(shape, "rank", 0) is None or type(spec).__name__ != "TensorSpec":
        return None
    return tuple(shape.as_list()) if hasattr(shape, "as_list") else tuple(shape)


def _compatible(got, want):
    return len(got) == len(want) and all(
        a is None or b is None or a == b for a, b in zip(got, want))


def _fmt(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def _describe(spec):
    if isinstance(spec, dict):
        return f"dicts (keys {', '.join(map(str, spec))})"
    if isinstance(spec, tuple):
        return f"tuples of {len(spec)}"
    return f"single tensors of shape {_fmt(_shape(spec))}" if _shape(spec) else _a(spec)


def _a(value):
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"a {name}"
