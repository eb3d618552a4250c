"""Using a saved model outside training, under the active backend: `kbench export` (ONNX /
SavedModel, checked against Keras) and `kbench predict` (image files and .npy arrays)."""

import json
import os
import shutil

import numpy as np
import pytest

import kbench  # noqa: F401
from kbench import cli
from kbench.errors import KbenchError
from kbench.export import export_model, usable_backends
from kbench.models import get_model
from kbench.predict import predict_files
from tests.conftest import BACKEND

ONNX_BACKENDS = usable_backends("onnx")  # tensorflow, torch (+ jax with jax2onnx installed)


@pytest.fixture(scope="module")
def saved_digits_model(tmp_path_factory):
    """A convnet for 8x8 grey digits, saved with a metrics.json naming its dataset."""
    run = tmp_path_factory.mktemp("run")
    model = get_model("convnet", num_classes=10, input_shape=(8, 8, 1), seed=0)
    model.save(run / "model.keras")
    (run / "metrics.json").write_text(json.dumps({"config": {"dataset": "digits"}}))
    return run / "model.keras", model


def keras_outputs(model, x):
    return np.asarray(model.predict(x, verbose=0))


def pixels(*shape, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


# --------------------------------------------------------------------------- export


def exporter(format):
    """The backend kbench exports `format` with: this one when it can, else TensorFlow (in a
    subprocess; the model file is portable)."""
    return BACKEND if BACKEND in usable_backends(format) else "tensorflow"


def test_onnx_export_matches_keras(saved_digits_model, tmp_path):
    """Under every backend: KERAS_BACKEND=jax (no jax2onnx here) exports through TensorFlow."""
    import onnxruntime

    model_path, model = saved_digits_model
    output = tmp_path / "out" / "model.onnx"
    tf_log_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    info = export_model(model_path, output, "onnx")
    assert info["max_abs_diff"] <= info["tolerance"] and output.is_file()
    # tf2onnx sets it to 3 on import, which would silence the C++ errors of later processes
    assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == tf_log_level
    assert info["backend"] == exporter("onnx")
    assert info["checked_under"] == list(dict.fromkeys([exporter("onnx"), BACKEND]))
    # Independently of export_model's own check: another batch size, other inputs.
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    x = pixels(5, 8, 8, 1)
    got = session.run(None, {name: x})[0]
    expected = keras_outputs(model, x)
    assert np.max(np.abs(got - expected)) < 1e-4 * max(1.0, np.abs(expected).max())
    assert not [p for p in os.listdir(output.parent) if p.startswith(".kbench-tmp-")]

    # An --output that exists and is not an ONNX model is refused and left as it was: the
    # model being exported (a mistyped --output), a notes file. The export above is replaced.
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for taken in (model_path, notes):
        before = taken.read_bytes()
        with pytest.raises(KbenchError, match="exists and is not an ONNX model"):
            export_model(model_path, taken, "onnx")
        assert taken.read_bytes() == before
    export_model(model_path, output, "onnx")
    onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])


def test_savedmodel_export_matches_keras_and_replaces_an_old_export(saved_digits_model,
                                                                     tmp_path, capsys):
    """Under every backend: KERAS_BACKEND=torch (Keras would need torch_xla) exports through
    TensorFlow, and says so."""
    import tensorflow as tf

    model_path, model = saved_digits_model
    output = tmp_path / "savedmodel"
    output.mkdir()
    (output / "saved_model.pb").write_bytes(b"an older export")
    (output / "stale.txt").write_text("from an older export")
    argv = ["export", str(model_path), "--format", "savedmodel", "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"as savedmodel under {exporter('savedmodel')} to" in out and "max abs diff" in out
    assert not (output / "stale.txt").exists()
    serve = tf.saved_model.load(str(output)).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    x = pixels(4, 8, 8, 1)
    (got,) = serve(**{name: tf.constant(x)}).values()
    np.testing.assert_allclose(got.numpy(), keras_outputs(model, x), atol=1e-4)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".kbench-tmp-")]


