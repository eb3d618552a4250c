"""Export a saved model for serving (ONNX or TensorFlow SavedModel), then check the artifact.

Keras does the export (`model.export(path, format=...)`); what it can do depends on the backend
running it. Measured with Keras 3.15.1 on kbench's registry models (kbench picks the backend,
see below):

    format       tensorflow       jax                                torch
    onnx         yes (tf2onnx)    only with jax2onnx installed, and  yes, except text_transformer
                                  not for models with MaxPooling2D   (attention, dynamic batch)
    savedmodel   yes              yes (jax2tf)                       no (Keras needs torch_xla)

(`tools/export_matrix.py` measures it; docs/models.md has its table.) A model.keras is
portable, so the backend the user happens to have set does not decide what can be exported:
when it cannot export a format here at all (the table's "no", or a missing package), the export
runs in a fresh interpreter under a backend that can (TensorFlow first), and the output says
which one did. Failures of one model under one backend (a "not" in the table) are one-line
errors naming the others: `--backend` picks one.

After exporting, the artifact runs on a small batch (onnxruntime for ONNX, the SavedModel's
serving signature in TensorFlow) and its outputs are compared with the Keras model's (under the
exporting backend, and, when that is another one, under this process's backend too): a
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

from kbench.errors import KbenchError, reason
from kbench.files import TEMP_PREFIX

# Our format names -> Keras' names.
FORMATS = {"onnx": "onnx", "savedmodel": "tf_saved_model"}
BACKENDS = ("jax", "tensorflow", "torch")
# Outputs may differ by this much relative to the largest |logit| (at least 1): float32
# round-off of a different kernel library, far below any change of prediction.
RELATIVE_TOLERANCE = 1e-4
SAMPLE_BATCH = 3  # not 1: the exported batch dimension must really be dynamic


def export_model(model, output, format, tolerance=None, backend=None):
    """Export `model` (a keras.Model or the path of a .keras file) to `output` and verify it.

    `backend`: the Keras backend that exports; default this process's when it can export
    `format` here, else the first of `usable_backends(format)`, in a subprocess.
    A Keras model passed in may change how it traces (see `_inline_normalization_constants`),
    never what it computes.

    `tolerance`: the largest allowed |artifact - Keras| output difference; default
    1e-4 x max(1, max |logit|) on the verification batch. Returns a dict with `output`,
    `format`, `backend` (the one that exported), `checked_under` (the backends whose Keras
    outputs the artifact matched), `max_abs_diff` and `tolerance`.
    """
    import keras


    if format not in FORMATS:
        raise KbenchError(f"unknown export format {format!r}; use one of: {', '.join(FORMATS)}")
    here = keras.backend.backend()
    if backend is not None and backend not in BACKENDS:
        raise KbenchError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    model = _float32_model(model)
    asked = backend is not None  # the user named it: the note says so, not why `here` lost
    if backend is None:  # this process's, else the first that can export this model
        able = [b for b in dict.fromkeys([here, *usable_backends(format)])
                if can_export(format, b) and not known_to_fail(model, format, b)]
        backend = able[0] if able else here
    check_supported(format, backend)
    sample, expected = _reference_outputs(model)
    if tolerance is None:
        tolerance = _default_tolerance(expected)

    output = os.path.abspath(output)
    check_output(output, format)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    # Export into a temp folder beside the output, check it there, then move it into place:
    # a failed or wrong export never replaces a good artifact.
    scratch = tempfile.mkdtemp(dir=os.path.dirname(output), prefix=TEMP_PREFIX + "export-")
    try:
        artifact = os.path.join(scratch, os.path.basename(output))
        if backend == here:
            _export_here(model, artifact, format)
            checked_under, diffs = [here], []
        else:  # exported and checked there; checked here below too
            child = _export_in_subprocess(model, scratch, artifact, format, tolerance, backend,
                                          asked=asked)
            checked_under, diffs = [backend, here], [child["max_abs_diff"]]
        try:
            got = run_artifact(artifact, format, sample)
        except KbenchError:
            raise
        except Exception as exc:  # onnxruntime / TensorFlow refusing the artifact
            raise KbenchError(f"the {format} export of {model.name} made under {backend} does "
                              f"not run ({reason(exc)})"
                              f"{_try_others(format, backend)}") from None
        diff = max([_compare(got, expected, format, tolerance), *diffs])
        _move_into_place(artifact, output, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"output": output, "format": format, "backend": backend,
            "checked_under": checked_under, "model": model.name, "max_abs_diff": diff,
            "tolerance": tolerance}


def _export_here(model, artifact, format):
    """Keras' model.export in this process; any exporter failure is one line."""
    import keras


    backend = keras.backend.backend()
    if backend == "tensorflow" and format == "onnx":
        _inline_normalization_constants(model)
    try:
        with _quiet():
            model.export(artifact, format=FORMATS[format], verbose=False)
        if format == "onnx":
            _fold_in_external_data(artifact)
    except Exception as exc:  # exporters fail in many ways; all mean "not this backend"
        raise KbenchError(f"{format} export of {model.name} failed under {backend} "
                          f"({reason(exc)})"
                          f"{_try_others(format, backend)}") from None


