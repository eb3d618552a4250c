"""Training to a target accuracy (`--target-accuracy`, kbench.target): when evaluations happen,
the clock rules (compile and evaluations on it, evaluations out of the step times), stopping at
the target, the records and reports of `kbench compare --target-accuracy`."""

import dataclasses
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

import kbench  # noqa: F401  (validates KERAS_BACKEND before keras is imported)
from kbench import target, train
from kbench.bench import native_common as common
from kbench.bench import records, report, report_target
from kbench.target import TargetProbe
from tests.conftest import BACKEND, fake_python

backend_independent = pytest.mark.backend_independent


# --------------------------------------------------------------------------- the probe


@backend_independent
def test_probe_evaluates_at_epoch_ends_or_every_n_steps_never_twice():
    per_epoch = TargetProbe(0.9, 0, steps_per_epoch=10)
    assert per_epoch.every == 10 and per_epoch.per_epoch
    assert not per_epoch.due(10) and per_epoch.due(10, epoch_end=True)
    assert not per_epoch.due(0, epoch_end=True)
    steps = TargetProbe(0.9, 4, steps_per_epoch=10)
    assert [n for n in range(13) if steps.due(n)] == [4, 8, 12]
    steps.start()
    steps.record(4, 0.5, 0.01)
    assert not steps.due(4) and not steps.due_at_end(4) and steps.due_at_end(6)


@backend_independent
def test_probe_record_fields_reached_and_not():
    probe = TargetProbe(0.9, 5, steps_per_epoch=10)
    probe.start()
    for steps, accuracy in [(5, 0.4), (10, 0.92), (15, 0.95)]:
        probe.record(steps, accuracy, eval_s=0.01)
    got = probe.summary()
    assert set(got) == set(records.TARGET_FIELDS)
    assert got["reached"] and got["steps_to_target"] == 10 and got["epochs_to_target"] == 1.0
    assert got["time_to_target_s"] == got["eval_points"][1]["seconds"]  # the first to reach
    assert got["eval_every_steps"] == 5 and got["eval_every"] == "steps"
    assert got["best_eval_accuracy"] == 0.95
    assert got["eval_seconds"] == pytest.approx(0.03)
    missed = TargetProbe(0.99, 0, steps_per_epoch=10)
    missed.start()
    missed.record(10, 0.5, 0.01)
    got = missed.summary()
    assert got["reached"] is False and got["eval_every"] == "epoch"
    assert got["time_to_target_s"] is None and got["steps_to_target"] is None
    assert got["epochs_to_target"] is None and len(got["eval_points"]) == 1
    assert "did not reach" in missed.describe()


class FakeModel:  # what TargetAccuracy touches of a Keras model
    stop_training = False


@backend_independent
def test_callback_schedule_stops_once_agreed_and_evaluates_the_last_step(monkeypatch):
    """Driven as Keras' fit drives it: evaluations before a step begins and at epoch ends;
    once the job agreed to stop, nothing evaluates again (the step Keras still trains can end
    an epoch on an evaluation point)."""
    accuracies = iter([0.5, 0.96, 0.99])
    monkeypatch.setattr(target, "test_accuracy", lambda model, test_ds: next(accuracies))
    prepared, votes = [], []

    def agree(reached):
        votes.append(reached)
        return reached

    probe = TargetProbe(0.95, 1, steps_per_epoch=2)
    callback = target.TargetAccuracy(probe, test_ds=None, agree=agree,
                                     prepare=lambda model: prepared.append(model))
    callback.set_model(FakeModel())
    callback.on_train_begin()
    callback.on_train_batch_begin(0)  # nothing done yet
    callback.on_train_batch_begin(1)  # after step 1: 0.5
    callback.on_epoch_end(0)  # after step 2: 0.96, reached: stop
    assert callback.stopped and callback.model.stop_training
    callback.on_epoch_end(1)  # (had Keras run on) no evaluation after the stop
    callback.evaluate_last_step()
    assert [p["steps"] for p in probe.points] == [1, 2] and votes == [False, True]
    assert len(prepared) == 2  # replicas sync BatchNorm statistics before each evaluation
    # A run that never reaches the target: its last step is evaluated once.
    missed = target.TargetAccuracy(TargetProbe(0.999, 2, steps_per_epoch=4), test_ds=None)
    accuracies = iter([0.5, 0.6])
    missed.set_model(FakeModel())
    missed.on_train_begin()
    for batch in range(3):
        missed.on_train_batch_begin(batch)  # evaluates after step 2
    missed.evaluate_last_step()  # after step 3
    missed.evaluate_last_step()  # not twice
    assert [p["steps"] for p in missed.probe.points] == [2, 3] and not missed.stopped


