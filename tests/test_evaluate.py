"""Evaluation (kbench.evaluation, `kbench evaluate`), loading saved models and their float32
copies (kbench.models.saving), and dataset class names, under the active backend."""

import json
import os
import zipfile

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

import kbench  # noqa: F401
from kbench import cli, data
from kbench.data.registry import CLASS_NAMES, class_names
from kbench.errors import KbenchError
from kbench.evaluation import evaluate_model, evaluate_predictions, write_evaluation
from kbench.models import get_model
from kbench.models.saving import float32_copy, load_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {"accuracy", "loss", "macro_f1", "num_examples", "num_classes", "per_class",
               "confusion_matrix"}


def digits_model(num_classes=10, seed=0):
    return get_model("convnet", num_classes=num_classes, input_shape=(8, 8, 1), seed=seed)


def digits_test_split(examples=200, batch_size=64):
    arrays = data.load_dataset("digits", test_examples=examples)
    return data.make_pipeline(arrays.x_test, arrays.y_test, 10, batch_size, training=False)


def save_run(tmp_path, model, config, recipe="mnist_convnet"):
    """A run folder as a recipe leaves it: model.keras and metrics.json."""
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "metrics.json").write_text(json.dumps({"recipe": recipe, "config": config}))
    return run / "model.keras"


def run_cli(*argv):
    """`kbench ARGV...` in this process; returns the exit status."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    return exit_info.value.code


# --------------------------------------------------------------------------- metrics


@pytest.mark.backend_independent
def test_metrics_of_known_logits_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=50)
    labels[:4] = [0, 1, 2, 2]  # class 3 may be absent: it must still get its row
    labels[labels == 3] = 2
    logits = rng.normal(size=(50, 4))
    result = evaluate_predictions(logits, labels, ["a", "b", "c", "d"])
    predicted = logits.argmax(1)

    assert RESULT_KEYS <= set(result) and "top5_accuracy" not in result  # < 10 classes
    assert result["num_examples"] == 50 and result["num_classes"] == 4
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert result["confusion_matrix"] == confusion_matrix(labels, predicted,
                                                          labels=range(4)).tolist()
    assert sum(map(sum, result["confusion_matrix"])) == 50
    assert [c["name"] for c in result["per_class"]] == ["a", "b", "c", "d"]
    assert result["per_class"][3]["support"] == 0
    assert [c["support"] for c in result["per_class"]] == np.bincount(labels, minlength=4).tolist()
    assert result["macro_f1"] == pytest.approx(
        f1_score(labels, predicted, labels=range(4), average="macro", zero_division=0))
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert result["loss"] == pytest.approx(-np.mean(log_softmax[np.arange(50), labels]))

    # One-hot labels and softmax outputs give the same numbers.
    one_hot = np.eye(4)[labels]
    probs = np.exp(log_softmax)
    again = evaluate_predictions(probs, one_hot, ["a", "b", "c", "d"])
    assert again["loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert again["confusion_matrix"] == result["confusion_matrix"]


@pytest.mark.backend_independent
def test_top5_with_ten_or_more_classes():
    logits = np.tile(np.arange(12, dtype=float), (3, 1))  # class 11 scores highest
    labels = np.array([11, 7, 6])  # ranks 1, 5, 6
    result = evaluate_predictions(logits, labels)
    assert result["top5_accuracy"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert [c["name"] for c in result["per_class"]] == [str(i) for i in range(12)]


@pytest.mark.backend_independent
def test_bad_predictions_and_labels_are_one_line_errors():
    with pytest.raises(KbenchError, match="3 outputs but the dataset has 2 classes"):
        evaluate_predictions(np.zeros((2, 3)), [0, 1], ["x", "y"])
    with pytest.raises(KbenchError, match="out of range"):
        evaluate_predictions(np.zeros((2, 3)), [0, 3])
    with pytest.raises(KbenchError, match="2 model outputs but 3 labels"):
        evaluate_predictions(np.zeros((2, 3)), [0, 1, 2])


@pytest.mark.backend_independent
def test_write_evaluation_writes_json_and_png_atomically(tmp_path):
    rng = np.random.default_rng(1)
    for classes in (10, 100):
        labels = rng.integers(0, classes, size=300)
        result = evaluate_predictions(rng.normal(size=(300, classes)), labels)
        out = tmp_path / str(classes)
        json_path, png_path = write_evaluation(result, out)
        on_disk = json.loads((out / "eval.json").read_text())
        assert on_disk == json.loads(json.dumps(result)) and json_path == str(out / "eval.json")
        assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
        assert sorted(os.listdir(out)) == ["confusion_matrix.png", "eval.json"]  # no temp files


@pytest.mark.backend_independent
def test_class_names_fit_every_dataset():
    for name in data.IMAGE_DATASETS + ("imdb",):
        names = class_names(name)
        if name == "synthetic":
            assert names is None
        else:
            assert len(names) == data.num_classes(name) == len(set(names)), name
    assert class_names("cifar10")[3] == "cat" and class_names("fashion_mnist")[9] == "Ankle boot"
    assert class_names("cifar100") == sorted(CLASS_NAMES["cifar100"])  # the archive's order
    with pytest.raises(KbenchError, match="unknown dataset"):
        class_names("imagenet")


# --------------------------------------------------------------------------- models


def test_evaluate_model_matches_keras_evaluate():
    import keras

    model = digits_model()
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    test_ds = digits_test_split(examples=200, batch_size=64)  # a partial last batch
    expected = model.evaluate(test_ds.dataset, return_dict=True, verbose=0)
    result = evaluate_model(model, test_ds, class_names("digits"))
    assert result["num_examples"] == 200 and len(result["per_class"]) == 10
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert sum(map(sum, result["confusion_matrix"])) == 200


def test_predictions_see_one_input_shape_and_keep_every_example_once():
    """A compiled predict step compiles once per input shape: the last, shorter batch is
    padded to the others' size (its last example repeated) and the padding cut off."""
    import keras

    from kbench.evaluation import pad_rows, predict_all

    model = digits_model()
    shapes = []
    keras_predict = model.predict_on_batch

    def predict_on_batch(x):
        shapes.append(tuple(x.shape))
        return keras_predict(x)

    model.predict_on_batch = predict_on_batch
    arrays = data.load_dataset("digits", test_examples=200)
    test_ds = data.make_pipeline(arrays.x_test, arrays.y_test, 10, 64, training=False)
    logits, labels = predict_all(model, test_ds)
    assert set(shapes) == {(64, 8, 8, 1)} and len(shapes) == 4  # 64, 64, 64, and 8 padded
    assert logits.shape == (200, 10) and len(labels) == 200
    one_pass = keras.ops.convert_to_numpy(model(keras.ops.convert_to_tensor(
        np.concatenate([x for x, _ in test_ds.dataset.as_numpy_iterator()])), training=False))
    # the same to float rounding: a batch of 200 may take other kernels than one of 64
    np.testing.assert_allclose(logits, one_pass, rtol=1e-5, atol=1e-5)
    # structures too (a model with several inputs), each array padded alike
    padded = pad_rows({"a": np.arange(3), "b": np.ones((3, 2)), "c": None}, 5)
    assert padded["a"].tolist() == [0, 1, 2, 2, 2] and padded["b"].shape == (5, 2)
    assert padded["c"] is None