def _export_in_subprocess(model, scratch, artifact, format, tolerance, backend, asked=False):
    """Export `model` to `artifact` under `backend` in a fresh interpreter (KERAS_BACKEND is
    read once per process), which checks it against its own Keras outputs; returns its
    result dict."""
    import json
    import subprocess
    import sys

    import keras

    saved = os.path.join(scratch, "model.keras")
    model.save(saved)
    here = keras.backend.backend()
    why = (f"--backend {backend}" if asked
           else f"{format} export does not work under {here} here" if not can_export(format, here)
           else f"{here}'s {format} exporter fails on {model.name}"
           if known_to_fail(model, format, here) else f"--backend {backend}")
    print(f"note: {why}; exporting under {backend} in a subprocess")
    done = subprocess.run(
        [sys.executable, "-m", "kbench.export", saved, format, artifact,
         str(float(tolerance))],
        env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
    try:
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        pass
    # The child's one-line error, not the TensorFlow / XLA log lines around it.
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    reason = (errors[-1].removeprefix("error: ") if errors
              else " | ".join(lines[-3:]) or f"exit status {done.returncode}")
    raise KbenchError(f"{format} export under {backend} failed: {reason}")


def _fold_in_external_data(path):
    """Make the ONNX file at `path` hold all its weights. jax2onnx (0.17) writes the larger
    initializers to a `<name>.data` file beside the model, and onnxruntime reads them from
    there; but --output is one .onnx file, checked and moved into place alone, so the weights
    would be left behind in the scratch folder. Folded in (ONNX's own loader reads them), the
    file stands alone; a model over protobuf's 2 GB cannot be, and fails to save here."""
    import onnx
    from onnx import external_data_helper

    bare = onnx.load(path, load_external_data=False)
    locations = {entry.value for tensor in external_data_helper._get_all_tensors(bare)
                 if external_data_helper.uses_external_data(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    if not locations:
        return
    onnx.save(onnx.load(path), path)  # load() reads the external data in; save() writes one file
    folder = os.path.abspath(os.path.dirname(path))
    for location in locations:
        side_file = os.path.abspath(os.path.join(folder, location))
        if os.path.dirname(side_file) == folder:  # only what the exporter wrote beside it
            os.remove(side_file)


def _float32_model(model):
    """The keras.Model to export: loaded from a path; a float32 copy of a mixed-precision one."""
    import keras

    from kbench.models.saving import LOW_PRECISION, float32_copy, load_model

    if not isinstance(model, keras.Model):
        model = load_model(model)
    if any(layer.dtype_policy.name in LOW_PRECISION for layer in model._flatten_layers()):
        # Keras exports float32 models only (ONNX says so outright): export the float32 copy.
        print(f"note: exporting a float32 copy of {model.name} (it computes in mixed precision)")
        model = float32_copy(model)
    return model


def _reference_outputs(model):
    """(the verification batch, the Keras model's outputs on it). Calling the model also marks
    it as called, which Keras' ONNX export checks under JAX."""
    import keras

    sample = sample_inputs(model)
    return sample, keras.ops.convert_to_numpy(model(sample, training=False))


def _default_tolerance(expected):
    return RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))


def _compare(got, expected, format, tolerance):
    """max |got - expected|, or a one-line error when the shapes differ or it is too large."""
    if got.shape != expected.shape:
        raise KbenchError(f"the exported {format} model outputs shape {got.shape}, the "
                          f"Keras model {expected.shape}: the export is broken")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:  # also catches NaN
        raise KbenchError(f"the exported {format} model disagrees with the Keras model: "
                          f"max abs diff {diff:.3g} > tolerance {tolerance:.3g}; not "
                          f"written (export it under another backend)")
    return diff


def usable_backends(format):
    """The backends that can export `format` with what is installed here, best first."""
    backends = {"onnx": ["tensorflow", "torch", "jax"],
                "savedmodel": ["tensorflow", "jax"]}[format]
    return [b for b in backends if can_export(format, b)]


def can_export(format, backend):
    try:
        check_supported(format, backend)
    except KbenchError:
        return False
    return True


def known_to_fail(model, format, backend):
    """Whether `backend`'s exporter is known to fail on `model` (the module doc's table):
    torch's ONNX exporter on attention with a dynamic batch, onnxruntime on the MaxPool that
    jax2onnx (0.17) writes ("Unsupported pooling size"). The automatic choice passes over such
    a backend; --backend still tries it."""
    import keras

    layers = list(model._flatten_layers(include_self=False, recursive=True))
    if format == "onnx" and backend == "torch":
        return any(isinstance(layer, keras.layers.MultiHeadAttention) for layer in layers)
    if format == "onnx" and backend == "jax":
        return any(isinstance(layer, keras.layers.MaxPooling2D) for layer in layers)
    return False


def _try_others(format, backend):
    others = [b for b in usable_backends(format) if b != backend]
    return f": try --backend {' or '.join(others)}" if others else ""


def check_supported(format, backend):
    """One line naming what to do when `backend` cannot export `format` here."""
    if not _installed(backend):
        raise KbenchError(f"{format} export under {backend} needs {backend}, which is not "
                          "installed here")
    if format == "savedmodel" and backend == "torch":
        # Keras exports SavedModels from torch through torch_xla's StableHLO bridge; no
        # torch_xla wheel matches the torch kbench pins, and Keras' torch path fails before it
        # on kbench models (torch.export dynamic-shape error), so this cannot work here.
        raise KbenchError("SavedModel export does not work under torch (Keras needs torch_xla "
                          "for it): export with --backend tensorflow or jax")
    if format == "onnx" and backend == "jax" and not _installed("jax2onnx"):
        raise KbenchError("ONNX export under jax needs the jax2onnx package (pip install "
                          "jax2onnx==0.17.1, the version tested; in a kbench checkout, pip "
                          "install -c constraints.txt jax2onnx pins what it pulls in too; not "
                          "in kbench's export extra: it pulls in flax, orbax and ~25 more): "
                          "or export with --backend tensorflow or torch")
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

    # Under jax the artifact holds jax2tf's custom gradients, which a SavedModel cannot keep:
    # TensorFlow warns on load that asking for a gradient would fail. The check only runs
    # the model forward; the warning says nothing about the export, so it is not shown.
    with _quiet():
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
    if format == "onnx" and os.path.lexists(output):
        # torch.onnx.export and tf2onnx write over whatever is there: a mistyped --output (the
        # model.keras being exported, a notes file) would be lost.
        if not _installed("onnx"):
            raise KbenchError(f"{output} exists, and without the onnx package kbench cannot "
                              "tell whether it is an older export: pick a new --output")
        if not _is_onnx_model(output):
            raise KbenchError(f"{output} exists and is not an ONNX model: pick a new --output "
                              "(an older .onnx export there would be replaced)")
    if format == "savedmodel" and os.path.lexists(output):
        if not os.path.isdir(output) or os.path.islink(output):
            raise KbenchError(f"{output} exists and is not a folder: --output takes the folder "
                              "to write the SavedModel to")
        if os.listdir(output) and not os.path.isfile(os.path.join(output, "saved_model.pb")):
            raise KbenchError(f"{output} holds files that are not a SavedModel: pick a new "
                              "--output (an older SavedModel there would be replaced)")


def _is_onnx_model(path):
    """Whether `path` is a file (or a link to one) that parses as an ONNX model with a graph.
    Parsing alone is not enough: protobuf reads many other files (a .keras zip, a line of
    text) as a ModelProto of unknown fields, with no IR version and no graph nodes. The
    exporters write ir_version, field 1, first (byte 0x08): a file that starts otherwise is
    not read whole."""
    import onnx

    try:
        with open(path, "rb") as f:
            if f.read(1) != b"\x08":
                return False
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not a readable file, protobuf's DecodeError...: not an export
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def _move_into_place(artifact, output, scratch):
    """Rename the checked artifact to `output`. An older SavedModel folder there is moved into
    the scratch folder first (a folder cannot be renamed over), and goes when it does."""
    if os.path.isdir(output):
        os.rename(output, os.path.join(scratch, ".old"))
    os.replace(artifact, output)


@contextlib.contextmanager
def _quiet():
    """Exporters narrate (tf2onnx logs every pass, torch.onnx warns per op and prints its
    whole graph when it fails, 30 KB for text_transformer): keep errors only, as the one
    line the caller makes of them."""
    import io
    import sys

    loggers = [logging.getLogger(name) for name in ("tf2onnx", "absl")]
    levels = [logger.level for logger in loggers]
    # tf2onnx sets TF_CPP_MIN_LOG_LEVEL=3 when imported (here, on the first ONNX export):
    # processes started after it would lose TensorFlow's C++ errors.
    tf_log_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    # torch prints the graph from C++, past Python's sys.stdout: the file descriptor too
    sys.stdout.flush()
    _flush_c_stdio()  # what C wrote before goes where it was meant to
    saved_fd = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        try:
            sys.stdout.flush()
            _flush_c_stdio()  # C++'s buffered output goes to the null device, not after it
        finally:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            if tf_log_level is None:
                os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            else:
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = tf_log_level


def _flush_c_stdio():
    """fflush(NULL): C stdio buffers (full when stdout is a pipe) written out now."""
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _installed(module):
    return importlib.util.find_spec(module) is not None


def _subprocess_main(argv):
    """`python -m kbench.export MODEL FORMAT OUTPUT TOLERANCE`, run by _export_in_subprocess
    under another KERAS_BACKEND: export, check, and print the result as JSON (last line)."""
    import json

    import keras

    from kbench.errors import exit_on_error

    path, format, output, tolerance = argv
    # Under the backend the parent chose (this process's), even where the automatic choice
    # would pass over it: otherwise `--backend torch` on text_transformer, or `--backend jax`
    # on a MaxPool model, exported under TensorFlow in a third process, reported as asked.
    info = exit_on_error(export_model, path, output, format, tolerance=float(tolerance),
                         backend=keras.backend.backend())
    print(json.dumps(info))


if __name__ == "__main__":
    import sys

    import kbench  # noqa: F401  (registers kbench's layers before the model is loaded)

    _subprocess_main(sys.argv[1:])
