"""The suite runs once per backend (`make test`): KERAS_BACKEND is fixed for a whole pytest run.

Tests marked `backend_independent` exercise no backend-specific code and run only in the
tensorflow pass, so the three passes do not repeat them.
"""

import contextlib
import os
import sys

import pytest

from kbench.backend import requested_backend

# The backend Keras will run, as Keras picks it: an empty or unset KERAS_BACKEND means
# keras.json's (else tensorflow), and " torch" means torch.
BACKEND = requested_backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config):
    return f"KERAS_BACKEND={BACKEND}"


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason="backend-independent: runs in the tensorflow pass")
    for item in items:
        if "backend_independent" in item.keywords:
            item.add_marker(skip)


def _keras_default_dtype_policy():
    import keras

    keras.config.set_dtype_policy("float32")


# Keras' dtype policy is process-wide, and kbench.train.setup_run sets it for every in-process
# run and native twin. Under pytest-xdist a worker runs whichever test files it is handed, so a
# policy left by one file (a mixed_bfloat16 twin) would build the next file's models in
# mixed precision, and only on some runs. Every module and every test starts from Keras'
# default. (Module scope: autouse fixtures come first within a scope, so this runs before a
# module's own fixtures build their models. A policy a module-scoped fixture sets is thus seen
# by the first test that uses it only: set it in the test, or build the model in the fixture.)
@pytest.fixture(autouse=True, scope="module")
def keras_default_dtype_policy_per_module():
    _keras_default_dtype_policy()
    yield
    _keras_default_dtype_policy()


@pytest.fixture(autouse=True)
def keras_default_dtype_policy_after_each_test():
    yield
    _keras_default_dtype_policy()


@pytest.fixture
def run_python():
    """Run `python ARGS...` from the repo root in a fresh interpreter; returns CompletedProcess.
    `env` adds to this process' environment; a variable set to None there is left out."""
    import subprocess

    def run(*args, env=None, timeout=300, backend=BACKEND):
        full_env = {**os.environ, "KERAS_BACKEND": backend, **(env or {})}
        full_env = {name: value for name, value in full_env.items() if value is not None}
        return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def run_pythons(run_python):
    """Run several independent `python ARGS...` at once, each in its own fresh interpreter;
    takes (args, options) pairs (options: run_python's keywords) and returns their
    CompletedProcesses in order. Such runs spend most of their time importing frameworks on
    one core each: side by side they finish in about the time of the longest, not the sum."""
    from concurrent.futures import ThreadPoolExecutor

    def run_all(*jobs):
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(run_python, *args, **options) for args, options in jobs]
            return [future.result() for future in futures]

    return run_all


@pytest.fixture
def entry_point_error(capsys):
    """Call an entry point (a recipe's run_recipe, kbench.cli.main) in this interpreter with
    bad input; returns (exit status, stderr). Cheaper than a fresh interpreter per case, and
    it runs the same code: exit_on_error prints the one line and exits."""

    def call(fn, *args, **kwargs):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            fn(*args, **kwargs)
        return exit.value.code, capsys.readouterr().err

    return call


@pytest.fixture
def entry_point(capsys):
    """Call an entry point (kbench.cli.main, ...) in this interpreter; returns (exit status,
    stdout, stderr)."""

    def call(fn, *args, **kwargs):
        capsys.readouterr()
        try:
            fn(*args, **kwargs)
            status = 0
        except SystemExit as exit:
            status = exit.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call


@pytest.fixture
def pinned_memory(monkeypatch):
    """Pinned host memory stood in for by ordinary tensors (pinning needs CUDA, this machine
    has none): the list of every pinned buffer kbench.torch_transfers made, as filled."""
    import torch

    from kbench import torch_transfers

    made = []

    def stand_in(shape, dtype):
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    monkeypatch.setattr(torch_transfers, "_pinned_empty", stand_in)
    return made


def fake_compare_interpreter(path, record, stopped_marker=None, compare_fails=False):
    """An 'interpreter' for the tools that run `kbench compare` as a child (gpu-check,
    overhead), standing in for the framework: it says "NVIDIA H200" to a framework probe
    (`-c`), prints one input-rate record to `-m kbench.bench.input_rate`, and plays a compare:
    writes its arguments (`argv`), the GPU-hiding variables it got (`env`), a worker's
    log (`logs/jax-r0.log`) and `record` as a finished run into its --output folder (its
    last argument), then exits 0, or, with stopped_marker, waits for SIGTERM, which it
    writes into that file before it exits 143 as compare does. With compare_fails, the
    compare exits 3 having recorded nothing."""
    import json
    import shlex
    import stat

    then = "exit 0"
    if stopped_marker:
        then = (f"sleep 300 & pid=$!\n"
                f"trap 'kill $pid; echo SIGTERM > {stopped_marker}; exit 143' TERM\n"
                f"echo running > {stopped_marker}.running\n"
                "wait")
    rate = {"batch_size": 1024, "ms_per_batch": 12.5, "ms_per_batch_p90": 14.0,
            "batches_per_sec": 80.0, "examples_per_sec": 81920.0}
    path.write_text(f"""#!/bin/bash
if [ "$1" = -c ]; then echo "NVIDIA H200"; exit 0; fi
if [ "$2" = kbench.bench.input_rate ]; then echo {shlex.quote(json.dumps(rate))}; exit 0; fi
for arg; do out=$arg; done
mkdir -p "$out/logs"
echo "$@" > "$out/argv"
echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-unset}}" \
     "JAX_PLATFORMS=${{JAX_PLATFORMS-unset}}" > "$out/env"
{"echo 'compare: cannot start' >&2; exit 3" if compare_fails else ""}
echo "a worker's log" > "$out/logs/jax-r0.log"
echo {shlex.quote(json.dumps(record))} > "$out/results.jsonl"
{then}
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def wait_for(path, seconds=60):
    """Until the file `path` exists (a fake's sign that it has got where a test wants it)."""
    import time

    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path.name} never appeared"


@contextlib.contextmanager
def in_own_session(command, **popen_kwargs):
    """Popen(command) (text stdout/stderr pipes) in a session of its own, so that a test can
    signal it alone; killed with everything it started when the block ends, so a failed
    assertion leaves no tool, fake compare or `sleep` running."""
    import signal
    import subprocess

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def sigterm_to_the_tool_alone(command, stopped_marker, **popen_kwargs):
    """Start a tool that runs its compare through fake_compare_interpreter(..., stopped_marker),
    send SIGTERM to the tool alone (not its group: a scheduler's stop) once the compare runs,
    and check that the tool passed it on and stopped as compare does: exit 143, its last line
    "stopped by SIGTERM", no traceback. Returns (stdout, stderr)."""
    import signal

    with in_own_session(command, **popen_kwargs) as proc:
        wait_for(stopped_marker.parent / f"{stopped_marker.name}.running")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stopped_marker.read_text().strip() == "SIGTERM"  # the compare got it
    assert stderr.strip().splitlines()[-1] == "stopped by SIGTERM" and "Traceback" not in stderr
    return stdout, stderr
