"""`make gpu-check`: kbench's look at an NVIDIA GPU, in one command, in under 8 minutes.

    .venv/bin/python tools/gpu_check.py [--output DIR]
        [--cases resnet20:mixed_bfloat16,preact_resnet18:mixed_bfloat16,resnet20:float32]
        [--batch-size resnet20=1024,preact_resnet18=512] [--budget-s 450] [--dry-run]
        [--rehearse]

On a machine with an NVIDIA GPU it installs nothing: it asks each framework whether it sees
the GPU (a framework that does not is named and left out, never timed on the CPU instead),
measures the input pipeline's own rate at each batch size (kbench.bench.input_rate), then
runs `kbench compare` on synthetic CIFAR data for every case (model:dtype policy), most
telling first, each case in two passes:
  - every Keras backend as it runs by default (`--jit-compile auto`): jax, torch (eager, with
    kbench's fast path), torch-stock (without it), and tensorflow / tensorflow-stock where
    TensorFlow sees the GPU, plus the eager native twins of those frameworks that implement
    the model (compare's TWIN_MODELS: today every framework's twin has the CIFAR ResNets and
    PreAct ResNet-18);
  - Keras-torch compiled: compare's `torch-compiled` variant with its twin
    `native-torch-compiled` where compare has them, else torch under `--jit-compile on`
    (with the twins, whose native-torch then compiles too).
Each pass has an estimate of its seconds (RUN_ESTIMATE_S, COMPILE_ESTIMATE_S below); a pass
that would end past `--budget-s` (counted from the start, framework probes included, and
rescaled by how long the passes so far took against their estimates) is skipped and named in
the table. The budget is also a hard limit: no run gets a `--timeout` past it, and a pass
still running when it ends is stopped as SIGTERM stops a compare (its finished runs kept),
the passes after it named as left out. `--dry-run` prints the plan with its estimates and
exits, on any machine.
It prints one table with achieved TFLOP/s, MFU (model FLOPs utilisation) against the GPU's
dense peak from PEAKS below, each Keras row over its native twin and the share of time spent
waiting for input, and writes gpu-check.jsonl (every compare record), gpu-check.md (the
tables, and any pass that failed or was stopped) and gpu-check-logs.tar.gz (every run's log)
at the top of the output folder after every pass; the compares' own folders are under
passes/. Without a GPU it says so in one line and exits 0; a pass whose compare recorded no
run at all makes the exit status 1.

`--rehearse` runs all of this on the machine's CPU instead (GPUs hidden from every child), at
sizes that show each run runs, not how fast: batch 8, 3 timed steps after 1 warm-up, a budget
of 3600 s, unless given. Run under the GPU machine's interpreter and packages (or copies of
them: docs/development.md), it finds before any GPU time is spent what would stop a pass
there: an import, an API that moved between versions, a compile that fails. Its tables say in
their first line that they hold no GPU figures.

FLOPs are kbench's analytic count of one model (convolutions and dense layers, training step
= 3x forward; kbench/bench/flops.py), the same number for every row of a model and batch, so
MFU compares like with like. The peak is the tensor-core dense rate for the policy's compute
dtype: bf16 for mixed_bfloat16, fp16 for mixed_float16, and TF32 for float32, because kbench
runs float32 convolutions and matmuls in TF32 on every backend (compare's
--float32-precision, default tf32).
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kbench.bench.compare import COMPILED_TWINS, TWIN_MODELS  # noqa: E402  (nor does this)
from kbench.bench.records import not_finite, read_results  # noqa: E402  (loads no framework)
from kbench.bench.cli import check_interpreter  # noqa: E402  (nor does this)
from kbench.errors import KbenchError, exit_on_error, run_child, sigterm_interrupts  # noqa: E402
from kbench.files import new_results_folder  # noqa: E402  (nor does this)
BACKENDS = ("jax", "tensorflow", "torch")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, keyed by a word sequence of the
# name nvidia-smi reports; the longest key that matches wins ("H100 PCIe" over "H100").
# Datasheet figures are boost-clock ceilings: real clocks, power and memory bound lower them.
PEAKS = (
    # name substring, bf16, fp16, tf32, source
    ("H200", 989.4, 989.4, 494.7, "H200 SXM datasheet (same SMs and clocks as H100 SXM)"),
    # The NVL cards (PCIe, up to 600 W) have lower clocks: the datasheets' sparse 1,671 bf16
    # and 835 TF32 TFLOP/s, halved
    ("H200 NVL", 835.5, 835.5, 417.5, "H200 NVL datasheet (per GPU)"),
    ("GH200", 989.4, 989.4, 494.7, "GH200 datasheet (H100 SXM rates)"),
    ("H100 PCIe", 756.5, 756.5, 378.0, "H100 PCIe datasheet"),
    ("H100 NVL", 835.5, 835.5, 417.5, "H100 NVL datasheet (per GPU)"),
    ("H100", 989.4, 989.4, 494.7, "H100 SXM datasheet"),
    ("B200", 2250.0, 2250.0, 1100.0, "B200 datasheet (HGX B200, per GPU)"),
    ("A100", 312.0, 312.0, 156.0, "A100 datasheet (SXM and PCIe)"),
    ("L40S", 362.1, 362.1, 183.0, "L40S datasheet"),
    ("L40", 181.0, 181.0, 90.5, "L40 datasheet"),
    ("L4", 121.0, 121.0, 60.0, "L4 datasheet"),
    ("A10", 125.0, 125.0, 62.5, "A10 datasheet"),
    ("RTX 4090", 165.2, 165.2, 82.6, "GeForce RTX 4090 (Ada whitepaper, fp32 accumulate)"),
    ("V100", None, 125.0, None, "V100 SXM2 datasheet (no bf16 or TF32 units)"),
    ("T4", None, 65.0, None, "T4 datasheet (no bf16 or TF32 units)"),
)
PEAK_KEY = {"mixed_bfloat16": "bf16", "mixed_float16": "fp16", "float32": "tf32"}

DEFAULT_BATCH = {"resnet20": 1024, "preact_resnet18": 512}
# --rehearse: every pass on the CPU at sizes that show it runs, not how fast: batch 8, 3
# timed steps, and a test split of 68 examples (8 full batches and a partial one, as the GPU
# run's 2000 leave at 512 and 1024). The whole synthetic test split, 250 batches of 8, took
# most of each PreAct ResNet-18 bfloat16 run on our 2-core CPU (~150 s: bfloat16
# convolutions are slow on a CPU), put compiled Keras-torch there past the 300 s --timeout,
# and the six passes for jax and torch at 36 minutes.
REHEARSAL = {"batch_size": 8, "steps": 3, "warmup_steps": 1, "budget_s": 3600.0,
             "test_examples": 68}
# What a rehearsal's children are told, so that a machine with a GPU rehearses on its CPU too
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}


def gpus():
    """[(name, memory MiB, driver)] from nvidia-smi, or [] when there is no NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    found = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append((parts[0], parts[1], parts[2]))
    return found