def test_savedmodel_export_says_only_what_the_user_can_act_on(saved_digits_model, tmp_path,
                                                                run_python):
    """Under jax the SavedModel holds jax2tf's custom gradients; TensorFlow's warning about
    them on loading (our check runs it forward only) is not shown. Nor is TensorFlow's C++
    start-up noise."""
    model_path, _ = saved_digits_model
    out = run_python("-m", "kbench.cli", "export", str(model_path), "--format", "savedmodel",
                     "--output", str(tmp_path / "sm"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "custom gradients" not in out.stderr and "WARNING:absl" not in out.stderr
    assert "I0000" not in out.stderr, out.stderr


@pytest.mark.backend_independent
def test_a_backend_that_cannot_export_names_those_that_can(saved_digits_model, tmp_path):
    model_path, _ = saved_digits_model
    with pytest.raises(KbenchError, match=r"^SavedModel export does not work under torch .*"
                                          r"--backend tensorflow or jax$") as error:
        export_model(model_path, tmp_path / "x", "savedmodel", backend="torch")
    assert "\n" not in str(error.value) and not os.listdir(tmp_path)
    with pytest.raises(KbenchError, match="unknown export format"):
        export_model(model_path, tmp_path / "x", "tflite")
    with pytest.raises(KbenchError, match="unknown backend 'mxnet'"):
        export_model(model_path, tmp_path / "x", "onnx", backend="mxnet")
    if "jax" not in ONNX_BACKENDS:  # jax2onnx is not in `make install`: how to add it
        with pytest.raises(KbenchError, match=r"^ONNX export under jax needs the jax2onnx "
                                              r"package \(pip install jax2onnx==0.17.1, .* "
                                              r"pip install -c constraints.txt jax2onnx .* "
                                              r"--backend tensorflow or torch$"):
            export_model(model_path, tmp_path / "x", "onnx", backend="jax")
        assert not os.listdir(tmp_path)


def snapshot(path):
    """{relative path: bytes} of a file or of every file under a folder."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_a_failed_check_writes_nothing_and_outputs_are_not_clobbered(saved_digits_model,
                                                                    tmp_path):
    """An artifact that disagrees with Keras (here: a tolerance nothing meets) is not kept, and
    an --output that holds something other than an older export is left alone."""
    model_path, _ = saved_digits_model
    format = "onnx" if BACKEND in ONNX_BACKENDS else "savedmodel"
    with pytest.raises(KbenchError, match="disagrees with the Keras model"):
        export_model(model_path, tmp_path / "model.out", format, tolerance=-1.0)
    assert os.listdir(tmp_path) == []

    # Over a good export, a failed one leaves the good one as it was.
    good = tmp_path / "good.out"
    export_model(model_path, good, format)
    before = snapshot(good)
    with pytest.raises(KbenchError, match="disagrees with the Keras model"):
        export_model(model_path, good, format, tolerance=-1.0)
    assert snapshot(good) == before and sorted(os.listdir(tmp_path)) == ["good.out"]
    if good.is_dir():  # a SavedModel
        shutil.rmtree(good)
    else:
        good.unlink()

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(KbenchError, match="is a folder|not a SavedModel"):
        export_model(model_path, precious, format)
    assert os.listdir(precious) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["precious"]


# --------------------------------------------------------------------------- predict


def test_predict_images_and_arrays(saved_digits_model, tmp_path, capsys):
    import keras
    from PIL import Image

    model_path, model = saved_digits_model
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "digit.png")
    batch = pixels(3, 8, 8, 1)
    np.save(tmp_path / "batch.npy", batch)
    np.save(tmp_path / "one.npy", batch[0, :, :, 0])  # (H, W): a grey image without channels

    rows = predict_files(model_path, [str(tmp_path / "digit.png"), str(tmp_path / "batch.npy"),
                                      str(tmp_path / "one.npy")], top=3)
    assert [r["input"] for r in rows] == [str(tmp_path / "digit.png")] + [
        f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] + [str(tmp_path / "one.npy")]
    image = keras.utils.load_img(tmp_path / "digit.png", color_mode="grayscale",
                                 target_size=(8, 8), interpolation="bilinear")
    x = np.concatenate([np.asarray(image, "float32").reshape(1, 8, 8, 1), batch, batch[:1]])
    logits = keras_outputs(model, x)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, p in zip(rows, probs):
        assert [t["class"] for t in row["top"]] == list(np.argsort(-p)[:3])
        assert [t["probability"] for t in row["top"]] == pytest.approx(np.sort(p)[::-1][:3],
                                                                       rel=1e-5)
        assert [t["name"] for t in row["top"]] == [str(t["class"]) for t in row["top"]]

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(model_path), str(tmp_path / "batch.npy"), "--top", "2",
                  "--json"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 3 and all(len(r["top"]) == 2 for r in printed)


def test_predict_bad_inputs_are_one_line_errors(saved_digits_model, tmp_path, capsys):
    model_path, _ = saved_digits_model
    (tmp_path / "bad.png").write_bytes(b"not an image")
    np.save(tmp_path / "wrong.npy", pixels(2, 5, 5, 3))
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "nan.npy", np.full((2, 8, 8, 1), np.nan, np.float32))
    np.save(tmp_path / "complex.npy", np.ones((2, 8, 8, 1), np.complex64))
    for name, message in (("bad.png", "not a readable image"), ("missing.jpg", "no such file"),
                          ("wrong.npy", "has shape (2, 5, 5, 3)"),
                          ("bad.npy", "not a readable .npy array"),
                          ("nan.npy", "holds NaN or infinite values"),
                          ("complex.npy", "holds complex64 values, not real numbers")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", str(model_path), str(tmp_path / name)])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, lines)


def test_only_arrays_in_0_to_1_get_the_scaling_note(saved_digits_model, tmp_path, capsys):
    from PIL import Image

    from kbench.predict import read_inputs

    _, model = saved_digits_model
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")  # read as 0..255
    np.save(tmp_path / "black.npy", np.zeros((8, 8, 1), np.float32))  # says nothing either way
    np.save(tmp_path / "scaled.npy", np.full((8, 8, 1), 0.5, np.float32))
    for names, noted in ((["black.png"], False), (["black.npy"], False),
                         (["black.png", "scaled.npy"], True)):
        read_inputs([tmp_path / n for n in names], model)
        assert ("note: the .npy inputs look scaled to 0..1" in capsys.readouterr().err) == noted


def test_token_ids_are_whole_numbers_in_the_vocabulary(tmp_path):
    """A text model's .npy: ids as given (a float array of whole numbers too); a fraction
    was truncated to another token by the int32 cast, silently; ids outside the table and
    image files are refused."""
    from kbench.predict import read_inputs

    model = get_model("text_lstm", num_classes=2, input_shape=(6,), vocab_size=50, seed=0)
    ids = np.array([[1, 2, 3, 0, 0, 0], [4, 49, 7, 8, 0, 0]])
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "float_ids.npy", ids.astype(np.float32))
    np.save(tmp_path / "fraction.npy", ids + np.array([0, 0, 0.7, 0, 0, 0]))
    np.save(tmp_path / "outside.npy", ids * 2)
    np.save(tmp_path / "wraps.npy", ids + 2**32)  # int32 would wrap these back to ids
    for name in ("ids.npy", "float_ids.npy"):
        names, batch = read_inputs([tmp_path / name], model)
        assert batch.dtype == np.int32 and (batch == ids).all() and len(names) == 2
    for name, message in (("fraction.npy", r"token ids are whole numbers; the inputs hold "
                                           r"fractions \(e.g. 3.7\)"),
                          ("outside.npy", r"token ids must lie in \[0, 50\) for this model; "
                                          r"the inputs hold 0..98"),
                          ("wraps.npy", r"token ids must lie in \[0, 50\) for this model; "
                                        r"the inputs hold 4294967296..4294967345"),
                          ("ids.png", "takes token ids, not images")):
        with pytest.raises(KbenchError, match=message):
            read_inputs([tmp_path / name], model)


def test_grey_images_of_more_than_8_bits_are_read_as_0_to_255_or_refused(saved_digits_model,
                                                                          tmp_path, capsys,
                                                                          monkeypatch):
    """Keras' load_img leaves a 16-bit grey PNG as 0..65535 (the model answered with
    confident nonsense): it is scaled by its bit depth. A 32-bit image has no known range:
    outside 0..255 it is refused. An image PIL will not decode for its size is one line too
    (PIL's DecompressionBombError is not an OSError)."""
    from PIL import Image

    from kbench.predict import read_inputs

    model_path, model = saved_digits_model
    grey = np.random.default_rng(3).integers(0, 256, (8, 8)).astype(np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "grey8.png")
    Image.fromarray(grey * 257).save(tmp_path / "grey16.png")  # a 16-bit PNG: mode I;16
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    _, batch = read_inputs([tmp_path / "grey8.png", tmp_path / "grey16.png"], model)
    np.testing.assert_allclose(batch[1], batch[0], atol=1e-3)
    np.testing.assert_array_equal(batch[0][..., 0], grey)

    # an RGB model gets the same 16-bit image as its 8-bit twin too (load_img clipped it)
    rgb = get_model("convnet", num_classes=10, input_shape=(8, 8, 3), seed=0)
    _, batch = read_inputs([tmp_path / "grey8.png", tmp_path / "grey16.png"], rgb)
    np.testing.assert_allclose(batch[1], batch[0], atol=1e-3)
    # big-endian 16 bits, and a float image within 0..255, read as their values
    Image.frombytes("I;16B", (8, 8), (grey * 257).astype(">u2").tobytes()).save(
        tmp_path / "grey16b.tif")
    Image.fromarray(grey.astype(np.float32), mode="F").save(tmp_path / "grey_float.tif")
    assert Image.open(tmp_path / "grey16b.tif").mode == "I;16B"
    _, batch = read_inputs([tmp_path / "grey16b.tif", tmp_path / "grey_float.tif"], model)
    np.testing.assert_allclose(batch[..., 0], [grey, grey], atol=1e-3)

    Image.fromarray((grey.astype(np.int32) * 4), mode="I").save(tmp_path / "wide.tif")
    Image.fromarray(grey.astype(np.float32) * 4, mode="F").save(tmp_path / "wide_float.tif")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses more than twice this
    for name, message in (("wide.tif", f"is a 32-bit integer image holding {grey.min() * 4}.."
                                       f"{grey.max() * 4}; kbench models take 0..255 pixels"),
                          ("wide_float.tif", f"is a float image holding {grey.min() * 4}.."
                                             f"{grey.max() * 4}; kbench models take 0..255"),
                          ("large.png", "large.png is too large to read safely (Image size "
                                        "(1600 pixels) exceeds limit of 200 pixels)")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", str(model_path), str(tmp_path / name)])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, lines)


def test_the_automatic_choice_passes_over_an_exporter_known_to_fail_on_the_model():
    """torch's ONNX exporter fails on attention (text_transformer), onnxruntime on jax2onnx's
    MaxPool: the default backend is then another (the module doc's table)."""
    import keras

    from kbench.export import known_to_fail

    tokens = keras.Input((6, 4))
    attention = keras.Model(tokens, keras.layers.MultiHeadAttention(2, 2)(tokens, tokens))
    images = keras.Input((8, 8, 1))
    pooling = keras.Model(images, keras.layers.MaxPooling2D()(images))
    assert known_to_fail(attention, "onnx", "torch")
    assert not known_to_fail(attention, "onnx", "jax")
    assert known_to_fail(pooling, "onnx", "jax") and not known_to_fail(pooling, "onnx", "torch")
    assert not known_to_fail(pooling, "savedmodel", "jax")


def test_the_export_subprocess_exports_under_its_own_backend(monkeypatch, capsys):
    """The parent picked the subprocess' backend: its automatic choice must not pick again
    (`--backend jax` on a MaxPool model went on to a third process, under TensorFlow)."""
    import keras

    from kbench import export

    calls = []
    monkeypatch.setattr(export, "export_model",
                        lambda *args, **kwargs: calls.append(kwargs) or {"done": True})
    export._subprocess_main(["model.keras", "onnx", "model.onnx", "0.001"])
    assert calls == [{"tolerance": 0.001, "backend": keras.backend.backend()}]
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"done": True}


def test_the_subprocess_note_names_the_asked_backend(saved_digits_model, tmp_path,
                                                     monkeypatch, capsys):
    """`KERAS_BACKEND=jax kbench export ... --backend torch` said "onnx export does not work
    under jax here": the user had asked for torch, whatever jax can do."""
    import subprocess
    import types

    import keras

    from kbench import export

    _, model = saved_digits_model
    here = keras.backend.backend()
    other = "torch" if here != "torch" else "tensorflow"
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: types.SimpleNamespace(
        returncode=0, stdout='{"done": true}\n', stderr=""))
    # Under every backend, each reason: this backend's exporter missing here, known to fail
    # on the model, or (the user's --backend) neither.
    for can, fails, asked, why in (
            (False, False, True, f"--backend {other}"),
            (True, True, True, f"--backend {other}"),
            (False, False, False, f"onnx export does not work under {here} here"),
            (True, True, False, f"{here}'s onnx exporter fails on {model.name}")):
        monkeypatch.setattr(export, "can_export", lambda format, backend, can=can: can)
        monkeypatch.setattr(export, "known_to_fail", lambda *args, fails=fails: fails)
        assert export._export_in_subprocess(model, str(tmp_path), str(tmp_path / "m.onnx"),
                                            "onnx", 1e-3, other, asked=asked) == {"done": True}
        assert capsys.readouterr().out == (f"note: {why}; exporting under {other} in a "
                                           "subprocess\n")


@pytest.mark.skipif(BACKEND not in ONNX_BACKENDS, reason="its exporter is patched in this "
                    "process: KERAS_BACKEND must export ONNX here (jax needs jax2onnx)")
def test_an_onnx_export_with_its_weights_in_a_side_file_is_written_as_one_file(tmp_path,
                                                                               monkeypatch):
    """jax2onnx (0.17) writes the larger weights to `<name>.onnx.data` beside the model. The
    check ran beside them, but only the .onnx was moved into place, so --output could not run
    (under another backend, the check itself failed). Here an exporter that writes its
    weights that way, through the real export_model: --output is one file that runs."""
    import keras
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    inputs = keras.Input((4,), name="features")
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.layers[1].weights)

    def export_with_a_side_file(path, format, verbose):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["features", "kernel"], ["product"]),
             helper.make_node("Add", ["product", "bias"], ["logits"])], "dense",
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
            [numpy_helper.from_array(kernel, "kernel"), numpy_helper.from_array(bias, "bias")])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
                  save_as_external_data=True, location=os.path.basename(path) + ".data",
                  size_threshold=0)
        assert os.path.isfile(path + ".data")  # as jax2onnx leaves it

    monkeypatch.setattr(model, "export", export_with_a_side_file)
    output = tmp_path / "out" / "dense.onnx"
    info = export_model(model, output, "onnx", backend=BACKEND)
    assert info["max_abs_diff"] <= info["tolerance"]
    assert sorted(os.listdir(output.parent)) == ["dense.onnx"]  # no side file, no scratch
    assert not any(onnx.external_data_helper.uses_external_data(t)
                   for t in onnx.load(output, load_external_data=False).graph.initializer)
    x = pixels(5, 4)
    got = onnxruntime.InferenceSession(output).run(None, {"features": x})[0]
    np.testing.assert_allclose(got, keras_outputs(model, x), rtol=1e-5, atol=1e-3)


