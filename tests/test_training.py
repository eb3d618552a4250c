"""Training features every recipe shares: schedules, clipping, mixed precision, checkpoints and
--resume (kill -9 included), best model, early stopping, the NaN guard, TensorBoard, --config.

Runs under every backend (`make test` runs the suite once per backend)."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from kbench import checkpoint, train
from kbench.errors import Interrupted, KbenchError
from kbench.flags import parse_config
from recipes import cifar_resnet
from tests.conftest import BACKEND, REPO


def tiny(tmp_path=None, **overrides):
    settings = dict(dataset="synthetic", model="convnet", epochs=2, steps_per_epoch=2,
                    batch_size=16, train_examples=64, test_examples=32, verbose=0,
                    output_dir=str(tmp_path / "run") if tmp_path else None)
    settings.update(overrides)
    return cifar_resnet.Config(**settings)


# --------------------------------------------------------------------------- schedules


def rates(config, steps_per_epoch, steps):
    schedule = train.learning_rate_schedule(config, steps_per_epoch)
    return [float(keras.ops.convert_to_numpy(schedule(step))) for step in steps]


def test_schedules_follow_their_definitions():
    base = dict(lr=0.1, epochs=6, warmup_epochs=0.0)
    assert rates(tiny(schedule="constant", **base), 10, [0, 59]) == pytest.approx([0.1, 0.1])
    # step: x0.1 every 2 epochs (20 steps)
    got = rates(tiny(schedule="step", decay_epochs=2, **base), 10, [0, 19, 20, 39, 40, 59])
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # exponential: reaches lr x decay_rate after the last step
    got = rates(tiny(schedule="exponential", decay_rate=0.01, **base), 10, [0, 30, 60])
    assert got == pytest.approx([0.1, 0.01, 0.001], rel=1e-5)
    # cosine: lr at 0, half way lr/2, 0 at the end
    assert rates(tiny(schedule="cosine", **base), 10, [0, 30, 60]) == pytest.approx(
        [0.1, 0.05, 0.0], abs=1e-6)
    # one-cycle: lr/25 at step 0, lr at 30%, ~0 at the end, never above lr
    curve = rates(tiny(schedule="one_cycle", **base), 10, range(60))
    assert curve[0] == pytest.approx(0.004, rel=1e-4)
    assert max(curve) == pytest.approx(0.1, rel=1e-4) and int(np.argmax(curve)) in (16, 17, 18)
    assert curve[-1] < 1e-5


def test_warmup_ramps_linearly_into_any_schedule():
    config = tiny(schedule="step", lr=0.2, epochs=4, warmup_epochs=1.0, decay_epochs=2)
    got = rates(config, 10, [0, 5, 10, 29, 30])
    # warmup 10 steps; then the step schedule counts from the warmup's end (decay after 20)
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.2, 0.02], abs=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "one_cycle"])
def test_schedules_survive_saving(schedule):
    """model.keras holds the optimizer and its schedule: kbench's must deserialize."""
    original = train.learning_rate_schedule(tiny(schedule=schedule, epochs=3), 10)
    config = keras.optimizers.schedules.serialize(original)
    restored = keras.optimizers.schedules.deserialize(json.loads(json.dumps(config)))
    for step in (0, 7, 15, 29):
        assert float(keras.ops.convert_to_numpy(restored(step))) == pytest.approx(
            float(keras.ops.convert_to_numpy(original(step))))


def test_gradient_clipping_is_set_and_keras_scales_the_loss_under_float16():
    optimizer = train.build_optimizer(tiny(clip_norm=1.5), 10)
    assert optimizer.global_clipnorm == 1.5
    config = tiny(dtype_policy="mixed_float16", optimizer="adamw")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    finally:
        keras.config.set_dtype_policy("float32")
    train.compile_model(model, config, 10)  # compile's auto_scale_loss wraps the optimizer
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer.global_clipnorm is None


@pytest.mark.parametrize("optimizer, clip_norm", [("adam", 0.0), ("adamw", 0.0),
                                                  ("sgd", 1.0)])
def test_adam_moves_a_repeated_embedding_row_as_every_backend_does(optimizer, clip_norm):
    """A token seen twice in a batch, with gradients 1 and 3: Adam's first step moves its
    Embedding row by the learning rate (m / sqrt(v) = 4 / sqrt(16)). Under tensorflow the
    gradient comes as one slice per occurrence, and Keras' Adam squared each apart (4 /
    sqrt(10): 1.26 times the step jax and torch take) until kbench summed them first
    (keras_fixes.sum_repeated_sparse_rows, installed by compile_model). So did --clip-norm's
    global norm (sqrt(10), not 4): SGD's row moved by lr * 4 / sqrt(10) (times Nesterov's
    1 + momentum), not lr * 4 / 4."""
    from kbench import optim

    config = cifar_resnet.Config(optimizer=optimizer, lr=0.1, weight_decay=0.0,
                                 warmup_epochs=0.0, epochs=1, clip_norm=clip_norm)
    ids = keras.Input((2,), dtype="int32")
    rows = keras.layers.Embedding(5, 1, embeddings_initializer="zeros")(ids)  # (batch, 2, 1)
    out = keras.ops.sum(rows[:, :, 0] * keras.ops.convert_to_tensor([[1.0, 3.0]]), axis=1)
    model = keras.Model(ids, out)
    train.compile_model(model, config, steps_per_epoch=1)
    # The loss is the output itself: d loss / d row 2 = 1 + 3
    model.compile(optimizer=model.optimizer, loss=lambda y_true, y_pred: y_pred,
                  jit_compile=model.jit_compile)
    schedule_rate = float(keras.ops.convert_to_numpy(
        optim.learning_rate_schedule(config, 1)(0)))
    model.train_on_batch(np.array([[2, 2]], "int32"), np.zeros((1,), "float32"))
    row = keras.ops.convert_to_numpy(model.layers[1].embeddings)[2, 0]
    expected = -schedule_rate  # Adam: the rate; SGD: the rate times the clipped gradient, 1
    if optimizer == "sgd" and model.optimizer.nesterov:
        expected *= 1 + model.optimizer.momentum
    assert row == pytest.approx(expected, rel=1e-5)


