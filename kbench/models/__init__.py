"""One registry for every kbench model: `get_model(name, num_classes, ...)`.

Image models take raw 0..255 pixels (NHWC), text models int32 token ids (input_shape is
(sequence_length,), vocab_size a keyword); all return float32 logits. Weights are drawn with
NumPy from `seed`, so a seed gives the same initial network under every backend.
"""

import functools

from kbench.errors import KbenchError
from kbench.models import layers  # noqa: F401  (registers custom layers)
from kbench.models import convnet, resnet, text

_REGISTRY = {}


def register_model(name, builder):
    """Add a builder `fn(num_classes, input_shape, seed, **kwargs) -> keras.Model`."""
    _REGISTRY[name] = builder
    return builder


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", functools.partial(resnet.cifar_resnet, _depth))
register_model("preact_resnet18", resnet.preact_resnet18)
register_model("resnet9", resnet.resnet9)
register_model("convnet", convnet.convnet)
register_model("text_transformer", text.text_transformer)
register_model("text_lstm", text.text_lstm)


def list_models():
    return sorted(_REGISTRY, key=lambda n: (n.rstrip("0123456789"), len(n), n))


class RegisteredModels:
    """The `allowed` of a recipe's model field (kbench.config.option): the names registered
    when the config is checked, so a wrong --model is one line before any data or training
    (and before compare starts a worker), and a model added with register_model counts."""

    def __contains__(self, name):
        return name in _REGISTRY

    def __str__(self):
        return f"registered in kbench.models ({', '.join(list_models())})"


REGISTERED = RegisteredModels()


def get_model(name, num_classes=10, input_shape=(32, 32, 3), seed=0, **kwargs):
    """Build model `name` for `num_classes` classes and images of `input_shape` (H, W, C)."""
    if name not in _REGISTRY:
        raise KbenchError(f"unknown model {name!r}; use one of: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), seed=seed,
                           **kwargs)
