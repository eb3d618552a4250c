"""kbench compare / report: records, failures kept apart, report re-rendering, baselines.

compare starts its own process per backend, so these run once (in the tensorflow pass).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from kbench.bench import compare, records, report
from tests.conftest import REPO, fake_python

pytestmark = pytest.mark.backend_independent

# A small compare: the convnet, except where the native twins (ResNets only) run beside it.
TINY = ["--dataset", "synthetic", "--model", "convnet", "--batch-size", "16", "--steps", "3",
        "--warmup-steps", "1", "--set", "train_examples=256", "--set", "test_examples=64"]


@pytest.fixture(scope="module", autouse=True)
def user_folder(tmp_path_factory):
    """Every compare here runs from a user's project folder that holds its own `recipes`
    package whose cifar_resnet.py raises on import: kbench must use its own recipe files."""
    global WORKDIR
    WORKDIR = tmp_path_factory.mktemp("project")
    (WORKDIR / "recipes").mkdir()
    (WORKDIR / "recipes" / "__init__.py").write_text("")
    (WORKDIR / "recipes" / "cifar_resnet.py").write_text(
        "raise RuntimeError('the user recipes package was imported')\n")
    return WORKDIR


WORKDIR = REPO


def kbench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kbench.cli", *args], cwd=WORKDIR,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})


def load(out_dir):
    return records.read_jsonl(os.path.join(out_dir, "results.jsonl"))


def test_all_backends_and_native_twins(tmp_path):
    """Every backend and twin end to end. The one comparison also shows that a setting
    (--float32-precision) reaches every run, the twins' too, and that each measures its
    input wait."""
    out = tmp_path / "cmp"
    result = kbench("compare", "--recipe", "cifar_resnet", "--backends", "jax,tensorflow,torch",
                    "--reference", "native", *TINY, "--model", "resnet20",
                    "--float32-precision", "highest", "--output", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = load(out)
    assert [r["backend"] for r in rows] == ["jax", "tensorflow", "torch", "native-jax",
                                           "native-tensorflow", "native-torch"]
    assert report.mixed_compares(rows) is None  # kbench report takes what compare wrote
    for row in rows:
        assert set(records.FIELDS) <= set(row), set(records.FIELDS) - set(row)
        assert row["status"] == "ok", row["error"]
        assert row["steps_timed"] == 3 and row["step_time_ms"] > 0
        assert row["step_time_p10_ms"] <= row["step_time_ms"] <= row["step_time_p90_ms"]
        assert row["examples_per_sec"] == pytest.approx(16 * 1000 / row["step_time_ms"])
        assert row["compile_s"] > 0 and row["peak_rss_mb"] > 100
        assert 0 <= row["test_accuracy"] <= 1 and row["test_loss"] > 0
        assert row["versions"]["keras"] and row["device"] and row["timestamp"]
        assert row["config"]["batch_size"] == 16 and row["command"].startswith("kbench compare")
        assert row["float32_precision"] == "highest"
        assert row["config"]["float32_precision"] == "highest"
        assert row["cudnn_benchmark"] is None  # no cuDNN on this CPU
        assert row["memory_format"] == "channels_last"  # Keras' layers and the twins alike
        assert row["autocast_dtype"] is None  # float32
        if row["backend"] == "tensorflow":  # Keras' tf.function pulls its batches itself
            assert row["input_wait_fraction"] is None  # (kbench.train.InputClock)
        else:
            assert 0 <= row["input_wait_fraction"] < 1
    keras_jax = rows[0]
    assert keras_jax["flops_per_step"] > 0 and keras_jax["achieved_tflops"] > 0
    assert (out / "results.png").stat().st_size > 1000 and (out / "results.csv").is_file()
    assert "vs native" in result.stdout
    # The Keras runs leave their metrics and model behind.
    metrics = json.loads((out / "runs" / "torch-r0" / "metrics.json").read_text())
    assert metrics["float32_precision"] == "highest" and "input_wait_fraction" in metrics
    assert (out / "runs" / "jax-r0" / "metrics.json").is_file()
    # kbench evaluate on one of them, from the same folder: the test split from kbench alone.
    result = kbench("evaluate", str(out / "runs" / "torch-r0" / "model.keras"),
                    "--output-dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["num_examples"] == 64
    # The run's own eval.json records what kbench evaluate records, but the model's path.
    own = json.loads((out / "runs" / "torch-r0" / "eval.json").read_text())
    assert set(evaluated) - set(own) == {"model_path"}
    assert own["recipe"] == evaluated["recipe"] == "cifar_resnet"
    assert own["config"] == evaluated["config"] and own["config"]["seed"] == 0


def test_a_failed_backend_is_recorded_and_the_others_kept(tmp_path):
    broken = fake_python(tmp_path / "broken-python",
                         "echo 'ModuleNotFoundError: No module named torch' >&2; exit 1")
    out = tmp_path / "cmp"
    result = kbench("compare", "--backends", "torch,jax", *TINY, "--python", f"torch={broken}",
                    "--output", str(out))
    assert result.returncode == 1  # some run failed
    rows = {r["backend"]: r for r in load(out)}
    assert rows["torch"]["status"] == "failed"
    assert "No module named torch" in rows["torch"]["error"]
    assert rows["jax"]["status"] == "ok"  # ran after the failure, and kept
    assert "No module named torch" in result.stdout  # the report shows why
    assert (out / "results.png").is_file()


def test_a_hanging_backend_times_out(tmp_path):
    hanging = fake_python(tmp_path / "hanging-python", "echo starting; sleep 60")
    out = tmp_path / "cmp"
    result = kbench("compare", "--backends", "tensorflow", *TINY,
                    "--python", f"tensorflow={hanging}", "--timeout", "2", "--output", str(out))
    assert result.returncode == 1
    row = load(out)[0]
    assert row["status"] == "timeout" and "--timeout" in row["error"]
    assert row["wall_s"] < 30


def test_bad_arguments_are_one_line_errors(tmp_path, entry_point_error):
    from kbench import cli

    for args, message in [
        (["--backends", "mxnet"], "unknown backend 'mxnet'"),
        (["--python", "jax"], "--python takes BACKEND=PATH"),
        (["--baseline", str(tmp_path / "none.jsonl")], "no such file"),
        (["--timeout", "nan"], "--timeout nan is not allowed"),
        (["--timeout", "0"], "--timeout 0 is not allowed"),
        (["--backends", ""], "--backends '' is not allowed"),
        (["--backends", "jax,"], "--backends 'jax,' is not allowed"),
        (["--backends", "jax,torch,jax"], "--backends names jax twice: to run it again, use "
                                          "--repeats"),
        (["--batch-size", "8", "--set", "batch_size=16"],
         "--batch-size 8 and --set batch_size=16 disagree"),
        (["--dtype-policy", "mixed_bfloat16", "--set", "dtype_policy=float32"],
         "--dtype-policy mixed_bfloat16 and --set dtype_policy=float32 disagree"),
        (["--dataset", "synthetic", "--set", "dataset=digits"],  # given, though the default
         "--dataset synthetic and --set dataset=digits disagree"),
        (["--backends", "torch", "--python", f"jax={sys.executable}"],  # unused, unsaid
         "--python jax=... is for jax, which this compare does not run (backends: torch): add "
         "jax to --backends, or drop it"),
    ]:
        status, err = entry_point_error(cli.main, ["compare", *args, "--output",
                                                   str(tmp_path / "x")])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err
    status, err = entry_point_error(cli.main, ["report", str(tmp_path / "missing.jsonl")])
    assert status == 2 and "does not exist" in err
    for content, message in [(b"\xff\xfe\n", "is not a text file"),
                             (b"[1, 2]\n", "a JSON list, not an object"),
                             (b"{}\n", "no backend name"),
                             (b'{"backend": "jax", "status": "ok", "step_time_ms": "fast"}\n',
                              "step_time_ms is 'fast', not a number"),
                             (b'{"backend": "jax", "status": "ok", "config": 5}\n',
                              "config is 5, not an object of settings"),
                             # the target and sweep tables' fields
                             (b'{"backend": "jax", "status": "ok", "target_accuracy": "a"}\n',
                              "target_accuracy is 'a', not a number"),
                             (b'{"backend": "jax", "status": "ok", "target_accuracy": 0.5, '
                              b'"reached": true}\n',
                              "it reached its target but holds no time_to_target_s"),
                             (b'{"backend": "jax", "status": "ok", "target_accuracy": 0.5, '
                              b'"eval_points": "zz"}\n',
                              "eval_points is not a list of evaluations"),
                             (b'{"backend": "jax", "status": "ok", "sweep_field": "batch_size", '
                              b'"batch_size": 8, "step_time_ms": 5}\n',
                              "a point of the batch_size sweep with no sweep_value")]:
        (tmp_path / "bad.jsonl").write_bytes(content)
        for argv in (["report", str(tmp_path / "bad.jsonl")],
                     ["report", str(tmp_path / "bad.jsonl"), "--baseline",
                      str(tmp_path / "bad.jsonl")]):
            status, err = entry_point_error(cli.main, argv)
            assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
            assert message in err
    # An --output that holds a compare's results is refused before anything runs (not
    # overwritten), so is one that cannot be a folder; nothing in them is touched
    done = tmp_path / "done"
    done.mkdir()
    kept = '{"backend": "jax", "status": "failed"}\n'
    (done / "results.jsonl").write_text(kept)
    (tmp_path / "a-file").write_text("mine")
    trained = tmp_path / "trained"  # a recipe run's folder
    trained.mkdir()
    (trained / "metrics.json").write_text("{}")
    for output, message in [(done, "already holds a compare's results.jsonl"),
                            (tmp_path / "a-file", "cannot write there"),
                            (trained, "holds a training run (metrics.json)")]:
        status, err = entry_point_error(cli.main, ["compare", "--backends", "jax", "--output",
                                                   str(output)])
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err
    assert (done / "results.jsonl").read_text() == kept
    assert os.listdir(trained) == ["metrics.json"]
    # One compare per --output: a folder another compare (or recipe) holds is refused
    from kbench.files import FolderLock

    busy = tmp_path / "busy"
    busy.mkdir()
    holder = FolderLock(str(busy), "--output").acquire()
    try:
        status, err = entry_point_error(cli.main, ["compare", "--backends", "jax", "--output",
                                                   str(busy)])
    finally:
        holder.release()
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {busy} is in use by another run (process {os.getpid()} ")
    assert err.rstrip().endswith("give this run another --output")
    assert os.listdir(busy) == [".kbench.lock"]
    status, err = entry_point_error(cli.main, ["report", str(done), "--output",
                                               str(tmp_path / "a-file")])
    assert status == 2 and "cannot write there" in err
    assert (tmp_path / "a-file").read_text() == "mine"
    # report --output into another compare's folder would leave its results.csv and .png
    # describing other runs than its results.jsonl: refused, nothing written there
    (tmp_path / "other.jsonl").write_text('{"backend": "torch", "status": "failed"}\n')
    status, err = entry_point_error(cli.main, ["report", str(tmp_path / "other.jsonl"),
                                               "--output", str(done)])
    assert status == 2 and "holds another compare's results.jsonl" in err
    assert os.listdir(done) == ["results.jsonl"]
    (done / "merged.jsonl").write_text(kept)  # beside it, without --output: the same
    status, err = entry_point_error(cli.main, ["report", str(done / "merged.jsonl")])
    assert status == 2 and err == (f"error: {done} holds another compare's results.jsonl, whose "
                                   "results.csv and results.png these would replace: pass "
                                   "--output NEW_FOLDER\n")


def test_bad_recipe_settings_are_refused_before_any_run(tmp_path, entry_point_error):
    from kbench import cli

    for setting, message in [("no_such_knob=1", "recipe cifar_resnet has no setting(s) "
                                                "no_such_knob"),
                             # the recipe's message, in compare's words (--set, not --momentum)
                             ("momentum=2", "--set momentum=2 is not allowed: it takes a "
                                            "finite number >= 0 and < 1"),
                             ("cutout=-4", "--set cutout=-4 is not allowed"),
                             ("model=nope", "--model 'nope' is not allowed: it takes a name "
                                            "registered in kbench.models for images "
                                            "(convnet, "),
                             ("epochs=0", "--set epochs is compare's to set, per run: use "
                                          "--epochs (or --steps; with a target, "
                                          "--max-epochs)"),
                             # each a failure of every run, once the runs had started
                             ("resume=true", "--set resume is compare's to set, per run: use "
                                             "nothing: a compare run starts from scratch"),
                             ("distribute=data_parallel", "--set distribute is compare's to "
                                                          "set, per run: use --distribute "
                                                          "data_parallel"),
                             ("simulate_devices=2", "--set simulate_devices is compare's to "
                                                    "set, per run: use --simulate-devices N"),
                             # the recipe's remedy, --validate-every-epoch, is compare's:
                             # compare names the one left to the user
                             ("early_stopping=2", "--set early_stopping=2 watches monitor "
                                                  "val_accuracy (the default), but a compare "
                                                  "run never logs val_accuracy (it evaluates "
                                                  "once, at its end): use --set "
                                                  "monitor=accuracy, or drop --set "
                                                  "early_stopping\n"),
                             ("early_stopping=2 monitor=val_loss", "--set early_stopping=2 "
                                                                   "watches --set "
                                                                   "monitor=val_loss, but"),
                             ("early_stopping=-1", "--set early_stopping=-1 is not allowed"),
                             # one of the two would be lost
                             ("lr=0.1 lr=0.2", "--set lr=0.1 and --set lr=0.2 disagree")]:
        out = tmp_path / "c"
        tiny = TINY[:TINY.index("--model")] + TINY[TINY.index("--model") + 2:]  # --set's to say
        sets = [arg for one in setting.split() for arg in ("--set", one)]
        status, err = entry_point_error(cli.main, ["compare", "--backends", "jax", *tiny,
                                                   *sets, "--output", str(out)])
        assert status == 2 and err.startswith("error: " + message), err
        assert not out.exists()  # nor the folder: the settings are checked before it is made


def test_missing_data_is_refused_before_any_run_in_compare_s_words(tmp_path, entry_point_error):
    """Every run would fail loading it: one line first, whose remedies compare takes (its
    --set data_dir=, --set download=true; --dataset is compare's own flag)."""
    from kbench import cli

    tiny = TINY[TINY.index("--model"):]
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [(["--dataset", "cifar10", "--set", f"data_dir={empty}"],
                           f"CIFAR-10 not found in {empty}: pass --set data_dir=DIR holding "
                           "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/, or a "
                           "TFDS data dir), add --set download=true to fetch it, or use "
                           "--dataset synthetic to run without data\n"),
                          (["--sweep", "dataset=synthetic,cifar10", "--set",
                            f"data_dir={empty}"], "--sweep dataset=cifar10: CIFAR-10 not found")]:
        out = tmp_path / "c"
        status, err = entry_point_error(cli.main, ["compare", "--backends", "jax", *tiny, *args,
                                                   "--output", str(out)])
        assert status == 2 and err.startswith(f"error: {message}"), err
        assert not out.exists()


def test_a_recipe_s_own_input_check_runs_once_before_any_run(tmp_path, entry_point_error):
    from kbench import cli

    tiny = TINY[:TINY.index("--model")] + TINY[TINY.index("--model") + 2:]
    # in compare's words: the recipe's --init-from is compare's --set init_from=
    for sets, message in [([], "pass --set init_from=PATH, a model.keras another recipe saved"),
                          (["--set", f"init_from={tmp_path / 'none.keras'}"],
                           f"--set init_from={tmp_path / 'none.keras'}: no such file"),
                          (["--set", f"init_from={tmp_path}"],
                           f"--set init_from={tmp_path} is a folder")]:
        out = tmp_path / "c"
        status, err = entry_point_error(cli.main, ["compare", "--recipe", "finetune",
                                                   "--backends", "jax,torch", *tiny, *sets,
                                                   "--output", str(out)])
        assert status == 2 and err.startswith(f"error: {message}"), err
        assert err.count("\n") == 1 and not out.exists()  # no run started, no folder made


def test_a_recipe_s_messages_are_reworded_as_compare_takes_its_settings():
    """A recipe names its settings by its flags; compare takes them as --set FIELD=VALUE
    (--sweep for the swept one). Only what follows a flag as its value joins it: a sentence
    going on after a flag is not a value."""
    import dataclasses

    @dataclasses.dataclass
    class Config:
        batch_size: int = 8  # compare's own flag: kept
        epochs: int = 1  # compare's to set: kept
        momentum: float = 0.9
        head_epochs: int = 1
        augment: bool = True
        init_from: str | None = None

    for message, reworded in [
        ("--momentum 2 is not allowed", "--set momentum=2 is not allowed"),
        ("--momentum 'x' is not allowed", "--set momentum='x' is not allowed"),
        ("--momentum nan is not allowed", "--set momentum=nan is not allowed"),
        ("--momentum must be set (a number)", "--set momentum must be set (a number)"),
        ("--head-epochs and --epochs are both 0", "--set head_epochs and --epochs are both 0"),
        ("--head-epochs N needs --batch-size 8", "--set head_epochs=N needs --batch-size 8"),
        ("--augment watches it", "--set augment=true watches it"),
        ("--no-augment turns it off", "--set augment=false turns it off"),
        ("--augment 5 is not allowed", "--set augment=5 is not allowed"),
        ("pass --init-from PATH, a model", "pass --set init_from=PATH, a model"),
        ("--init-from /a/b.keras: no such file", "--set init_from=/a/b.keras: no such file"),
        ("it takes its network from --init-from; drop", "it takes its network from "
                                                        "--set init_from; drop"),
    ]:
        assert compare.as_set_options(message, Config) == reworded
    assert compare.as_set_options("--momentum 2 is not allowed", Config(), swept="momentum") \
        == "--sweep momentum=2 is not allowed"


def record(backend, median, p10, p90, accuracy=0.5):
    row = dict.fromkeys(records.FIELDS)
    row.update(backend=backend, status="ok", step_time_ms=median, step_time_p10_ms=p10,
               step_time_p90_ms=p90, examples_per_sec=128000.0 / median, compile_s=2.0,
               test_accuracy=accuracy, test_loss=1.0, recipe="cifar_resnet", model="resnet20",
               dataset="synthetic", batch_size=128, dtype_policy="float32", device="cpu:0")
    return row


def report_here(entry_point, path):
    """`kbench report PATH` in this interpreter: (exit status, stdout)."""
    from kbench import cli

    status, out, _ = entry_point(cli.main, ["report", str(path)])
    return status, out


def test_report_rerenders_saved_results(tmp_path, entry_point):
    rows = [record("jax", 100, 95, 105), record("native-jax", 80, 78, 82),
            record("torch", 60, 58, 62)]
    failed = dict.fromkeys(records.FIELDS)
    failed.update(backend="tensorflow", status="failed",
                  error="ImportError: no tf\nTraceback (most recent call last): ...",
                  log="logs/tensorflow-r0.log")
    records.write_jsonl_atomic(str(tmp_path / "results.jsonl"), rows + [failed])
    status, out = report_here(entry_point, tmp_path / "results.jsonl")
    assert status == 0
    assert "1.25x" in out  # jax vs native-jax: 100 / 80
    assert "ImportError: no tf (log: logs/tensorflow-r0.log)" in out  # the first line only
    assert "Traceback" not in out
    assert (tmp_path / "results.png").stat().st_size > 1000
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.startswith("backend,status,runs,step_time_ms")
    assert "tensorflow,failed" in csv_text
    # The compare's folder stands for its results.jsonl; --output says where each file is
    from kbench import cli

    status, out, _ = entry_point(cli.main, ["report", str(tmp_path), "--output",
                                            str(tmp_path / "elsewhere")])
    assert status == 0 and "1.25x" in out
    assert f"results: {tmp_path / 'results.jsonl'}; {tmp_path / 'elsewhere' / 'results.csv'}" in out
    assert not (tmp_path / "elsewhere" / "results.jsonl").exists()


def test_report_refuses_a_file_that_joins_several_compares(tmp_path, entry_point_error):
    """Files joined by hand: one title and one median per backend over runs that measured
    different things would mislead. One compare's own records (its failed runs know only what
    was asked) and a sweep's points (the swept field differs) are one compare."""
    from kbench import cli

    path = tmp_path / "results.jsonl"
    failed = dict.fromkeys(records.FIELDS, None) | {"backend": "tensorflow", "status": "failed"}
    point = dict(record("jax", 10, 9, 11), sweep_field="batch_size", sweep_value=64,
                 batch_size=64)
    for rows, message in [
            ([record("torch", 60, 58, 62), dict(record("torch", 30, 29, 31),
                                                recipe="recipes/mnist_convnet.py")],
             "recipe cifar_resnet and mnist_convnet"),
            ([record("jax", 100, 95, 105), dict(record("torch", 60, 58, 62), batch_size=64)],
             "batch size 128 and 64"),
            ([record("jax", 100, 95, 105), point], "a sweep of batch_size beside step times"),
            ([record("jax", 100, 95, 105), dict(record("jax", 90, 85, 95), target_accuracy=0.5)],
             "step times beside time to target")]:
        records.write_jsonl_atomic(str(path), rows)
        status, err = entry_point_error(cli.main, ["report", str(path)])
        assert status == 2 and err == (
            f"error: {path} holds runs of more than one compare ({message}): report each "
            "compare's results.jsonl on its own, or compare them with --baseline\n")
        assert not (tmp_path / "results.csv").exists()
    path.write_text("")  # a compare stopped before its first run ended: nothing to show
    status, err = entry_point_error(cli.main, ["report", str(path)])
    assert status == 2 and err == (f"error: {path} holds no runs: the compare that writes it "
                                   "stopped before its first run ended; nothing to report\n")
    arch = dict(record("jax", 10, 9, 11), sweep_field="arch", sweep_value="transformer",
                model="text_transformer", config={"model": None})
    built = dict(record("jax", 100, 95, 105), model="my_net", config={"model": "resnet20"})
    for rows in ([record("jax", 100, 95, 105), record("native-jax", 80, 78, 82), failed],
                 [point, dict(point, sweep_value=128, batch_size=128)],
                 # a swept field changes what its points build; a recipe may build a model of
                 # another name than the one asked for, which its twin records
                 [arch, dict(arch, sweep_value="lstm", model="text_lstm")],
                 [built, record("native-jax", 80, 78, 82)]):
        assert report.mixed_compares(rows) is None


def test_vs_native_gives_the_range_over_repeats_and_says_when_it_straddles_parity(
        tmp_path, entry_point):
    """Each repeat's ratio pairs a run with its twin of the same repeat: a machine whose speed
    drifts between repeats moves them apart, which the median ratio alone would hide."""
    rows = []
    for repeat, times in enumerate([{"jax": 100, "native-jax": 90, "torch": 60,
                                     "native-torch": 50},
                                    {"jax": 100, "native-jax": 110, "torch": 66,
                                     "native-torch": 50}]):
        rows += [dict(record(name, ms, ms - 1, ms + 1), repeat=repeat)
                 for name, ms in times.items()]
    records.write_jsonl_atomic(str(tmp_path / "results.jsonl"), rows)
    status, out = report_here(entry_point, tmp_path / "results.jsonl")
    assert status == 0
    assert "1.00x (0.91-1.11)" in out  # medians 100 / 100; repeats 100/90 and 100/110
    assert "1.26x (1.20-1.32)" in out  # medians 63 / 50; repeats 60/50 and 66/50
    assert ("jax: its repeats ran 0.91x to 1.11x its native twin's step time, on both sides "
            "of 1.00x: these runs cannot tell the two apart") in " ".join(out.split())
    assert "torch: its repeats" not in out  # slower in both: the gap is the runs', not noise
    header, jax_row = (tmp_path / "results.csv").read_text().splitlines()[:2]
    row = dict(zip(header.split(","), jax_row.split(",")))
    assert (float(row["vs_native_min"]), float(row["vs_native_max"])) == pytest.approx(
        (100 / 110, 100 / 90))
    # One repeat: the ratio alone, no range and no warning.
    records.write_jsonl_atomic(str(tmp_path / "results.jsonl"),
                               [r for r in rows if r["repeat"] == 0])
    status, out = report_here(entry_point, tmp_path / "results.jsonl")
    assert status == 0 and "1.11x " in out and "(" not in out.split("1.11x")[1][:3]
    assert "its repeats ran" not in out


def test_baseline_marks_only_changes_beyond_noise():
    baseline = [record("jax", 100, 96, 104), record("torch", 60, 59, 61),
                record("tensorflow", 80, 79, 81)]
    current = [record("jax", 103, 99, 107),  # +3 ms, noise 4 ms: same
               record("torch", 70, 69, 71),  # +10 ms, noise 1 ms: slower
               record("tensorflow", 70, 69, 71)]  # -10 ms: faster
    summary = report.compare_to_baseline(report.summarize(current), baseline)
    verdicts = {s["backend"]: s["vs_baseline"].split()[0] for s in summary}
    assert verdicts == {"jax": "same", "torch": "slower", "tensorflow": "faster"}
    # A backend the baseline did not run, or whose baseline run failed: no verdict, and why
    summary = report.compare_to_baseline(report.summarize([record("torch-stock", 70, 69, 71)]),
                                         baseline)
    assert summary[0]["vs_baseline"] == "not comparable: no run of it in the baseline"
    failed = [dict(record("torch", 60, 59, 61), status="failed", step_time_ms=None),
              dict(record("jax", 60, 59, 61), status="timeout", step_time_ms=None)]
    summary = report.compare_to_baseline(report.summarize(current), failed)
    assert {s["backend"]: s["vs_baseline"] for s in summary} == {
        "jax": "not comparable: the baseline's run timed out",
        "torch": "not comparable: the baseline's run failed",
        "tensorflow": "not comparable: no run of it in the baseline"}
    # Windows of 10 steps against a baseline synced every step: no verdict, and why.
    windowed = [dict(record("jax", 70, 69, 71), sync_every=10)]
    summary = report.compare_to_baseline(report.summarize(windowed), baseline)
    assert summary[0]["vs_baseline"] == "not comparable: synced every 10 vs 1 steps"
    # A baseline of another batch size (or model, dataset, policy, recipe) measured
    # something else: no verdict, and why
    bigger = [dict(record("torch", 70, 69, 71), batch_size=256, dtype_policy="mixed_bfloat16")]
    summary = report.compare_to_baseline(report.summarize(bigger), baseline)
    assert summary[0]["vs_baseline"] == ("not comparable: batch size 256 vs 128, dtype policy "
                                         "mixed_bfloat16 vs float32")
    # ... judged by runs that finished (a failed one keeps only what was asked), a recipe
    # file by its name
    failed_first = [dict(record("torch", 70, 69, 71), status="failed", model=None,
                         batch_size=None),
                    dict(record("torch", 70, 69, 71), recipe="/src/recipes/cifar_resnet.py")]
    summary = report.compare_to_baseline(report.summarize(failed_first), baseline)
    assert summary[0]["vs_baseline"].startswith("slower")
    # A time-to-target baseline (whole epochs, no warm-up) says nothing of step times.
    to_target = [dict(r, target_accuracy=0.9) for r in baseline]
    summary = report.compare_to_baseline(report.summarize(current), to_target)
    assert {s["vs_baseline"] for s in summary} == {
        "not comparable: the baseline measured time to target"}


def test_repeats_alternate_the_order_of_the_runs(tmp_path, monkeypatch):
    """Repeats run the plan forward, then backward, and so on: on a machine whose speed
    drifts, no backend or twin always gets the same place (compare.in_repeat_order)."""
    ran = []

    def run_one(name, runner, framework, options, out_dir, repeat, distributed=False):
        ran.append((name, repeat))
        row = record(name, 100.0, 95.0, 105.0)
        row["repeat"] = repeat
        return row

    monkeypatch.setattr(compare, "run_one", run_one)
    monkeypatch.setattr(compare, "check_recipe_settings", lambda options: None)
    options = compare.CompareOptions(backends=("jax", "torch"), reference="native", repeats=3,
                                     output=str(tmp_path / "c"))
    rows = compare.compare(options, console=report.make_console())
    plan = ["jax", "torch", "native-jax", "native-torch"]
    assert ran == ([(name, 0) for name in plan] + [(name, 1) for name in reversed(plan)]
                   + [(name, 2) for name in plan])
    assert len(rows) == 12
    # the report keeps the plan's order
    assert [row["backend"] for row in report.summarize(rows)] == plan


def test_repeats_are_aggregated_by_median():
    summary = report.summarize([record("jax", 100, 95, 105), record("jax", 110, 100, 120),
                                record("jax", 90, 85, 95)])
    assert len(summary) == 1 and summary[0]["runs"] == 3
    assert summary[0]["step_time_ms"] == 100


def _running(pid):
    """Whether process `pid` exists and is not a zombie (its parent may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("signal_name, status, last_line", [
    ("SIGINT", 130, "interrupted"),  # Ctrl-C
    ("SIGTERM", 143, "stopped by SIGTERM"),  # a scheduler's stop, `timeout`, `kill`
    ("SIGHUP", 143, "stopped by SIGHUP"),  # a closed terminal, a dropped ssh session
])
def test_a_signal_keeps_finished_runs_and_stops_the_running_one(tmp_path, signal_name,
                                                                status, last_line):
    """The workers run in process groups of their own: a compare that just died would leave
    the running one (and what it started) burning the machine."""
    import signal
    import time

    broken = fake_python(tmp_path / "broken-python", "exit 1")  # a quick, kept record
    pid_file = tmp_path / "worker-child.pid"
    slow = fake_python(tmp_path / "slow-python", f"sleep 120 & echo $! > {pid_file}; wait")
    out = tmp_path / "cmp"

    def as_from_a_terminal():
        # A test runner started under nohup, or as a background job of a non-interactive
        # shell, hands its children SIGHUP / SIGINT ignored, which compare (and Python) keep
        # ignored, as they should: start the compare with a terminal's dispositions.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, "-m", "kbench.cli", "compare", "--backends", "jax,torch", *TINY,
         "--python", f"jax={broken}", "--python", f"torch={slow}", "--output", str(out)],
        cwd=REPO, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)  # jax's record is written; torch's worker has started its child
    assert pid_file.exists(), "the second run never started"
    child = int(pid_file.read_text())
    proc.send_signal(getattr(signal, signal_name))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr[-2000:]
    assert [(r["backend"], r["status"]) for r in load(out)] == [("jax", "failed")]
    assert "interrupted" in stdout and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == last_line
    # The running worker's whole process group was stopped, its child too.
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def test_compares_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    import types

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare.time, "strftime", lambda fmt: "20261206-101906")
    options = types.SimpleNamespace(output=None)
    opened = [compare.open_output(options) for _ in range(3)]
    try:
        assert [folder for folder, _ in opened] == [
            os.path.join("runs", "compare", name) for name in
            ("20261206-101906", "20261206-101906-2", "20261206-101906-3")]
    finally:
        for _, lock in opened:
            lock.release()


def test_a_compare_killed_outright_takes_its_worker_with_it(tmp_path):
    """SIGKILL (the out-of-memory killer's) leaves compare no time to stop its worker, which
    runs in a session of its own: the kernel sends the worker SIGTERM when compare dies."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    slow = fake_python(tmp_path / "slow-python", f"echo $$ > {pid_file}; exec sleep 120")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kbench.cli", "compare", "--backends", "torch", *TINY,
         "--python", f"torch={slow}", "--output", str(tmp_path / "cmp")],
        cwd=REPO, env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    try:
        assert _running(worker)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker)
    finally:  # never leave it behind, whatever failed
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