MIRRORED_EMBEDDING_STEP = """
from kbench import backend, keras_fixes
backend.simulate_cpu_devices(2)
import keras, numpy as np, tensorflow as tf
keras_fixes.sum_repeated_sparse_rows()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    ids = keras.Input((2,), dtype="int32")
    rows = keras.layers.Embedding(5, 1, embeddings_initializer="zeros")(ids)
    out = keras.ops.sum(rows[:, :, 0] * keras.ops.convert_to_tensor([[1.0, 3.0]]), axis=1)
    model = keras.Model(ids, out)
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=lambda y_true, y_pred: y_pred)
model.fit(np.array([[2, 2], [2, 2]], "int32"), np.zeros((2,), "float32"), batch_size=2,
          verbose=0)
print(float(model.layers[1].embeddings.numpy()[2, 0]))
"""


@pytest.mark.skipif(BACKEND != "tensorflow", reason="MirroredStrategy is tensorflow's")
def test_adam_moves_a_repeated_embedding_row_alike_on_two_mirrored_replicas(run_python):
    """Each replica's batch holds the row twice; the all-reduce joins the replicas' slices
    (the row twice again), which kbench sums once more: Adam's step is the rate, as on one
    device (it was 0.1414 for a rate of 0.1)."""
    done = run_python("-c", MIRRORED_EMBEDDING_STEP, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) == pytest.approx(-0.1, rel=1e-5)


# --------------------------------------------------------------------------- mixed precision


def test_mixed_bfloat16_trains_and_saves_a_float32_model(tmp_path):
    try:
        metrics = cifar_resnet.main(tiny(tmp_path, dtype_policy="mixed_bfloat16", epochs=1))
    finally:
        keras.config.set_dtype_policy("float32")
    assert metrics["dtype_policy"] == "mixed_bfloat16" and math.isfinite(metrics["test_loss"])
    loaded = keras.saving.load_model(tmp_path / "run" / "model.keras", compile=False)
    assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    assert keras.ops.convert_to_numpy(loaded(x, training=False)).dtype == np.float32


def test_mixed_float16_under_tensorflow_on_a_cpu_gets_a_note(capsys):
    from kbench import backend

    try:
        for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
            train.setup_run(tiny(dtype_policy=policy))  # what every run's setup calls
    finally:
        keras.config.set_dtype_policy("float32")
    notes = capsys.readouterr().err.strip().splitlines()
    if BACKEND == "tensorflow" and backend.accelerator() == "cpu":
        assert len(notes) == 1 and notes[0].startswith("note: mixed_float16 under tensorflow")
    else:  # measured slow only there; elsewhere nothing is said
        assert notes == []


# --------------------------------------------------------------------------- checkpoints


def test_every_epoch_is_checkpointed_and_logged(tmp_path):
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=3, tensorboard=True))
    run = tmp_path / "run"
    state = checkpoint.load_state(run)
    assert state.epochs_done == 3 and state.batches_done == 6 and state.steps_done == 6
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2.weights.h5"]
    assert (run / "history.csv").read_text().splitlines()[0].startswith("epoch,loss,")
    assert [r["epoch"] for r in state.rows] == [0, 1, 2]
    assert metrics["history"]["loss"] == [r["loss"] for r in state.rows]
    assert (run / "best.keras").exists() and metrics["best"]["monitor"] == "val_accuracy"
    assert json.loads((run / "config.json").read_text())["recipe"] == "cifar_resnet"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(run.glob(".kbench-tmp-*"))  # no temp files left behind


def run_recipe(args, output_dir, **popen):
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    command = [sys.executable, "recipes/cifar_resnet.py", *args, "--output-dir", str(output_dir)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def history_rows(path):
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split(","), map(float, line.split(",")))) for line in lines[1:]]


