"""The `kbench` command and `import kbench` as a newcomer meets them: instant help, version and
usage errors (no framework loaded), exit statuses, help with defaults, quiet TensorFlow."""

import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO
from kbench.backend import nvidia_gpu_present

FRAMEWORKS = ("keras", "tensorflow", "jax", "torch")

# Runs `kbench ARGV` through kbench.cli.main in a fresh interpreter and reports, on stdout's
# last line, the exit status and which frameworks were imported by then.
PROBE = """
import json, sys
from kbench import cli
try:
    cli.main(sys.argv[1:])
    status = 0
except SystemExit as exc:
    status = exc.code
sys.stdout.flush()
print(json.dumps({"status": status, "loaded": [m for m in %r if m in sys.modules]}))
""" % (FRAMEWORKS,)


def kbench_probe(*argv, env=None):
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=full_env,
                         capture_output=True, text=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["status"], result["loaded"], out


@pytest.mark.backend_independent
@pytest.mark.parametrize("argv, status", [
    ([], 2),
    (["--help"], 0),
    (["--version"], 0),
    (["compare", "--help"], 0),
    (["report", "--help"], 0),
    (["evaluate", "--help"], 0),
    (["export", "--help"], 0),
    (["predict", "--help"], 0),
    (["env", "--help"], 0),
    (["compare", "--backends", "nope"], 2),
    (["compare", "--steps", "0"], 2),
    (["compare", "--steps", "x"], 2),
    (["compare", "--target-accuracy", "1.5", "--backends", "jax"], 2),
    (["compare", "--recipe", "no_such_recipe"], 2),
    (["compare", "--set", "epochs=3"], 2),
    (["compare", "--epochs", "0"], 2),  # would time --steps instead
    (["compare", "--epochs", "1", "--steps", "3"], 2),  # --steps went unheeded
    # the twins are judged on the recipe's settings (Keras) only after the cheap checks
    (["compare", "--reference", "native", "--backends", "torch", "--target-accuracy", "1.5"],
     2),
    (["compare", "--reference", "native", "--max-batch", "--max-batch-tries", "1"], 2),
    (["compare", "--max-batch", "--epochs", "1"], 2),
    (["compare", "--recipe", "./README.md"], 2),  # not a Python file
    (["report", "/no/such/results.jsonl"], 2),
    (["evaluate", "--test-examples", "0", "m.keras"], 2),
    (["evaluate", "/no/such/model.keras"], 2),
    (["evaluate", "--batch-size", "abc", "m.keras"], 2),
    (["export", "README.md", "--format", "onnx", "--output", "/tmp/x.onnx", "--tolerance",
      "nan"], 2),
    (["export", "/no/such/model.keras", "--format", "onnx", "--output", "/tmp/x.onnx"], 2),
    (["predict", "/no/such/model.keras", "digit.png"], 2),
])
def test_help_version_and_usage_errors_load_no_framework(argv, status):
    got, loaded, out = kbench_probe(*argv)
    assert got == status, out.stderr
    assert loaded == [], f"kbench {' '.join(argv)} imported {loaded}"
    if status == 2:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr


@pytest.mark.backend_independent
def test_version():
    _, _, out = kbench_probe("--version")
    from kbench import __version__

    assert out.stdout.splitlines()[0] == f"kbench {__version__}"