def test_scaling_efficiency_is_reported_against_the_single_replica_run(tmp_path, entry_point):
    single = record("jax", 100, 95, 105)  # 1280 examples/s
    parallel = record("jax", 40, 38, 42)  # 3200 examples/s on 4 replicas
    parallel.update(distribution="jax_data_parallel", num_replicas=4)
    single.update(distribution="none", num_replicas=1)
    summary = report.summarize([single, parallel])
    assert [s["backend"] for s in summary] == ["jax", "jax dp"]
    assert summary[1]["num_replicas"] == 4
    assert summary[1]["scaling_efficiency"] == pytest.approx(3200 / (4 * 1280))
    assert summary[0]["scaling_efficiency"] is None
    records.write_jsonl_atomic(str(tmp_path / "results.jsonl"), [single, parallel])
    status, out = report_here(entry_point, tmp_path / "results.jsonl")
    assert status == 0
    assert "scaling eff." in out and "62%" in out
    assert "global batch 128" in out
    csv_text = (tmp_path / "results.csv").read_text()
    assert "scaling_efficiency" in csv_text.splitlines()[0]


def test_distributed_runs_are_planned_and_launched_per_engine():
    options = compare.CompareOptions(backends=("jax", "torch"), distribute="data_parallel",
                                     simulate_devices=2)
    assert compare.plan_runs(options) == [("jax", "keras", "jax", False),
                                          ("jax", "keras", "jax", True),
                                          ("torch", "keras", "torch", False),
                                          ("torch", "keras", "torch", True)]
    assert compare.distribute_config("jax", options) == {"distribute": "data_parallel",
                                                         "simulate_devices": 2}
    # torch replicas are processes: no simulated devices, torchrun starts 2 workers.
    assert compare.distribute_config("torch", options) == {"distribute": "data_parallel"}
    command = compare.worker_command("py", "torch", True, options, "s.json", "r.json")
    assert command == ["py", "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "2", "-m", "kbench.bench.worker", "s.json", "r.json"]
    command = compare.worker_command("py", "torch", True, options, "s.json", "r.json",
                                     log_dir="out/logs/torch-dp-r0-torchrun")
    assert command[5:8] == ["2", "--log-dir", "out/logs/torch-dp-r0-torchrun"]
    assert compare.worker_command("py", "jax", True, options, "s", "r")[:3] == \
        ["py", "-m", "kbench.bench.worker"]


def test_simulate_devices_needs_distribute(tmp_path, entry_point_error):
    from kbench import cli

    status, err = entry_point_error(cli.main, ["compare", "--simulate-devices", "2", "--output",
                                               str(tmp_path / "x")])
    assert status == 2
    assert err == "error: --simulate-devices N goes with --distribute data_parallel\n"
    status, err = entry_point_error(cli.main, ["compare", "--simulate-devices", "1000",
                                               "--distribute", "data_parallel", "--output",
                                               str(tmp_path / "x")])
    assert status == 2 and "--simulate-devices 1000 is not allowed: it takes 1 to 64" in err
    # Before the one-replica runs, which would be timed for nothing: each dp run refused it
    status, err = entry_point_error(cli.main, ["compare", "--simulate-devices", "2",
                                               "--distribute", "data_parallel", "--batch-size",
                                               "33", "--output", str(tmp_path / "x")])
    assert (status, err) == (2, "error: --batch-size 33 does not divide among "
                                "--simulate-devices 2 replicas: use a multiple of 2\n")
    assert not (tmp_path / "x").exists()


def test_compiled_torch_twin_runs_with_jit_compile_on_and_is_its_reference():
    from kbench.bench import compare, worker

    eager = compare.plan_runs(compare.CompareOptions(backends=("torch",), reference="native"))
    assert [name for name, *_ in eager] == ["torch", "native-torch"]
    set_on = compare.plan_runs(compare.CompareOptions(  # --set jit_compile=on, as the flag
        backends=("torch",), reference="native", extra_config={"jit_compile": "on"}))
    assert [name for name, *_ in set_on] == ["torch", "native-torch", "native-torch-compiled"]
    compiled = compare.plan_runs(compare.CompareOptions(backends=("torch", "jax"),
                                                        reference="native", jit_compile="on"))
    assert compiled[2:] == [("native-jax", "native-jax", "jax", False),
                            ("native-torch", "native-torch", "torch", False),
                            ("native-torch-compiled", "native-torch-compiled", "torch", False)]
    assert worker.NATIVE_RUNNERS["native-torch-compiled"] == ("native_torch", {"compiled": True})
    assert set(worker.NATIVE_RUNNERS) == set(compare.NATIVE)
    # Keras-torch compiled is measured against the compiled twin, eager against the eager one.
    rows = [record("torch", 120, 118, 122), record("native-torch", 100, 98, 102),
            record("native-torch-compiled", 60, 59, 61), record("jax", 90, 89, 91),
            record("native-jax", 90, 89, 91)]
    for row in rows:
        row["config"] = {"jit_compile": "on"}
    ratios = {s["backend"]: s["vs_native"] for s in report.summarize(rows)}
    assert ratios["torch"] == pytest.approx(2.0) and ratios["jax"] == pytest.approx(1.0)
    rows[0]["config"] = {"jit_compile": "auto"}
    assert report.summarize(rows)[0]["vs_native"] == pytest.approx(1.2)
    # the torch-compiled variant: its twin is the compiled one, and only that one is run
    alone = compare.CompareOptions(backends=("torch-compiled",), reference="native")
    assert [name for name, *_ in compare.plan_runs(alone)] == ["torch-compiled",
                                                               "native-torch-compiled"]
    rows = [record("torch-compiled", 66, 65, 67), record("native-torch-compiled", 60, 59, 61)]
    rows[0]["config"] = {"jit_compile": "on"}
    assert report.summarize(rows)[0]["vs_native"] == pytest.approx(1.1)


def test_a_twin_without_the_model_is_left_out_of_the_plan(monkeypatch):
    # Every twin has every model today but resnet9, which none has; a framework's twin that
    # lacks a model the others have (as TF's lacked PreAct ResNet-18) is left out alone.
    resnet9 = compare.CompareOptions(backends=("jax", "torch"), reference="native",
                                     model="resnet9")
    runs = compare.plan_runs(resnet9)
    assert [name for name, *_ in runs] == ["jax", "torch"]
    assert compare.twins_of(runs, resnet9)[1] == {"native-jax", "native-torch"}
    preact = compare.CompareOptions(backends=("jax", "tensorflow", "torch"), reference="native",
                                    model="preact_resnet18")
    assert [name for name, *_ in compare.plan_runs(preact)][3:] == [
        "native-jax", "native-tensorflow", "native-torch"]
    monkeypatch.setitem(compare.TWIN_MODELS, "tensorflow", compare.CIFAR_RESNETS)
    options = compare.CompareOptions(backends=("jax", "tensorflow", "torch"), reference="native",
                                     model="preact_resnet18")
    runs = compare.plan_runs(options)
    assert [name for name, *_ in runs] == ["jax", "tensorflow", "torch", "native-jax",
                                           "native-torch"]
    assert compare.twins_of(runs, options)[1] == {"native-tensorflow"}  # compare says so
    said = []
    compare.say_left_out_twins(options, runs, said.append)
    assert said == ["[compare] native-tensorflow left out: its tensorflow twin has no model "
                    "preact_resnet18 (it covers resnet20, resnet32, resnet44, resnet56, "
                    "resnet110)"]
    # the model a run gets through --set counts as --model does
    by_set = compare.CompareOptions(backends=("tensorflow",), reference="native",
                                    extra_config={"model": "preact_resnet18"})
    assert [name for name, *_ in compare.plan_runs(by_set)] == ["tensorflow"]
    # so does the recipe's own default model (mnist_convnet's convnet: the twin started and
    # failed, exit 1), and a setting no twin implements (it failed the same way)
    for extra, recipe, why in (
            ({}, "mnist_convnet", "its torch twin has no model convnet (it covers resnet20, "),
            ({"optimizer": "adam"}, "cifar_resnet", "its torch twin implements SGD only, not "
                                                    "'adam' (use --set optimizer=sgd to compare "
                                                    "against it)"),
            ({"clip_norm": 1.0}, "cifar_resnet", "its torch twin implements no gradient "
                                                 "clipping (clip_norm 1.0) (use --set "
                                                 "clip_norm=0 to compare against it)")):
        options = compare.CompareOptions(backends=("torch",), reference="native", recipe=recipe,
                                         extra_config=extra)
        runs = compare.plan_runs(options)
        assert [name for name, *_ in runs] == ["torch"], extra
        said = []
        compare.say_left_out_twins(options, runs, said.append)
        assert len(said) == 1 and said[0].startswith(f"[compare] native-torch left out: {why}")
    # A sweep's plan keeps a twin that some point can train, judged at the points, not at the
    # recipe's default of the swept field (a default model without a twin dropped them all).
    defaults = compare.recipe_defaults("cifar_resnet")
    with monkeypatch.context() as patched:
        patched.setattr(compare, "recipe_defaults",
                        lambda recipe: {**defaults, "model": "convnet"})
        swept = compare.CompareOptions(backends=("torch",), reference="native",
                                       sweep=("model", ["resnet20", "resnet32"]))
        assert [name for name, *_ in compare.plan_runs(swept)] == ["torch", "native-torch"]
    # A recipe whose images are not CIFAR-shaped: the twin refuses in its own process
    # rather than time another network (mnist_convnet's synthetic set is 28x28x1; the twin
    # trained 32x32x3 and compare said "vs native" of the two).
    from kbench.bench import worker
    from kbench.errors import KbenchError
    from kbench.recipe import load_recipe

    for name, refused in (("cifar_resnet", False), ("mnist_convnet", True)):
        recipe = load_recipe(name)
        config = recipe.Config(dataset="synthetic", model="resnet20", optimizer="sgd")
        if not refused:
            worker.check_twin_trains_the_runs_images(recipe, config)
            continue
        with pytest.raises(KbenchError, match=(
                r"^the native twin trains synthetic images of shape \(32, 32, 3\) in 10 "
                r"classes, and this recipe's model takes \(28, 28, 1\) in 10 classes: "
                r"compare with --recipe cifar_resnet, or --reference none$")):
            worker.check_twin_trains_the_runs_images(recipe, config)
    by_optimizer = compare.CompareOptions(backends=("torch",), reference="native",
                                          sweep=("optimizer", ["sgd", "adam"]))
    runs = compare.plan_runs(by_optimizer)
    assert [name for name, *_ in runs] == ["torch", "native-torch"]
    at_adam = dataclasses.replace(by_optimizer, extra_config={"optimizer": "adam"})
    assert compare.twins_of(runs, at_adam)[1] == {"native-torch"}
    # a recipe file of the user's with no model setting at all
    monkeypatch.setattr(compare, "recipe_defaults", lambda recipe: {"dataset": "synthetic"})
    options = compare.CompareOptions(backends=("jax",), reference="native", recipe="mine.py")
    assert compare.why_left_out("native-jax", options) == (
        "its jax twin trains a model it implements (resnet20, resnet32, resnet44, resnet56, "
        "resnet110, preact_resnet18), and the recipe names none")

FAILING_RECIPE = '''
import dataclasses

from kbench.config import TrainConfig


@dataclasses.dataclass
class Config(TrainConfig):
    dataset: str = "synthetic"
    model: str = "convnet"


def build_model(config):
    raise NotImplementedError


def build_datasets(config):
    raise NotImplementedError


def main(config, model=None, datasets=None, callbacks=()):
    # As Keras words a layer's error: the message, then the call's arguments below it.
    raise ValueError("the layer got a bad shape\\n\\nArguments received by Dense.call():\\n"
                     "  \\u2022 kwargs=<class 'inspect._empty'>")
'''


def test_a_failed_run_says_its_exception_and_log_and_the_title_stays_true(tmp_path):
    recipe = tmp_path / "failing.py"
    recipe.write_text(FAILING_RECIPE)
    out = tmp_path / "cmp"
    result = kbench("compare", "--recipe", str(recipe), "--backends", "torch", "--steps", "2",
                    "--output", str(out))
    assert result.returncode == 1
    log = out / "logs" / "torch-r0.log"
    line = ("[compare] torch: failed: ValueError: the layer got a bad shape "
            f"(log: {out}/logs/torch-r0.log)")
    assert line in result.stdout, result.stdout
    row = load(out)[0]
    assert row["error"].startswith("ValueError: the layer got a bad shape\n")
    assert "Traceback (most recent call last)" in log.read_text()  # the whole story stays
    title = ("failing.py: every run failed (the recipe's model asked) on synthetic, the recipe's "
             "batch size, float32")
    assert title in " ".join(result.stdout.split()), result.stdout


def test_a_runs_error_names_the_recipe_flags_as_compare_takes_them(tmp_path, monkeypatch,
                                                                   capsys):
    """A run's KbenchError in the recipe's words said "lower --lr, add --clip-norm", flags
    compare refuses: the worker words it as --set, as compare's own checks do."""
    from kbench.bench import worker
    from kbench.errors import KbenchError

    def diverge(recipe, config, spec):
        raise KbenchError("training diverged: loss is nan at epoch 0, step 2; lower --lr, "
                          "add --clip-norm")

    monkeypatch.setattr(worker, "run_keras", diverge)
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"recipe": "cifar_resnet", "runner": "keras", "config": {},
                                "steps": 1, "warmup_steps": 0}))
    assert worker.main([str(spec), str(result)]) == 2
    said = ("training diverged: loss is nan at epoch 0, step 2; lower --set lr, add --set "
            "clip_norm")
    assert json.loads(result.read_text())["error"] == f"KbenchError: {said}"
    assert capsys.readouterr().err.strip() == f"error: {said}"


