"""`make gpu-check --rehearse` through the real compare (tools/gpu_check.py; the rest of its
tests, with stand-ins for the GPU machine, are in test_gpu_check.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import BACKEND, REPO

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "tools",
                                                                        "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

# Its runs set their own backends, so it runs once: in the torch pass, the shortest
pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="runs once, in the torch pass")


def test_a_rehearsal_with_the_real_compare_records_every_run_ok(tmp_path):
    """The rehearsal as a session runs it before renting a GPU, smallest: jax and its twin
    through the real compare, pipeline and tables (about 40 s here)."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--rehearse",
         "--backends", "jax", "--cases", "resnet20:float32", "--batch-size", "resnet20=4",
         "--steps", "2", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu-check: jax: sees cpu, jax " in done.stdout
    records = [json.loads(line) for line in (out / "gpu-check.jsonl").open()]
    assert sorted((r["backend"], r["status"]) for r in records) == [
        ("jax", "ok"), ("native-jax", "ok")]
    assert all(r["batch_size"] == 4 and r["steps_timed"] == 2 for r in records)
    # each run evaluated the rehearsal's small test split (the twin's too)
    assert all(r["config"]["test_examples"] == 68 for r in records)
    table = (out / "gpu-check.md").read_text()
    assert table.startswith("kbench gpu-check REHEARSAL")
    # in the table, CPU rows are as they should be: ok, the Keras row over its twin, no MFU
    keras_row = next(line for line in table.splitlines()
                     if line.startswith("| resnet20 | float32 | jax |"))
    cells = [c.strip() for c in keras_row.strip("|").split("|")]
    columns = dict(zip(gpu_check.COLUMNS, cells))
    assert (columns["batch"], columns["status"], columns["MFU"]) == ("4", "ok", "-")
    assert columns["vs native"].endswith("x")
    assert "| native-jax |" in table
    assert "| 4 | " in table.split("Input pipeline alone")[1]  # its rate at the batch size