# --------------------------------------------------------------------------- the clock


class Stream:  # what timed_training reads of a kbench Stream
    dataset = tf.data.Dataset.from_tensors((np.zeros((2, 2)), np.zeros((2,)))).repeat()


def slow_evaluations(accuracies, seconds):
    """An accuracy_fn that takes `seconds` and returns the next of `accuracies`."""
    queue = list(accuracies)

    def accuracy():
        time.sleep(seconds)
        return queue.pop(0)

    return accuracy


def slow_first_step(step, images, labels):
    if step == 0:
        time.sleep(0.2)  # the compile
    return float(step)


@backend_independent
@pytest.mark.parametrize("sync_every, windows", [(1, 5), (None, 3)])
def test_twin_clock_has_compile_and_evaluations_but_step_times_do_not(sync_every, windows):
    EVAL_S = 1.0  # a step stalled by a busy machine (the other test worker) stays far below it
    probe = TargetProbe(0.8, 2, steps_per_epoch=4)
    compile_s, step_times, steps_timed, losses = common.timed_training(
        Stream, slow_first_step, steps=11, warmup_steps=0, sync_every=sync_every, probe=probe,
        accuracy_fn=slow_evaluations([0.2, 0.5, 0.9, 0.95], EVAL_S))
    got = probe.summary()
    assert got["reached"] and got["steps_to_target"] == 6
    assert len(losses) == 6  # stopped at the evaluation that reached the target
    assert compile_s >= 0.2
    assert got["time_to_target_s"] >= compile_s + 3 * EVAL_S  # both on the clock
    assert [p["steps"] for p in got["eval_points"]] == [2, 4, 6]
    assert all(p["eval_s"] >= EVAL_S for p in got["eval_points"])
    # Evaluations are not steps: a window holds at most 2 steps, so an evaluation inside one
    # would make its time per step at least EVAL_S / 2. The steps themselves take
    # microseconds; the margin is for a loaded machine, where one took 70 ms.
    assert steps_timed == 5 and max(step_times) < EVAL_S / 2
    assert len(step_times) == windows  # None: windows end at evaluations only


@backend_independent
def test_twin_that_misses_the_target_evaluates_its_last_step():
    probe = TargetProbe(0.99, 4, steps_per_epoch=4)
    _, _, _, losses = common.timed_training(
        Stream, slow_first_step, steps=9, warmup_steps=0, probe=probe,
        accuracy_fn=slow_evaluations([0.2, 0.5, 0.6], 0.0))
    got = probe.summary()
    assert len(losses) == 10 and not got["reached"]
    assert [p["steps"] for p in got["eval_points"]] == [4, 8, 10]
    assert got["best_eval_accuracy"] == 0.6


# --------------------------------------------------------------------------- Keras runs


def digits_config(tmp_path, **overrides):
    from recipes import mnist_convnet

    fields = dict(dataset="digits", epochs=3, output_dir=str(tmp_path / "run"), verbose=0,
                  validate_every_epoch=False, target_accuracy=0.95)
    return mnist_convnet, mnist_convnet.Config(**{**fields, **overrides})


def test_keras_run_stops_at_the_target_with_evaluations_on_the_clock(tmp_path, monkeypatch):
    recipe, config = digits_config(tmp_path, eval_every_steps=5)
    timer = train.StepTimer(config.batch_size)
    accuracy = slow_evaluations([0.3, 0.6, 0.97], 1.0)
    window_open = []  # at each evaluation: whether the timer had a window open

    def evaluate(model, test_ds):
        window_open.append(timer._open is not None)
        return accuracy()

    monkeypatch.setattr(target, "test_accuracy", evaluate)
    metrics = recipe.main(config, callbacks=[timer])
    got = metrics["time_to_target"]
    assert got["reached"] and got["steps_to_target"] == 15 and got["eval_every_steps"] == 5
    assert [p["steps"] for p in got["eval_points"]] == [5, 10, 15]
    # The clock began with training: compile and all three evaluations are on it ...
    assert got["time_to_target_s"] >= timer.compile_s + 3 * 1.0
    # ... and the evaluations are not in the step times: the timer's window was closed when
    # each began (a bound on the windows' seconds, asserted before, failed under load).
    assert timer.steps_timed >= 10 and window_open == [False, False, False]
    # Keras stops after the step in progress: 16 of the 3 x 21 steps were trained.
    assert int(timer.model.optimizer.iterations) == 16
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["time_to_target"]["steps_to_target"] == 15