def test_titles_name_the_model_built_or_what_was_asked():
    built = record("jax", 100, 95, 105)
    built.update(model="my_tiny", params=650, recipe="/home/me/my_recipe.py")
    twin = record("native-jax", 80, 78, 82)
    twin.update(model="resnet20", params=None)
    assert report.describe([twin, built]).startswith(
        "my_recipe.py: my_tiny (650 params) on synthetic, batch 128, float32")
    failed = dict.fromkeys(records.FIELDS)
    failed.update(backend="torch", status="failed", recipe="mnist_convnet", model=None,
                  dataset="digits", batch_size=None, dtype_policy="float32")
    assert report.describe([failed]) == ("mnist_convnet: every run failed (the recipe's model "
                                         "asked) on digits, the recipe's batch size, float32")
    failed.update(model="convnet", batch_size=32)
    assert report.describe([failed]) == ("mnist_convnet: every run failed (convnet asked) on "
                                         "digits, batch 32, float32")


def test_a_record_names_the_model_its_run_built():
    row = dict.fromkeys(records.FIELDS)
    row.update(backend="jax", batch_size=16, config={"model": "convnet", "batch_size": 16})
    records.fill_measurements(row, {"model": "my_tiny", "params": 650, "step_times": [0.01] * 3,
                                    "config": {"model": "convnet", "batch_size": 16}})
    assert row["model"] == "my_tiny" and row["params"] == 650
    assert row["config"]["model"] == "convnet"


