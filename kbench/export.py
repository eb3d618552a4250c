"""Export a saved model for serving (ONNX or TensorFlow SavedModel), then check the artifact.

Keras does the export (`model.export(path, format=...)`); what it can do depends on the backend
running it. Measured with Keras 3.15.1 on kbench's registry models:

    format       tensorflow       jax                                torch
    onnx         yes (tf2onnx)    only with jax2onnx installed, and  yes, except text_transformer
                                  not for models with MaxPooling2D   (attention, dynamic batch)
    savedmodel   yes              yes (jax2tf)                       no (Keras needs torch_xla)

After exporting, the artifact runs on a small batch (onnxruntime for ONNX, the SavedModel's
serving signature in TensorFlow) and its outputs are compared with the Keras model's: a
mismatch beyond float32 noise is an error, and the artifact is only moved into place once it
has passed.
"""

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

from kbench.errors import KbenchError

# Our format names -> Keras' names.
FORMATS = {"onnx": "onnx", "savedmodel": "tf_saved_model"}
# Outputs may differ by this much relative to the largest |logit| (at least 1): float32
# round-off of a different kernel library, far below any change of prediction.
RELATIVE_TOLERANCE = 1e-4
SAMPLE_BATCH = 3  # not 1: the exported batch dimension must really be dynamic


def export_model(model, output, format, tolerance=None):
    """Export `model` (a keras.Model or the path of a .keras file) to `output` and verify it.

    A Keras model passed in may change how it traces (see `_inline_normalization_constants`),
    never what it computes.

    `tolerance`: the largest allowed |artifact - Keras| output difference; default
    1e-4 x max(1, max |logit|) on the verification batch. Returns a dict with `output`,
    `format`, `backend`, `max_abs_diff` and `tolerance`.
    """
    import keras

    from kbench.models.saving import LOW_PRECISION, first_line, float32_copy, load_model

    if format not in FORMATS:
        raise KbenchError(f"unknown export format {format!r}; use one of: {', '.join(FORMATS)}")
    backend = keras.backend.backend()
    check_supported(format, backend)
    if not isinstance(model, keras.Model):
        model = load_model(model)
    if any(layer.dtype_policy.name in LOW_PRECISION for layer in model._flatten_layers()):
        # Keras exports float32 models only (ONNX says so outright): export the float32 copy.
        print(f"note: exporting a float32 copy of {model.name} (it computes in mixed precision)")
        model = float32_copy(model)

    sample = sample_inputs(model)
    # Calling the model once gives the reference outputs, and marks it as called, which
    # Keras' ONNX export checks under JAX.
    expected = keras.ops.convert_to_numpy(model(sample, training=False))
    if tolerance is None:
        tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if backend == "tensorflow" and format == "onnx":
        _inline_normalization_constants(model)

    output = os.path.abspath(output)
    check_output(output, format)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    # Export into a temp folder beside the output, check it there, then move it into place:
    # a failed or wrong export never replaces a good artifact.
    scratch = tempfile.mkdtemp(dir=os.path.dirname(output), prefix=".tmp-export-")
    try:
        artifact = os.path.join(scratch, os.path.basename(output))
        try:
            with _quiet():
                model.export(artifact, format=FORMATS[format], verbose=False)
        except Exception as exc:  # exporters fail in many ways; all mean "not this backend"
            raise KbenchError(f"{format} export of {model.name} failed under {backend} "
                              f"({type(exc).__name__}: {first_line(exc)})"
                              f"{_try_others(format, backend)}") from None
        try:
            got = run_artifact(artifact, format, sample)
        except KbenchError:
            raise
        except Exception as exc:  # onnxruntime / TensorFlow refusing the artifact
            raise KbenchError(f"the {format} export of {model.name} made under {backend} does "
                              f"not run ({type(exc).__name__}: {first_line(exc)})"
                              f"{_try_others(format, backend)}") from None
        if got.shape != expected.shape:
            raise KbenchError(f"the exported {format} model outputs shape {got.shape}, the "
                              f"Keras model {expected.shape}: the export is broken")
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= tolerance:  # also catches NaN
            raise KbenchError(f"the exported {format} model disagrees with the Keras model: "
                              f"max abs diff {diff:.3g} > tolerance {tolerance:.3g}; not "
                              f"written (export it under another backend)")
        _move_into_place(artifact, output, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"output": output, "format": format, "backend": backend, "model": model.name,
            "max_abs_diff": diff, "tolerance": tolerance}