def test_exporters_narration_is_kept_off_the_terminal_down_to_the_file_descriptor():
    """torch's ONNX exporter prints its graph from C++, past sys.stdout (30 KB when it fails):
    _quiet silences file descriptor 1 too, C stdio's buffer included, and restores it."""
    import subprocess
    import sys

    code = ("import ctypes, os, sys\n"
            "from kbench.export import _quiet\n"
            "with _quiet():\n"
            "    os.write(1, b'from fd 1\\n'); print('from python')\n"
            "    ctypes.CDLL(None).printf(b'from C stdio\\n')\n"
            "print('after')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "after\n"


@pytest.mark.backend_independent
def test_the_export_matrix_tool_runs_kbench_export_per_cell(tmp_path):
    """tools/export_matrix.py, which measured models.md's table: one real `kbench export` per
    cell, the difference it printed or its one-line error, and the table written out."""
    import subprocess
    import sys

    from tests.conftest import REPO

    tool = [sys.executable, os.path.join(REPO, "tools", "export_matrix.py")]
    done = subprocess.run([*tool, "--output", str(tmp_path / "m"), "--models", "convnet",
                           "--formats", "onnx,savedmodel", "--backends", "torch"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "m" / "table.md").read_text().splitlines()
    assert table[:2] == ["| model | format | torch |", "| --- | --- | --- |"]
    assert len(table) == 4 and done.stdout.splitlines()[-1] == table[-1]  # printed as it went
    onnx, savedmodel = (line.split(" | ") for line in table[2:])
    assert onnx[:2] == ["| convnet", "onnx"] and float(onnx[2].rstrip(" |")) < 1e-4
    assert savedmodel[2].startswith("error: SavedModel export does not work under torch")
    done = subprocess.run([*tool, "--output", str(tmp_path / "m"), "--models", "nope"],
                          capture_output=True, text=True, cwd=REPO)
    assert (done.returncode, done.stderr) == (2, "error: --models: unknown 'nope'; use any of: "
                                                 "convnet, resnet9, resnet20, preact_resnet18, "
                                                 "text_transformer, text_lstm\n")