def test_keras_run_takes_fits_own_validation_as_the_epoch_evaluation(tmp_path, monkeypatch):
    def not_called(model, test_ds):
        raise AssertionError("the epoch's validation already measured the test accuracy")

    monkeypatch.setattr(target, "test_accuracy", not_called)
    recipe, config = digits_config(tmp_path, validate_every_epoch=True, target_accuracy=0.5)
    metrics = recipe.main(config)
    got = metrics["time_to_target"]
    assert got["reached"] and got["steps_to_target"] == 21 and got["eval_every"] == "epoch"
    assert got["eval_points"][0]["accuracy"] == pytest.approx(metrics["history"]["val_accuracy"][0])
    assert metrics["epochs"] == 1


def test_flags_without_a_target_or_with_resume_are_refused(tmp_path):
    from kbench.config import check
    from kbench.errors import KbenchError

    _, config = digits_config(tmp_path, target_accuracy=None, eval_every_steps=5)
    with pytest.raises(KbenchError, match="--eval-every-steps goes with --target-accuracy"):
        check(config)
    _, config = digits_config(tmp_path, resume=True)
    with pytest.raises(KbenchError, match="cannot --resume"):
        check(config)
    _, config = digits_config(tmp_path, epoch_checkpoints=False, checkpoint_every=5)
    with pytest.raises(KbenchError, match="--no-epoch-checkpoints"):
        check(config)
    _, config = digits_config(tmp_path, target_accuracy=1.5)
    with pytest.raises(KbenchError, match="--target-accuracy 1.5 is not allowed"):
        check(config)


# --------------------------------------------------------------------------- native twins


@pytest.mark.skipif(BACKEND not in ("jax", "tensorflow", "torch"), reason="no native twin")
def test_native_twin_records_its_evaluations_where_keras_does(tmp_path):
    import importlib

    from recipes import cifar_resnet

    native = importlib.import_module(f"kbench.bench.native_{BACKEND}")
    config = cifar_resnet.Config(dataset="synthetic", train_examples=64, test_examples=24,
                                 batch_size=16, epochs=2, lr=0.01, output_dir=None, verbose=0,
                                 target_accuracy=1.0, eval_every_steps=3)
    result = native.run(config, steps=20, warmup_steps=0)  # the target sets the length
    assert not result["reached"] and result["time_to_target_s"] is None
    # 2 epochs of 4 steps: every 3 steps, and the last step.
    assert [p["steps"] for p in result["eval_points"]] == [3, 6, 8]
    assert result["eval_points"][-1]["accuracy"] == pytest.approx(result["test_accuracy"])
    assert len(result["train_loss_history"]) == 8
    # The Keras run of the same settings evaluates at the same steps.
    keras_run = cifar_resnet.main(dataclasses.replace(
        config, output_dir=str(tmp_path / "keras"), validate_every_epoch=False))
    assert ([p["steps"] for p in keras_run["time_to_target"]["eval_points"]]
            == [p["steps"] for p in result["eval_points"]])


# --------------------------------------------------------------------------- reports


def record(backend, seed, seconds, reached=True, steps=40, best=0.97, status="ok"):
    points = [{"steps": 20, "epochs": 1.0, "seconds": seconds / 2, "accuracy": 0.5,
               "eval_s": 0.1},
              {"steps": steps, "epochs": 2.0, "seconds": seconds, "accuracy": best,
               "eval_s": 0.1}]
    row = dict.fromkeys(records.FIELDS)
    row.update(backend=backend, status=status, seed=seed, recipe="mnist_convnet",
               model="convnet", dataset="digits", batch_size=64, dtype_policy="float32",
               config={"epochs": 2}, target_accuracy=0.95, reached=reached, eval_every="epoch",
               eval_every_steps=20, eval_points=points, best_eval_accuracy=best,
               time_to_target_s=seconds if reached else None,
               steps_to_target=steps if reached else None,
               epochs_to_target=2.0 if reached else None, compile_s=1.0, step_time_ms=10.0,
               eval_seconds=0.2)
    return row


