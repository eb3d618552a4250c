"""recipes/cifar_resnet.py end to end under the active backend, plus its contracts."""

import csv
import dataclasses
import json
import os
import time

import numpy as np
import pytest

import kbench  # noqa: F401
from kbench import data
from kbench.errors import KbenchError
from kbench.flags import build_parser, parse_config, run_recipe
from recipes import cifar_resnet
from tests import cifar_files
from tests.conftest import BACKEND

METRICS_KEYS = {"backend", "test_accuracy", "test_loss", "epochs", "train_examples_per_sec",
                "num_replicas", "config", "versions"}


def tiny(**overrides):
    base = dict(dataset="synthetic", model="convnet", train_examples=256, test_examples=64, epochs=1,
                batch_size=32, verbose=0)
    return cifar_resnet.Config(**{**base, **overrides})


def test_command_line_run_writes_metrics_history_and_model(entry_point, tmp_path):
    """The recipe's command line (its `__main__` calls run_recipe), in this interpreter; the
    script itself runs in fresh ones in test_training.py (kill -9) and test_portability.py."""
    out_dir = tmp_path / "run"
    status, stdout, stderr = entry_point(
        run_recipe, cifar_resnet.main, cifar_resnet.Config,
        ["--dataset", "synthetic", "--model", "convnet", "--epochs", "1", "--steps-per-epoch",
         "4", "--batch-size", "32", "--train-examples", "128", "--test-examples", "64",
         "--output-dir", str(out_dir)])
    assert status == 0, stderr[-3000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert METRICS_KEYS <= set(metrics)
    assert metrics["backend"] == BACKEND and metrics["epochs"] == 1
    assert metrics["num_replicas"] == 1 and metrics["train_examples_per_sec"] > 0
    assert metrics["config"]["batch_size"] == 32 and metrics["versions"]["keras"]
    # What compiled the step, as compare's records say it (--jit-compile auto's choice here).
    assert metrics["compiler"] == {"jax": "xla", "tensorflow": "tf.function",
                                   "torch": "eager"}[BACKEND]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_loss"])
    with open(out_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0"]
    assert list(rows[0])[:2] == ["epoch", "loss"]
    # The final summary line.
    assert f"under {BACKEND}: test accuracy" in stdout
    assert (out_dir / "model.keras").is_file()
    assert not [p for p in os.listdir(out_dir) if p.startswith(".kbench-tmp-")]


@pytest.mark.skipif(BACKEND != "torch", reason="the reader is backend-independent; learning "
                    "is checked per backend on digits: runs in the torch pass, the fastest")
def test_training_on_published_cifar_files_learns(tmp_path):
    """CIFAR-10 read from a published-format archive (holding learnable synthetic images):
    three epochs lower the loss every epoch and beat chance on the test split by far."""
    # Measured (torch, this seed): losses 2.33, 1.59, 1.27; test accuracy 0.81.
    train, test = data.load_synthetic(train_examples=512, test_examples=256, seed=1)
    cifar_files.write_archive(tmp_path / "cifar", "cifar10", train, test, [256, 256])
    config = cifar_resnet.Config(dataset="cifar10", data_dir=str(tmp_path / "cifar"),
                                 model="convnet", epochs=3, batch_size=32, lr=0.05,
                                 warmup_epochs=0.5,
                                 validate_every_epoch=False, output_dir=str(tmp_path / "out"),
                                 verbose=0)
    metrics = cifar_resnet.main(config)
    losses = metrics["history"]["loss"]
    assert losses[0] > losses[1] > losses[2], losses
    assert metrics["test_accuracy"] > 0.5, metrics["test_accuracy"]  # chance: 0.1
    assert metrics["epochs"] == 3


def test_main_takes_a_users_own_model(tmp_path):
    """The template use: swap in your own network, keep everything else."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    mine = keras.Model(inputs, outputs, name="mine")
    metrics = cifar_resnet.main(tiny(output_dir=str(tmp_path)), model=mine)
    assert metrics["model"] == "mine" and metrics["params"] == mine.count_params()
    assert (tmp_path / "metrics.json").is_file()


def test_main_takes_users_own_datasets(tmp_path):
    arrays = data.load_dataset("synthetic", train_examples=128, test_examples=32)
    train_ds, test_ds = data.make_datasets(arrays, batch_size=32)
    # Plain tf.data pipelines: a finite one's length is its epoch.
    import tensorflow as tf

    onehot = np.eye(10, dtype=np.float32)[arrays.y_train.ravel()]
    finite = tf.data.Dataset.from_tensor_slices(
        (arrays.x_train.astype(np.float32), onehot)).batch(32)  # 4 batches
    metrics = cifar_resnet.main(tiny(output_dir=str(tmp_path), steps_per_epoch=None),
                                datasets=(finite, test_ds.dataset))
    assert metrics["epochs"] == 1 and "test_accuracy" in metrics
    assert metrics["history"]["loss"] and metrics["config"]["steps_per_epoch"] is None
    # An endless one cannot say how long an epoch is: one line, before any training.
    with pytest.raises(KbenchError, match="pass --steps-per-epoch"):
        cifar_resnet.main(tiny(output_dir=str(tmp_path / "b"), steps_per_epoch=None),
                          datasets=(train_ds.dataset, test_ds.dataset))


def test_same_seed_same_numbers(tmp_path):
    a = cifar_resnet.main(tiny(steps_per_epoch=3, output_dir=str(tmp_path / "a")))
    b = cifar_resnet.main(tiny(steps_per_epoch=3, output_dir=str(tmp_path / "b")))
    assert a["history"]["loss"] == pytest.approx(b["history"]["loss"], rel=1e-5)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)


@pytest.mark.backend_independent
def test_every_config_field_is_a_flag():
    parser = build_parser(cifar_resnet.Config)
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(cifar_resnet.Config)}
    config = parse_config(cifar_resnet.Config, ["--batch-size", "7", "--no-augment",
                                                "--data-dir", "/d", "--steps-per-epoch", "3"])
    assert (config.batch_size, config.augment, config.data_dir, config.steps_per_epoch) == (
        7, False, "/d", 3)
    common = ["--dataset", "--data-dir", "--model", "--epochs", "--steps-per-epoch",
              "--batch-size", "--lr", "--seed", "--output-dir", "--dtype-policy"]
    options = {s for a in parser._actions for s in a.option_strings}
    assert set(common) <= options


@pytest.mark.backend_independent
def test_offline_without_data_fails_fast_with_one_line(entry_point_error, monkeypatch,
                                                      tmp_path):
    """The recipe's command line with its defaults (CIFAR-10), in this interpreter (a recipe
    script's own refusal runs in a fresh one in test_config.py)."""
    for name, value in {"HOME": str(tmp_path), "KBENCH_DATA_DIR": "",
                        "TFDS_DATA_DIR": str(tmp_path / "t")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # its default folder, runs/..., lands here, not in the checkout
    start = time.monotonic()
    status, err = entry_point_error(run_recipe, cifar_resnet.main, cifar_resnet.Config, [])
    elapsed = time.monotonic() - start
    assert status == 2
    assert "Traceback" not in err and err.count("\n") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: CIFAR-10 not found")
    assert "--data-dir" in last and "--dataset synthetic" in last
    assert elapsed < 60
    assert not (tmp_path / "runs").exists()  # the run's folder, made and left empty: gone


@pytest.mark.backend_independent
def test_bad_flags_are_one_line_errors(entry_point_error):
    for args, message in [
        (["--model", "resnet21", "--epochs", "1", "--steps-per-epoch", "1"],
         "error: --model 'resnet21' is not allowed: it takes a name registered in "
         "kbench.models for images (convnet, preact_resnet18, resnet9, resnet20"),
        (["--train-examples", "16", "--batch-size", "64"], "batch size 64 is impossible"),
    ]:
        status, err = entry_point_error(run_recipe, cifar_resnet.main, cifar_resnet.Config,
                                        ["--dataset", "synthetic", *args])
        assert status == 2 and err.count("\n") == 1 and message in err, err