def peak_for(gpu_name):
    """{"bf16", "fp16", "tf32", "source"} for the GPU, or None when PEAKS does not know it."""
    import re

    for key, bf16, fp16, tf32, source in sorted(PEAKS, key=lambda p: -len(p[0])):
        # Whole words only: "L4" is not the start of "L40", "H200" not the end of "GH200".
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", gpu_name,
                     re.IGNORECASE):
            return {"bf16": bf16, "fp16": fp16, "tf32": tf32, "source": source}
    return None


# Each probe prints the framework's first GPU, or nothing; run in its own interpreter so a
# framework that grabs GPU memory at start-up lets go of it before the benchmark.
PROBES = {
    "jax": "import jax; d = jax.devices()[0]; print(d.device_kind if d.platform == 'gpu' else '')",
    "tensorflow": ("import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); "
                   "print(g[0].name if g else '')"),
    "torch": ("import torch; print(torch.cuda.get_device_name(0) "
              "if torch.cuda.is_available() else '')"),
}


# A rehearsal's probes: the framework imports here and computes on the CPU
CPU_PROBES = {
    "jax": "import jax; d = jax.devices()[0]; print(f'{d.platform}, jax {jax.__version__}')",
    "tensorflow": ("import tensorflow as tf; d = tf.config.list_logical_devices()[0]; "
                   "print(f'{d.device_type}, tensorflow {tf.__version__}')"),
    "torch": "import torch; print(f'{torch.ones(1).device}, torch {torch.__version__}')",
}