@pytest.mark.backend_independent
def test_bad_keras_backend_is_one_line_and_status_2(run_python):
    for args in (["-m", "kbench.cli", "env"], ["-c", "import kbench"],
                 ["recipes/mnist_convnet.py", "--epochs", "1"]):
        out = run_python(*args, backend="mxnet", timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.strip().splitlines() == [
            "error: unknown KERAS_BACKEND='mxnet'; use one of: jax, tensorflow, torch "
            "(e.g. KERAS_BACKEND=jax)"], args


@pytest.mark.backend_independent
def test_the_backend_is_the_one_keras_will_run(tmp_path, monkeypatch):
    """KERAS_BACKEND (spaces around it are dropped, also for Keras), else keras.json's, as
    Keras decides: a bad name from either is one line naming where it came from."""
    from kbench.backend import requested_backend
    from kbench.errors import KbenchError

    monkeypatch.setenv("KERAS_BACKEND", " torch ")
    assert requested_backend() == "torch" and os.environ["KERAS_BACKEND"] == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert requested_backend() == "tensorflow"  # no keras.json: Keras' default
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert requested_backend() == "jax"
    monkeypatch.setenv("KERAS_BACKEND", "")  # empty: Keras reads keras.json, and so do we
    assert requested_backend() == "jax"
    (tmp_path / "keras.json").write_text('{"backend": "garbage"}')
    with pytest.raises(KbenchError, match=f"unknown backend 'garbage' in {tmp_path}/keras.json"):
        requested_backend()


@pytest.mark.backend_independent
def test_every_flag_of_every_command_has_help_and_shows_its_default():
    from kbench.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in verbs.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"kbench {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help text"
            shown = formatter._get_help_string(action)
            if action.option_strings and action.default not in (None, False):
                assert "default" in shown, f"{where} hides its default {action.default!r}"
    compare_help = verbs.choices["compare"].format_help()
    for flag, default in (("--repeats", "1"), ("--timeout", "900.0"), ("--warmup-steps", "3"),
                          ("--jit-compile", "auto"), ("--dtype-policy", "float32")):
        text = compare_help.split(flag, 2)[2] if compare_help.count(flag) > 1 else compare_help
        assert f"(default: {default})" in " ".join(text.split()), flag


def test_import_kbench_is_light_and_keras_gets_kbench_layers(run_pythons):
    """`import kbench` loads no framework; importing Keras (after or before kbench) registers
    kbench's layers, so load_model reads kbench models."""
    check = ("import keras, sys; "
             "assert keras.saving.get_registered_object('kbench>ShortcutPad') is not None")
    programs = ["import kbench, sys; "
                f"assert not [m for m in {FRAMEWORKS!r} if m in sys.modules]; " + check,
                "import keras; import kbench; " + check,
                "import kbench; assert kbench.models.get_model"]
    runs = run_pythons(*[(["-c", program], dict(timeout=120)) for program in programs])
    for program, out in zip(programs, runs):
        assert out.returncode == 0, (program, out.stderr)


@pytest.mark.backend_independent
def test_tensorflow_start_up_lines_are_filtered_unless_asked_for(run_pythons):
    """TensorFlow's absl start-up lines ('I0000 ... port.cc:153] oneDNN ...') go, unless
    the user set TF_CPP_MIN_LOG_LEVEL or KBENCH_VERBOSE; warnings from Python stay. Quiet both
    where Keras imports TensorFlow (its backend) and where the user imports it after Keras
    (under jax, as under torch: Keras then imports no TensorFlow)."""
    code = ("import importlib.util, warnings, kbench; "
            "importlib.util.find_spec('tensorflow'); "  # asks the finders, imports nothing
            "import keras, tensorflow; tensorflow.constant(1); "  # an op: TensorFlow's CUDA probe
            "warnings.warn('a warning the user can act on')")
    clean = {"TF_CPP_MIN_LOG_LEVEL": None, "KBENCH_SET_TF_CPP_MIN_LOG_LEVEL": None,
             "KBENCH_VERBOSE": None, "PYTHONPATH": REPO}
    asked = ({"KBENCH_VERBOSE": "1"}, {"TF_CPP_MIN_LOG_LEVEL": "0"})
    quiet_tf, quiet_jax, *loud = run_pythons(
        *[(["-c", code], dict(env=clean, backend=backend, timeout=120))
          for backend in ("tensorflow", "jax")],
        *[(["-c", code], dict(env={**clean, **extra}, timeout=120)) for extra in asked])
    for quiet in (quiet_tf, quiet_jax):
        assert quiet.returncode == 0, quiet.stderr
        assert "a warning the user can act on" in quiet.stderr
        assert "I0000" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr
        if not nvidia_gpu_present():  # a CUDA build's "failed call to cuInit" error
            assert "cuInit" not in quiet.stderr, quiet.stderr
    for extra, run in zip(asked, loud):
        assert "absl::InitializeLog" in run.stderr, extra  # TensorFlow's own start-up lines


@pytest.mark.backend_independent
def test_filter_keeps_errors_and_unknown_lines():
    from kbench.imports import filter_startup_lines

    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n"
            "I0000 00:00:1796399522.044379    2654 port.cc:153] oneDNN custom operations\n"
            "W0000 00:00:1796399522.044379    2654 x.cc:1] a warning\n"
            "E0000 00:00:1796399522.045199    2654 cuda.cc:31] an error\n"
            "UserWarning: something to do\n")
    assert filter_startup_lines(text, 2) == ("E0000 00:00:1796399522.045199    2654 cuda.cc:31] "
                                             "an error\nUserWarning: something to do\n")
    assert "W0000" in filter_startup_lines(text, 1)
    cuinit = ("E0000 00:00:1796559432.986220   28414 cuda_platform.cc:52] failed call to cuInit: "
              "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
    assert filter_startup_lines(cuinit, 2) == cuinit  # a GPU TensorFlow cannot use: kept
    assert filter_startup_lines(cuinit + text, 2, gpu_present=False) == filter_startup_lines(
        text, 2)


@pytest.mark.backend_independent
def test_an_interpreter_that_is_not_there_is_one_line_for_compare(tmp_path):
    from kbench.bench.cli import _python_map
    from kbench.errors import KbenchError

    assert _python_map([f"jax={sys.executable}"]) == {"jax": sys.executable}
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    for path in ("/no/such/python", str(not_executable)):
        with pytest.raises(KbenchError, match=f"--python jax={path}: no executable interpreter"):
            _python_map([f"jax={path}"])


@pytest.mark.backend_independent
def test_compare_refuses_up_front_what_it_would_drop_or_fail_on_and_names_the_help(tmp_path):
    """An interpreter without kbench (else every run fails), a second --sweep or a second
    --python for a backend (else the last wins without a word): one line each, exit status 2,
    before any run. A command's unknown argument points at that command's help, which lists
    its flags (kbench --help does not)."""
    from kbench.bench.cli import _python_map

    # An interpreter that starts but cannot import kbench: no site-packages, no PYTHONPATH and
    # no working folder on its path
    no_kbench = tmp_path / "python"
    no_kbench.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S "$@"\n')
    no_kbench.chmod(0o755)
    cases = [
        (["compare", "--python", f"torch={no_kbench}"],
         f"error: --python torch={no_kbench}: that interpreter cannot import kbench; install "
         f"kbench there ({no_kbench} -m pip install -e {REPO}) or point --python at one that "
         "has it"),
        (["compare", "--python", "torch=/a/python", "--python", "torch=/b/python"],
         "error: --python torch=/a/python and --python torch=/b/python disagree: give one"),
        (["compare", "--sweep", "batch_size=8,16", "--sweep", "lr=0.1,0.2"],
         "error: --sweep batch_size=8,16 and --sweep lr=0.1,0.2: a compare sweeps one field; "
         "give one --sweep FIELD=V1,V2,..."),
        (["compare", "--data-dir", "/tmp"],
         "error: unrecognized arguments: --data-dir /tmp (see kbench compare --help)"),
        (["report", str(tmp_path), "--bogus"],
         "error: unrecognized arguments: --bogus (see kbench report --help)"),
        (["--bogus", "env"], "error: unrecognized arguments: --bogus (see kbench --help)"),
    ]
    for argv, message in cases:
        status, loaded, out = kbench_probe(*argv)
        assert (status, out.stderr) == (2, message + "\n"), argv
        assert loaded == [], argv
    # the same interpreter twice loses nothing, as the same --set twice
    assert _python_map([f"jax={sys.executable}"] * 2) == {"jax": sys.executable}
