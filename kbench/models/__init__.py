"""One registry for every kbench model: `get_model(name, num_classes, ...)`.

Image models take raw 0..255 pixels (NHWC), text models int32 token ids (input_shape is
(sequence_length,), vocab_size a keyword); all return float32 logits. Weights are drawn with
NumPy from `seed`, so a seed gives the same initial network under every backend.
"""

import functools

from kbench.errors import KbenchError
from kbench.models import layers  # noqa: F401  (registers custom layers)
from kbench.models import convnet, resnet, text

_REGISTRY = {}  # name -> builder
_INPUTS = {}  # name -> what its model takes: "images" or "tokens"
INPUT_KINDS = ("images", "tokens")


def register_model(name, builder, inputs="images"):
    """Add a builder `fn(num_classes, input_shape, seed, **kwargs) -> keras.Model` whose model
    takes `inputs`: "images" (0..255 pixels, input_shape (H, W, C)) or "tokens" (int32 ids,
    input_shape (sequence_length,), vocab_size a keyword)."""
    if inputs not in INPUT_KINDS:
        raise KbenchError(f"register_model({name!r}, inputs={inputs!r}): inputs is one of "
                          f"{', '.join(INPUT_KINDS)}")
    _REGISTRY[name] = builder
    _INPUTS[name] = inputs
    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", functools.partial(resnet.cifar_resnet, _depth))
register_model("preact_resnet18", resnet.preact_resnet18)
register_model("resnet9", resnet.resnet9)
register_model("convnet", convnet.convnet)
register_model("text_transformer", text.text_transformer, inputs="tokens")
register_model("text_lstm", text.text_lstm, inputs="tokens")


def list_models(inputs=None):
    """The registered names (those whose models take `inputs`, if given), in a stable order."""
    names = [n for n in _REGISTRY if inputs is None or _INPUTS[n] == inputs]
    return sorted(names, key=lambda n: (n.rstrip("0123456789"), len(n), n))


class RegisteredModels:
    """The `allowed` of a recipe's model field (kbench.config.option): the names registered
    when the config is checked whose models take the recipe's `inputs`, so a wrong --model is
    one line before any data or training (and before compare starts a worker), and a model
    added with register_model counts."""

    def __init__(self, inputs):
        if inputs not in INPUT_KINDS:
            raise ValueError(f"inputs is one of {', '.join(INPUT_KINDS)}, not {inputs!r}")
        self.inputs = inputs

    def __contains__(self, name):
        return _INPUTS.get(name) == self.inputs

    def __str__(self):
        return (f"registered in kbench.models for {self.inputs} "
                f"({', '.join(list_models(self.inputs))})")

    def why_not(self, name):
        """kbench.config.check's hint for a name registered for the other inputs."""
        if name not in _INPUTS:
            return ""
        return (f"; {name} is registered for {_INPUTS[name]}: if it takes {self.inputs}, "
                f"register it with register_model(..., inputs={self.inputs!r})")


IMAGE_MODELS = RegisteredModels("images")  # cifar_resnet's, mnist_convnet's --model
TEXT_MODELS = RegisteredModels("tokens")  # imdb_transformer's


def get_model(name, num_classes=10, input_shape=(32, 32, 3), seed=0, **kwargs):
    """Build model `name` for `num_classes` classes and images of `input_shape` (H, W, C)."""
    if name not in _REGISTRY:
        raise KbenchError(f"unknown model {name!r}; use one of: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), seed=seed,
                           **kwargs)
