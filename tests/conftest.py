"""The suite runs once per backend (`make test`): KERAS_BACKEND is fixed for a whole pytest run.

Tests marked `backend_independent` exercise no backend-specific code and run only in the
tensorflow pass, so the three passes do not repeat them.
"""

import contextlib
import getpass
import os
import re
import shutil
import sys
import tempfile

import pytest

# One temp folder for this test run, made here in the first process, used by it, the xdist
# workers and every process the tests start (as TMPDIR), and removed at the end of the run. A
# process the tests kill with SIGKILL cannot remove its own temp files (TensorFlow's autograph
# writes one per converted function and removes it at exit), and tfds.testing.mock_data leaves
# an empty mkdtemp folder per builder: without this each `make test` left some 20 of them in
# /tmp. pytest's tmp_path folders stay where pytest keeps them (PYTEST_DEBUG_TEMPROOT: the
# last runs' folders, for a look after a failure).
# torch.compile's inductor keeps its compiled kernels in the temp folder too (torch's
# default_cache_dir: <temp>/torchinductor_<user>). It stays there, warm from one run to the
# next as before, unless you set it: cold, it cost the torch pass 40 s (docs/development.md).
_RUN_TMP_MADE_HERE = None
if not os.environ.get("KBENCH_TESTS_TMPDIR"):
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    _user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())  # as torch spells it
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"torchinductor_{_user}"))
    _RUN_TMP_MADE_HERE = tempfile.mkdtemp(prefix="kbench-tests-")
    os.environ["KBENCH_TESTS_TMPDIR"] = os.environ["TMPDIR"] = _RUN_TMP_MADE_HERE
    tempfile.tempdir = _RUN_TMP_MADE_HERE  # this process's own temp files too

# JAX's persistent compilation cache, for this test run only, in the run's temp folder. Tests,
# compare workers and twins compile the same small models at the same shapes again and again;
# a hit loads the executable instead of compiling it (the same program, so the same numbers).
# Measured on the 2-core machine: the jax pass took 479 CPU-s instead of 589. kbench itself
# never turns the cache on: compare's compile_s is the compile a user's first run pays. A
# JAX_COMPILATION_CACHE_DIR of your own is used as it is. (JAX writes an entry without a lock
# or a rename: one cut short by a kill -9 test is read as corrupt, and JAX warns and compiles
# again; the result is the same.)
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["KBENCH_TESTS_TMPDIR"], "jax-cache")
    os.makedirs(os.environ["JAX_COMPILATION_CACHE_DIR"], exist_ok=True)
    # JAX's default (1 s) would leave out most of the suite's compiles: tiny models, tiny steps.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from kbench.backend import requested_backend  # noqa: E402  (after the cache settings)

# The backend Keras will run, as Keras picks it: an empty or unset KERAS_BACKEND means
# keras.json's (else tensorflow), and " torch" means torch.
BACKEND = requested_backend()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_unconfigure(config):
    if _RUN_TMP_MADE_HERE:  # the process that made it: every worker has finished
        shutil.rmtree(_RUN_TMP_MADE_HERE, ignore_errors=True)


def pytest_report_header(config):
    return f"KERAS_BACKEND={BACKEND}"


# CPU-seconds each test file took in its pass (own and child processes, 2-core machine,
# 2026-12-06, at 702c891; the jax pass's with the JAX cache above; files under 5 s left out).
# Used only to order the files, heaviest first: `make test` hands whole files to its two
# workers (`--dist loadfile --no-loadscope-reorder`), and a heavy file handed out last keeps one
# worker busy while the other has finished. Heaviest first, the time one worker sat idle at the end
# of a pass went from 11/36/27 s (jax/tensorflow/torch) to 4/1/1-9 s. A stale figure costs
# seconds, never a result.
FILE_CPU_SECONDS = {
    "jax": {"test_native.py": 109, "test_training.py": 95, "test_distribute.py": 71,
            "test_finetune.py": 44, "test_recipe.py": 26, "test_export.py": 26,
            "test_imdb_transformer.py": 25, "test_target.py": 22, "test_models.py": 19,
            "test_evaluate.py": 16, "test_mnist_convnet.py": 13, "test_cli.py": 10},
    "tensorflow": {"test_compare.py": 186, "test_training.py": 99, "test_portability.py": 86,
                   "test_native.py": 77, "test_target.py": 58, "test_distribute.py": 55,
                   "test_cli.py": 47, "test_finetune.py": 39, "test_sweep.py": 34,
                   "test_standalone.py": 28, "test_input_wait.py": 23,
                   "test_mnist_convnet.py": 22, "test_imdb_transformer.py": 18,
                   "test_recipe.py": 18, "test_data_more.py": 14, "test_models.py": 14,
                   "test_export.py": 14, "test_evaluate.py": 12, "test_data.py": 7,
                   "test_config.py": 7},
    "torch": {"test_distribute.py": 112, "test_torch_compile.py": 78, "test_training.py": 75,
              "test_gpu_rehearsal.py": 64, "test_native.py": 53, "test_export.py": 29,
              "test_cli.py": 23, "test_finetune.py": 15, "test_fast_path.py": 15,
              "test_recipe.py": 13, "test_target.py": 7, "test_mnist_convnet.py": 7,
              "test_imdb_transformer.py": 7, "test_evaluate.py": 6},
}


def pytest_collection_modifyitems(config, items):
    seconds = FILE_CPU_SECONDS.get(BACKEND, {})
    # A stable sort: each file's tests keep their order, and unlisted files theirs.
    items.sort(key=lambda item: -seconds.get(item.path.name, 0))
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


def fake_python(path, body):
    """An 'interpreter' that behaves like a broken or hanging backend environment: its runs do
    `body` (a shell script). compare's check before any run (`PATH -c ...`: can it import
    kbench?) goes to this interpreter, so the environment looks like one with kbench in it
    whose framework fails or hangs once a run starts."""
    import shlex
    import stat

    path.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {shlex.quote(sys.executable)} "$@"\n'
                    + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


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
