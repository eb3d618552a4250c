"""The suite runs once per backend (`make test`): KERAS_BACKEND is fixed for a whole pytest run.

Tests marked `backend_independent` exercise no backend-specific code and run only in the
tensorflow pass, so the three passes do not repeat them.
"""

import os
import sys

import pytest

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
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
