"""`make gpu-check`: kbench's first look at an NVIDIA GPU, in one command.

    .venv/bin/python tools/gpu_check.py [--output DIR] [--models resnet20,preact_resnet18]
        [--dtypes float32,mixed_bfloat16] [--batch-size resnet20=1024,preact_resnet18=512]

On a machine with an NVIDIA GPU it installs nothing: it asks each framework whether it sees
the GPU (a framework that does not is named and left out, never timed on the CPU instead),
then runs `kbench compare` on synthetic CIFAR data for every model x dtype policy:
  - every Keras backend with `--jit-compile auto` (torch and tensorflow also as torch-stock
    and tensorflow-stock, without kbench's fast path), plus the native twins where they exist (float32 CIFAR ResNets);
  - `--jit-compile on` for the backends where that is not what auto already runs (torch:
    torch.compile; under jax auto is XLA, under tensorflow on a GPU auto is XLA too).
It prints one table with achieved TFLOP/s and MFU (model FLOPs utilisation) against the GPU's
dense peak from PEAKS below, and writes gpu-check.jsonl (every compare record) and
gpu-check.md (the table) into the output folder. Without a GPU it says so in one line and
exits 0.

FLOPs are kbench's analytic count of one model (convolutions and dense layers, training step
= 3x forward; kbench/bench/flops.py), the same number for every row of a model and batch, so
MFU compares like with like. The peak is the tensor-core dense rate for the policy's compute
dtype: bf16 for mixed_bfloat16, fp16 for mixed_float16, and TF32 for float32, because cuDNN
and XLA run float32 convolutions on the TF32 tensor cores by default on Ampere and later.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("jax", "tensorflow", "torch")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, keyed by a word sequence of the
# name nvidia-smi reports; the longest key that matches wins ("H100 PCIe" over "H100").
# Datasheet figures are boost-clock ceilings: real clocks, power and memory bound lower them.
PEAKS = (
    # name substring, bf16, fp16, tf32, source
    ("H200", 989.4, 989.4, 494.7, "H200 SXM datasheet (same SMs and clocks as H100 SXM)"),
    ("GH200", 989.4, 989.4, 494.7, "GH200 datasheet (H100 SXM rates)"),
    ("H100 PCIe", 756.5, 756.5, 378.0, "H100 PCIe datasheet"),
    ("H100 NVL", 835.0, 835.0, 417.5, "H100 NVL datasheet (per GPU)"),
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
NATIVE_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")  # twins' models


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


def backend_sees_gpu(name, python):
    """(sees it, what it said): whether this framework, as installed, computes on the GPU."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    try:
        out = subprocess.run([python, "-c", PROBES[name]], capture_output=True, text=True,
                             timeout=300, env=env)
    except subprocess.TimeoutExpired:
        return False, "timed out asking for its GPUs"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["exit status %d" % out.returncode])[-1]
        return False, f"not usable here ({last})"
    said = out.stdout.strip().splitlines()[-1:] or [""]
    if not said[0]:
        return False, "installed without GPU support here, or its CUDA libraries are missing"
    return True, said[0]


def plan(models, dtypes, backends, batch_sizes, sync_every=10):
    """The `kbench compare` passes to run, most telling first: (label, arguments)."""
    passes, jit_on = [], []
    for dtype in dtypes:
        for model in models:
            common = ["--recipe", "cifar_resnet", "--dataset", "synthetic", "--model", model,
                      "--batch-size", str(batch_sizes[model]), "--dtype-policy", dtype,
                      "--sync-every", str(sync_every)]
            # torch-stock, tensorflow-stock: without kbench's fast path, beside it
            names = [n for b in backends for n in ((b, f"{b}-stock") if b != "jax" else (b,))]
            args = common + ["--backends", ",".join(names), "--jit-compile", "auto"]
            if model in NATIVE_MODELS and dtype == "float32":  # twins of these backends
                args += ["--reference", "native"]
            passes.append((f"{model} {dtype} jit auto", args))
            if "torch" in backends:  # the only backend whose "on" differs from "auto" on a GPU
                jit_on.append((f"{model} {dtype} jit on",
                               common + ["--backends", "torch", "--jit-compile", "on"]))
    return passes + jit_on  # torch.compile's minutes of compiling last


def rows_with_mfu(records, peak):
    """One table row per compare record, with TFLOP/s from the model's analytic count."""
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
        if status == "ok" and not any(k in device.lower() for k in ("gpu", "cuda")):
            status = f"ok, but on {device or 'an unknown device'}"  # never pass it off as GPU
            dense = None  # and no utilisation of a GPU it did not use
        rows.append({
            "model": r.get("model"), "dtype": r.get("dtype_policy"), "backend": r["backend"],
            "jit": r.get("jit"), "batch": r.get("batch_size"), "status": status,
            "step_time_ms": ms, "examples_per_sec": r.get("examples_per_sec"),
            "compile_s": r.get("compile_s"), "peak_device_mb": r.get("peak_device_mb"),
            "tflops": tflops, "mfu": tflops / dense if tflops and dense else None,
            "error": r.get("error"),
        })
    return rows


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


COLUMNS = ("model", "dtype", "backend", "jit", "batch", "status", "ms/step", "examples/s",
           "compile s", "device MB", "TFLOP/s", "MFU")