def test_a_model_of_named_inputs_is_evaluated():
    """Data of ({"image": x}, y) elements for a model of named inputs: every backend, torch
    included (where kbench converts the inputs to tensors itself)."""
    import keras
    import tensorflow as tf

    from kbench.evaluation import predict_all

    inputs = keras.Input((8, 8, 1), name="image")
    model = keras.Model({"image": inputs}, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(0).random((10, 8, 8, 1)).astype("float32")
    y = np.eye(10, dtype="float32")
    test_ds = tf.data.Dataset.from_tensor_slices(({"image": x}, y)).batch(4)
    logits, labels = predict_all(model, test_ds)
    np.testing.assert_allclose(logits, keras.ops.convert_to_numpy(model({"image": x})),
                               rtol=1e-5, atol=1e-5)
    assert labels.shape == (10, 10)


def test_load_model_round_trip_and_bad_files(tmp_path):
    model = get_model("resnet20", num_classes=10, seed=0)  # custom layers: ShortcutPad
    model.save(tmp_path / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    loaded = load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))

    good = (tmp_path / "model.keras").read_bytes()
    cases = {
        "missing.keras": None,
        "garbage.keras": b"\x00not a zip at all" * 100,
        "truncated.keras": good[: len(good) // 2],
    }
    for name, payload in cases.items():
        if payload is not None:
            (tmp_path / name).write_bytes(payload)
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("readme.txt", "a zip, but no Keras model")
    (tmp_path / "renamed.zip").write_bytes(good)
    model.save_weights(tmp_path / "model.weights.h5")  # what a run's checkpoints are
    expected = {"missing.keras": "no such file", "garbage.keras": "not a readable .keras file",
                "truncated.keras": "not a readable .keras file", "other.keras": "not a Keras model",
                "renamed.zip": "ending in .keras",
                "model.weights.h5": r"is an HDF5 file \(weights, or a Keras 2 .h5 model\), "
                                    "not a .keras file"}
    for name, message in expected.items():
        with pytest.raises(KbenchError, match=message) as error:
            load_model(tmp_path / name)
        assert "\n" not in str(error.value), name
    with pytest.raises(KbenchError, match="is a folder"):
        load_model(tmp_path)


@pytest.fixture
def restore_dtype_policy():
    import keras

    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("name", ["convnet", "text_transformer"])
def test_float32_copy_of_a_mixed_precision_model(name, restore_dtype_policy):
    import keras

    if name == "convnet":
        kwargs = dict(num_classes=10, input_shape=(8, 8, 1))
        x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 1)).astype("float32")
    else:  # custom PositionEmbedding, MultiHeadAttention's sublayers, int32 inputs
        kwargs = dict(num_classes=2, input_shape=(12,), vocab_size=40)
        x = np.random.default_rng(0).integers(0, 40, (4, 12)).astype("int32")
    keras.config.set_dtype_policy("mixed_bfloat16")
    mixed = get_model(name, seed=0, **kwargs)
    keras.config.set_dtype_policy("float32")
    copy = float32_copy(mixed)
    reference = get_model(name, seed=1, **kwargs)  # other initial weights, then mixed's
    reference.set_weights(mixed.get_weights())

    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in mixed.layers)
    assert str(copy.inputs[0].dtype) == str(mixed.inputs[0].dtype)
    out = copy.predict(x, verbose=0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, reference.predict(x, verbose=0))
    scale = np.abs(out).max()
    np.testing.assert_allclose(out, mixed.predict(x, verbose=0), atol=0.03 * scale)  # bf16


