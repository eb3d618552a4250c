"""kbench compare --sweep / --max-batch / --max-memory: the cost model, the crossover, the
search, out of memory as a result, the sweep's records and its report.

compare starts its own process per backend, so these run once (in the tensorflow pass).
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from kbench import backend
from kbench.bench import compare as comparing
from kbench.bench import cost_model, records, report, report_sweep, sweep, worker
from kbench.errors import KbenchError
from tests.conftest import REPO

pytestmark = pytest.mark.backend_independent

MEMORY_RECIPE = os.path.join(REPO, "tests", "memory_recipe.py")
MB_PER_EXAMPLE = 16  # memory_recipe's default ballast


# --- the cost model -------------------------------------------------------------------------

def test_fit_recovers_a_known_fixed_and_per_example_cost():
    rng = np.random.default_rng(0)
    batches = np.repeat([2, 8, 32, 128], 3)
    times = 12.0 + 0.75 * batches + rng.normal(0, 0.5, batches.size)  # a = 12 ms, b = 0.75
    fit = cost_model.fit_line(batches, times)
    assert fit.n == 12 and (fit.x_min, fit.x_max) == (2, 128)
    # Within three standard errors of the truth, and the errors are of the noise's size.
    assert abs(fit.a - 12.0) < 3 * fit.a_se and 0.05 < fit.a_se < 1.0
    assert abs(fit.b - 0.75) < 3 * fit.b_se and fit.b_se < 0.02
    assert 0.999 < fit.r2 <= 1.0
    # Noise of 3% of each timing, as measured ones have: the weighted fit still finds the
    # small fixed cost (unweighted, batch 128's noise alone would be +-10 ms on a).
    relative = (12.0 + 0.75 * batches) * (1 + rng.normal(0, 0.03, batches.size))
    fit = cost_model.fit_line(batches, relative)
    assert abs(fit.a - 12.0) < 1.0 and fit.a_se < 1.0
    assert abs(fit.b - 0.75) < 0.03
    exact = cost_model.fit_line([1, 2, 4], [3.0, 5.0, 9.0])  # 1 + 2 x, no noise
    assert exact.a == pytest.approx(1.0) and exact.b == pytest.approx(2.0)
    assert exact.a_se == pytest.approx(0, abs=1e-6) and exact.r2 == pytest.approx(1.0)
    two = cost_model.fit_line([2, 8], [4.0, 7.0])  # a line through two points: no error left
    assert two.a_se is None and two.b_se is None and two.r2 is None
    assert cost_model.fit_line([32, 32], [5.0, 6.0]) is None  # one batch: no line


def test_crossover_statement_says_who_wins_where():
    # Keras-like: large fixed cost, cheaper per example; eager-like: the opposite.
    heavy = cost_model.fit_line([2, 8, 32, 128], [20 + 0.5 * x for x in (2, 8, 32, 128)])
    light = cost_model.fit_line([2, 8, 32, 128], [4 + 1.3 * x for x in (2, 8, 32, 128)])
    assert cost_model.crossover(heavy, light) == pytest.approx(20.0)
    text = cost_model.crossover_statement("jax", heavy, "torch", light)
    assert text.startswith("jax overtakes torch at batch ~20: torch is faster below it")
    assert "extrapolated" not in text
    # Crossing at 200, outside 2-128 but within 2x: named, as an extrapolation.
    far = cost_model.fit_line([2, 128], [4 + 0.6 * x for x in (2, 128)])
    near = cost_model.fit_line([2, 128], [24 + 0.5 * x for x in (2, 128)])
    assert "at batch ~200, outside the swept 2-128 (extrapolated)" in (
        cost_model.crossover_statement("a", far, "b", near))
    # Parallel lines, or a crossing at 2000 (far outside): no statement.
    same_slope = cost_model.fit_line([2, 128], [10 + 0.5 * x for x in (2, 128)])
    assert cost_model.crossover_statement("a", near, "b", same_slope) is None
    beyond = cost_model.fit_line([2, 128], [4 + 0.51 * x for x in (2, 128)])
    assert cost_model.crossover(beyond, cost_model.fit_line(
        [2, 128], [24 + 0.5 * x for x in (2, 128)])) == pytest.approx(2000)
    parallel = cost_model.fit_line([2, 8, 32, 128], [10 + 0.5 * x for x in (2, 8, 32, 128)])
    statements, same_order, poor = cost_model.crossovers({"a": heavy, "b": light,
                                                           "c": parallel, "d": same_slope})
    assert len(statements) + same_order == 3 and poor == ["d"]  # d: two runs, untested
    scattered = cost_model.fit_line([2, 8, 32, 128], [50.0, 5.0, 60.0, 70.0])
    assert scattered.r2 < 0.9
    statements, same_order, poor = cost_model.crossovers({"a": heavy, "b": scattered})
    assert (statements, same_order, poor) == ([], 0, ["b"])


# --- the largest-batch search ---------------------------------------------------------------

@pytest.mark.parametrize("limit,start", [(75, 16), (75, 256), (1000, 1), (5, 128), (1, 1)])
def test_max_batch_search_brackets_the_limit(limit, start):
    asked = []

    def fits(batch):
        asked.append(batch)
        return "ok" if batch <= limit else "oom"

    fit, miss, why = sweep.search_max_batch(fits, start, tries=16)
    assert why == "found" and fit <= limit < miss
    assert miss <= fit * 1.125 or miss - fit <= 1  # so fit is within 1.25x of the limit
    assert len(asked) == len(set(asked)) <= 14  # no batch tried twice


def test_max_batch_search_stops_at_the_tries_and_at_a_failure():
    fit, miss, why = sweep.search_max_batch(lambda b: "ok" if b <= 5000 else "oom", 1, tries=4)
    assert (fit, miss) == (8, None) and "4 tries" in why
    fit, miss, why = sweep.search_max_batch(lambda b: "ok" if b < 64 else "failed", 16, 10)
    assert (fit, miss, why) == (32, None, "stopped: batch 64 failed")
    assert sweep.search_max_batch(lambda b: "oom", 4, 10) == (None, 1, "even batch 1 runs out "
                                                                       "of memory")


# --- parsing and checking a sweep -----------------------------------------------------------

def test_parse_sweep_reads_values_as_set_does():
    assert sweep.parse_sweep("batch-size=2,8, 32") == ("batch_size", [2, 8, 32])
    assert sweep.parse_sweep("model=resnet20,resnet56") == ("model", ["resnet20", "resnet56"])
    assert sweep.parse_sweep("lr=0.1,1e-2") == ("lr", [0.1, 0.01])
    for bad in ("batch_size", "batch_size=", "=2,4", "batch_size=2,,4", "batch_size=2,2"):
        with pytest.raises(KbenchError):
            sweep.parse_sweep(bad)


def test_bad_sweeps_are_one_line_errors_before_any_run(tmp_path, entry_point_error):
    from kbench import cli

    for args, message in [
        (["--sweep", "no_such=1,2"], "--sweep no_such: recipe cifar_resnet has no setting"),
        (["--sweep", "epochs=1,2"], "--sweep epochs: compare sets epochs itself; use --epochs"),
        (["--sweep", "resume=true,false"], "--sweep resume: compare sets resume itself; use "
                                           "nothing: a compare run starts from scratch"),
        (["--sweep", "distribute=none,data_parallel"],
         "--sweep distribute: compare sets distribute itself; use --distribute data_parallel "
         "(runs one replica and N)"),
        (["--sweep", "batch_size=8,0"], "--sweep batch_size=0: --batch-size 0 is not allowed"),
        (["--sweep", "batch_size=8,x"], "--sweep batch_size=x: --batch-size 'x' is not allowed"),
        (["--sweep", "batch_size=8,16", "--batch-size", "4"], "drop --batch-size"),
        (["--sweep", "cutout=0,4", "--set", "cutout=2"], "--sweep cutout and --set cutout"),
        # an unknown --set field is the --set's, not the sweep's point's
        (["--sweep", "batch_size=2,4", "--set", "foo=1"],
         "error: --set: recipe cifar_resnet has no setting(s) foo\n"),
        # a recipe setting's own message, in the sweep's words, naming the point once
        (["--sweep", "momentum=0.5,2"], "error: --sweep momentum=2 is not allowed: it takes a "
                                        "finite number >= 0 and < 1\n"),
        (["--sweep", "early_stopping=0,2"], "error: --sweep early_stopping=2 watches monitor "
                                            "val_accuracy (the default), but a compare run "
                                            "never logs val_accuracy (it evaluates once, at "
                                            "its end): use --set monitor=accuracy, or drop "
                                            "--sweep early_stopping\n"),
        (["--sweep", "monitor=accuracy,val_loss", "--set", "early_stopping=1"],
         "error: --sweep monitor=val_loss with --set early_stopping=1: a compare run never logs "
         "val_loss (it evaluates once, at its end): sweep monitors without val_, or drop --set "
         "early_stopping\n"),
        (["--sweep", "simulate_devices=1,2"], "add --distribute data_parallel"),
        (["--sweep", "simulate_devices=2,0", "--distribute", "data_parallel"],
         "--sweep simulate_devices=0: a device count is an integer >= 1"),
        (["--sweep", "batch_size"], "--sweep takes FIELD=V1,V2,..."),
        (["--sweep", "batch_size=2,4", "--max-batch"], "--sweep and --max-batch"),
        (["--max-memory", "-5"], "--max-memory -5 is not allowed"),
        (["--max-batch-tries", "3"], "--max-batch-tries N goes with --max-batch"),
        (["--max-batch", "--max-batch-tries", "1"], "--max-batch-tries 1 is not allowed"),
    ]:
        out = tmp_path / "c"
        status, err = entry_point_error(cli.main, ["compare", "--backends", "jax", *args,
                                                   "--output", str(out)])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
        assert not (out / "results.jsonl").exists()


# --- out of memory --------------------------------------------------------------------------

def test_out_of_memory_errors_are_recognised_by_framework():
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    class ResourceExhaustedError(Exception):  # tf.errors'
        pass

    class XlaRuntimeError(RuntimeError):  # jax's
        pass

    assert worker.is_out_of_memory(OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert worker.is_out_of_memory(ResourceExhaustedError("OOM when allocating tensor"))
    assert worker.is_out_of_memory(XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while "
                                                   "trying to allocate 8.0GiB"))
    assert worker.is_out_of_memory(MemoryError())
    try:  # Keras re-raising a framework's error as its own
        try:
            raise XlaRuntimeError("RESOURCE_EXHAUSTED: ...")
        except XlaRuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert worker.is_out_of_memory(outer)
    assert not worker.is_out_of_memory(ValueError("shapes (3,) and (4,) do not match"))


def test_out_of_memory_record_asks_the_runs_own_framework_for_its_peak(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(backend, "peak_device_mb", lambda framework: asked.append(framework))
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    for runner in ("keras", "native-jax", "native-tensorflow", "native-torch",
                   "native-torch-compiled"):
        path = tmp_path / f"{runner}.json"
        assert worker.report_out_of_memory(MemoryError(), {"runner": runner}, str(path)) == \
            worker.OOM_EXIT
        assert "MemoryError" in path.read_text()
    assert asked == ["jax", "jax", "tensorflow", "torch", "torch"]


def test_the_memory_cap_stops_a_process_tree_that_passes_it():
    """The parent's poll counts the worker's children too (torchrun's ranks) and stops the
    whole group; under the cap the run is left alone."""
    grow = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(200 * 2**20); time.sleep(30)']); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", grow], start_new_session=True)
    returncode, over = comparing._wait(proc, timeout=60, cap_mb=150)
    assert over is not None and over > 150 and returncode is not None and returncode < 0
    quick = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    assert comparing._wait(quick, timeout=60, cap_mb=150) == (0, None)
    row = {"peak_rss_mb": 180.0, "status": "ok"}
    comparing._check_peak(row, 150)
    assert row["status"] == "oom" and "peak RSS 180 MB, over the --max-memory cap of 150" in (
        row["error"])


def fake_record(backend, value, status="ok", step_ms=None, field="batch_size", rss=1000.0,
                distribution="none", replicas=1, repeat=0, search=None):
    row = dict.fromkeys(records.FIELDS)
    batch = value if field == "batch_size" else 32
    row.update(backend=backend, status=status, sweep_field=field, sweep_value=value,
               batch_size=batch, recipe="cifar_resnet", model="resnet20", dataset="synthetic",
               dtype_policy="float32", distribution=distribution, num_replicas=replicas,
               repeat=repeat, search=search, config={field: value}, sync_every=1)
    if status == "ok":
        row.update(step_time_ms=step_ms, step_time_p10_ms=step_ms * 0.98,
                   step_time_p90_ms=step_ms * 1.02, examples_per_sec=batch * 1000 / step_ms,
                   compile_s=1.0, peak_rss_mb=rss, test_accuracy=0.5)
    elif status == "oom":
        row.update(peak_rss_mb=rss, error="out of memory: over the --max-memory cap")
    return row


def test_report_reads_every_kind_of_sweep_point_it_may_be_given():
    # null is a value a sweep may take (the recipe's default), a name or a flag another
    for value in (8, 0.5, "resnet20", True, None):
        assert records.not_a_record(fake_record("jax", value, field="x", step_ms=5.0)) is None
    missing = fake_record("jax", 8, step_ms=5.0)
    del missing["sweep_value"]
    assert records.not_a_record(missing) == ("a point of the batch_size sweep with no "
                                             "sweep_value (a setting's value)")


def test_a_point_out_of_memory_skips_the_larger_ones_of_its_backend_only(tmp_path,
                                                                          monkeypatch):
    """The sweep's loop with run_one replaced: jax runs out at 32, so its 128 is skipped;
    torch runs every point; every record has the swept field and value; exit status 0."""
    ran = []

    def run_one(name, runner, framework, options, out_dir, repeat, distributed=False,
                point=None):
        field, value = point
        ran.append((name, value, repeat))
        assert options.extra_config["batch_size"] == value  # the point's setting
        assert options.extra_config["test_examples"] == sweep.SWEEP_TEST_EXAMPLES
        if name == "jax" and value >= 32:
            return fake_record(name, value, status="oom", rss=3000.0, repeat=repeat)
        return fake_record(name, value, step_ms=5 + 0.5 * value, repeat=repeat)

    monkeypatch.setattr(comparing, "run_one", run_one)
    monkeypatch.setattr(sweep, "check_sweep", lambda options: None)
    options = comparing.CompareOptions(backends=("jax", "torch"), repeats=2,
                                       sweep=("batch_size", [2, 32, 128]),
                                       output=str(tmp_path / "s"), max_memory=2000)
    rows = sweep.sweep(options, console=report.make_console())
    # each point's repeats alternate the backends' order (compare.in_repeat_order)
    assert ran == [("jax", 2, 0), ("torch", 2, 0), ("torch", 2, 1), ("jax", 2, 1),
                   ("jax", 32, 0), ("torch", 32, 0), ("torch", 32, 1), ("jax", 32, 1),
                   ("torch", 128, 0), ("torch", 128, 1)]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [(r["backend"], r["sweep_value"], r["repeat"]) for r in skipped] == [
        ("jax", 128, 0), ("jax", 128, 1)]
    assert skipped[0]["batch_size"] == 128 and "batch_size=32 already ran out of memory" in (
        skipped[0]["error"])
    assert sweep.finished(rows)
    saved = records.read_jsonl(str(tmp_path / "s" / "results.jsonl"))
    assert len(saved) == 12 and all(r["sweep_field"] == "batch_size" for r in saved)
    assert report.mixed_compares(saved) is None  # kbench report takes what compare wrote
    assert (tmp_path / "s" / "results.png").stat().st_size > 1000
    assert not sweep.finished(saved + [fake_record("jax", 2, status="failed")])


def test_max_batch_runs_its_search_through_compares_runs(tmp_path, monkeypatch, capsys):
    """--max-batch's loop with run_one replaced by a backend whose runs fit up to batch 75:
    short runs, a record per try, the largest batch that fits within 1.25x of the limit,
    reported and written to max_batch.csv. (A real cap on a real process:
    test_a_sweep_whose_largest_point_passes_the_memory_cap.)"""
    limit, ran = 75, []

    def run_one(name, runner, framework, options, out_dir, repeat, distributed=False,
                point=None):
        field, value = point
        ran.append(value)
        assert (field, options.extra_config["batch_size"]) == ("batch_size", value)
        assert options.steps == sweep.MAX_BATCH_STEPS and options.repeats == 1
        if value > limit:
            return fake_record(name, value, status="oom", rss=3000.0)
        return fake_record(name, value, step_ms=5 + 0.5 * value, rss=1000.0 + 16 * value)

    monkeypatch.setattr(comparing, "run_one", run_one)
    options = comparing.CompareOptions(backends=("torch",), max_batch=True, batch_size=32,
                                       steps=20, max_memory=2300, output=str(tmp_path / "m"))
    rows = sweep.max_batch(options, console=report.make_console())
    assert ran[:3] == [32, 64, 128] and len(ran) == len(set(ran)) <= 10
    assert all(r["search"] == "max_batch" for r in rows) and sweep.finished(rows)
    found = max(r["batch_size"] for r in rows if r["status"] == "ok")
    assert limit / 1.25 <= found <= limit
    saved = records.read_jsonl(str(tmp_path / "m" / "results.jsonl"))
    assert [r["batch_size"] for r in saved] == ran and report.mixed_compares(saved) is None
    out = capsys.readouterr().out
    assert "largest batch that trains" in out and f"│ {found} " in out.replace("  ", " ")
    assert f"torch: largest batch that fits {found} (found)" in out
    assert (tmp_path / "m" / "max_batch.csv").read_text().splitlines()[1].startswith(
        f"torch,{found},")
    assert "no --max-memory" not in out
    # Without a cap, a note before the first run: on a CPU the search could take all memory.
    sweep.max_batch(dataclasses.replace(options, max_memory=None, output=str(tmp_path / "m2")),
                    console=report.make_console())
    assert "[compare] note: no --max-memory: on a CPU the search grows the batch until the " \
           "machine's memory runs out; give --max-memory MB" in capsys.readouterr().out


def test_a_model_sweep_runs_each_twin_at_the_models_it_has(tmp_path, monkeypatch, capsys):
    """--sweep model=resnet20,resnet9 --reference native: the twins train resnet20 and sit
    resnet9 out (no twin has it), saying so at that point, instead of failing there."""
    ran = []

    def run_one(name, runner, framework, options, out_dir, repeat, distributed=False,
                point=None):
        ran.append((name, point[1]))
        record = fake_record(name, point[1], step_ms=5.0, field="model", repeat=repeat)
        record["model"] = point[1]
        return record

    monkeypatch.setattr(comparing, "run_one", run_one)
    monkeypatch.setattr(sweep, "check_sweep", lambda options: None)
    options = comparing.CompareOptions(backends=("jax", "torch"), reference="native",
                                       sweep=("model", ["resnet20", "resnet9"]),
                                       output=str(tmp_path / "s"))
    rows = sweep.sweep(options, console=None)
    assert ran == [("jax", "resnet20"), ("torch", "resnet20"), ("native-jax", "resnet20"),
                   ("native-torch", "resnet20"), ("jax", "resnet9"), ("torch", "resnet9")]
    assert sweep.finished(rows)
    out = capsys.readouterr().out
    assert "[compare] native-jax left out: its jax twin has no model resnet9" in out
    assert "native-torch left out: its torch twin has no model resnet9" in out
    assert "resnet20 (it covers" not in out  # nothing left out at the first point
    # one framework's twin sits a point out while the other's trains it
    ran.clear()
    monkeypatch.setitem(comparing.TWIN_MODELS, "torch", comparing.CIFAR_RESNETS)
    options = dataclasses.replace(options, sweep=("model", ["resnet20", "preact_resnet18"]),
                                  output=str(tmp_path / "t"))
    assert sweep.finished(sweep.sweep(options, console=None))
    assert ran == [("jax", "resnet20"), ("torch", "resnet20"), ("native-jax", "resnet20"),
                   ("native-torch", "resnet20"), ("jax", "preact_resnet18"),
                   ("torch", "preact_resnet18"), ("native-jax", "preact_resnet18")]
    out = capsys.readouterr().out
    assert out.count("left out") == 1 and "native-torch left out" in out
    # a sweep of another setting the twins lack at some points: said at those points, once
    ran.clear()
    options = dataclasses.replace(options, sweep=("optimizer", ["sgd", "adam"]),
                                  output=str(tmp_path / "u"))
    assert sweep.finished(sweep.sweep(options, console=None))
    assert [name for name, _ in ran] == ["jax", "torch", "native-jax", "native-torch", "jax",
                                         "torch"]
    out = capsys.readouterr().out
    assert out.count("left out") == 2 and ("[compare] native-jax left out: its jax twin "
                                           "implements SGD only, not 'adam'") in out


def test_a_device_count_sweep_runs_the_single_replica_once():
    options = comparing.CompareOptions(backends=("jax", "torch"), distribute="data_parallel",
                                       sweep=("simulate_devices", [2, 4]))
    points = sweep.plan_points(options, comparing.plan_runs(options))
    assert [(value, [(n, dp) for n, _, _, dp in runs]) for value, _, runs in points] == [
        (1, [("jax", False), ("torch", False)]),
        (2, [("jax", True), ("torch", True)]), (4, [("jax", True), ("torch", True)])]
    assert [o.simulate_devices for _, o, _ in points] == [None, 2, 4]
    assert sweep.larger(4, 2, [2, 4]) and not sweep.larger(2, 4, [2, 4])
    assert sweep.larger("resnet110", "resnet56", ["resnet20", "resnet56", "resnet110"])


# --- the report -----------------------------------------------------------------------------

def batch_sweep_rows():
    rows = []
    for repeat in range(2):
        for value in (2, 8, 32, 128):
            rows.append(fake_record("jax", value, step_ms=20 + 0.5 * value + repeat * 0.1,
                                    repeat=repeat))
            rows.append(fake_record("torch", value, step_ms=4 + 1.3 * value + repeat * 0.1,
                                    repeat=repeat))
            rows.append(fake_record("native-torch", value, step_ms=2 + 1.2 * value,
                                    repeat=repeat))
    return rows


def test_report_of_a_batch_sweep_has_points_cost_model_and_crossover(tmp_path, entry_point):
    rows = batch_sweep_rows()
    rows.append(fake_record("jax", 512, status="oom", rss=5000.0))
    path = tmp_path / "results.jsonl"
    records.write_jsonl_atomic(str(path), rows)
    status, out, _ = entry_point(__import__("kbench.cli", fromlist=["main"]).main,
                                 ["report", str(path)])
    assert status == 0
    items = report_sweep.summarize(rows)
    assert [(i["backend"], i["sweep_value"]) for i in items][:5] == [
        ("jax", 2), ("jax", 8), ("jax", 32), ("jax", 128), ("jax", 512)]
    jax_512 = items[4]
    assert jax_512["status"] == "oom" and jax_512["step_time_ms"] is None
    assert jax_512["peak_rss_mb"] == 5000.0  # what it reached
    torch_8 = next(i for i in items if (i["backend"], i["sweep_value"]) == ("torch", 8))
    assert torch_8["vs_native"] == pytest.approx((4 + 1.3 * 8 + 0.05) / (2 + 1.2 * 8))
    # Each repeat's own ratio, as in a plain comparison's table: slower in both, no warning.
    assert (torch_8["vs_native_min"], torch_8["vs_native_max"]) == pytest.approx(
        ((4 + 1.3 * 8) / (2 + 1.2 * 8), (4 + 1.3 * 8 + 0.1) / (2 + 1.2 * 8)))
    assert "1.25x (1.24-1.25)" in out and "its repeats ran" not in out
    fits = report_sweep.fit_costs(rows)
    assert fits["jax"].a == pytest.approx(20.05, abs=0.01)
    assert fits["jax"].b == pytest.approx(0.5, abs=1e-4)
    fitted = {r["backend"]: r for r in report_sweep.fit_rows(fits)}
    assert fitted["torch"]["a_minus_twin_ms"] == pytest.approx(2.05, abs=0.01)
    assert "jax overtakes torch at batch ~20" in out
    assert "jax batch_size=512 oom" in out
    assert "cost model: step time = a + b x batch" in out
    csv = (tmp_path / "cost_model.csv").read_text().splitlines()
    assert csv[0].startswith("backend,a_ms,a_se_ms,b_ms_per_example") and len(csv) == 4
    points = (tmp_path / "results.csv").read_text().splitlines()
    assert points[0].startswith("backend,sweep_field,sweep_value,status") and len(points) == 14
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_report_of_a_device_sweep_gives_scaling_efficiency():
    rows = [fake_record("jax", 1, step_ms=100.0, field="simulate_devices")]
    for n, step in ((2, 60.0), (4, 40.0)):
        rows.append(fake_record("jax", n, step_ms=step, field="simulate_devices",
                                distribution="data_parallel", replicas=n))
    items = {(i["backend"], i["sweep_value"]): i for i in report_sweep.summarize(rows)}
    assert items[("jax dp", 2)]["scaling_efficiency"] == pytest.approx(100 / 60 / 2)
    assert items[("jax dp", 4)]["scaling_efficiency"] == pytest.approx(100 / 40 / 4)
    assert items[("jax", 1)]["scaling_efficiency"] is None


def test_baseline_compares_sweeps_point_by_point(tmp_path):
    base = batch_sweep_rows()
    base_path = tmp_path / "base.jsonl"
    records.write_jsonl_atomic(str(base_path), base)
    now = [dict(r) for r in base if r["repeat"] == 0]
    for r in now:  # torch 20% slower at 128 only
        if r["backend"] == "torch" and r["sweep_value"] == 128:
            r.update(step_time_ms=r["step_time_ms"] * 1.2, step_time_p10_ms=r["step_time_ms"]
                     * 1.19, step_time_p90_ms=r["step_time_ms"] * 1.21)
    items = report_sweep.compare_to_baseline(report_sweep.summarize(now),
                                             records.read_jsonl(str(base_path)))
    verdicts = {(i["backend"], i["sweep_value"]): i["vs_baseline"].split()[0] for i in items}
    assert verdicts[("torch", 128)] == "slower"
    assert {v for k, v in verdicts.items() if k != ("torch", 128)} == {"same"}
    other = [fake_record("jax", "resnet20", step_ms=5.0, field="model")]
    items = report_sweep.compare_to_baseline(report_sweep.summarize(other), base)
    assert items[0]["vs_baseline"] == "not comparable: the baseline swept batch_size"


def test_report_of_a_max_batch_search():
    rows = [fake_record("jax", b, step_ms=b * 0.5, search="max_batch") for b in (16, 32, 64)]
    rows += [fake_record("jax", b, status="oom", search="max_batch") for b in (128, 96, 80)]
    rows.append(fake_record("jax", 72, step_ms=36.0, rss=1900.0, search="max_batch"))
    found = report_sweep.max_batches(rows)
    assert found == [{"backend": "jax", "largest_batch": 72, "smallest_oom_batch": 80,
                      "tries": 7, "search": "limit in [72, 80)", "step_time_ms": 36.0,
                      "examples_per_sec": 2000.0, "peak_rss_mb": 1900.0,
                      "peak_device_mb": None}]


# --- end to end -----------------------------------------------------------------------------

def kbench(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "kbench.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow",
                               "PYTHONPATH": REPO})


TINY = ["--recipe", MEMORY_RECIPE, "--dataset", "digits", "--steps", "2", "--warmup-steps", "1",
        "--set", "test_examples=64"]


def test_a_sweep_whose_largest_point_passes_the_memory_cap(tmp_path):
    """Batch 400 holds 6.4 GB of ballast, over a 2.5 GB cap: oom (stopped by the parent's
    poll), 800 skipped, batch 8 ran and is reported; exit status 0."""
    out = tmp_path / "s"
    result = kbench("compare", "--backends", "tensorflow", *TINY, "--sweep",
                    "batch_size=8,400,800", "--max-memory", "2500", "--output", str(out),
                    cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = records.read_jsonl(str(out / "results.jsonl"))
    assert [(r["sweep_value"], r["status"]) for r in rows] == [
        (8, "ok"), (400, "oom"), (800, "skipped")]
    assert rows[0]["peak_rss_mb"] < 2500 and rows[0]["max_memory_mb"] == 2500
    assert rows[1]["peak_rss_mb"] > 2500 and "--max-memory cap of 2500 MB" in rows[1]["error"]
    assert rows[1]["log"].endswith("tensorflow-batch_size=400-r0.log")
    assert "tensorflow batch_size=400 oom" in result.stdout
    assert (out / "results.png").is_file()


# Not in `make test`: test_max_batch_runs_its_search_through_compares_runs (the search through
# compare's runs, in-process) and test_a_sweep_whose_largest_point_passes_the_memory_cap (a real
# process over a real cap) check its parts; this one, every part together on real memory.
@pytest.mark.slow
def test_max_batch_finds_the_memory_limit_within_a_quarter(tmp_path):
    """The memory recipe's peak is (baseline + 16 MB x batch): the true limit under the cap
    follows from any run's baseline, and the search must land within 1.25x below it."""
    cap = 2300
    out = tmp_path / "m"
    result = kbench("compare", "--backends", "tensorflow", *TINY, "--max-batch",
                    "--batch-size", "32", "--max-memory", str(cap), "--output", str(out),
                    cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = records.read_jsonl(str(out / "results.jsonl"))
    assert all(r["search"] == "max_batch" and r["steps_timed"] in (None, 2) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    baseline = float(np.median([r["peak_rss_mb"] - MB_PER_EXAMPLE * r["batch_size"]
                                for r in ok]))
    true_limit = (cap - baseline) / MB_PER_EXAMPLE
    found = max(r["batch_size"] for r in ok)
    assert true_limit / 1.25 <= found <= true_limit + 2, (found, true_limit, baseline)
    assert len(rows) <= 10
    assert "largest batch that trains" in result.stdout
    assert f"│ {found} " in result.stdout.replace("  ", " ")
    assert (out / "max_batch.csv").read_text().splitlines()[1].startswith(f"tensorflow,{found},")
