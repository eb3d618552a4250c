"""Input wait: the share of the timed steps' time spent waiting for the input pipeline
(kbench.train.InputClock for Keras runs, native_common.timed_training for the twins), in every
record of `kbench compare` and flagged in its table past a few percent."""

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import BACKEND, REPO

# Per batch: several times a step of the 8 -> 2 dense model below (20-50 ms of Keras' own
# work here under load). tf.data may prefetch in the background (its default optimizations
# inject a prefetch), so the wait is the sleep less the step's own time, not all of it.
DELAY_S = 0.2

# A recipe file whose input pipeline sleeps DELAY_S per batch in a py_function.
SLOW_RECIPE = textwrap.dedent(f'''
    """A recipe whose training pipeline sleeps {DELAY_S} s per batch (tests/test_input_wait.py)."""
    import dataclasses
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from kbench.train import Run, TrainConfig, option


    @dataclasses.dataclass
    class Config(TrainConfig):
        batch_size: int = option(8, "global batch size")


    def build_model(config):
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)], name="dense_8_2")


    def slow(x):
        time.sleep({DELAY_S})
        return x


    def build_datasets(config):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 8)).astype("float32")
        y = np.eye(2, dtype="float32")[(x.sum(axis=1) > 0).astype(int)]
        train = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(config.batch_size)
        train = train.map(lambda a, b: (tf.ensure_shape(
            tf.py_function(slow, [a], tf.float32), a.shape), b))
        test = tf.data.Dataset.from_tensor_slices((x, y)).batch(config.batch_size)
        return train, test


    def main(config, model=None, datasets=None, callbacks=()):
        with Run(config, "slow_input", callbacks) as run:
            train_ds, test_ds = run.datasets(build_datasets, given=datasets)
            model = run.model(build_model, given=model)
            run.fit(model, train_ds, test_ds)
            return run.finish(model)
''')


def load_slow_recipe(tmp_path):
    from kbench.recipe import load_recipe

    path = tmp_path / "slow_input.py"
    path.write_text(SLOW_RECIPE)
    return load_recipe(str(path))


def test_a_slow_pipeline_is_measured_as_input_wait(tmp_path):
    """The Keras runs: under jax and torch most of each timed step is the sleeping pipeline;
    under tensorflow the batch is fetched inside the compiled step, so it is not measured."""
    from kbench import train

    recipe = load_slow_recipe(tmp_path)
    config = recipe.Config(epochs=1, steps_per_epoch=8, verbose=0, validate_every_epoch=False,
                           epoch_checkpoints=False, output_dir=str(tmp_path / "run"))
    timer = train.StepTimer(config.batch_size, sync_every=1, warmup_steps=1)
    metrics = recipe.main(config, callbacks=[timer])
    assert timer.steps_timed == 6
    if BACKEND == "tensorflow":
        assert timer.input_wait_fraction is None and metrics["input_wait_fraction"] is None
        return
    # Each window lasts about DELAY_S, most of it waiting (never all: the step runs too).
    assert 0.5 < timer.input_wait_fraction < 1.0
    assert len(timer.input_waits) == 6
    assert sum(timer.input_waits) > 6 * DELAY_S / 2
    # metrics.json: the run's own timer's figure (one window per epoch), as slow.
    assert metrics["input_wait_fraction"] > 0.5
    with open(os.path.join(config.output_dir, "metrics.json")) as f:
        assert json.load(f)["input_wait_fraction"] == metrics["input_wait_fraction"]


@pytest.mark.backend_independent
def test_the_twins_time_the_input_iterator_inside_their_windows():
    from kbench.bench import native_common

    class Batches:
        def as_numpy_iterator(self):
            for _ in range(100):
                time.sleep(0.01)
                yield np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32")

    class Stream:
        dataset = Batches()

    _, step_times, steps, _ = native_common.timed_training(Stream(), lambda *a: 0.0, steps=5,
                                                           warmup_steps=1, sync_every=1)
    assert steps == 5 and len(step_times) == 5
    fraction = native_common.input_wait_fraction()
    assert 0.9 < fraction <= 1.0  # the step itself does nothing


def summary_row(backend, wait):
    return {"backend": backend, "status": "ok", "step_time_ms": 10.0, "step_time_p10_ms": 9.0,
            "step_time_p90_ms": 11.0, "examples_per_sec": 100.0, "batch_size": 1,
            "input_wait_fraction": wait}


