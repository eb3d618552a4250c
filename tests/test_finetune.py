"""recipes/finetune.py under the active backend: a new head on a saved kbench ResNet, stage 1
with the backbone frozen, stage 2 with everything but BatchNorm, and its one-line errors."""

import csv
import json

import numpy as np
import pytest

import kbench  # noqa: F401
from kbench.errors import KbenchError
from kbench.flags import run_recipe
from kbench.models import get_model
from recipes import finetune
from tests.conftest import BACKEND


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A CIFAR-10 ResNet-20 as recipes/cifar_resnet.py saves it, with BatchNorm statistics
    that are not the initial 0 / 1, so that any update to them shows."""
    import keras

    model = get_model("resnet20", num_classes=10, seed=1)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    path = tmp_path_factory.mktemp("pretrained") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small CIFAR-shaped convnet (conv-BN stages, Dense head) for the tests that check
    stage and resume bookkeeping rather than what a ResNet learns: it compiles in a fraction
    of ResNet-20's time."""
    model = get_model("convnet", num_classes=10, input_shape=(32, 32, 3), seed=1, widths=(8, 16))
    path = tmp_path_factory.mktemp("pretrained_small") / "model.keras"
    model.save(path)
    return path


def tiny(checkpoint, **overrides):
    base = dict(init_from=str(checkpoint) if checkpoint else None, dataset="synthetic", train_examples=64,
                test_examples=32, batch_size=16, head_epochs=1, epochs=1, steps_per_epoch=2,
                validate_every_epoch=False, verbose=0)
    return finetune.Config(**{**base, **overrides})


def snapshot(model):
    """{weight path: value} of every BatchNorm weight and of every conv kernel."""
    import keras

    return {w.path: np.array(keras.ops.convert_to_numpy(w)) for w in model.weights
            if w.path.startswith(("batch_normalization", "conv2d"))}


def test_two_stages_train_head_then_all_but_batchnorm(tmp_path, checkpoint):
    import keras

    seen = []  # a snapshot at the end of each stage
    record = keras.callbacks.LambdaCallback(on_train_end=lambda logs: seen.append(
        snapshot(record.model)))
    config = tiny(checkpoint, output_dir=str(tmp_path), validate_every_epoch=True,
                  head_epochs=2)
    metrics = finetune.main(config, callbacks=[record])

    # A new 100-way head (the synthetic stand-in for CIFAR-100) on the pretrained network.
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert model.output_shape == (None, 100) and metrics["model"] == "resnet20_finetuned"
    pretrained = snapshot(keras.saving.load_model(checkpoint))
    head, tuned = seen
    bn = [p for p in pretrained if "batch_normalization" in p]
    conv = [p for p in pretrained if p.endswith("kernel") and "batch" not in p]
    assert len(bn) == 19 * 4 and len(conv) == 19
    # Stage 1 trained the head only; stage 2 changed the convolutions; BatchNorm (scale,
    # offset and moving statistics) never moved.
    for path in bn + conv:
        np.testing.assert_array_equal(head[path], pretrained[path], err_msg=path)
    assert all(not np.array_equal(tuned[p], pretrained[p]) for p in conv)
    for path in bn:
        np.testing.assert_array_equal(tuned[path], pretrained[path], err_msg=path)

    # One history for both stages: 2 head epochs then 1 fine-tuning epoch, numbered 0..2.
    assert metrics["epochs"] == 3 and metrics["head_epochs"] == 2
    assert metrics["backend"] == BACKEND and len(metrics["history"]["loss"]) == 3
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and "val_accuracy" in rows[0]
    assert json.loads((tmp_path / "metrics.json").read_text())["init_from"] == str(checkpoint)