def usable_backends(format):
    """The backends that can export `format` with what is installed here."""
    backends = {"onnx": ["tensorflow", "torch"], "savedmodel": ["tensorflow", "jax"]}[format]
    if format == "onnx" and _installed("jax2onnx"):
        backends.append("jax")
    return backends


def _try_others(format, backend):
    others = [b for b in usable_backends(format) if b != backend]
    return f": try KERAS_BACKEND={' or '.join(others)}" if others else ""


def check_supported(format, backend):
    """One line naming what to do when this backend cannot export `format` here."""
    if format == "savedmodel" and backend == "torch":
        # Keras exports SavedModels from torch through torch_xla's StableHLO bridge; no
        # torch_xla wheel matches the torch kbench pins, and Keras' torch path fails before it
        # on kbench models (torch.export dynamic-shape error), so this cannot work here.
        raise KbenchError("SavedModel export does not work under torch (Keras needs torch_xla "
                          "for it): run it with KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax")
    if format == "onnx" and backend == "jax" and not _installed("jax2onnx"):
        raise KbenchError("ONNX export under jax needs the jax2onnx package (pip install "
                          "jax2onnx; not in kbench's export extra: it pulls in flax, orbax and "
                          "~25 more): or run it with KERAS_BACKEND=tensorflow or torch")
    if format == "onnx" and backend == "tensorflow" and not _installed("tf2onnx"):
        raise KbenchError("ONNX export under tensorflow needs tf2onnx: pip install "
                          "-c constraints.txt -e '.[export]'")
    if format == "onnx" and not _installed("onnxruntime"):
        raise KbenchError("checking an ONNX export needs onnxruntime: pip install "
                          "-c constraints.txt -e '.[export]'")


def sample_inputs(model, batch=SAMPLE_BATCH, seed=0):
    """A fixed batch the model accepts: raw 0..255 pixels, or token ids below its vocabulary."""
    from kbench.models.saving import vocab_size

    spec = model.inputs[0]
    shape = (batch,) + tuple(d if d is not None else 1 for d in spec.shape[1:])
    rng = np.random.default_rng(seed)
    if "int" in str(spec.dtype):
        return rng.integers(0, vocab_size(model) or 2, size=shape).astype(str(spec.dtype))
    return np.round(rng.uniform(0, 255, size=shape)).astype("float32")


def run_artifact(path, format, inputs):
    """The exported model's outputs on `inputs`, run outside Keras."""
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != 1:
            # tf2onnx turns tensors a tf.function captures into graph inputs: the artifact
            # would need values nobody can give it.
            raise KbenchError(f"the exported ONNX model asks for {len(names)} inputs "
                              f"({', '.join(names)}), the Keras model takes 1: export it under "
                              "another backend")
        return np.asarray(session.run(None, {names[0]: inputs})[0])
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    (out,) = serve(**{name: tf.constant(inputs)}).values()
    return out.numpy()


def _inline_normalization_constants(model):
    """Make Normalization's fixed mean and variance graph constants for tf2onnx.

    The layer keeps them as eager tensors; a tf.function captures those as extra inputs and
    tf2onnx 1.17 exports them as ONNX graph inputs without their values, so the exported model
    cannot run. As NumPy arrays they are folded into the graph as constants. Same values, same
    outputs; this changes only how `model` traces.
    """
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is not None:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)


def check_output(output, format):
    """Refuse outputs whose replacement would destroy something that is not an old export."""
    if format == "onnx" and os.path.isdir(output):
        raise KbenchError(f"{output} is a folder: --output takes the .onnx file to write")
    if format == "savedmodel" and os.path.lexists(output):
        if not os.path.isdir(output) or os.path.islink(output):
            raise KbenchError(f"{output} exists and is not a folder: --output takes the folder "
                              "to write the SavedModel to")
        if os.listdir(output) and not os.path.isfile(os.path.join(output, "saved_model.pb")):
            raise KbenchError(f"{output} holds files that are not a SavedModel: pick a new "
                              "--output (an older SavedModel there would be replaced)")


def _move_into_place(artifact, output, scratch):
    """Rename the checked artifact to `output`. An older SavedModel folder there is moved into
    the scratch folder first (a folder cannot be renamed over), and goes when it does."""
    if os.path.isdir(output):
        os.rename(output, os.path.join(scratch, ".old"))
    os.replace(artifact, output)


@contextlib.contextmanager
def _quiet():
    """Exporters narrate (tf2onnx logs every pass, torch.onnx warns per op): keep errors only."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _installed(module):
    return importlib.util.find_spec(module) is not None