@pytest.mark.backend_independent
def test_the_table_flags_rows_that_wait_for_their_input():
    from rich.console import Console

    from kbench.bench import report

    summary = report.summarize([summary_row("jax", 0.01), summary_row("torch", 0.4),
                                summary_row("tensorflow", None)])
    assert [s["input_wait_fraction"] for s in summary] == [0.01, 0.4, None]
    console = Console(width=250, record=True)
    console.print(report.table(summary, "t"))
    report.print_input_wait_warnings(summary, console)
    text = console.export_text()
    assert "input wait" in text and "40.0% !" in text and "1.0%" in text
    assert "1.0% !" not in text
    warnings = [line for line in text.splitlines() if "waiting for the input pipeline" in line]
    assert len(warnings) == 1 and warnings[0].startswith("torch: 40%")
    # No column at all when no run measured it.
    console = Console(width=250, record=True)
    console.print(report.table(report.summarize([summary_row("tensorflow", None)]), "t"))
    assert "input wait" not in console.export_text()


@pytest.mark.backend_independent
def test_the_table_flags_rows_whose_test_loss_is_not_finite():
    """A run that finished with a NaN test loss was timed on garbage (jax 0.11.2's XLA:CPU
    does this to a jitted bf16 ResNet: docs/development.md); one such repeat marks its row."""
    from rich.console import Console

    from kbench.bench import report

    runs = [summary_row("jax", 0.01), summary_row("jax", 0.01), summary_row("torch", 0.01)]
    for run, loss in zip(runs, (2.3, float("nan"), 2.3)):
        run["test_loss"] = loss
    summary = report.summarize(runs)
    console = Console(width=250, record=True)
    report.print_garbage_warnings(summary, console)
    lines = console.export_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jax: its test loss is nan: the model it "
                                                   "trained computes garbage")
    # The sweep's and the time-to-target tables say it too.
    from kbench.bench import report_sweep, report_target

    for run, point in zip(runs, (8, 8, 16)):
        run.update(sweep_field="batch_size", sweep_value=point)
    console = Console(width=250, record=True)
    report.print_garbage_warnings(report_sweep.summarize(runs), console)
    assert console.export_text().startswith("jax batch_size=8: its test loss is nan")
    for run in runs:
        run.update(sweep_field=None, target_accuracy=0.9, reached=False, eval_every="epoch")
    console = Console(width=250, record=True)
    report.print_garbage_warnings(report_target.summarize(runs), console)
    assert console.export_text().startswith("jax: its test loss is nan")


@pytest.mark.backend_independent
def test_compare_records_and_flags_a_slow_pipeline(tmp_path):
    (tmp_path / "slow_input.py").write_text(SLOW_RECIPE)
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, "-m", "kbench.cli", "compare", "--recipe", "./slow_input.py",
         "--backends", "torch", "--steps", "4", "--warmup-steps", "1", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "ok" and 0.5 < row["input_wait_fraction"] < 1.0
    assert row["float32_precision"] == "tf32"  # recorded with every run
    assert " !" in result.stdout and "waiting for the input pipeline" in result.stdout


@pytest.mark.backend_independent
def test_the_input_pipelines_own_rate(capsys):
    from kbench.bench import input_rate

    rate = input_rate.pipeline_rate(batch_size=16, steps=3, warmup_steps=1)
    assert rate["batch_size"] == 16 and rate["steps"] == 3
    assert rate["examples_per_sec"] == pytest.approx(16 * rate["batches_per_sec"])
    assert 0 < rate["ms_per_batch"] <= rate["ms_per_batch_p90"]
    with pytest.raises(SystemExit) as stop:
        input_rate.main(["--batch-sizes", "16,x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --batch-sizes takes integers >= 1, not '16,x'"


@pytest.mark.slow  # not in `make test`: test_compare.py's all-backends run checks the same
@pytest.mark.backend_independent
def test_every_record_says_its_precision_and_input_wait_twins_included(tmp_path):
    out = tmp_path / "cmp"
    result = subprocess.run(
        [sys.executable, "-m", "kbench.cli", "compare", "--backends", "torch", "--reference",
         "native", "--model", "resnet20", "--batch-size", "8", "--steps", "3",
         "--warmup-steps", "1", "--set", "train_examples=64", "--set", "test_examples=32",
         "--float32-precision", "highest", "--output", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["torch", "native-torch"]
    for row in rows:  # the flag reached every run, the twin's too
        assert row["float32_precision"] == "highest" and row["config"]["float32_precision"] \
            == "highest"
        assert row["cudnn_benchmark"] is None  # no cuDNN on this CPU
        assert 0 <= row["input_wait_fraction"] < 1
    metrics = json.loads((out / "runs" / "torch-r0" / "metrics.json").read_text())
    assert metrics["float32_precision"] == "highest" and "input_wait_fraction" in metrics
