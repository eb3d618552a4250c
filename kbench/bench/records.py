"""Benchmark records: one JSON object per run, in DIR/results.jsonl (schema in DESIGN.md).

A record is built in the parent (what was asked: backend, config, command) and completed from
the worker's measurements; a failed run keeps the first part plus `status` and `error`.
"""

import json
import math
import os
import statistics
import time

from kbench import backend
from kbench.files import write_text_atomic

# oom: ran out of device memory or passed --max-memory; skipped: a sweep did not run it, as a
# smaller point of the same backend ran out of memory.
STATUSES = ("ok", "failed", "timeout", "oom", "skipped")
TARGET_FIELDS = ("target_accuracy", "reached", "time_to_target_s", "steps_to_target",
                 "epochs_to_target", "eval_every_steps", "eval_every", "eval_points",
                 "eval_seconds", "best_eval_accuracy")
# How the run executed, as the worker reports it (None where it does not apply):
# compiler: "xla" | "torch.compile" | "tf.function" | "eager"; memory_format: "channels_last" |
# "channels_first" (the layout the model hands the convolutions: Keras rows, their layers'
# data_format; on a GPU, XLA and TensorFlow's layout optimizer may lay them out again);
# cudnn_benchmark: bool on CUDA; autocast_dtype: the compute dtype under a mixed policy;
# float32_precision: "tf32" | "highest".
SETTING_FIELDS = ("compiler", "memory_format", "cudnn_benchmark", "autocast_dtype",
                  "float32_precision")
# Every record has these keys (None where unknown or not applicable).
FIELDS = (
    "backend", "status", "error", "step_time_ms", "step_time_p10_ms", "step_time_p90_ms",
    "steps_timed", "examples_per_sec", "compile_s", "peak_rss_mb", "peak_device_mb",
    "test_accuracy", "test_loss", "flops_per_step", "flops_source", "achieved_tflops",
    "xla_flops_per_step",  # native-jax: XLA's cost analysis of its step, beside the analytic
    "versions", "device", "config", "command", "git_commit", "git_dirty", "kbench_version",
    "timestamp",
    "recipe", "model", "dataset", "batch_size", "dtype_policy", "jit", "params", "repeat",
    "python", "wall_s", "num_replicas", "distribution", "sync_every", "fast_path", "seed",
    *SETTING_FIELDS, "input_wait_fraction",
    # Other processes' share of the machine's CPU during the run (kbench.bench.machine_load)
    "other_cpu_share",
    # Torch on CUDA: PyTorch's synchronizing operations a warm-up step made (kbench.sync_watch)
    "syncs_per_step", "sync_sites",
    # Time-to-target mode (kbench compare --target-accuracy; kbench.target.TargetProbe).
    *TARGET_FIELDS,
    # Sweeps (kbench compare --sweep / --max-batch, kbench.bench.sweep); the memory cap.
    "sweep_field", "sweep_value", "search", "max_memory_mb",
)


def new_record(name, spec, options, command, python, repeat):
    record = dict.fromkeys(FIELDS)
    record.update(
        backend=name, status="failed", recipe=spec["recipe"], model=spec["config"].get("model"),
        dataset=spec["config"].get("dataset"), batch_size=spec["config"].get("batch_size"),
        dtype_policy=spec["config"].get("dtype_policy"), config=spec["config"], command=command,
        python=python, repeat=repeat, **backend.provenance(),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        distribution=spec["config"].get("distribute", "none"), num_replicas=1,
        sync_every=spec.get("sync_every", 1),
    )
    if spec.get("target"):  # what was asked; the run fills in the epoch length
        every = spec["target"].get("eval_every_steps")
        record.update(target_accuracy=spec["target"]["accuracy"],
                      eval_every="steps" if every else "epoch", eval_every_steps=every or None)
    return record


def fill_measurements(record, result):
    """Complete a record from a worker's result: medians and spread of the step times (one
    per step, or with --sync-every k one mean per window of k steps)."""
    times_ms = sorted(1000.0 * t for t in result.get("step_times") or [])
    record.update(status="ok", error=None)
    for key in ("compile_s", "peak_rss_mb", "peak_device_mb", "test_accuracy", "test_loss",
                "flops_per_step", "flops_source", "xla_flops_per_step", "versions", "device",
                "git_commit", "git_dirty", "kbench_version", "jit",
                "params", "num_replicas", "distribution", "fast_path", *SETTING_FIELDS,
                "input_wait_fraction", "syncs_per_step", "sync_sites"):
        if result.get(key) is not None:
            record[key] = result[key]
    record["config"] = result.get("config") or record["config"]
    for key in ("model", "dataset", "batch_size", "dtype_policy", "seed"):  # as resolved
        record[key] = record["config"].get(key, record[key])
    # The model built, by its Keras name: a recipe's build_model may not follow config.model.
    record["model"] = result.get("model") or record["model"]
    if record.get("target_accuracy") is not None:
        for key in TARGET_FIELDS:
            record[key] = result.get(key)
        if result.get("target_accuracy") is None:
            record.update(status="failed", error="the run recorded no time to target")
            return record
    if not times_ms and record.get("target_accuracy") is not None:
        return record  # reached before a steady-state step was timed: no step time
    if not times_ms:
        record.update(status="failed", error="no steady-state steps were timed; raise --steps")
        return record
    median = statistics.median(times_ms)
    record.update(
        step_time_ms=median,
        step_time_p10_ms=percentile(times_ms, 10),
        step_time_p90_ms=percentile(times_ms, 90),
        steps_timed=result.get("steps_timed") or len(times_ms),
        examples_per_sec=record["batch_size"] * 1000.0 / median,
    )
    if record["flops_per_step"]:
        record["achieved_tflops"] = record["flops_per_step"] / (median / 1000.0) / 1e12
    return record