def test_kill_minus_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The issue's must-show: killed with SIGKILL after its second epoch, a 4-epoch run resumed
    with --resume logs epochs 0..3 once each, reports epochs: 4, and trains the same numbers
    as a run that was never interrupted (same seed, backend and machine). Also: the killed
    run's folder lock died with it, and a second run into a busy folder is refused."""
    args = ["--dataset", "synthetic", "--model", "convnet", "--epochs", "4", "--steps-per-epoch", "6",
            "--batch-size", "16", "--train-examples", "256", "--test-examples", "32",
            "--verbose", "0"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = run_recipe(args, killed)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        state = checkpoint.load_state(killed) if (killed / "checkpoint.json").exists() else None
        if state is not None and state.epochs_done >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    # Killed at any moment after checkpoint 1: history.csv may lag the checkpoint by an epoch.
    rows_at_kill = [row["epoch"] for row in history_rows(killed / "history.csv")]
    assert rows_at_kill == list(range(len(rows_at_kill))) and 1 <= len(rows_at_kill) <= 3

    resumed = run_recipe([*args, "--resume"], killed)  # the lock died with the killed run
    reference = run_recipe(args, whole)
    # One run per output folder: while `reference` trains, a second run into its folder
    # refuses at once and leaves it untouched (its numbers are checked below).
    lock = whole / ".kbench.lock"
    while time.time() < deadline and not (lock.exists() and str(reference.pid) in
                                          lock.read_text()):
        time.sleep(0.02)
    start = time.monotonic()
    with pytest.raises(KbenchError, match=rf"^{whole} is in use by another run \(process "
                                          rf"{reference.pid} on .*--output-dir$"):
        cifar_resnet.main(tiny(output_dir=str(whole), epochs=4, steps_per_epoch=6))
    assert time.monotonic() - start < 10
    out_resumed, out_reference = resumed.communicate(timeout=300), reference.communicate(timeout=300)
    assert resumed.returncode == 0, out_resumed[0]
    assert reference.returncode == 0, out_reference[0]
    assert "resuming cifar_resnet" in out_resumed[0]
    got, expected = history_rows(killed / "history.csv"), history_rows(whole / "history.csv")
    assert [row["epoch"] for row in got] == [0, 1, 2, 3]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["epochs"] == 4 and len(metrics["history"]["loss"]) == 4
    # Bit-identical, as docs/recipes.md says: every logged number, and the test loss
    # (accuracy on 32 examples moves in steps of 1/32, too coarse to tell)
    uninterrupted = json.loads((whole / "metrics.json").read_text())
    assert got == expected and metrics["history"] == uninterrupted["history"]
    assert (metrics["test_loss"], metrics["test_accuracy"]) == (
        uninterrupted["test_loss"], uninterrupted["test_accuracy"])


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(KbenchError, match="nothing to resume"):
        cifar_resnet.main(tiny(tmp_path, resume=True))
    cifar_resnet.main(tiny(tmp_path, epochs=1))
    with pytest.raises(KbenchError, match="from model 'convnet', this run is model 'resnet20'"):
        cifar_resnet.main(tiny(tmp_path, model="resnet20", resume=True))
    # Another dataset or recipe is refused before any data is loaded (CIFAR-100 is not here,
    # and with --download it would have been fetched for nothing)
    with pytest.raises(KbenchError, match="from dataset 'synthetic', this run is dataset "
                                          "'cifar100'"):
        cifar_resnet.main(tiny(tmp_path, dataset="cifar100", resume=True, download=True))
    from recipes import mnist_convnet

    other = mnist_convnet.Config(dataset="synthetic", model="convnet", batch_size=16,
                                 output_dir=str(tmp_path / "run"), resume=True)
    with pytest.raises(KbenchError, match="from recipe 'cifar_resnet', this run is recipe "
                                          "'mnist_convnet'"):
        mnist_convnet.main(other)
    with pytest.raises(KbenchError, match="trained with --optimizer sgd \\(not adam\\), "
                                          "--batch-size 16 \\(not 8\\): resume it with the same"):
        cifar_resnet.main(tiny(tmp_path, epochs=2, optimizer="adam", batch_size=8, resume=True))
    state = checkpoint.load_state(tmp_path / "run")
    (tmp_path / "run" / state.weights).write_bytes(b"not an h5 file")
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(KbenchError, match="cannot load checkpoint"):
        cifar_resnet.main(tiny(tmp_path, epochs=2, resume=True))
    # A resume that failed leaves the run's settings as they were (what --config reads back)
    assert (tmp_path / "run" / "config.json").read_text() == saved
    # A checkpoint.json whose fields are not what a run writes is refused before training
    state_path = tmp_path / "run" / "checkpoint.json"
    written = json.loads(state_path.read_text())
    for field, value, message in (("epochs_done", "two", "epochs_done is 'two', not an integer"),
                                  ("epochs_done", -5, "epochs_done is -5, not an integer >= 0"),
                                  ("rows", 5, "rows is 5, not a list"),
                                  ("weights", 5, "weights is 5, not a name"),
                                  # the next checkpoint deletes it: only a file of this run's
                                  ("weights", "../other/checkpoint-0.weights.h5",
                                   "weights is '../other/checkpoint-0.weights.h5', not a "
                                   "checkpoint-\\*.weights.h5 file's name"),
                                  ("rows", [{"loss": 1.0}], "rows holds something other"),
                                  ("stage_first_batch", written["batches_done"] + 1,
                                   f"stage_first_batch is {written['batches_done'] + 1}, past "
                                   f"batches_done \\({written['batches_done']}\\)")):
        state_path.write_text(json.dumps({**written, field: value}))
        with pytest.raises(KbenchError, match=f"is unreadable \\({message}"):
            checkpoint.load_state(tmp_path / "run")
    # A stage this recipe never reaches: every stage would be skipped as done, and the run
    # would end as finished ("raise --epochs", which does nothing) without training
    state_path.write_text(json.dumps({**written, "stage": 2}))
    with pytest.raises(KbenchError, match="is from training stage 3, but cifar_resnet now "
                                          "trains in 1 stage\\(s\\) \\(was the recipe or the "
                                          "checkpoint edited\\?\\): run without --resume"):
        cifar_resnet.main(tiny(tmp_path, epochs=3, resume=True))
    for content, message in (([1], "a JSON list, not an object"),
                             ({**written, "epoch": 1}, "unknown field 'epoch'"),
                             ({k: v for k, v in written.items() if k != "recipe"},
                              "no recipe field")):
        state_path.write_text(json.dumps(content))
        with pytest.raises(KbenchError, match=rf"is unreadable \({message}\); delete it"):
            checkpoint.load_state(tmp_path / "run")


class SignalAt(keras.callbacks.Callback):
    """Sends this process `signum` at the end of training batch `batch` (Keras' index in the
    fit at hand) of epoch `epoch`: a preemption at a known step."""

    def __init__(self, epoch, batch, signum):
        super().__init__()
        self.at, self.signum, self.epoch = (epoch, batch), signum, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), self.signum)


