"""Reading saved kbench models, and float32 copies of mixed-precision ones.

`load_model` turns every way a model file can be wrong (missing, a folder, truncated, not a
Keras archive, unloadable) into one `KbenchError` line that says what to do. `float32_copy`
rebuilds a mixed_float16 / mixed_bfloat16 model with every layer computing in float32 and the
same weights: what a run saves as model.keras, so the file loads and predicts alike everywhere
and exports (ONNX needs a float32 policy).
"""

import json
import os
import sys
import zipfile

import keras

from kbench.errors import KbenchError, first_line, reason
from kbench.models import layers  # noqa: F401  (registers kbench's custom layers for loading)

# Dtype policies (and tensor dtypes) that compute below float32. Under the mixed policies the
# variables are float32 already, so a float32 rebuild takes the weights unchanged.
LOW_PRECISION = frozenset({"float16", "bfloat16", "mixed_float16", "mixed_bfloat16"})


def load_model(path, compile=False):
    """`keras.saving.load_model` for a .keras file, with kbench's custom layers registered.

    `compile=False` by default: evaluation, export and prediction need only the forward pass,
    and skipping the optimizer makes loading work whatever optimizer trained the model.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KbenchError(f"{path}: no such file; point to a model.keras a recipe wrote "
                          "(runs/<recipe>/<backend>/model.keras)")
    if os.path.isdir(path):
        raise KbenchError(f"{path} is a folder, not a .keras file: point to the model.keras "
                          "inside it")
    if not zipfile.is_zipfile(path):
        if _is_hdf5(path):  # a weights file (a run's checkpoint) or Keras 2's .h5 model
            raise KbenchError(f"{path} is an HDF5 file (weights, or a Keras 2 .h5 model), not "
                              "a .keras file: point to the model.keras a recipe wrote, or "
                              "re-save the model with model.save('name.keras')")
        raise KbenchError(f"{path} is not a readable .keras file (corrupt or truncated?): "
                          "re-save it or point to another file")
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise KbenchError(f"{path} is not a readable .keras file ({first_line(exc)}): "
                          "re-save it or point to another file") from None
    if "config.json" not in members:
        raise KbenchError(f"{path} is a zip archive but not a Keras model (no config.json): "
                          "point to a .keras file written by model.save")
    if not path.endswith(".keras"):
        # Keras recognises its zip format by this ending and refuses the file without it.
        raise KbenchError(f"{path} holds a Keras model but Keras loads it only from a name "
                          "ending in .keras: rename it")
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as exc:  # h5py, JSON, deserialization: all mean the same to the user
        raise KbenchError(f"{path} is not a loadable Keras model ({reason(exc)}): "
                          "re-save it or point to another file") from None


def _is_hdf5(path):
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def run_info(model_path):
    """What the run that wrote `model_path` recorded beside it: {"recipe": name or None,
    "config": its settings (dataset, data_dir, seed, train/test_examples, batch_size...),
    "path": the file they came from, "data_given"}, from
    metrics.json (a finished run) or else config.json (written before training, so a
    best.keras of an unfinished run has it too). None when neither is there; an unreadable
    file is reported and skipped: the model itself is still usable."""
    folder = os.path.dirname(os.path.abspath(model_path))
    for name in ("metrics.json", "config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"note: ignoring {path} ({type(exc).__name__}): pass the settings as flags",
                  file=sys.stderr)
            continue
        settings = saved.get("config") if isinstance(saved, dict) else None
        if not isinstance(saved, dict) or (name == "metrics.json"
                                           and not isinstance(settings or {}, dict)):
            print(f"note: ignoring {path} (not a kbench run's record): pass the settings as "
                  "flags", file=sys.stderr)
            continue
        if name == "metrics.json":  # settings under "config", the dataset also at the top
            config = dict(settings or {})
            config.setdefault("dataset", saved.get("dataset"))
        else:  # the settings themselves, labelled with recipe and backend
            from kbench.config import CONFIG_LABELS

            config = {k: v for k, v in saved.items() if k not in CONFIG_LABELS}
        return {"recipe": saved.get("recipe"), "config": config, "path": path,
                "data_given": bool(saved.get("data_given"))}
    return None


def vocab_size(model):
    """The number of token ids a text model's (first) Embedding takes, or None for models
    without one."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Embedding):
            return int(layer.input_dim)
    return None


def float32_copy(model):
    """A copy of `model` whose every layer computes in float32, with the same weights.

    Rebuilt from the model's config with each low-precision dtype policy (and each bfloat16 /
    float16 tensor dtype between layers) replaced by float32, under a float32 global policy so
    layers that make sublayers without passing a dtype get float32 too. Integer inputs (token
    ids) keep their dtype; custom layers come back through Keras' serialization registry. The
    copy is not compiled: the optimizer (a LossScaleOptimizer under mixed_float16) belongs to
    training, not to the saved model.
    """
    serialized = keras.saving.serialize_keras_object(model)
    serialized.pop("compile_config", None)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        copy = keras.saving.deserialize_keras_object(_float32_config(serialized))
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def _float32_config(node):
    """`node` (a serialized config tree) with every low-precision policy/dtype set to float32."""
    if isinstance(node, dict):
        config = node.get("config")
        if (node.get("class_name") == "DTypePolicy" and isinstance(config, dict)
                and config.get("name") in LOW_PRECISION):
            return {**node, "config": {**config, "name": "float32"}}
        return {key: "float32" if key == "dtype" and isinstance(value, str)
                and value in LOW_PRECISION else _float32_config(value)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    return node