# --------------------------------------------------------------------------- kbench evaluate


def test_evaluate_command_takes_settings_from_metrics_json(tmp_path, capsys):
    model_path = save_run(tmp_path, digits_model(), {
        "dataset": "digits", "data_dir": None, "seed": 0, "train_examples": None,
        "test_examples": 120, "batch_size": 50})
    out = tmp_path / "eval"
    assert run_cli("evaluate", model_path, "--output-dir", out) == 0
    result = json.loads((out / "eval.json").read_text())
    assert RESULT_KEYS <= set(result) and result["num_examples"] == 120
    assert result["dataset"] == "digits" and result["recipe"] == "mnist_convnet"
    assert [c["name"] for c in result["per_class"]] == [str(d) for d in range(10)]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("convnet on digits under") and "accuracy" in line

    # Flags override metrics.json, and the numbers are those of the model on that split.
    assert run_cli("evaluate", model_path, "--output-dir", out, "--test-examples", 60) == 0
    result = json.loads((out / "eval.json").read_text())
    expected = evaluate_model(load_model(model_path), digits_test_split(examples=60))
    assert result["num_examples"] == 60 and result["accuracy"] == expected["accuracy"]

    # A batch larger than the training split (digits: 1347 examples) evaluates in one batch:
    # evaluate builds the test split alone.
    assert run_cli("evaluate", model_path, "--output-dir", out, "--test-examples", 60,
                   "--batch-size", 5000) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["num_examples"] == 60 and result["accuracy"] == expected["accuracy"]


def test_evaluate_writes_beside_the_model_without_output_dir(tmp_path, capsys):
    model_path = save_run(tmp_path, digits_model(), {
        "dataset": "digits", "data_dir": None, "seed": 0, "train_examples": None,
        "test_examples": 40, "batch_size": 20})
    assert run_cli("evaluate", model_path) == 0
    folder = os.path.dirname(os.path.abspath(model_path))
    assert json.loads(open(os.path.join(folder, "eval.json")).read())["num_examples"] == 40
    assert os.path.isfile(os.path.join(folder, "confusion_matrix.png"))
    assert f"wrote {folder}/eval.json" in capsys.readouterr().out


def test_a_model_without_its_runs_files_records_the_split_it_was_scored_on(tmp_path):
    """No metrics.json beside it: the split is kbench's default one (seed 0), and eval.json
    says so (it said seed null)."""
    path = tmp_path / "alone" / "my_model.keras"
    path.parent.mkdir()
    digits_model().save(path)
    assert run_cli("evaluate", path, "--dataset", "digits", "--test-examples", 30,
                   "--output-dir", tmp_path / "eval") == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["config"]["seed"] == 0 and result["config"]["dataset"] == "digits"
    assert result["num_examples"] == 30 and result["recipe"] is None


def test_evaluate_reads_config_json_of_an_unfinished_run(tmp_path):
    """A run killed mid-way has best.keras and config.json (flat settings) but no metrics.json."""
    run = tmp_path / "run"
    run.mkdir()
    digits_model().save(run / "best.keras")
    (run / "config.json").write_text(json.dumps({
        "recipe": "mnist_convnet", "backend": "jax", "dataset": "digits", "test_examples": 30,
        "batch_size": 16, "seed": 0}))
    assert run_cli("evaluate", run / "best.keras", "--output-dir", tmp_path / "eval") == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["num_examples"] == 30 and result["config"]["batch_size"] == 16