class CheckpointSeen(keras.callbacks.Callback):
    """Records, at the end of every training batch, the weights file checkpoint.json names."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir, self.seen = run_dir, set()

    def on_train_batch_end(self, batch, logs=None):
        if (self.run_dir / "checkpoint.json").exists():
            self.seen.add(checkpoint.load_state(self.run_dir).weights)


def test_sigterm_and_sigint_mid_epoch_checkpoint_and_resume_equals_an_uninterrupted_run(
        tmp_path):
    """The issue's must-show, in this interpreter (a real signal, sent to itself at a known
    step): SIGTERM in epoch 1 finishes the step, checkpoints mid-epoch and stops with status
    143; resumed, SIGINT in epoch 2 stops with 130; resumed again, the run logs every epoch
    once and ends with the uninterrupted run's numbers. --checkpoint-every 4 also wrote a
    step checkpoint in epoch 0, and a stop in epoch 0 resumes too."""
    settings = dict(epochs=3, steps_per_epoch=6, checkpoint_every=4)
    # What SIGINT did before: Python's default_int_handler, or SIG_IGN where the test runs in
    # a background job of a non-interactive shell (which starts with SIGINT ignored).
    sigint_before = signal.getsignal(signal.SIGINT)
    whole = cifar_resnet.main(tiny(output_dir=str(tmp_path / "whole"), **settings))
    run = tmp_path / "run"
    seen = CheckpointSeen(run)
    with pytest.raises(Interrupted) as stop:
        cifar_resnet.main(tiny(tmp_path, **settings),
                          callbacks=[seen, SignalAt(0, 4, signal.SIGTERM)])
    assert stop.value.status == 143 and "\n" not in str(stop.value)
    assert str(stop.value) == (f"stopped by SIGTERM in epoch 0 after batch 5 of 6: checkpoint "
                               f"in {run}; continue with the same command and --resume")
    assert "checkpoint-0-4.weights.h5" in seen.seen  # the periodic one, mid-epoch 0
    state = checkpoint.load_state(run)
    assert (state.epochs_done, state.batches_in_epoch, state.batches_done) == (0, 5, 5)
    assert state.weights == "checkpoint-0-5.weights.h5" and state.metric_states
    assert history_rows(run / "history.csv") == []
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0-5.weights.h5"]

    # A step checkpoint continues only with the epoch length it counted in.
    with pytest.raises(KbenchError, match="resume with the same --batch-size"):
        cifar_resnet.main(tiny(tmp_path, resume=True, **{**settings, "steps_per_epoch": 8}))

    # Resumed: the last step of epoch 0 is one fit (its batches counted from 0), then
    # epochs 1 and 2.
    with pytest.raises(Interrupted) as stop:
        cifar_resnet.main(tiny(tmp_path, resume=True, **settings),
                          callbacks=[SignalAt(2, 1, signal.SIGINT)])
    assert stop.value.status == 130 and "in epoch 2 after batch 2 of 6" in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # handlers restored

    metrics = cifar_resnet.main(tiny(tmp_path, resume=True, **settings))
    got, expected = history_rows(run / "history.csv"), history_rows(tmp_path / "whole" /
                                                                    "history.csv")
    assert [row["epoch"] for row in got] == [0, 1, 2] and metrics["epochs"] == 3
    assert got == expected and metrics["history"] == whole["history"]  # bit-identical
    assert (metrics["test_loss"], metrics["test_accuracy"]) == (whole["test_loss"],
                                                                whole["test_accuracy"])


def test_a_run_resumed_mid_epoch_counts_its_epochs_of_the_whole_run(tmp_path, capsys):
    """Keras' progress bar after a mid-epoch resume: `Epoch 2/3`, `Epoch 3/3` (Keras' own
    would say `Epoch 2/2` for the rest of epoch 1, a fit of its own)."""
    settings = dict(epochs=3, steps_per_epoch=4)
    with pytest.raises(Interrupted):
        cifar_resnet.main(tiny(tmp_path, **settings), callbacks=[SignalAt(1, 1, signal.SIGTERM)])
    capsys.readouterr()
    cifar_resnet.main(tiny(tmp_path, resume=True, verbose=2, **settings))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("Epoch ")] == [
        "Epoch 2/3", "Epoch 3/3"], out


def test_a_signal_outside_training_stops_at_once(tmp_path):
    """While data loads (or the final evaluation runs) there is no step to finish: SIGTERM
    raises Interrupted at once, and the handlers are Python's again after the run."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="^stopped by SIGTERM outside a training step: run "
                                          "the same command again$") as stop:
        with train.Run(tiny(tmp_path), "cifar_resnet"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the handler raises
    assert stop.value.status == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_interrupted_run_exits_143_or_130_with_one_line(capsys):
    from kbench.errors import exit_on_error

    def preempted():
        raise Interrupted("SIGTERM", "in epoch 0 after batch 1 of 2", "continue with --resume")

    with pytest.raises(SystemExit) as exit:
        exit_on_error(preempted)
    assert exit.value.code == 143
    assert capsys.readouterr().err == ("stopped by SIGTERM in epoch 0 after batch 1 of 2: "
                                       "continue with --resume\n")
    assert Interrupted("SIGINT", "").status == 130


@pytest.mark.backend_independent
@pytest.mark.parametrize("raised", ["stop", "error"])
def test_a_stop_or_error_raised_in_a_keras_layer_call_is_one_line(raised, capsys):
    """A second signal during a stock Keras layer call (the fast path off, or a layer of
    yours) raises Interrupted there, which Keras' traceback filtering raised again as a
    RuntimeError with the layer's arguments (Interrupted takes more than a message), a
    KbenchError as a new one with them: exit_on_error says the original's one line."""
    from kbench.errors import exit_on_error

    class Stopping(keras.layers.Layer):
        def call(self, x):
            if raised == "stop":
                raise Interrupted("SIGTERM", "at a second signal, without a checkpoint",
                                  "run the same command again")
            raise KbenchError("a bad value: give a good one")

    layer = Stopping()
    x = np.ones((2, 3), "float32")
    with pytest.raises(Exception) as wrapped:
        layer(x)
    assert getattr(wrapped.value, "_keras_call_info_injected", False)  # Keras' wrapper
    with pytest.raises(SystemExit) as exit:
        exit_on_error(layer, x)
    assert exit.value.code == (143 if raised == "stop" else 2)
    assert capsys.readouterr().err == (
        "stopped by SIGTERM at a second signal, without a checkpoint: run the same command "
        "again\n" if raised == "stop" else "error: a bad value: give a good one\n")


@pytest.mark.backend_independent
def test_an_error_raised_while_handling_ours_is_shown_as_it_is(capsys):
    """exit_on_error unwraps our errors from torch.compile's and Keras' wrappers only;
    anywhere else an exception raised while handling a KbenchError is a bug of its own, and
    keeps its traceback (and nothing of ours is printed)."""
    from kbench.errors import exit_on_error

    def cleanup_fails():
        try:
            raise KbenchError("bad input")
        except KbenchError:
            raise RuntimeError("the clean-up failed")

    with pytest.raises(RuntimeError, match="the clean-up failed"):
        exit_on_error(cleanup_fails)
    assert "bad input" not in capsys.readouterr().err


def test_resume_of_a_finished_run_is_refused_and_keeps_its_results(tmp_path):
    """A finished run (its metrics.json newer than its checkpoint) has nothing to resume: the
    refusal keeps its results, speed figures included, and its config.json. A run stopped
    after its last checkpoint but before its results is completed by --resume, no epoch
    trained again."""
    cifar_resnet.main(tiny(tmp_path, epochs=2))
    run = tmp_path / "run"
    kept = {name: (run / name).read_bytes() for name in ("metrics.json", "config.json")}
    for epochs in (2, 1):
        with pytest.raises(KbenchError, match="nothing to resume .* had finished \\(2 epochs"):
            cifar_resnet.main(tiny(tmp_path, epochs=epochs, resume=True))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # A checkpoint older than the finished results (epoch checkpoints off after a resume
    # from a step checkpoint) is not resumed from: it would train the run again
    finished = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**finished, "epochs": 3}))
    with pytest.raises(KbenchError, match="is from epoch 2, older than its finished run's 3"):
        cifar_resnet.main(tiny(tmp_path, epochs=4, resume=True))
    (run / "metrics.json").unlink()  # stopped before Run.finish wrote it
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=2, resume=True))
    assert metrics["epochs"] == 2
    assert [r["epoch"] for r in history_rows(run / "history.csv")] == [0, 1]
    # ... and a finished run resumed with more epochs trains on
    two_epochs = (run / "metrics.json").read_bytes()
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=3, resume=True))
    assert metrics["epochs"] == 3 and metrics["step_time_ms"] > 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    # Stopped after its third epoch's checkpoint but before its results: the 2-epoch
    # metrics.json (same run_id) is not those results, and --resume completes the run
    (run / "metrics.json").write_bytes(two_epochs)
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=3, resume=True))
    assert metrics["epochs"] == 3
    assert [r["epoch"] for r in history_rows(run / "history.csv")] == [0, 1, 2]