def test_a_keras_record_says_the_layout_and_compute_dtype_its_model_used():
    """memory_format and autocast_dtype of a Keras row, as the twins report theirs: the
    layers' data_format (None for a text model) and the compute dtype under a mixed policy."""
    import keras

    from kbench.bench import worker
    from kbench.models import get_model

    try:
        for policy, compute in (("float32", None), ("mixed_bfloat16", "bfloat16"),
                                ("mixed_float16", "float16")):
            keras.config.set_dtype_policy(policy)
            model = get_model("resnet20")
            assert worker.layer_layout(model) == "channels_last"
            assert worker.mixed_compute_dtype(model) == compute
        text = get_model("text_lstm", input_shape=(16,), vocab_size=50)
        assert worker.layer_layout(text) is None
    finally:
        keras.config.set_dtype_policy("float32")


def test_a_compare_stops_when_two_backends_are_refused_alike():
    """Data that is not there (or a setting the recipe refuses) fails every run the same
    way: two different runs refused alike, and none ok, stop the compare."""
    def refused(backend, text="KbenchError: MNIST not found in /data: pass --data-dir DIR"):
        return {**dict.fromkeys(records.FIELDS), "backend": backend, "status": "failed",
                "error": text + "\nmore"}

    assert compare.refused_alike([refused("jax")]) is None  # one backend says nothing yet
    assert compare.refused_alike([refused("jax"), refused("jax")]) is None  # a repeat neither
    assert compare.refused_alike([refused("torch"), refused("torch-stock"),  # one framework
                                  refused("native-torch")]) is None
    assert compare.refused_alike([refused("jax"), refused("torch")]) == (
        "every run was refused alike: MNIST not found in /data: pass --data-dir DIR")
    assert compare.refused_alike([refused("jax"), refused("torch", "KbenchError: other")]) is None
    assert compare.refused_alike([refused("jax"), refused("torch", "ValueError: bug")]) is None
    assert compare.refused_alike([record("jax", 1, 1, 1), refused("torch"),
                                  refused("native-torch")]) is None  # one backend ran


