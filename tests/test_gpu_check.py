"""`make gpu-check` (tools/gpu_check.py): what can be checked without a GPU. Its real run is
on a GPU machine (docs/compare.md, "GPU"); here: the one-line answer without one, the peak table,
the plan of compare passes and the MFU arithmetic."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO, fake_compare_interpreter, sigterm_to_the_tool_alone

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
                     "nothing to measure (--rehearse runs every pass on the CPU, at tiny "
                     "sizes)."]


def test_peaks_match_the_names_nvidia_smi_reports():
    assert gpu_check.peak_for("NVIDIA H200")["bf16"] == 989.4
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3")["tf32"] == 494.7
    assert gpu_check.peak_for("NVIDIA H100 PCIe")["bf16"] == 756.5
    assert gpu_check.peak_for("NVIDIA H200 NVL")["bf16"] == 835.5  # not the SXM figure
    assert gpu_check.peak_for("NVIDIA H100 NVL")["tf32"] == 417.5
    assert gpu_check.peak_for("NVIDIA A100-SXM4-80GB")["bf16"] == 312.0
    assert gpu_check.peak_for("NVIDIA L4")["bf16"] == 121.0
    assert gpu_check.peak_for("NVIDIA L40S")["bf16"] == 362.1  # not taken for an L4
    assert gpu_check.peak_for("NVIDIA L40")["bf16"] == 181.0  # nor an L40
    assert gpu_check.peak_for("NVIDIA GH200 480GB")["source"].startswith("GH200")
    assert gpu_check.peak_for("Tesla T4")["bf16"] is None
    assert gpu_check.peak_for("Some Future GPU") is None


CASES = gpu_check.DEFAULT_CASES
TODAY = ({"torch-stock": ("torch", {"fast_path": "off"})},
         {"native-jax": "jax", "native-tensorflow": "tensorflow", "native-torch": "torch"})
COMPILED = ({**TODAY[0], "torch-compiled": ("torch", {"jit_compile": "on"})},
            {**TODAY[1], "native-torch-compiled": "torch"})


def arg(args, flag):
    return args[args.index(flag) + 1]


def test_plan_measures_the_issues_cases_with_twins_and_compiled_torch():
    passes = gpu_check.plan(CASES, ["jax", "torch"], gpu_check.DEFAULT_BATCH, 10, *COMPILED)
    assert [p.label for p in passes] == [
        "resnet20 mixed_bfloat16", "resnet20 mixed_bfloat16 torch-compiled",
        "preact_resnet18 mixed_bfloat16", "preact_resnet18 mixed_bfloat16 torch-compiled",
        "resnet20 float32", "resnet20 float32 torch-compiled"]
    first, compiled = passes[0], passes[1]
    assert arg(first.args, "--backends") == "jax,torch,torch-stock"
    assert arg(first.args, "--reference") == "native"  # the CIFAR ResNets have twins
    # compare runs the compiled twin only beside compiled Keras-torch (compare.twins_of)
    assert first.runs == ["jax", "torch", "torch-stock", "native-jax", "native-torch"]
    assert arg(compiled.args, "--backends") == "torch-compiled"
    assert arg(compiled.args, "--reference") == "native"
    assert compiled.runs == ["torch-compiled", "native-torch-compiled"]
    assert passes[2].runs[-2:] == ["native-jax", "native-torch"]  # PreAct's jax, torch twins
    assert passes[3].runs == ["torch-compiled", "native-torch-compiled"]
    # what each pass plans is what compare runs for its arguments
    from kbench.bench import compare
    for p in passes:
        options = compare.CompareOptions(
            backends=tuple(arg(p.args, "--backends").split(",")), model=arg(p.args, "--model"),
            reference=arg(p.args, "--reference") if "--reference" in p.args else "none",
            jit_compile=arg(p.args, "--jit-compile"))
        assert [name for name, *_ in compare.plan_runs(options)] == p.runs, p.label
    assert all(arg(p.args, "--sync-every") == "10" for p in passes)
    assert arg(passes[2].args, "--dtype-policy") == "mixed_bfloat16"
    assert arg(passes[2].args, "--batch-size") == "512"


def test_plan_without_compiled_variants_runs_torch_under_jit_on_with_its_twin():
    passes = gpu_check.plan(CASES[:1], ["torch"], gpu_check.DEFAULT_BATCH, 10, *TODAY)
    auto, jit_on = passes
    assert arg(auto.args, "--backends") == "torch,torch-stock"  # no twin of a framework left out
    assert auto.runs == ["torch", "torch-stock", "native-torch"]
    assert arg(jit_on.args, "--jit-compile") == "on" and arg(jit_on.args, "--reference") == \
        "native"
    assert jit_on.runs == ["torch-compiled", "native-torch-compiled"]
    assert gpu_check.plan(CASES[:1], ["jax"], gpu_check.DEFAULT_BATCH, 10, *TODAY)[0].runs \
        == ["jax", "native-jax"]


def test_the_budget_skips_what_would_end_past_it_rescaled_by_what_passes_took():
    now = [0.0]
    budget = gpu_check.Budget(100, clock=lambda: now[0])
    assert budget.allows(100) and not budget.allows(101)
    now[0] = 30.0
    budget.spent(15, 30)  # took twice its estimate: later estimates count double
    assert budget.scale == 2.0
    assert budget.allows(35) and not budget.allows(36)


def test_dry_run_lists_the_plan_within_the_budget_on_any_machine(capsys):
    assert gpu_check.main(["--dry-run", "--backends", "jax,torch", "--budget-s", "200"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("gpu-check plan (budget 200 s")
    steps = out[1:-1]
    assert steps[0].lstrip().startswith("run") and "probe frameworks: jax, torch" in steps[0]
    assert "input pipeline rate at batch 512, 1024" in steps[1]
    assert any(line.lstrip().startswith("skip") for line in steps)  # 200 s is not enough
    planned = sum(float(line.split("~")[1].split()[0]) for line in steps
                  if line.lstrip().startswith("run"))
    assert planned <= 200 and out[-1].strip() == f"total ~{planned:.0f} s of 200 s"
    # The default budget keeps the check under 8 minutes of GPU time.
    assert gpu_check.main(["--dry-run"]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(total.split("~")[1].split()[0]) <= 8 * 60
    # With the GPU machine's frameworks, the default budget plans both bf16 cases, eager and
    # compiled: issue 20's goals are judged on them (its plain-PyTorch ResNet-20 timings, MFU).
    assert gpu_check.main(["--dry-run", "--backends", "jax,torch"]) == 0
    planned = [line.split(":")[0].split(" s  ")[-1] for line in
               capsys.readouterr().out.splitlines() if line.lstrip().startswith("run")]
    assert [label for label in planned if "bfloat16" in label] == [
        "resnet20 mixed_bfloat16", "resnet20 mixed_bfloat16 torch-compiled",
        "preact_resnet18 mixed_bfloat16", "preact_resnet18 mixed_bfloat16 torch-compiled"]


def record(backend, device, ms, dtype="float32", status="ok", flops=None):
    return {"backend": backend, "status": status, "model": "resnet20", "batch_size": 1024,
            "dtype_policy": dtype, "jit": "True", "step_time_ms": ms, "device": device,
            "flops_source": "analytic: 3 x forward" if flops else None,
            "flops_per_step": flops, "examples_per_sec": None, "compile_s": 1.0,
            "peak_device_mb": 100.0, "error": None}


def test_rows_name_compiled_torch_runs_and_divide_each_keras_row_by_its_twin():
    rows = gpu_check.rows_with_mfu([
        {**record("torch", "cuda:0", 40.0), "jit": "False", "input_wait_fraction": 0.02},
        {**record("native-torch", "cuda:0", 10.0), "jit": "eager"},
        {**record("torch", "cuda:0", 9.0), "jit": "True"},  # --jit-compile on
        {**record("native-torch", "cuda:0", 8.0), "jit": "torch.compile (inductor)"},
        {**record("torch-stock", "cuda:0", 50.0), "jit": "False"},
    ], gpu_check.peak_for("NVIDIA H200"))
    assert [r["backend"] for r in rows] == ["torch", "native-torch", "torch-compiled",
                                           "native-torch-compiled", "torch-stock"]
    assert [r["vs_native"] for r in rows] == [4.0, None, 9.0 / 8.0, None, 5.0]
    table = gpu_check.markdown(rows, "t", input_rates=[
        {"batch_size": 1024, "ms_per_batch": 12.5, "ms_per_batch_p90": 14.0,
         "batches_per_sec": 80.0, "examples_per_sec": 81920.0}],
        skipped=["resnet20 mixed_bfloat16 torch-compiled (torch-compiled)"])
    assert "| 4.00x | 2.0% | - |" in table and "| 1024 | 12.50 | 14.00 | 80.0 | 81920 |" in table
    assert "Left out to stay within the time budget" in table
    stock = gpu_check.rows_with_mfu([{**record("torch-stock", "cuda:0", 50.0), "jit": "False",
                                      "syncs_per_step": 13.0,
                                      "sync_sites": ["core.py:259 (12/step)"]}], None)
    table = gpu_check.markdown(stock, "t")
    assert "| 13 |" in table and "- resnet20 float32 torch-stock: core.py:259 (12/step)" in table


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
    # A twin carries the same analytic count: its MFU needs no Keras row beside it
    alone = gpu_check.rows_with_mfu(
        [record("native-torch", "cuda:0 (NVIDIA H200)", 20.0, flops=4.947e12 * 0.02)], peak)
    assert alone[0]["tflops"] == pytest.approx(4.947) and alone[0]["mfu"] == pytest.approx(0.01)
    diverged = gpu_check.rows_with_mfu(
        [{**record("jax", "gpu:0", 10.0), "test_loss": float("nan")},
         {**record("jax", "gpu:0", 10.0), "test_loss": 2.3}], peak)
    assert [r["status"] for r in diverged] == ["ok, but test loss nan", "ok"]
    assert rows[3]["mfu"] == pytest.approx(2 * 4.947 / 989.4)  # against the bf16 peak
    table = gpu_check.markdown(rows, "title")
    assert "| resnet20 | float32 | jax |" in table and "1.0%" in table
    # A rehearsal expects the CPU: its rows are ok, over their twins, checked for a NaN
    # loss, with no MFU (no peak); a row on a GPU would be the one flagged
    rehearsal = gpu_check.rows_with_mfu([
        {**record("torch", "cpu:0", 20.0), "jit": "False"},
        {**record("native-torch", "cpu (2 threads)", 16.0), "jit": "eager"},
        {**record("jax", "cpu:0", 10.0), "test_loss": float("nan")},
        record("jax", "gpu:0", 10.0)], None, rehearsal=True)
    assert [r["status"] for r in rehearsal] == ["ok", "ok", "ok, but test loss nan",
                                                "ok, but on gpu:0"]
    assert rehearsal[0]["vs_native"] == 1.25 and all(r["mfu"] is None for r in rehearsal)


@pytest.mark.parametrize("argv, message", [
    (["--cases", "resnet20:float64"], "unknown dtype policy 'float64'"),
    (["--cases", "resnet20"], "--cases takes MODEL:DTYPE_POLICY"),
    (["--budget-s", "0"], "--budget-s 0.0 is not allowed"),
    (["--batch-size", "resnet20=abc"], "--batch-size takes MODEL=N"),
    (["--backends", "jx"], "unknown backend 'jx'"),
    (["--backends", "jax,torch,jax"], "--backends names jax twice"),
    (["--sync-every", "0"], "--sync-every 0 is not allowed"),
    (["--timeout", "nan"], "--timeout nan is not allowed"),
    (["--python", "/no/such/python"], "--python /no/such/python: no executable interpreter"),
    (["--rehearse", "--steps", "0"], "--steps 0 is not allowed"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--cases", "resnet50:float32"], "no batch size for resnet50"),
])
def test_bad_arguments_are_one_line_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_an_output_folder_with_a_check_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "gpu-check.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--output", str(tmp_path)])
    assert stop.value.code == 2 and "already holds" in capsys.readouterr().err
    assert (tmp_path / "gpu-check.jsonl").read_text() == "{}\n"


# --------------------------------------------------------------------------- the whole tool
# The GPU machine played by stand-ins (nvidia-smi, and an interpreter that answers the probes
# and plays compare): what is checked is gpu-check's own part, from probes to tables.

JAX_ON_H200 = {**record("jax", "gpu:0 (NVIDIA H200)", 10.25, flops=4.947e12 * 0.0125),
               "examples_per_sec": 99902.0}


def fake_gpu_machine(tmp_path, stopped_marker=None, compare_fails=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "NVIDIA H200, 143771, 580.95"\n')
    smi.chmod(0o755)
    python = fake_compare_interpreter(tmp_path / "python", JAX_ON_H200, stopped_marker,
                                      compare_fails)
    command = [sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--python", python,
               "--backends", "jax", "--cases", "resnet20:float32", "--output",
               str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k not in gpu_check.CPU_ONLY_ENV}
    return command, {**env, "PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_a_check_writes_its_tables_from_what_compare_wrote(tmp_path):
    command, env = fake_gpu_machine(tmp_path)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpu-check: jax: sees NVIDIA H200" in done.stdout
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    # 4.947e12 * 0.0125 FLOPs in 10.25 ms: 6.03 TFLOP/s, 1.2% of the H200's TF32 peak
    assert "| resnet20 | float32 | jax | True | 1024 | ok | 10.25 | 99902 |" in table
    assert "| 6.0 | 1.2% |" in table
    assert "| 1024 | 12.50 | 14.00 | 80.0 | 81920 |" in table  # the input pipeline's rate
    kept = [json.loads(line) for line in (tmp_path / "out" / "gpu-check.jsonl").open()]
    assert kept and all(r["backend"] == "jax" for r in kept)
    # The output folder's top holds what a remote machine should hand back, and no more
    # (the device tool returns 8 files, 2 folders down): the compares' folders are deeper
    assert sorted(os.listdir(tmp_path / "out")) == [
        "gpu-check-logs.tar.gz", "gpu-check.jsonl", "gpu-check.md", "passes"]
    with tarfile.open(tmp_path / "out" / "gpu-check-logs.tar.gz") as archive:
        assert archive.getnames() == ["passes/00-resnet20-float32/logs/jax-r0.log"]


def test_a_pass_running_when_the_budget_ends_is_stopped_and_the_check_ends(tmp_path):
    """The budget is a limit, not a wish: a pass still running when it ends is stopped as
    SIGTERM stops a compare (its finished runs kept), no run is given longer than what is
    left, and the passes after it are named as left out."""
    marker = tmp_path / "compare-got"
    command, env = fake_gpu_machine(tmp_path, stopped_marker=marker)
    # The first pass (jax and its twin, ~30 s estimated) starts within 4 s because the fake
    # input rate answers at once against its 15 s estimate: the budget's scale is then ~0
    command += ["--cases", "resnet20:float32,preact_resnet18:mixed_bfloat16",
                "--budget-s", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert marker.read_text().strip() == "SIGTERM"
    argv = (tmp_path / "out" / "passes" / "00-resnet20-float32" / "argv").read_text().split()
    assert float(argv[argv.index("--timeout") + 1]) <= 4
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "| resnet20 | float32 | jax | True | 1024 | ok | 10.25 |" in table
    assert "Not as planned: resnet20 float32 was stopped when the budget ran out" in table
    assert "its finished runs are above, not run: native-jax." in table
    assert "Left out to stay within the time budget (--budget-s): preact_resnet18" in table


def test_a_compare_that_records_nothing_is_named_and_the_check_exits_1(tmp_path):
    command, env = fake_gpu_machine(tmp_path, compare_fails=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "compare: cannot start" in done.stderr  # the compare's own words reach the output
    assert ("Not as planned: resnet20 float32: compare exited 3 without recording a run"
            in (tmp_path / "out" / "gpu-check.md").read_text())


def test_sigterm_to_the_check_alone_stops_its_compare_and_keeps_what_finished(tmp_path):
    """A scheduler's SIGTERM reaches gpu-check, not the compare it runs: gpu-check passes it
    on (compare then stops its worker's process group) and writes the finished runs."""
    marker = tmp_path / "compare-got"
    command, env = fake_gpu_machine(tmp_path, stopped_marker=marker)
    sigterm_to_the_tool_alone(command, marker, env=env)
    assert "| resnet20 | float32 | jax | True | 1024 | ok | 10.25 |" in (
        tmp_path / "out" / "gpu-check.md").read_text()


# --------------------------------------------------------------------------- rehearsal

def test_a_rehearsal_runs_every_pass_on_the_cpu_at_tiny_sizes_and_says_so(tmp_path):
    """--rehearse on a machine with a GPU (the stand-in nvidia-smi) still runs on the CPU:
    every child is told to hide the GPU, the passes get the rehearsal's sizes, and the tables
    say first that they hold no GPU figures (no MFU either)."""
    command, env = fake_gpu_machine(tmp_path)
    done = subprocess.run(command + ["--rehearse"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpu-check: this machine's NVIDIA H200 stays unused" in done.stdout
    pass_dir = tmp_path / "out" / "passes" / "00-resnet20-float32"
    argv = (pass_dir / "argv").read_text().split()
    assert (arg(argv, "--batch-size"), arg(argv, "--steps"), arg(argv, "--warmup-steps")) == (
        "8", "3", "1")
    # a small test split with a partial last batch (8 x 8 + 4), as the GPU run's has
    assert arg(argv, "--set") == "test_examples=68"
    assert (pass_dir / "env").read_text().split() == ["CUDA_VISIBLE_DEVICES=",
                                                      "JAX_PLATFORMS=cpu"]
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert table.startswith("kbench gpu-check REHEARSAL on the CPU of ")
    assert "no GPU: these figures say only that each run runs" in table
    # the stand-in's record says it ran on a GPU: in a rehearsal, that is the odd one out
    # (a CPU row's status: the next test, through the real compare)
    assert "| ok, but on gpu:0 (NVIDIA H200) |" in table
    # a GPU check's children are told nothing (the fake records what they got)
    (tmp_path / "gpu").mkdir()
    command, env = fake_gpu_machine(tmp_path / "gpu")
    assert subprocess.run(command, env=env, capture_output=True, timeout=120).returncode == 0
    gpu_pass = tmp_path / "gpu" / "out" / "passes" / "00-resnet20-float32"
    assert (gpu_pass / "env").read_text().split() == ["CUDA_VISIBLE_DEVICES=unset",
                                                      "JAX_PLATFORMS=unset"]
    assert "--set" not in (gpu_pass / "argv").read_text().split()  # the whole test split