def test_the_stop_line_says_resume_only_when_this_run_has_a_checkpoint_on_disk(tmp_path):
    """A signal with progress in memory but no checkpoint of this run on disk (epoch
    checkpoints off; a second signal during the write; an earlier run's file) must not send
    the user to a --resume that will fail."""
    import dataclasses as dc

    folder = tmp_path / "run"
    with train.Run(tiny(tmp_path), "cifar_resnet") as run:  # one process: the chief
        run.state = checkpoint.RunState(recipe="cifar_resnet", model="convnet",
                                        dataset="synthetic", batches_done=5, epochs_done=2,
                                        run_id="this")
        assert run._resume_hint() == (f"no checkpoint of this run was written in {folder}; "
                                      "run the same command again")
        earlier = dc.replace(run.state, run_id="earlier", weights="checkpoint-1.weights.h5")
        (folder / "checkpoint.json").write_text(json.dumps(dc.asdict(earlier)))
        assert run._resume_hint().startswith("no checkpoint of this run")
        (folder / "checkpoint.json").write_text(json.dumps(dc.asdict(dc.replace(
            earlier, run_id="this"))))
        assert run._resume_hint() == (f"checkpoint in {folder}; continue with the same "
                                      "command and --resume")
        # A data-parallel process other than the chief writes nothing and cannot know whether
        # the chief's write is done (or on its host): it points at the chief's line.
        run.dist.process_index = 1
        assert run._resume_hint() == (f"the chief process (0) says whether it checkpointed "
                                      f"to {folder}")


