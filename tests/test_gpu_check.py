"""`make gpu-check` (tools/gpu_check.py): what can be checked without a GPU. Its real run is
on a GPU machine (docs/compare.md, "GPU"); here: the one-line answer without one, the peak table,
the plan of compare passes and the MFU arithmetic."""

import importlib.util
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.backend_independent

spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "tools",
                                                                        "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    if gpu_check.gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # No nvidia-smi on PATH: what a machine without an NVIDIA driver looks like.
    out = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check"], cwd=REPO,
                         env=dict(os.environ, PATH="/usr/bin:/bin"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert lines == ["gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); "
                     "nothing to measure."]


def test_peaks_match_the_names_nvidia_smi_reports():
    assert gpu_check.peak_for("NVIDIA H200")["bf16"] == 989.4
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3")["tf32"] == 494.7
    assert gpu_check.peak_for("NVIDIA H100 PCIe")["bf16"] == 756.5
    assert gpu_check.peak_for("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert gpu_check.peak_for("NVIDIA L4")["bf16"] == 121.0
    assert gpu_check.peak_for("NVIDIA L40S")["bf16"] == 362.1  # not taken for an L4
    assert gpu_check.peak_for("NVIDIA L40")["bf16"] == 181.0  # nor an L40
    assert gpu_check.peak_for("NVIDIA GH200 480GB")["source"].startswith("GH200")
    assert gpu_check.peak_for("Tesla T4")["bf16"] is None
    assert gpu_check.peak_for("Some Future GPU") is None


def test_plan_runs_twins_where_they_exist_and_torch_compile_last():
    passes = gpu_check.plan(["resnet20", "preact_resnet18"], ["float32", "mixed_bfloat16"],
                            ["jax", "torch"], gpu_check.DEFAULT_BATCH)
    labels = [label for label, _ in passes]
    assert labels[:4] == ["resnet20 float32 jit auto", "preact_resnet18 float32 jit auto",
                          "resnet20 mixed_bfloat16 jit auto",
                          "preact_resnet18 mixed_bfloat16 jit auto"]
    assert all(label.endswith("jit on") for label in labels[4:]) and len(labels) == 8
    with_twins = [label for label, args in passes if "--reference" in args]
    assert with_twins == ["resnet20 float32 jit auto"]  # twins: float32 CIFAR ResNets only
    # compare runs the twins of the backends given, so a framework left out has none
    alone = gpu_check.plan(["resnet20"], ["float32"], ["torch"], gpu_check.DEFAULT_BATCH)
    assert alone[0][1][alone[0][1].index("--backends") + 1] == "torch,torch-stock"
    assert all("--sync-every" in args for _, args in passes)
    auto = dict(passes)["resnet20 float32 jit auto"]
    assert auto[auto.index("--backends") + 1] == "jax,torch,torch-stock"
    on = dict(passes)["resnet20 float32 jit on"]
    assert on[on.index("--backends") + 1] == "torch"


def record(backend, device, ms, dtype="float32", status="ok", flops=None):
    return {"backend": backend, "status": status, "model": "resnet20", "batch_size": 1024,
            "dtype_policy": dtype, "jit": "True", "step_time_ms": ms, "device": device,
            "flops_source": "analytic: 3 x forward" if flops else None,
            "flops_per_step": flops, "examples_per_sec": None, "compile_s": 1.0,
            "peak_device_mb": 100.0, "error": None}


def test_mfu_uses_one_flop_count_per_model_and_never_credits_a_cpu_run():
    peak = gpu_check.peak_for("NVIDIA H200")
    rows = gpu_check.rows_with_mfu([
        record("jax", "gpu:0 (NVIDIA H200)", 10.0, flops=4.947e12 * 0.01),
        record("native-torch", "cuda:0 (NVIDIA H200)", 20.0),  # no count of its own
        record("torch", "cpu:0", 40.0),
        record("jax", "gpu:0 (NVIDIA H200)", 5.0, dtype="mixed_bfloat16", flops=4.947e12 * 0.01),
    ], peak)
    assert rows[0]["tflops"] == pytest.approx(4.947) and rows[0]["mfu"] == pytest.approx(0.01)
    assert rows[1]["tflops"] == pytest.approx(4.947 / 2) and rows[1]["mfu"] == pytest.approx(0.005)
    assert rows[2]["status"] == "ok, but on cpu:0" and rows[2]["mfu"] is None
    assert rows[3]["mfu"] == pytest.approx(2 * 4.947 / 989.4)  # against the bf16 peak
    table = gpu_check.markdown(rows, "title")
    assert "| resnet20 | float32 | jax |" in table and "1.0%" in table


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "float64"], "unknown dtype policy 'float64'"),
    (["--batch-size", "resnet20=abc"], "--batch-size takes MODEL=N"),
    (["--backends", "jx"], "unknown backend 'jx'"),
    (["--sync-every", "0"], "--sync-every 0 is not allowed"),
    (["--timeout", "nan"], "--timeout nan is not allowed"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--models", "resnet50"], "no batch size for resnet50"),
])
def test_bad_arguments_are_one_line_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
