"""recipes/mnist_convnet.py under the active backend: the digits accuracy its defaults promise,
the template use (a user's own model), and its command line."""

import dataclasses
import json
import time

import pytest

import kbench  # noqa: F401
from kbench.flags import build_parser
from recipes import mnist_convnet
from tests.conftest import BACKEND


def test_defaults_on_digits_reach_97_percent(tmp_path):
    """The one real data set that needs no download, with every other setting the default."""
    start = time.monotonic()
    config = mnist_convnet.Config(dataset="digits", output_dir=str(tmp_path), verbose=0)
    metrics = mnist_convnet.main(config)
    assert metrics["test_accuracy"] >= 0.97, metrics["test_accuracy"]
    assert metrics["backend"] == BACKEND and metrics["epochs"] == config.epochs
    assert metrics["model"] == "convnet" and metrics["config"]["optimizer"] == "adam"
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == metrics["test_accuracy"]
    assert (tmp_path / "model.keras").is_file() and (tmp_path / "history.csv").is_file()
    # A guard against defaults that train far longer (about 10 s quiet here), not a
    # benchmark: 80 s were seen with the 2 cores four times oversubscribed.
    assert time.monotonic() - start < 180


def test_main_takes_a_users_own_model(tmp_path):
    """The template use: swap in your own network, keep everything else."""
    import keras

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    mine = keras.Model(inputs, outputs, name="mine")
    config = mnist_convnet.Config(dataset="synthetic", train_examples=64, test_examples=32,
                                  batch_size=16, epochs=1, steps_per_epoch=2,
                                  output_dir=str(tmp_path), verbose=0)
    metrics = mnist_convnet.main(config, model=mine)
    assert metrics["model"] == "mine" and metrics["params"] == mine.count_params()
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["model"] == "mine"


@pytest.mark.backend_independent
def test_every_config_field_is_a_flag():
    parser = build_parser(mnist_convnet.Config)
    assert {a.dest for a in parser._actions} - {"help"} == {
        f.name for f in dataclasses.fields(mnist_convnet.Config)}
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--dataset", "--data-dir", "--model", "--epochs", "--steps-per-epoch",
            "--batch-size", "--seed", "--output-dir", "--optimizer", "--crop-padding"} <= options


@pytest.mark.backend_independent
def test_offline_without_mnist_fails_fast_with_one_line(run_python, tmp_path):
    start = time.monotonic()
    env = {"HOME": str(tmp_path), "KBENCH_DATA_DIR": "", "TFDS_DATA_DIR": str(tmp_path / "t")}
    # Its own folder: the default one (runs/ in the checkout) may be a developer's run's
    result = run_python("recipes/mnist_convnet.py", "--output-dir", str(tmp_path / "run"),
                        env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MNIST not found")
    assert "--data-dir" in last and "--dataset synthetic" in last and "--dataset digits" in last
    # A guard against defaults that train far longer (about 10 s quiet here), not a
    # benchmark: 80 s were seen with the 2 cores four times oversubscribed.
    assert time.monotonic() - start < 180
