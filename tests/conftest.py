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
    """Run `python ARGS...` from the repo root in a fresh interpreter; returns CompletedProcess."""
    import subprocess

    def run(*args, env=None, timeout=300, backend=BACKEND):
        full_env = {**os.environ, "KERAS_BACKEND": backend, **(env or {})}
        return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


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