def backend_sees_gpu(name, python, timeout_s, probes=PROBES, env=None):
    """(sees it, what it said): whether this framework, as installed, computes on the GPU
    (with `probes=CPU_PROBES`: whether it imports and computes at all). `env`: the child's
    environment (os.environ by default)."""
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        out = subprocess.run([python, "-c", probes[name]], capture_output=True, text=True,
                             timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {timeout_s:.0f} s when asked for its devices"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["exit status %d" % out.returncode])[-1]
        return False, f"not usable here ({last})"
    said = out.stdout.strip().splitlines()[-1:] or [""]
    if not said[0]:
        return False, "installed without GPU support here, or its CUDA libraries are missing"
    return True, said[0]


# Most telling first, as the budget keeps the first that fit: ResNet-20 in bf16 is the step that
# plain PyTorch programs were timed on, on an H200 (issue 20: 9.6 ms eager, 7.7 compiled) and
# that the compiled and eager goals are judged by; PreAct ResNet-18 in bf16 the one the MFU goal
# is; float32 (TF32) last. Before 2026-12-07 float32 came first, and the plan's estimates left
# ResNet-20 bf16 out of a jax,torch check (446 of 450 s).
DEFAULT_CASES = (("resnet20", "mixed_bfloat16"), ("preact_resnet18", "mixed_bfloat16"),
                 ("resnet20", "float32"))
# Seconds a compare run takes on a GPU, start to record (interpreter, data, compile, 60
# steps, evaluation; an H200 took 4-16 s to compile under JAX), and what torch.compile adds.
# Guesses to be replaced by what the next GPU run's wall_s fields say; the budget rescales
# them by what the passes before took anyway.
RUN_ESTIMATE_S = 15
COMPILE_ESTIMATE_S = {"torch-compiled": 60, "native-torch-compiled": 35}  # 34 s: native, H200
INPUT_RATE_ESTIMATE_S = 15  # per batch size
PROBE_ESTIMATE_S = 8  # per framework asked whether it sees the GPU
PROBE_TIMEOUT_S = 120  # an import and a device query; H200: a few seconds each
INPUT_RATE_TIMEOUT_S = 120  # for all batch sizes
RUN_TIMEOUT_MARGIN_S = 10  # a run's --timeout ends this long before the budget


@dataclasses.dataclass
class Pass:
    """One `kbench compare` call: its label, arguments and the runs it will make (names as
    gpu-check's table shows them), with the seconds they are expected to take."""

    label: str
    args: list
    runs: list

    @property
    def estimate_s(self):
        return sum(RUN_ESTIMATE_S + COMPILE_ESTIMATE_S.get(run, 0) for run in self.runs)


def plan(cases, backends, batch_sizes, sync_every=10, keras_variants=(), natives=None,
         test_examples=None):
    """The compare passes to run, in order: per case (model, dtype policy), the default pass
    with the twins, then Keras-torch compiled. `keras_variants` / `natives`: the names
    compare knows (its KERAS_VARIANTS and NATIVE), so that the plan uses `torch-compiled`
    and `native-torch-compiled` where they exist and `--jit-compile on` where not.
    `test_examples`: the test split's size for every run (None: the data set's own)."""
    natives = dict(natives if natives is not None else
                   {"native-jax": "jax", "native-tensorflow": "tensorflow",
                    "native-torch": "torch"})
    passes = []
    for model, dtype in cases:
        common = ["--recipe", "cifar_resnet", "--dataset", "synthetic", "--model", model,
                  "--batch-size", str(batch_sizes[model]), "--dtype-policy", dtype,
                  "--sync-every", str(sync_every)]
        if test_examples is not None:
            common += ["--set", f"test_examples={test_examples}"]
        # torch-stock, tensorflow-stock: without kbench's fast path, beside it
        names = [n for b in backends for n in ((b, f"{b}-stock") if b != "jax" else (b,))]
        args = common + ["--backends", ",".join(names), "--jit-compile", "auto"]
        runs = list(names)
        # compare runs the eager twins of the frameworks compared that implement the model
        # (the compiled one only beside compiled Keras-torch, in the next pass)
        twins = [n for n, fw in natives.items() if fw in backends
                 and n not in COMPILED_TWINS and model in TWIN_MODELS.get(fw, ())]
        if twins:
            args += ["--reference", "native"]
            runs += twins
        passes.append(Pass(f"{model} {dtype}", args, runs))
        if "torch" not in backends:
            continue
        torch_twin = model in TWIN_MODELS["torch"]
        if "torch-compiled" in keras_variants:
            args = common + ["--backends", "torch-compiled", "--jit-compile", "auto"]
            runs = ["torch-compiled"]
            if torch_twin and "native-torch-compiled" in natives:  # its twin: compiled alike
                args += ["--reference", "native"]
                runs.append("native-torch-compiled")
            passes.append(Pass(f"{model} {dtype} torch-compiled", args, runs))
            continue
        # This checkout's compare has no torch-compiled: torch under --jit-compile on, with
        # the twin compiled the same way when compare has no native-torch-compiled.
        args = common + ["--backends", "torch", "--jit-compile", "on"]
        runs = ["torch-compiled"]
        if torch_twin and "native-torch-compiled" not in natives:
            args += ["--reference", "native"]
            runs.append("native-torch-compiled")
        passes.append(Pass(f"{model} {dtype} jit on", args, runs))
    return passes


class Budget:
    """Seconds of GPU time for the whole check: `allows(estimate)` says whether a step
    estimated at `estimate` seconds would still end within it, with the estimate rescaled by
    how long the steps so far took against theirs (`spent(estimate, actual)`)."""

    def __init__(self, seconds, clock=time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.started = clock()
        self.estimated = self.actual = 0.0

    @property
    def elapsed(self):
        return self.clock() - self.started

    @property
    def scale(self):
        return self.actual / self.estimated if self.estimated else 1.0

    @property
    def remaining(self):
        return self.seconds - self.elapsed

    def limit(self, cap, margin=0.0):
        """Seconds a step may take: `cap`, but no later than `margin` before the budget's
        end (at least 1 s: a limit of 0 would mean none to subprocess and compare)."""
        return max(1.0, min(cap, self.remaining - margin))

    def allows(self, estimate):
        return self.elapsed + estimate * self.scale <= self.seconds

    def spent(self, estimate, actual):
        self.estimated += estimate
        self.actual += actual


def dry_run(passes, budget_s, backends, batch_sizes, where="GPU", run_sizes=""):
    """The plan as text: each step with its estimate and whether it fits the budget.
    `where`: what the budget's seconds are of; `run_sizes`: added to the heading."""
    lines = [f"gpu-check plan (budget {budget_s:g} s of {where} time; estimates, not "
             f"measurements){run_sizes}:"]
    steps = [("probe frameworks: " + ", ".join(backends), PROBE_ESTIMATE_S * len(backends),
              None),
             ("input pipeline rate at batch " + ", ".join(map(str, sorted(set(
                 batch_sizes.values())))), INPUT_RATE_ESTIMATE_S * len(set(batch_sizes.values())),
              None)]
    steps += [(f"{p.label}: kbench compare {' '.join(p.args)}", p.estimate_s, p)
              for p in passes]
    total = 0.0
    for text, estimate, _ in steps:
        fits = total + estimate <= budget_s
        if fits:
            total += estimate
        lines.append(f"  {'run ' if fits else 'skip'} ~{estimate:4.0f} s  {text}")
    lines.append(f"  total ~{total:.0f} s of {budget_s:g} s")
    return "\n".join(lines)


def rows_with_mfu(records, peak, rehearsal=False):
    """One table row per compare record, with TFLOP/s from the model's analytic count. A row
    that ran where the check did not mean it to (the CPU in a GPU check, a GPU in a
    rehearsal) says so in its status, and is neither divided by its twin nor given an MFU."""
    analytic = {}
    for r in records:
        if (r.get("flops_source") or "").startswith("analytic") and r.get("flops_per_step"):
            analytic[(r["model"], r["batch_size"])] = r["flops_per_step"]
    rows = []
    for r in records:
        flops = analytic.get((r.get("model"), r.get("batch_size")))
        ms = r.get("step_time_ms")
        tflops = flops / (ms / 1000.0) / 1e12 if flops and ms and r["status"] == "ok" else None
        dense = peak.get(PEAK_KEY.get(r.get("dtype_policy") or "float32")) if peak else None
        device = r.get("device") or ""
        status = r["status"]
        on_gpu = any(k in device.lower() for k in ("gpu", "cuda"))
        if status == "ok" and on_gpu == rehearsal:  # a CPU row never passed off as GPU
            status = f"ok, but on {device or 'an unknown device'}"
            dense = None  # and no utilisation of a GPU it did not use
        elif status == "ok" and not_finite(r.get("test_loss")):
            # timed, but what it computed is garbage (jax 0.11.2's XLA:CPU returns NaN for
            # a jitted bf16 ResNet forward: docs/development.md); never a clean row
            status = f"ok, but test loss {r['test_loss']}"
        rows.append({
            "model": r.get("model"), "dtype": r.get("dtype_policy"), "backend": row_name(r),
            "jit": r.get("jit"), "batch": r.get("batch_size"), "status": status,
            "step_time_ms": ms, "examples_per_sec": r.get("examples_per_sec"),
            "compile_s": r.get("compile_s"), "peak_device_mb": r.get("peak_device_mb"),
            "tflops": tflops, "mfu": tflops / dense if tflops and dense else None,
            "input_wait": r.get("input_wait_fraction"), "syncs": r.get("syncs_per_step"),
            "sync_sites": r.get("sync_sites"), "error": r.get("error"),
        })
    for row in rows:  # each Keras row over its twin of the same case and compile mode
        twin = next((t for t in rows if t["backend"] == TWIN.get(row["backend"])
                     and (t["model"], t["dtype"]) == (row["model"], row["dtype"])
                     and t["step_time_ms"] and t["status"] == "ok"), None)
        row["vs_native"] = (row["step_time_ms"] / twin["step_time_ms"]
                            if twin and row["step_time_ms"] and row["status"] == "ok" else None)
    return rows


# The native twin each Keras row is divided by (same compile mode: compiled over compiled).
TWIN = {"jax": "native-jax", "tensorflow": "native-tensorflow",
        "tensorflow-stock": "native-tensorflow", "torch": "native-torch",
        "torch-stock": "native-torch", "torch-compiled": "native-torch-compiled"}


def compiled_by_torch(record):
    """Whether a torch record's step ran under torch.compile: its compiler setting or jit
    description says so (a Keras-torch run under --jit-compile on reports jit "True")."""
    text = f"{record.get('compiler')} {record.get('jit')}"
    return "torch.compile" in text or (record["backend"] == "torch"
                                       and str(record.get("jit")) == "True")


def row_name(record):
    """The record's backend, with `-compiled` where torch compiled a run that compare names
    without it (this checkout's --jit-compile on pass)."""
    name = record["backend"]
    if name in ("torch", "native-torch") and compiled_by_torch(record):
        return f"{name}-compiled"
    return name


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = ("model", "dtype", "backend", "jit", "batch", "status", "ms/step", "examples/s",
           "compile s", "device MB", "TFLOP/s", "MFU", "vs native", "input wait", "syncs/step")


def cells(row):
    return [row["model"] or "-", row["dtype"] or "-", row["backend"], str(row["jit"]),
            _fmt(row["batch"], "d"), row["status"], _fmt(row["step_time_ms"], ".2f"),
            _fmt(row["examples_per_sec"], ".0f"), _fmt(row["compile_s"], ".1f"),
            _fmt(row["peak_device_mb"], ".0f"), _fmt(row["tflops"], ".1f"),
            "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%",
            "-" if row.get("vs_native") is None else f"{row['vs_native']:.2f}x",
            "-" if row.get("input_wait") is None else f"{100 * row['input_wait']:.1f}%",
            _fmt(row.get("syncs"), "g")]


def markdown(rows, header, input_rates=(), skipped=(), failed=()):
    """The tables: every run; the input pipeline's own rate per batch size; the passes that
    failed or were stopped; what the budget left out."""
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    sites = [r for r in rows if r.get("sync_sites")]
    if sites:
        lines += ["", "Where each torch run's syncs/step came from (PyTorch's synchronizing "
                      "operations in its warm-up steps, by the line that called them; "
                      "kbench.sync_watch):", ""]
        lines += [f"- {r['model']} {r['dtype']} {r['backend']}: " + "; ".join(r["sync_sites"])
                  for r in sites]
    if input_rates:
        lines += ["", "Input pipeline alone (kbench.bench.input_rate: the cifar_resnet "
                      "training pipeline read as NumPy batches on the host CPU, nothing "
                      "training):", "", "| batch | ms/batch | p90 ms | batches/s | examples/s |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch_size']} | {r['ms_per_batch']:.2f} | {r['ms_per_batch_p90']:.2f} "
                  f"| {r['batches_per_sec']:.1f} | {r['examples_per_sec']:.0f} |"
                  for r in input_rates]
    if failed:
        lines += [""] + [f"Not as planned: {line}." for line in failed]
    if skipped:
        lines += ["", "Left out to stay within the time budget (--budget-s): "
                  + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def print_table(rows, header):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("model", "dtype", "backend",
                                                                "status") else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=200).print(table)


LOGS_ARCHIVE = "gpu-check-logs.tar.gz"


def write_logs_archive(out_dir):
    """Every run's log (passes/*/logs/*.log, where a failed run's traceback is) in one
    archive at the top of out_dir, rewritten after every pass."""
    import glob
    import tarfile

    path = os.path.join(out_dir, LOGS_ARCHIVE)
    with tarfile.open(path + ".tmp", "w:gz") as archive:
        for log in sorted(glob.glob(os.path.join(out_dir, "passes", "*", "logs", "*.log"))):
            archive.add(log, arcname=os.path.relpath(log, out_dir))
    os.replace(path + ".tmp", path)


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _fail(message):
    """A bad argument: one `error: ...` line on stderr, exit status 2, as kbench's commands
    answer."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_batch_sizes(text, models, defaults=DEFAULT_BATCH):
    sizes = dict(defaults)
    for item in filter(None, (text or "").split(",")):
        model, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            _fail(f"--batch-size takes MODEL=N with N >= 1, not {item!r}")
        sizes[model.strip()] = int(value)
    missing = [m for m in models if m not in sizes]
    if missing:
        _fail(f"no batch size for {', '.join(missing)} (it has defaults for "
              f"{', '.join(defaults)}); for another kbench model add "
              f"--batch-size {missing[0]}=N")
    return sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as kbench's own commands answer
        _fail(f"{message} (see tools/gpu_check.py --help)")


def parse_cases(text):
    """'resnet20:float32,...' -> [(model, dtype policy)]."""
    cases = []
    for item in filter(None, (c.strip() for c in text.split(","))):
        model, sep, dtype = item.partition(":")
        if not sep or not model:
            _fail(f"--cases takes MODEL:DTYPE_POLICY,... (e.g. resnet20:float32), "
                  f"not {item!r}")
        if dtype not in PEAK_KEY:
            _fail(f"unknown dtype policy {dtype!r} in --cases; use "
                  f"{', '.join(PEAK_KEY)}")
        cases.append((model, dtype))
    if not cases:
        _fail("--cases names no case")
    return cases


def compare_names():
    """(KERAS_VARIANTS, NATIVE) of this checkout's `kbench compare`."""
    from kbench.bench import compare

    return compare.KERAS_VARIANTS, compare.NATIVE


def input_rates(python, batch_sizes, steps, budget, env=None):
    """kbench.bench.input_rate's records, one per batch size; [] (with the reason printed)
    when it fails. `env`: the child's environment (os.environ by default)."""
    command = [python, "-m", "kbench.bench.input_rate", "--batch-sizes",
               ",".join(map(str, batch_sizes)), "--steps", str(steps)]
    print(f"\ngpu-check: input pipeline: {' '.join(command[1:])}", flush=True)
    env = dict(os.environ if env is None else env, KERAS_BACKEND="jax",
               TF_CPP_MIN_LOG_LEVEL="3")
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=budget.limit(INPUT_RATE_TIMEOUT_S))
    except subprocess.TimeoutExpired as late:
        # (not counted into the budget's scale: a host pipeline that hung says nothing of
        # how long the GPU passes take)
        print(f"gpu-check: the input pipeline's rate was not measured: no answer within "
              f"{late.timeout:.0f} s")
        return []
    if done.returncode != 0:
        print("gpu-check: the input pipeline's rate was not measured: "
              + (done.stderr.strip().splitlines() or ["?"])[-1])
        return []
    budget.spent(INPUT_RATE_ESTIMATE_S * len(batch_sizes), time.monotonic() - start)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(argv=None):
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None,
                        help="results folder (default runs/gpu-check/<timestamp>)")
    parser.add_argument("--cases", default=",".join(f"{m}:{d}" for m, d in DEFAULT_CASES),
                        metavar="MODEL:DTYPE,...", help="what to measure, most telling first")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="backends to try (each is asked first whether it sees the GPU)")
    parser.add_argument("--batch-size", default=None, metavar="MODEL=N,...",
                        help="per-model batch size (default: resnet20=1024,preact_resnet18=512;"
                             " rehearsal 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per run (default 50; rehearsal 3)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed steps before them (default 10; rehearsal 1)")
    parser.add_argument("--sync-every", type=int, default=10, metavar="K",
                        help="compare --sync-every: a device sync every K steps (a sync per "
                             "step holds a GPU's host back)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="seconds of GPU time (of CPU time in a rehearsal) for the "
                             "whole check: a pass that would end past it is skipped and "
                             "named (default 450: under 8 minutes; rehearsal 3600)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan with its time estimates and exit (any machine)")
    parser.add_argument("--rehearse", action="store_true",
                        help="run every pass on this machine's CPU (GPUs hidden) at tiny "
                             "sizes (batch 8, 3 timed steps unless given): whether the whole "
                             "check runs under --python's packages, before spending GPU time "
                             "on it; its tables say they hold no GPU figures. Name the "
                             "backends the GPU run will have (--backends jax,torch where "
                             "TensorFlow is a CPU build)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    args = parser.parse_args(argv)

    cases = parse_cases(args.cases)
    models = [m for m, _ in cases]
    if args.rehearse:
        batch_sizes = parse_batch_sizes(args.batch_size, models,
                                        dict.fromkeys(DEFAULT_BATCH, REHEARSAL["batch_size"]))
    else:
        batch_sizes = parse_batch_sizes(args.batch_size, models)
    for name in ("steps", "warmup_steps", "budget_s"):  # unset: the mode's default
        if getattr(args, name) is None:
            setattr(args, name, REHEARSAL[name] if args.rehearse else
                    {"steps": 50, "warmup_steps": 10, "budget_s": 450.0}[name])
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        _fail(f"unknown backend {unknown[0]!r}; use {', '.join(BACKENDS)}")
    twice = sorted({b for b in names if names.count(b) > 1})
    if twice:  # kbench compare refuses it too, once per pass
        _fail(f"--backends names {twice[0]} twice")
    for flag, value, least, kind in (("--steps", args.steps, 1, "an integer"),
                                     ("--warmup-steps", args.warmup_steps, 0, "an integer"),
                                     ("--sync-every", args.sync_every, 1, "an integer"),
                                     ("--timeout", args.timeout, 1, "a number of seconds"),
                                     ("--budget-s", args.budget_s, 1, "a number of seconds")):
        if not value >= least:  # NaN too
            _fail(f"{flag} {value} is not allowed: it takes {kind} >= {least}")
    try:
        check_interpreter(args.python, f"--python {args.python}")
    except KbenchError as bad:
        _fail(str(bad))
    if args.output and not args.dry_run:  # before any GPU time is spent
        try:
            new_results_folder(args.output, "gpu-check.jsonl", "a check's")
        except KbenchError as bad:
            _fail(str(bad))
    used_sizes = {m: batch_sizes[m] for m, _ in cases}
    # A rehearsal's evaluations: small, with a partial last batch (REHEARSAL)
    test_examples = REHEARSAL["test_examples"] if args.rehearse else None
    if args.dry_run:  # as if every framework named saw the GPU
        keras_variants, natives = compare_names()
        passes = plan(cases, names, batch_sizes, args.sync_every, keras_variants, natives,
                      test_examples)
        print(dry_run(passes, args.budget_s, names, used_sizes,
                      "CPU (a rehearsal)" if args.rehearse else "GPU",
                      f", each run {args.steps} timed steps after {args.warmup_steps} warm-up"
                      + (f", {test_examples} test examples" if test_examples else "")))
        return 0
    budget = Budget(args.budget_s)
    child_env = dict(os.environ)  # every child's: the probes, the pipeline, the compares
    if args.rehearse:
        child_env.update(CPU_ONLY_ENV)
        peak, probes = None, CPU_PROBES
        print("gpu-check: a rehearsal on this machine's CPU: every pass at tiny sizes, to see "
              "that it runs; no figure it prints is a GPU figure")
        for name, _, _ in gpus()[:1]:
            print(f"gpu-check: this machine's {name} stays unused (GPUs hidden from every "
                  "run); without --rehearse the check measures it")
        header = (f"kbench gpu-check REHEARSAL on the CPU of {platform.node()} (no GPU: these "
                  "figures say only that each run runs), synthetic CIFAR data, "
                  f"{args.steps} timed steps after {args.warmup_steps} warm-up, "
                  f"{test_examples} test examples")
    else:
        found = gpus()
        if not found:
            print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing "
                  "to measure (--rehearse runs every pass on the CPU, at tiny sizes).")
            return 0
        gpu_name, memory_mib, driver = found[0]
        peak, probes = peak_for(gpu_name), PROBES
        print(f"gpu-check: {len(found)} GPU(s), using the first: {gpu_name}, {memory_mib} "
              f"MiB, driver {driver}")
        if peak:
            print(f"gpu-check: peaks (dense TFLOP/s) bf16 {peak['bf16']}, fp16 "
                  f"{peak['fp16']}, tf32 {peak['tf32']} from the {peak['source']}")
        else:
            print(f"gpu-check: no peak known for {gpu_name!r}: MFU left out; add it to PEAKS "
                  "in tools/gpu_check.py")
        header = (f"kbench gpu-check on {gpu_name} ({memory_mib} MiB, driver {driver}), "
                  f"synthetic CIFAR data, {args.steps} timed steps after {args.warmup_steps} "
                  f"warm-up, synced every {args.sync_every}, float32 in TF32 on every backend; "
                  "MFU against the dense peak of the policy's compute dtype (TF32 for float32)")

    backends = []
    for name in names:
        sees, said = backend_sees_gpu(name, args.python, budget.limit(PROBE_TIMEOUT_S),
                                      probes, child_env)
        print(f"gpu-check: {name}: {'sees ' + said if sees else said + '; left out'}")
        if sees:
            backends.append(name)
    if not backends:
        print("gpu-check: no framework here " + ("runs" if args.rehearse else "sees the GPU")
              + "; nothing to measure.")
        return 1

    out_dir = os.path.abspath(args.output or os.path.join("runs", "gpu-check",
                                                          time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out_dir, exist_ok=True)
    records, skipped, failed = [], [], []
    compare_failed = False
    keras_variants, natives = compare_names()
    rates = input_rates(args.python, sorted(set(used_sizes.values())), 30, budget, child_env)

    def write():  # after every pass: a stopped check still leaves what it measured
        write_atomic(os.path.join(out_dir, "gpu-check.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in records))
        write_atomic(os.path.join(out_dir, "gpu-check.md"),
                     markdown(rows_with_mfu(records, peak, args.rehearse), header, rates,
                              skipped, failed))
        write_logs_archive(out_dir)

    write()
    passes = plan(cases, backends, batch_sizes, args.sync_every, keras_variants, natives,
                  test_examples)
    for index, step in enumerate(passes):
        if not budget.allows(step.estimate_s):
            print(f"\ngpu-check: {step.label}: skipped, ~{step.estimate_s * budget.scale:.0f} s "
                  f"would pass the budget ({budget.elapsed:.0f} of {args.budget_s:g} s spent)")
            skipped.append(f"{step.label} ({', '.join(step.runs)})")
            write()
            continue
        # The compares' own folders one level down, so that the output folder's top holds
        # only the tables and the logs' archive (what a remote machine hands back)
        pass_dir = os.path.join(out_dir, "passes",
                                f"{index:02d}-{step.label.replace(' ', '-')}")
        # No run, and no pass, outlasts the budget: a pass that is still running when it
        # ends is stopped as SIGTERM stops it (its finished runs kept, the one in flight
        # listed as not run), and the check ends. compare's --timeout is per run, from the
        # run's start: set to end RUN_TIMEOUT_MARGIN_S before the budget, it lets compare
        # record the pass's first run as timed out itself; a later run still in flight at
        # the budget's end is stopped with the pass.
        run_timeout = budget.limit(args.timeout, margin=RUN_TIMEOUT_MARGIN_S)
        command = [args.python, "-m", "kbench.cli", "compare", *step.args,
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--timeout", f"{run_timeout:.0f}", "--output", pass_dir]
        print(f"\ngpu-check: {step.label} (~{step.estimate_s} s): {' '.join(command[1:])}",
              flush=True)
        start, before = time.monotonic(), len(records)
        try:  # a failed run is in its records; go on
            code = run_child(command, cwd=ROOT, timeout=budget.limit(float("inf")),
                             env=child_env)
        except subprocess.TimeoutExpired:
            records += read_results(pass_dir)
            ran = {row_name(r) for r in records[before:]}
            unrun = [run for run in step.runs if run not in ran]
            failed.append(f"{step.label} was stopped when the budget ran out, after "
                          f"{time.monotonic() - start:.0f} s; its finished runs are above"
                          + (f", not run: {', '.join(unrun)}" if unrun else ""))
            skipped += [f"{p.label} ({', '.join(p.runs)})" for p in passes[index + 1:]]
            write()
            print(f"gpu-check: {step.label}: stopped at the end of the budget "
                  f"({args.budget_s:g} s)", flush=True)
            break
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the compare stopped cleanly; keep what
            records += read_results(pass_dir)  # finished, then stop
            write()
            print(f"gpu-check: stopped; what finished is in {out_dir}/gpu-check.md",
                  file=sys.stderr)
            raise
        budget.spent(step.estimate_s, time.monotonic() - start)
        records += read_results(pass_dir)
        if code != 0 and len(records) == before:  # compare itself failed: no run recorded
            compare_failed = True
            failed.append(f"{step.label}: compare exited {code} without recording a run "
                          "(its output is in the check's)")
        write()
    rows = rows_with_mfu(records, peak, args.rehearse)
    print()
    print_table(rows, header)
    for rate in rates:
        print(f"gpu-check: input pipeline alone at batch {rate['batch_size']}: "
              f"{rate['ms_per_batch']:.2f} ms/batch, {rate['examples_per_sec']:.0f} examples/s")
    for line in failed:
        print(f"gpu-check: not as planned: {line}")
    if skipped:
        print("gpu-check: left out for the budget: " + "; ".join(skipped))
    print(f"gpu-check: {budget.elapsed:.0f} s in all; wrote {out_dir}/gpu-check.md, "
          f"gpu-check.jsonl and {LOGS_ARCHIVE}")
    return 1 if compare_failed else 0


if __name__ == "__main__":
    with sigterm_interrupts():  # SIGTERM stops the check as Ctrl-C does: exit 143
        sys.exit(exit_on_error(main))