def test_a_fresh_run_over_a_finished_one_resumes_whatever_the_file_times(tmp_path, capsys):
    """Whether a folder's run finished is whether its metrics.json names its checkpoint's run
    (run_id), not which file is newer: a fresh run killed in a folder that still holds the
    last run's metrics.json resumes, even after a copy that gave metrics.json the newer time.
    And a fresh run says when it removes an unfinished run's checkpoint."""
    cifar_resnet.main(tiny(tmp_path, epochs=1))
    run = tmp_path / "run"
    first = json.loads((run / "metrics.json").read_text())["run_id"]
    assert first == checkpoint.load_state(run).run_id
    assert checkpoint.finished_epochs(run) == 1
    capsys.readouterr()
    with pytest.raises(Interrupted):  # over a finished run: nothing to say
        cifar_resnet.main(tiny(tmp_path, epochs=2), callbacks=[SignalAt(1, 0, signal.SIGTERM)])
    assert "note: starting afresh" not in capsys.readouterr().out
    assert checkpoint.load_state(run).run_id != first
    os.utime(run / "metrics.json")  # the finished run's results, now the newest file
    assert checkpoint.finished_epochs(run) is None  # so --resume goes on (file times: refused)
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=1))  # starting over loses 3 batches
    assert ("note: starting afresh in " f"{run}: the checkpoint of an unfinished run there "
            "(1 batch into epoch 1) is removed; --resume would have continued it"
            ) in capsys.readouterr().out
    assert metrics["epochs"] == 1


# --------------------------------------------------------------------------- callbacks


def recorder_for(tmp_path, **kwargs):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    state = checkpoint.RunState(recipe="t", model=model.name, dataset="d")
    saved = []
    recorder = checkpoint.EpochRecorder(str(tmp_path), state, steps_per_epoch=1,
                                        save_model=lambda m, path: saved.append(path), **kwargs)
    recorder.set_model(model)
    return recorder, state, saved


def test_early_stopping_and_best_model(tmp_path, capsys):
    recorder, state, saved = recorder_for(tmp_path, monitor="val_loss", patience=2)
    for epoch, val_loss in enumerate([1.0, 0.5, 0.6, 0.7, 0.4]):
        recorder.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
        if recorder.model.stop_training:
            break
    assert epoch == 3 and state.stopped_early  # two epochs without improving on 0.5
    assert state.best == 0.5 and state.best_epoch == 1 and len(saved) == 2
    assert checkpoint.load_state(tmp_path).stopped_early
    # Said once training has ended: at the epoch's end the progress bar's last line is still
    # to come, and the message would share its line.
    assert capsys.readouterr().out == ""
    recorder.on_train_end()
    assert capsys.readouterr().out == ("early stopping: val_loss has not improved for 2 epochs "
                                       "(best 0.5000 at epoch 1)\n")


def test_monitor_direction_is_keras_rule_or_the_mode_given(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse",
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)  # builds the compiled metrics
    assert checkpoint.higher_is_better(model, "val_accuracy")
    assert not checkpoint.higher_is_better(model, "val_loss")
    assert not checkpoint.higher_is_better(model, "val_accuracy", mode="min")
    with pytest.raises(KbenchError, match="pass --monitor-mode max or min"):
        checkpoint.higher_is_better(model, "val_f2")


def test_early_stopping_on_a_metric_not_logged(tmp_path):
    recorder, _, _ = recorder_for(tmp_path, monitor="val_accuracy", patience=1)
    with pytest.raises(KbenchError, match="does not log"):
        recorder.on_epoch_end(0, {"loss": 1.0})


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    import tensorflow as tf

    # NaN targets: NaN pixels would not do, XLA's ReLU (max with 0) turns NaN into 0.
    images = np.zeros((32, 32, 32, 3), np.float32)
    labels = np.full((32, 10), np.nan, np.float32)
    nan_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat()
    test_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    # A float32 run that had no checkpoint yet: no advice to train in float32, no claim of a
    # checkpoint to go back to.
    with pytest.raises(KbenchError, match=r"^training diverged: loss is nan at epoch 0, step 0; "
                                          r"lower --lr, add --clip-norm$"):
        cifar_resnet.main(tiny(tmp_path), datasets=(nan_ds, test_ds))


def test_the_divergence_line_names_float32_and_a_checkpoint_only_where_they_apply(tmp_path):
    keras.config.set_dtype_policy("mixed_bfloat16")  # as a recipe's --dtype-policy does
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    (tmp_path / checkpoint.STATE_FILE).write_text("{}")  # a checkpoint this run wrote
    guard = checkpoint.StopOnNaN(str(tmp_path))
    guard.set_model(model)
    guard.on_epoch_begin(2)
    with pytest.raises(KbenchError, match=rf"^training diverged: loss is inf at epoch 2, step 5; "
                                          rf"lower --lr, add --clip-norm, or train in float32 "
                                          rf"afresh \(--dtype-policy float32\); its last "
                                          rf"checkpoint stays in {tmp_path} \(--resume\)$"):
        guard.on_train_batch_end(5, {"loss": float("inf")})


# --------------------------------------------------------------------------- step timing