@backend_independent
def test_summary_counts_reached_runs_and_never_averages_the_others():
    rows = [record("jax", 0, 4.0), record("jax", 1, 6.0), record("jax", 2, 99.0, reached=False),
            record("torch", 0, 1.0), record("torch", 1, 1.5)]
    jax, torch = report_target.summarize(rows)
    assert jax["reached_text"] == "2/3" and jax["time_to_target_s"] == 5.0
    assert jax["time_to_target_mean_s"] == 5.0
    assert jax["time_to_target_sd_s"] == pytest.approx(np.std([4.0, 6.0], ddof=1))
    assert torch["vs_fastest"] == 1.0 and jax["vs_fastest"] == pytest.approx(5.0 / 1.25)
    assert report_target.not_reached_lines([jax, torch]) == [
        "jax: 1 of 3 run(s) did not reach 0.95 within 2 epoch(s); median best test accuracy "
        "0.9700"]
    # A crashed run is failed, not "did not reach", and its error is shown.
    crashed = dict(record("torch", 2, 0.0, reached=None), status="failed", error="boom",
                   eval_points=None)
    (torch,) = report_target.summarize([record("torch", 0, 1.0), crashed])
    assert torch["status"] == "ok 1/2" and torch["reached_text"] == "1/2"
    assert report_target.not_reached_lines([torch]) == [] and torch["error"] == "boom"


@backend_independent
def test_baseline_compares_time_to_target_beyond_its_spread():
    base = [record("jax", 0, 10.0), record("jax", 1, 11.0), record("torch", 0, 5.0)]
    now = [record("jax", 0, 20.0), record("jax", 1, 21.0), record("torch", 0, 5.5)]
    jax, torch = report_target.compare_to_baseline(report_target.summarize(now), base)
    assert jax["vs_baseline"].startswith("slower +95")
    assert "no noise estimate" in torch["vs_baseline"]
    other_target = [dict(r, target_accuracy=0.9) for r in base]
    jax, _ = report_target.compare_to_baseline(report_target.summarize(now), other_target)
    assert jax["vs_baseline"].startswith("not comparable")
    step_time_rows = [dict(r, target_accuracy=None) for r in base]
    jax, _ = report_target.compare_to_baseline(report_target.summarize(now), step_time_rows)
    assert jax["vs_baseline"] == "not comparable: the baseline has no time to target"
    (stock,) = report_target.compare_to_baseline(
        report_target.summarize([record("torch-stock", 0, 6.0)]), base)
    assert stock["vs_baseline"] == "not comparable: no run of it in the baseline"


@backend_independent
def test_chart_draws_evaluations_as_steps_crossing_where_the_table_says(tmp_path):
    """Accuracy holds between evaluations (steps, not slopes), the ring sits at the table's
    time to target, and time starts at 0."""
    import matplotlib.pyplot as plt

    jax = record("jax", 0, 4.0)
    jax["eval_points"].insert(1, {"steps": 30, "epochs": 1.5, "seconds": 3.0, "accuracy": 0.9,
                                  "eval_s": 0.1})
    rows = [jax, record("torch", 0, 1.0, reached=False, best=0.6)]
    drawn = report_target.chart_runs(rows)
    assert [d["label"] for d in drawn] == ["jax", "torch"]
    assert drawn[0]["seconds"] == [2.0, 3.0, 4.0] and drawn[0]["accuracy"] == [0.5, 0.9, 0.97]
    assert drawn[0]["hit"] == (4.0, 40, 0.97) and drawn[1]["hit"] is None
    fig = report_target.chart_figure(rows, "title")
    by_time, by_steps = fig.axes
    lines = [line for line in by_time.get_lines() if line.get_drawstyle() == "steps-post"]
    # Each drawn as 'post' steps: 0.9 holds from 3 s to 4 s, under the target, until the
    # evaluation at 4 s reached it.
    assert len(lines) == 2 and list(lines[0].get_xdata()) == [2.0, 3.0, 4.0]
    rings = [line for line in by_time.get_lines() if line.get_marker() == "o"]
    assert [(list(r.get_xdata()), list(r.get_ydata())) for r in rings] == [([4.0], [0.97])]
    assert by_time.get_xlim()[0] == 0 and by_steps.get_xlim()[0] == 0
    report_target.write_chart(rows, str(tmp_path / "chart.png"), "title")
    assert (tmp_path / "chart.png").stat().st_size > 1000
    plt.close("all")