def error_line(record, folder=None):
    """A failed run in one line: the first line of its error (the exception's type and
    message), and its log (in `folder`, the results folder, when given)."""
    lines = (record.get("error") or "").strip().splitlines()
    text = lines[0] if lines else "no error text"
    log = record.get("log")
    if log:
        text += f" (log: {os.path.join(folder, log) if folder else log})"
    return text


def one_line(record, folder=None):
    if record["status"] != "ok":
        return f"{record['status']}: {error_line(record, folder)}"
    if record.get("target_accuracy") is not None:
        from kbench.target import describe

        return describe(record, compile_s=record.get("compile_s"))
    replicas = record.get("num_replicas") or 1
    return (f"{record['step_time_ms']:.1f} ms/step (p10 {record['step_time_p10_ms']:.1f}, "
            f"p90 {record['step_time_p90_ms']:.1f}), {record['examples_per_sec']:.0f} ex/s"
            + (f" on {replicas} replicas" if replicas > 1 else "")
            + f", compile {record['compile_s']:.1f} s, test acc {record['test_accuracy']:.3f}")


def write_jsonl_atomic(path, rows):
    write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path):
    from kbench.errors import KbenchError

    if not os.path.isfile(path):
        raise KbenchError(f"{path} does not exist; pass the results.jsonl that kbench compare wrote")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise KbenchError(f"{path}:{number} is not a JSON record") from None
                why = not_a_record(row)
                if why:
                    raise KbenchError(f"{path}:{number} is not a kbench compare record: {why}")
                rows.append(row)
    except UnicodeDecodeError:
        raise KbenchError(f"{path} is not a text file of JSON records; pass the results.jsonl "
                          "that kbench compare wrote") from None
    return rows


# A record's numbers, as report and its tables read them: each a number or null.
NUMBER_FIELDS = ("step_time_ms", "step_time_p10_ms", "step_time_p90_ms", "examples_per_sec",
                 "compile_s", "peak_rss_mb", "peak_device_mb", "achieved_tflops",
                 "test_accuracy", "test_loss", "batch_size", "sync_every", "num_replicas",
                 "input_wait_fraction", "other_cpu_share")


def not_a_record(row):
    """Why a parsed line is not a record report can read (None when it is one)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key in ("backend", "status"):
        if not isinstance(row.get(key), str):
            return f"no {key} name"
    for key in (*NUMBER_FIELDS, *TARGET_NUMBER_FIELDS):
        if row.get(key) is not None and not _is_number(row[key]):
            return f"{key} is {row[key]!r}, not a number"
    if not isinstance(row.get("config") or {}, dict):
        return f"config is {row['config']!r}, not an object of settings"
    return not_a_target_record(row) or not_a_sweep_record(row)


# The time-to-target numbers report's target table and plot read (each a number or null).
TARGET_NUMBER_FIELDS = ("target_accuracy", "time_to_target_s", "steps_to_target",
                        "epochs_to_target", "eval_every_steps", "eval_seconds",
                        "best_eval_accuracy")
EVAL_POINT_FIELDS = ("steps", "epochs", "seconds", "accuracy")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def not_a_target_record(row):
    """Why a record's time-to-target fields other than its numbers are not what report
    reads, or None."""
    if row.get("reached") not in (None, True, False):
        return f"reached is {row['reached']!r}, not true or false"
    if row.get("reached") and not _is_number(row.get("time_to_target_s")):
        return "it reached its target but holds no time_to_target_s"
    points = row.get("eval_points")
    if points is not None and not (isinstance(points, list) and all(
            isinstance(p, dict) and all(_is_number(p.get(k)) for k in EVAL_POINT_FIELDS)
            for p in points)):
        return ("eval_points is not a list of evaluations (each with its "
                f"{', '.join(EVAL_POINT_FIELDS)})")
    return None


def not_a_sweep_record(row):
    """Why a record's sweep fields are not what report reads, or None."""
    field = row.get("sweep_field")
    if field is None:
        return None
    if not isinstance(field, str):
        return f"sweep_field is {field!r}, not a setting's name"
    # null is a value a sweep may take (--sweep train_examples=256,null: the recipe's default)
    if "sweep_value" not in row or not isinstance(row["sweep_value"],
                                                  (str, int, float, type(None))):
        return f"a point of the {field} sweep with no sweep_value (a setting's value)"
    return None


def read_results(out_dir):
    """The records a `kbench compare` wrote into out_dir so far; [] when it wrote none (a
    compare stopped before its first run ended)."""
    path = os.path.join(out_dir, "results.jsonl")
    return read_jsonl(path) if os.path.isfile(path) else []


def not_finite(loss):
    """Whether a recorded loss is NaN or infinite (None: not measured, not garbage)."""
    return loss is not None and not math.isfinite(loss)


def percentile(values, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