def timed_fit(timer, epochs=2, steps=6, validation=False):
    x = np.random.default_rng(0).normal(size=(96, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=epochs, steps_per_epoch=steps, verbose=0,
              validation_data=(x[:32], y[:32]) if validation else None, callbacks=[timer])
    return timer


@pytest.mark.parametrize("sync_every, warmup, expected, syncs", [
    (None, 0, [5, 5], 4),        # recipe runs: one window per epoch, its first step left out
    (1, 0, [1] * 10, 12),        # compare's default: every step on its own
    (2, 0, [2, 2, 1] * 2, 8),
    (None, 2, [3, 5], 5),        # compare's warm-up: the first epoch's steps 1 and 2 untimed
])
def test_step_timer_windows_cover_the_steady_state(sync_every, warmup, expected, syncs,
                                                   monkeypatch):
    from kbench import backend

    # Every clock reading waits for the device first: one sync per window edge (an edge two
    # windows share, once), one for compile_s, and none elsewhere (a sync per step would
    # keep the host from queueing the next one).
    synced = []
    monkeypatch.setattr(backend, "synchronize", lambda model: synced.append(model))
    timer = timed_fit(train.StepTimer(16, sync_every=sync_every, warmup_steps=warmup),
                      validation=True)  # validation must not land in a window
    assert len(synced) == syncs and all(model is timer.model for model in synced)
    assert [steps for steps, _ in timer.windows] == expected
    assert timer.steps_timed == sum(expected) and len(timer.step_times) == len(expected)
    assert timer.compile_s > 0 and all(seconds > 0 for _, seconds in timer.windows)
    total = sum(seconds for _, seconds in timer.windows)
    assert timer.examples_per_sec == pytest.approx(16 * sum(expected) / total)


def test_one_step_epochs_still_report_compile_time():
    timer = timed_fit(train.StepTimer(16), steps=1)
    assert timer.compile_s > 0 and timer.windows == [] and timer.examples_per_sec is None


@pytest.mark.skipif(BACKEND != "jax", reason="the state fit keeps between steps is jax's")
def test_synchronize_waits_for_every_array_of_the_jax_state(monkeypatch):
    import jax

    from kbench import backend

    waited = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            state = getattr(self.model, "_jax_state", None)
            if state:  # Keras keeps it in a TrackedDict, opaque to jax's tree functions
                monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(x) or x)
                backend.synchronize(self.model)
                monkeypatch.undo()
                leaves = jax.tree_util.tree_leaves(waited[-1])
                expected = sum(len(group) for group in state.values())
                assert len(leaves) == expected and all(isinstance(a, jax.Array) for a in leaves)

    timed_fit(Check(), epochs=1, steps=3)
    assert len(waited) == 2


@pytest.mark.skipif(BACKEND == "tensorflow", reason="Keras dispatches callbacks "
                    "asynchronously only where its backend is thread-safe: jax and torch")
def test_kbench_callbacks_leave_keras_async_dispatch_on(tmp_path):
    """No per-step sync in real runs: a callback with on_train_batch_end (unless async_safe)
    makes Keras convert every step's logs to numbers. Checks what a recipe run passes fit."""
    config = tiny(tmp_path)
    state = train.start_or_resume(config, "cifar_resnet", config.model)
    callbacks = [train.StepTimer(16), *train.run_callbacks(config, 2, state),
                 checkpoint.StepCheckpoint(config.output_dir, state, 2, every=4)]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    assert keras.callbacks.CallbackList(callbacks, model=model)._async_train
    # ... and the one that must sync (finishing an interrupted epoch) does turn it off.
    resumed = [*callbacks, checkpoint.ResumedEpochSums([[1.0]])]
    assert not keras.callbacks.CallbackList(resumed, model=model)._async_train


# --------------------------------------------------------------------------- --config