def test_other_work_on_the_machine_is_measured_and_flagged(capsys):
    """A run that shared the CPU with other processes measured them too: its record says how
    much (other_cpu_share), and the table flags the row."""
    import time

    from kbench.bench import machine_load

    others = machine_load.OtherLoad()
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\n"
                             "while time.time() < end: pass"])
    time.sleep(1.5)  # this process idles while the other one spins a core
    share = others.share()
    busy.wait()
    assert share > 0.3 / len(os.sched_getaffinity(0)), share  # most of one core, of ours
    loaded = [dict(record("torch", 100, 95, 105), other_cpu_share=0.6),
              dict(record("jax", 100, 95, 105), other_cpu_share=0.01)]
    report.print_load_warnings(report.summarize(loaded), report.make_console())
    out = capsys.readouterr().out
    assert "torch: other processes took 60% of this machine's CPU" in out and "jax:" not in out


def test_a_worker_that_never_started_says_the_last_line_of_its_log():
    """An interpreter without kbench never runs the worker: no exception line, so the error
    is the interpreter's own last word (else: the log's last exception line)."""
    from kbench.bench.compare import _explain

    tail = ("/usr/bin/python3: Error while finding module specification for "
            "'kbench.bench.worker' (ModuleNotFoundError: No module named 'kbench')")
    assert _explain(1, tail).splitlines()[0] == f"worker exited with status 1: {tail}"
    tail = "Traceback (most recent call last):\n  ...\nImportError: no tf\nsome exit chatter"
    assert _explain(1, tail).splitlines()[0] == "worker exited with status 1: ImportError: no tf"
    assert _explain(0, "").splitlines()[0] == "worker exited with status 0"
    assert _explain(0, "epoch 1/1 done").splitlines()[0] == "worker exited with status 0"