def test_evaluate_command_errors_are_one_line(tmp_path, capsys):
    def error_of(*argv):
        assert run_cli("evaluate", *argv, "--output-dir", tmp_path / "eval") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    bare = tmp_path / "bare.keras"  # no metrics.json beside it
    digits_model(num_classes=3).save(bare)
    assert "pass --dataset" in error_of(bare)
    assert "3 outputs but digits has 10 classes" in error_of(bare, "--dataset", "digits")
    assert "takes images (8, 8, 1) but synthetic gives images (32, 32, 3)" in error_of(
        bare, "--dataset", "synthetic", "--recipe", "cifar_resnet", "--test-examples", "8")
    assert "kbench has no dataset 'nope'" in error_of(bare, "--dataset", "nope")
    assert "dataset 'imdb' holds token ids, not the images this model takes" in error_of(
        bare, "--dataset", "imdb")
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable .keras file" in error_of(tmp_path / "broken.keras")
    # An --output-dir it cannot write is refused before the evaluation, not after it
    (tmp_path / "a-file").write_text("mine")
    assert run_cli("evaluate", bare, "--dataset", "digits", "--output-dir",
                   tmp_path / "a-file" / "eval") == 2
    assert "cannot write there" in capsys.readouterr().err


def test_bad_settings_in_metrics_json_are_one_line_errors_naming_the_file(tmp_path, capsys):
    """A metrics.json edited by hand (or not kbench's): its settings are checked by the rules
    the recipe's flags follow, before any data is built, and a flag given now wins over it."""
    settings = {"dataset": "digits", "seed": 0, "test_examples": 40, "batch_size": 20}
    for name, bad, hint in [("test_examples", -5, ", or pass --test-examples"),
                            ("batch_size", "x", ", or pass --batch-size"),
                            ("batch_size", 0, ", or pass --batch-size"),
                            ("seed", -1, "")]:
        case = tmp_path / f"{name}-{bad}"
        case.mkdir()
        model_path = save_run(case, digits_model(), {**settings, name: bad})
        metrics = model_path.parent / "metrics.json"
        assert run_cli("evaluate", model_path, "--output-dir", case / "eval") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {metrics} holds a setting that is not allowed "
                               f"(--{name.replace('_', '-')} {bad!r} is not allowed"), line
        assert line.endswith(f"mend the file{hint}")
        assert not (case / "eval" / "eval.json").exists()
    batch_0 = tmp_path / "batch_size-0" / "run" / "model.keras"
    assert run_cli("evaluate", batch_0, "--batch-size", 10, "--output-dir",
                   tmp_path / "eval") == 0
    # With --recipe the recipe's Config rules, and a bad flag is not blamed on the file.
    assert run_cli("evaluate", model_path, "--recipe", "mnist_convnet", "--output-dir",
                   tmp_path / "eval") == 2
    assert f"error: {metrics} holds a setting that is not allowed (--seed -1" in \
        capsys.readouterr().err
    assert run_cli("evaluate", batch_0, "--recipe", "mnist_convnet", "--dataset", "bogus",
                   "--output-dir", tmp_path / "eval") == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'bogus'")

    # Another recipe's settings (finetune saves model: null) under --recipe: the file is fine,
    # the recipe is not the one that trained the model.
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    tuned_path = save_run(tuned, digits_model(), {**settings, "model": None}, recipe="finetune")
    assert run_cli("evaluate", tuned_path, "--recipe", "mnist_convnet", "--output-dir",
                   tuned / "eval") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tuned_path.parent / 'metrics.json'} was written by recipe "
                           "finetune, whose settings this recipe does not take (--model "), line
    assert line.endswith("pass --recipe finetune, or leave --recipe out"), line
    # ... but a value that recipe would refuse too is the file's fault, not the recipe's
    (tuned / "run" / "metrics.json").write_text(json.dumps(
        {"recipe": "finetune", "config": {**settings, "seed": -1, "model": None}}))
    assert run_cli("evaluate", tuned_path, "--recipe", "mnist_convnet", "--output-dir",
                   tuned / "eval") == 2
    assert capsys.readouterr().err.startswith(f"error: {tuned_path.parent / 'metrics.json'} "
                                              "holds a setting that is not allowed (--seed -1")

    # A "config" that is no mapping: the file is set aside with a note, as an unreadable one.
    metrics.write_text(json.dumps({"recipe": "mnist_convnet", "config": 5}))
    assert run_cli("evaluate", model_path, "--output-dir", tmp_path / "eval2") == 2
    err = capsys.readouterr().err
    assert "note: ignoring" in err and "error: " in err and "pass --dataset" in err