@pytest.mark.backend_independent
def test_config_file_reruns_a_run_and_flags_override(tmp_path, capsys):
    saved = dataclasses.asdict(tiny(tmp_path, epochs=7, lr=0.3, schedule="one_cycle"))
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"backend": "jax", "config": saved}))
    config = parse_config(cifar_resnet.Config, ["--config", str(path), "--lr", "0.05"])
    assert config.epochs == 7 and config.schedule == "one_cycle" and config.lr == 0.05
    # A re-run is a new run: it goes where a fresh run of this backend goes, never into the
    # saved run's folder (which it would replace), unless told so or resuming that run; the
    # folder the file names is not dropped without a word (a hand-written file meant it)
    assert saved["output_dir"] and config.output_dir is None
    assert capsys.readouterr().out == (
        f"note: not writing into {saved['output_dir']}, the output_dir {path} names: a re-run "
        f"goes where a fresh run goes; pass --output-dir {saved['output_dir']} to write there, "
        "or --resume to continue that run\n")
    elsewhere = str(tmp_path / "rerun")
    assert parse_config(cifar_resnet.Config, ["--config", str(path), "--output-dir",
                                              elsewhere]).output_dir == elsewhere
    assert parse_config(cifar_resnet.Config, ["--config", str(path), "--resume"]
                        ).output_dir == saved["output_dir"]
    assert capsys.readouterr().out == ""  # the folder was chosen: nothing to say
    # A run saved in the folder a fresh run of this backend goes to: the re-run writes there
    # too (replacing it, as re-running its command does), and the note would be untrue
    default = os.path.join("runs", "cifar_resnet", keras.backend.backend())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "output_dir": default,
                                                      "recipe": "cifar_resnet"}))
    parse_config(cifar_resnet.Config, ["--config", str(tmp_path / "config.json")])
    assert capsys.readouterr().out == ""
    assert parse_config(cifar_resnet.Config, ["--config", str(path), "--output",  # argparse's
                                              elsewhere]).output_dir == elsewhere  # short form
    # A resumed run's settings say resume: true; re-run from them, they start afresh
    path.write_text(json.dumps({"backend": "jax", "config": {**saved, "resume": True}}))
    capsys.readouterr()
    config = parse_config(cifar_resnet.Config, ["--config", str(path)])
    assert not config.resume and config.output_dir is None
    assert capsys.readouterr().out.splitlines()[1] == (
        f"note: not resuming, though {path} says resume: true (a re-run starts afresh): pass "
        "--resume to continue the run")
    # --resume continues in the file's folder: where a file is in its way, the file is named
    # (not an --output-dir the command line never had)
    (tmp_path / "a_file").write_text("")
    path.write_text(json.dumps({"backend": "jax", "config": {
        **saved, "output_dir": str(tmp_path / "a_file" / "run")}}))
    with pytest.raises(KbenchError, match=re.escape(
            f"nothing to resume in {tmp_path / 'a_file' / 'run'}, the output_dir {path} names "
            f"({tmp_path / 'a_file'} is a file, not a folder): pass the --output-dir of the run "
            "to continue")):
        parse_config(cifar_resnet.Config, ["--config", str(path), "--resume"])
    (tmp_path / "other.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(KbenchError, match="does not know: vocab_size"):
        parse_config(cifar_resnet.Config, ["--config", str(tmp_path / "other.json")])


@pytest.mark.backend_independent
@pytest.mark.parametrize("flags, expected", [
    (["--dtype-policy", "float64"], "argument --dtype-policy: invalid choice: 'float64'"),
    (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_bad_flag_values_are_one_line_argparse_errors(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_config(cifar_resnet.Config, flags)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected) and err.count("\n") == 1, err


def test_dropout_rng_state_is_checkpointed_and_restored(tmp_path):
    """save_weights leaves Keras' seed-generator states out; the checkpoint keeps them, so a
    resumed run draws the dropout masks the uninterrupted run would."""
    def dropout_model():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5, seed=1),
                                  keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    model = dropout_model()
    model.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=1, verbose=0)
    state = checkpoint.RunState(recipe="t", model=model.name, dataset="d")
    recorder = checkpoint.EpochRecorder(str(tmp_path), state, steps_per_epoch=1,
                                        save_model=lambda m, path: None)
    recorder.set_model(model)
    recorder.on_epoch_end(0, {"loss": 1.0})
    trained = [keras.ops.convert_to_numpy(v) for v in checkpoint.rng_variables(model)]
    assert trained and state.rng_states

    fresh = dropout_model()
    initial = [keras.ops.convert_to_numpy(v) for v in checkpoint.rng_variables(fresh)]
    assert [a.tolist() for a in initial] != [a.tolist() for a in trained]  # training drew masks
    checkpoint.restore(fresh, checkpoint.load_state(tmp_path), str(tmp_path))
    restored = [keras.ops.convert_to_numpy(v) for v in checkpoint.rng_variables(fresh)]
    assert [a.tolist() for a in restored] == [a.tolist() for a in trained]
    x = np.ones((4, 4), np.float32)
    assert np.array_equal(keras.ops.convert_to_numpy(model(x, training=True)),
                          keras.ops.convert_to_numpy(fresh(x, training=True)))


def test_saved_models_leave_jit_compile_to_the_backend_that_loads_them(tmp_path):
    """Keras saves the jit_compile it resolved (True under JAX) and load_model compiles with
    it: under torch, torch.compile for every predict. kbench saves "auto" instead, and the
    trained model keeps what it resolved."""
    import zipfile

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)  # as JAX resolves "auto"
    train.save_model_float32(model, tmp_path / "model.keras")
    # A kbench run's model, whatever its backend resolved "auto" to (False under torch)
    run_config = tiny(tmp_path)
    run_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10)])
    train.compile_model(run_model, run_config, steps_per_epoch=2)
    train.save_model_float32(run_model, tmp_path / "run.keras")
    with zipfile.ZipFile(tmp_path / "run.keras") as saved:
        assert json.loads(saved.read("config.json"))["compile_config"]["jit_compile"] == "auto"
    with zipfile.ZipFile(tmp_path / "model.keras") as saved:
        config = json.loads(saved.read("config.json"))
    assert config["compile_config"]["jit_compile"] == "auto"
    assert model._compile_config.config["jit_compile"] is True
    assert keras.saving.load_model(tmp_path / "model.keras").jit_compile == (BACKEND == "jax")
    off = dataclasses.replace(run_config, jit_compile="off")  # --jit-compile off stays
    train.compile_model(run_model, off, steps_per_epoch=2)
    train.save_model_float32(run_model, tmp_path / "off.keras")
    with zipfile.ZipFile(tmp_path / "off.keras") as saved:
        assert json.loads(saved.read("config.json"))["compile_config"]["jit_compile"] is False


def test_a_run_on_data_given_to_main_says_so(tmp_path, capsys):
    """main(config, datasets=...) trains on the caller's data, not config.dataset: the
    results say so, and kbench evaluate asks which data to score the model on."""
    import tensorflow as tf

    from kbench.evaluation import evaluate_saved_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (32, 32, 32, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]
    train_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat()
    test_ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    metrics = cifar_resnet.main(tiny(tmp_path, epochs=1), datasets=(train_ds, test_ds))
    assert metrics["data_given"] is True
    assert "convnet on the data given to main() under" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_given"] is True
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluated["data_given"] is True and evaluated["dataset"] is None
    assert "airplane" not in json.dumps(evaluated)  # not CIFAR-10's class names
    with pytest.raises(KbenchError, match="trained on data given to main\\(\\), not on its "
                                          "config's dataset 'synthetic': pass --dataset"):
        evaluate_saved_model(tmp_path / "run" / "model.keras", tmp_path / "eval")
    # data_given is a label of the run, not a setting: --config takes the file all the same,
    # with the settings the run had, into a fresh run's folder.
    again = parse_config(cifar_resnet.Config, ["--config", str(tmp_path / "run" / "config.json")])
    assert (again.model, again.epochs, again.batch_size) == ("convnet", 1, 16)
    assert not hasattr(again, "data_given") and again.output_dir != str(tmp_path / "run")