def test_main_takes_a_users_own_model(tmp_path):
    """The template use: fine-tune your own pretrained network (its last layer the head)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2)(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    features = keras.layers.GlobalAveragePooling2D()(x)
    mine = keras.Model(inputs, keras.layers.Dense(10)(features), name="mine")
    model = finetune.with_new_head(mine, num_classes=100)
    metrics = finetune.main(tiny(None, output_dir=str(tmp_path)), model=model)
    assert metrics["model"] == "mine_finetuned" and metrics["params"] == model.count_params()
    assert metrics["epochs"] == 2 and (tmp_path / "metrics.json").is_file()


@pytest.mark.backend_independent
def test_missing_or_corrupt_init_from_is_one_line_error(tmp_path, checkpoint):
    for path, expected in ((None, "pass --init-from PATH"),
                           (tmp_path / "nope.keras", "no such file"),
                           (tmp_path, "is a folder: point to the model.keras in it"),
                           (tmp_path / "bad.keras", "is not a readable .keras file")):
        if path is not None and path.name == "bad.keras":
            path.write_bytes(b"PK\x03\x04 this is not a Keras archive")
        with pytest.raises(KbenchError) as err:
            finetune.build_model(tiny(path if path else None))
        assert expected in str(err.value) and "\n" not in str(err.value)
    # ... said before the data is looked for (here: CIFAR-100 that is not there)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KbenchError, match="pass --init-from PATH"):
        finetune.main(tiny(None, dataset="cifar100", data_dir=str(tmp_path / "empty")))
    with pytest.raises(KbenchError, match="images of shape"):
        finetune.build_model(tiny(checkpoint, dataset="digits"))
    with pytest.raises(KbenchError, match="drop --model"):
        finetune.build_model(tiny(checkpoint, model="resnet20"))
    import keras

    images, extra = keras.Input((32, 32, 3)), keras.Input((5,))
    two_inputs = keras.Model([images, extra], keras.layers.Dense(3)(
        keras.layers.Concatenate()([keras.layers.Flatten()(images), extra])))
    two_inputs.save(tmp_path / "two_inputs.keras")
    with pytest.raises(KbenchError, match=r"two_inputs.keras takes 2 inputs; finetune trains a "
                                          r"model of one image input$"):
        finetune.build_model(tiny(tmp_path / "two_inputs.keras"))


@pytest.mark.backend_independent
def test_command_line_corrupt_checkpoint(entry_point_error, tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_text("not a model")
    status, err = entry_point_error(run_recipe, finetune.main, finetune.Config,
                                    ["--init-from", str(bad), "--dataset", "synthetic",
                                     "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --init-from {bad} is not a readable .keras file")


class Interrupted(Exception):
    """Stands in for a crash: raised in epoch `at` before its checkpoint is written."""


def crash_in_epoch(at):
    import keras

    def on_epoch_end(epoch, logs=None):
        if epoch == at:
            raise Interrupted(epoch)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def history_of(path):
    with open(path / "history.csv") as f:
        return list(csv.DictReader(f))


def test_resume_in_either_stage_equals_an_uninterrupted_run(tmp_path, small_checkpoint):
    """Interrupted at the boundary or in stage 2, --resume restores the stage the checkpoint
    is from (its own optimizer), finishes it, trains the next, and ends where an
    uninterrupted run ends: every epoch logged once, the same losses and test accuracy.
    (Within a stage, resume is cifar_resnet's, tested in test_training.py.) One run is
    interrupted twice: in epoch 2 (stage 1 done, stage 2 not begun), then, resumed from
    there, in epoch 3 (stage 2); resumed again, it must end as the uninterrupted run."""
    settings = dict(head_epochs=2, epochs=2, validate_every_epoch=False, lr=0.002,
                    finetune_lr=0.0005)
    ckpt = small_checkpoint
    whole = finetune.main(tiny(ckpt, output_dir=str(tmp_path / "whole"), **settings))
    expected = history_of(tmp_path / "whole")
    out = tmp_path / "crashed"
    for crash_at in (2, 3):
        with pytest.raises(Interrupted):
            finetune.main(tiny(ckpt, output_dir=str(out), resume=crash_at == 3, **settings),
                          callbacks=[crash_in_epoch(crash_at)])
        got = history_of(out)
        assert [row["epoch"] for row in got] == [str(e) for e in range(crash_at)], crash_at
        assert got == expected[:crash_at], crash_at  # bit-identical, every column
    metrics = finetune.main(tiny(ckpt, output_dir=str(out), resume=True, **settings))
    got = history_of(out)
    assert [row["epoch"] for row in got] == ["0", "1", "2", "3"]
    assert metrics["epochs"] == 4
    assert got == expected and metrics["history"] == whole["history"]
    # the test loss: the accuracy of this small, briefly trained model hardly moves
    assert (metrics["test_loss"], metrics["test_accuracy"]) == (whole["test_loss"],
                                                                whole["test_accuracy"])


def test_early_stopping_ends_a_stage_not_the_run(tmp_path, small_checkpoint):
    """Patience runs out in stage 1: stage 2 still trains (and stops by the same rule)."""
    import keras

    class WorseEveryEpoch(keras.callbacks.Callback):
        """The monitored value rises every epoch: after epoch 0, never an improvement."""

        def on_epoch_end(self, epoch, logs=None):
            logs["loss"] = float(epoch + 1)

    config = tiny(small_checkpoint, output_dir=str(tmp_path), head_epochs=3, epochs=3,
                  monitor="loss", early_stopping=1)
    metrics = finetune.main(config, callbacks=[WorseEveryEpoch()])
    # Stage 1: epoch 0 is the best, epoch 1 does not improve -> stage 1 ends. Stage 2 trains
    # epoch 2, which does not beat the best either -> the run ends.
    assert [row["epoch"] for row in history_of(tmp_path)] == ["0", "1", "2"]
    assert metrics["epochs"] == 3 and metrics["best"]["epoch"] == 0
    assert metrics["best"]["stopped_early"]