@backend_independent
def test_report_rerenders_a_time_to_target_run(tmp_path, entry_point):
    from kbench import cli

    path = tmp_path / "results.jsonl"
    records.write_jsonl_atomic(str(path), [dict(record("jax", 0, 4.0), other_cpu_share=0.4),
                                           record("torch", 0, 1.0),
                                           record("torch", 1, 0.0, reached=False)])
    status, out, _ = entry_point(cli.main, ["report", str(path)])
    assert status == 0
    assert "time to target s" in out and "1/2" in out and "4.00x" in out
    assert "torch: 1 of 2 run(s) did not reach 0.95" in out
    # A run that shared the machine is flagged as in a plain table: its clock measured both.
    assert "jax: other processes took 40% of this machine's CPU" in out and "torch: other" not in out
    assert (tmp_path / "results.png").stat().st_size > 1000
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "time_to_target_s" in header and "other_cpu_share" in header


# --------------------------------------------------------------------------- kbench compare


def kbench_compare(*args, timeout=600):
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "kbench.cli", "compare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})


@backend_independent
def test_compare_target_no_run_reaches_is_reported_with_exit_0(tmp_path):
    out = tmp_path / "cmp"
    result = kbench_compare("--recipe", "mnist_convnet", "--dataset", "digits", "--backends",
                            "torch", "--target-accuracy", "0.999", "--max-epochs", "1",
                            "--repeats", "2", "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = records.read_jsonl(str(out / "results.jsonl"))
    assert [r["seed"] for r in rows] == [0, 1]  # repeats sample other seeds
    assert report.mixed_compares(rows) is None  # kbench report takes what compare wrote
    for row in rows:
        assert set(records.FIELDS) <= set(row)
        assert row["status"] == "ok" and row["reached"] is False
        assert row["time_to_target_s"] is None and row["steps_to_target"] is None
        assert row["target_accuracy"] == 0.999 and row["eval_every"] == "epoch"
        assert [p["steps"] for p in row["eval_points"]] == [21]  # one epoch of 1347 / 64
        assert row["eval_points"][0]["accuracy"] == pytest.approx(row["test_accuracy"])
        assert row["compile_s"] > 0 and row["config"]["epochs"] == 1
        assert row["sync_every"] is None  # no syncs that training alone would not do
    run_dir = out / "runs" / "torch-r0"  # metrics and model kept; no checkpoint on the clock
    assert (run_dir / "metrics.json").is_file() and (run_dir / "history.csv").is_file()
    assert not (run_dir / "checkpoint.json").exists()
    assert "0/2" in result.stdout
    assert "torch: 2 of 2 run(s) did not reach 0.999 within 1 epoch(s)" in result.stdout
    assert (out / "results.png").stat().st_size > 1000


@backend_independent
def test_compare_target_keeps_a_failed_backend_apart(tmp_path):
    broken = fake_python(tmp_path / "broken-python",
                         "echo 'ModuleNotFoundError: No module named jax' >&2; exit 1")
    out = tmp_path / "cmp"
    result = kbench_compare("--recipe", "mnist_convnet", "--dataset", "digits", "--backends",
                            "jax", "--python", f"jax={broken}", "--target-accuracy", "0.5",
                            "--output", str(out))
    assert result.returncode == 1
    (row,) = records.read_jsonl(str(out / "results.jsonl"))
    assert row["status"] == "failed" and row["target_accuracy"] == 0.5
    assert row["reached"] is None and "No module named jax" in result.stdout


@backend_independent
def test_compare_target_flags_out_of_range_are_one_line_errors(tmp_path, entry_point_error):
    from kbench import cli

    for args, message in [
        (["--target-accuracy", "1.5"], "--target-accuracy 1.5 is not allowed"),
        (["--target-accuracy", "nan"], "--target-accuracy nan is not allowed"),
        (["--target-accuracy", "0.9", "--eval-every", "0"], "--eval-every 0 is not allowed"),
        (["--target-accuracy", "0.9", "--max-epochs", "0"], "--max-epochs 0 is not allowed"),
        (["--target-accuracy", "0.9", "--epochs", "2"], "instead"),
        (["--target-accuracy", "0.9", "--steps", "5"], "--steps times a fixed number"),
        (["--max-epochs", "3"], "go with --target-accuracy"),
        (["--eval-every", "3"], "go with --target-accuracy"),
        (["--eval-every-epoch"], "--eval-every-epoch goes with --target-accuracy"),
        (["--target-accuracy", "0.9", "--set", "target_accuracy=0.5"],
         "--set target_accuracy is compare's to set"),
    ]:
        status, err = entry_point_error(cli.main, ["compare", *args, "--output",
                                                   str(tmp_path / "x")])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    status, err = entry_point_error(cli.main, ["compare", "--target-accuracy", "0.9",
                                               "--eval-every", "3", "--eval-every-epoch"])
    assert status == 2 and "not allowed with argument" in err