def cells(row):
    return [row["model"] or "-", row["dtype"] or "-", row["backend"], str(row["jit"]),
            _fmt(row["batch"], "d"), row["status"], _fmt(row["step_time_ms"], ".2f"),
            _fmt(row["examples_per_sec"], ".0f"), _fmt(row["compile_s"], ".1f"),
            _fmt(row["peak_device_mb"], ".0f"), _fmt(row["tflops"], ".1f"),
            "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"]


def markdown(rows, header):
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
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


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _fail(message):
    """A bad argument: one line on stderr, exit status 2 (as argparse and kbench do)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def parse_batch_sizes(text, models):
    sizes = dict(DEFAULT_BATCH)
    for item in filter(None, (text or "").split(",")):
        model, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            _fail(f"gpu-check: --batch-size takes MODEL=N with N >= 1, not {item!r}")
        sizes[model.strip()] = int(value)
    missing = [m for m in models if m not in sizes]
    if missing:
        _fail(f"gpu-check: no batch size for {', '.join(missing)} (it has defaults for "
              f"{', '.join(DEFAULT_BATCH)}); for another kbench model add "
              f"--batch-size {missing[0]}=N")
    return sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as kbench's own commands answer
        _fail(f"gpu-check: {message} (see tools/gpu_check.py --help)")


def main(argv=None):
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None,
                        help="results folder (default runs/gpu-check/<timestamp>)")
    parser.add_argument("--models", default="resnet20,preact_resnet18")
    parser.add_argument("--dtypes", default="float32,mixed_bfloat16")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="backends to try (each is asked first whether it sees the GPU)")
    parser.add_argument("--batch-size", default=None, metavar="MODEL=N,...",
                        help="per-model batch size (default: resnet20=1024,preact_resnet18=512)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--sync-every", type=int, default=10, metavar="K",
                        help="compare --sync-every: a device sync every K steps (a sync per "
                             "step holds a GPU's host back)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in PEAK_KEY]
    if bad:
        _fail(f"gpu-check: unknown dtype policy {bad[0]!r}; use "
                         f"{', '.join(PEAK_KEY)}")
    batch_sizes = parse_batch_sizes(args.batch_size, models)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        _fail(f"gpu-check: unknown backend {unknown[0]!r}; use {', '.join(BACKENDS)}")
    for flag, value, least, kind in (("--steps", args.steps, 1, "an integer"),
                                     ("--warmup-steps", args.warmup_steps, 0, "an integer"),
                                     ("--sync-every", args.sync_every, 1, "an integer"),
                                     ("--timeout", args.timeout, 1, "a number of seconds")):
        if not value >= least:  # NaN too
            _fail(f"gpu-check: {flag} {value} is not allowed: it takes {kind} >= {least}")
    found = gpus()
    if not found:
        print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to "
              "measure.")
        return 0
    gpu_name, memory_mib, driver = found[0]
    peak = peak_for(gpu_name)
    print(f"gpu-check: {len(found)} GPU(s), using the first: {gpu_name}, {memory_mib} MiB, "
          f"driver {driver}")
    if peak:
        print(f"gpu-check: peaks (dense TFLOP/s) bf16 {peak['bf16']}, fp16 {peak['fp16']}, "
              f"tf32 {peak['tf32']} from the {peak['source']}")
    else:
        print(f"gpu-check: no peak known for {gpu_name!r}: MFU left out; add it to PEAKS in "
              "tools/gpu_check.py")

    backends = []
    for name in names:
        sees, said = backend_sees_gpu(name, args.python)
        print(f"gpu-check: {name}: {'sees ' + said if sees else said + '; left out'}")
        if sees:
            backends.append(name)
    if not backends:
        print("gpu-check: no framework here sees the GPU; nothing to measure.")
        return 1

    out_dir = os.path.abspath(args.output or os.path.join("runs", "gpu-check",
                                                          time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out_dir, exist_ok=True)
    header = (f"kbench gpu-check on {gpu_name} ({memory_mib} MiB, driver {driver}), synthetic "
              f"CIFAR data, {args.steps} timed steps after {args.warmup_steps} warm-up, synced "
              f"every {args.sync_every}; MFU "
              "against the dense peak of the policy's compute dtype (TF32 for float32)")
    records = []
    passes = plan(models, dtypes, backends, batch_sizes, args.sync_every)
    for index, (label, compare_args) in enumerate(passes):
        pass_dir = os.path.join(out_dir, f"{index:02d}-{label.replace(' ', '-')}")
        command = [args.python, "-m", "kbench.cli", "compare", *compare_args,
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--timeout", str(args.timeout), "--output", pass_dir]
        print(f"\ngpu-check: {label}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=ROOT)  # a failed pass is in its records; go on
        path = os.path.join(pass_dir, "results.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                records += [json.loads(line) for line in f if line.strip()]
        # After every pass: a stopped check still leaves what it measured.
        write_atomic(os.path.join(out_dir, "gpu-check.jsonl"),
                     "".join(json.dumps(r) + "\n" for r in records))
        write_atomic(os.path.join(out_dir, "gpu-check.md"),
                     markdown(rows_with_mfu(records, peak), header))
    rows = rows_with_mfu(records, peak)
    print()
    print_table(rows, header)
    print(f"gpu-check: wrote {out_dir}/gpu-check.md and gpu-check.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
