"""Tables, CSV and charts from benchmark records (`kbench compare`'s output, `kbench report`).

Runs that trained to a target accuracy (`kbench compare --target-accuracy`) are reported by
kbench.bench.report_target instead, sweeps (`--sweep`, `--max-batch`) by
kbench.bench.report_sweep. Otherwise: one summary row per backend: medians over repeats, the p10-p90 spread of step times, the
overhead ratio of each Keras backend against its native twin, and, with a baseline, whether a
run is slower or faster than the baseline by more than the measured noise. Data-parallel runs
(`kbench compare --distribute data_parallel`) get their own row, "<backend> dp", with their
replica count and scaling efficiency: throughput on N replicas / (N x the same backend's
single-replica throughput), both at the same global batch.
"""

import csv
import math
import os
import statistics

from kbench.bench.records import error_line, not_finite, read_jsonl

NATIVE_TWIN = {"jax": "native-jax", "tensorflow": "native-tensorflow", "torch": "native-torch",
               "tensorflow-stock": "native-tensorflow", "torch-stock": "native-torch",
               "torch-compiled": "native-torch-compiled"}
# Keras-torch under --jit-compile on is measured against the twin under torch.compile.
COMPILED_TWIN = {"native-torch": "native-torch-compiled"}
CSV_FIELDS = ("backend", "status", "runs", "step_time_ms", "step_time_p10_ms",
              "step_time_p90_ms", "examples_per_sec", "compile_s", "peak_rss_mb",
              "peak_device_mb", "achieved_tflops", "test_accuracy", "test_loss",
              "vs_native", "vs_native_min", "vs_native_max", "vs_baseline",
              "baseline_step_time_ms", "num_replicas", "scaling_efficiency",
              "input_wait_fraction", "other_cpu_share", "error")
# A row whose timed steps waited longer than this share of their time for the input
# pipeline measured the pipeline as much as the framework: the table flags it.
INPUT_WAIT_FLAG = 0.05


# What a row measured, beyond its backend: a baseline row that differs in any of these
# measured something else, and gets no verdict.
SETUP_KEYS = ("recipe", "model", "dataset", "batch_size", "dtype_policy")


def setup_of(row):
    """SETUP_KEYS of a record; a recipe file by its name (`recipes/x.py` and `x` alike)."""
    setup = {key: row.get(key) for key in SETUP_KEYS}
    if isinstance(setup["recipe"], str):
        setup["recipe"] = os.path.splitext(os.path.basename(setup["recipe"]))[0]
    return setup


def mixed_compares(rows):
    """What in `rows` no one compare would hold (None: nothing): records of time to target
    beside step times, a sweep beside plain runs or another sweep, or runs of one sweep point
    (of a plain compare: all of them) that were asked for another recipe, model, dataset,
    batch size or dtype policy. `kbench report` renders one compare: over several, its title
    would name one and its medians mix runs that measured other things."""
    kinds = {"time to target" if r.get("target_accuracy") is not None else
             f"a sweep of {r['sweep_field']}" if r.get("sweep_field") else "step times"
             for r in rows}
    if len(kinds) > 1:
        return " beside ".join(sorted(kinds))
    points = {}  # a sweep's points differ in their field, and in what it changes (arch: model)
    for r in rows:
        points.setdefault(repr(r.get("sweep_value")), []).append(r)
    for point in points.values():
        for key in SETUP_KEYS:
            values = {_asked(r, key) for r in point} - {None}
            if len(values) > 1:
                return f"{key.replace('_', ' ')} {' and '.join(sorted(map(str, values)))}"
    return None


def _asked(row, key):
    """A record's SETUP_KEYS field as the compare asked for it: a recipe may build a model of
    another name than its --model (a native twin records the name asked)."""
    asked = (row.get("config") or {}).get(key) if key == "model" else None
    return asked if asked is not None else setup_of(row)[key]


def _median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def median_test_loss(runs):
    """The runs' median test loss, NaN when any run's is not finite: one garbage run marks
    its row (a median would hide it)."""
    if any(not_finite(r.get("test_loss")) for r in runs):
        return math.nan
    return _median(runs, "test_loss")


def run_label(row):
    """The summary row a run belongs to: its backend, or "<backend> dp" for data-parallel."""
    if row.get("distribution") in (None, "none"):
        return row["backend"]
    return f"{row['backend']} dp"


def scaling_efficiency(parallel, single):
    """Throughput on N replicas / (N x single-replica throughput); None when unknown."""
    n = parallel.get("num_replicas")
    if not n or not parallel.get("examples_per_sec") or not single.get("examples_per_sec"):
        return None
    return parallel["examples_per_sec"] / (n * single["examples_per_sec"])


def group_runs(rows):
    """[(summary row label, its runs)] in first-seen order, with the runs that finished ok
    and the row's status: "ok", "ok K/N" when some failed, else the last run's status."""
    groups = {}
    for row in rows:
        groups.setdefault(run_label(row), []).append(row)
    grouped = []
    for name, runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        if ok:
            status = "ok" if len(ok) == len(runs) else f"ok {len(ok)}/{len(runs)}"
        else:
            status = runs[-1]["status"]
        grouped.append((name, runs, ok, status))
    return grouped


def last_error(runs):
    """The error of the group's last run that did not finish ok, in one line with its log
    (None when all did): shown under the table even when other repeats of the backend
    finished; the whole error stays in results.jsonl."""
    failed = next((r for r in reversed(runs) if r["status"] != "ok"), None)
    return None if failed is None else error_line(failed)


def busiest_share(runs):
    """The largest other_cpu_share of the runs: one run under load is enough to doubt their
    median."""
    return max((r["other_cpu_share"] for r in runs if r.get("other_cpu_share") is not None),
               default=None)


def summarize(rows):
    """One dict per backend (in first-seen order), aggregated over its repeats."""
    summary, ok_runs = [], {}
    for name, runs, ok, status in group_runs(rows):
        ok_runs[name] = ok
        item = {"backend": name, "status": status, "runs": len(runs),
                "error": last_error(runs)}
        for key in ("step_time_ms", "step_time_p10_ms", "step_time_p90_ms", "examples_per_sec",
                    "compile_s", "peak_rss_mb", "peak_device_mb", "achieved_tflops",
                    "test_accuracy", "num_replicas", "input_wait_fraction"):
            item[key] = _median(ok, key)
        item["other_cpu_share"] = busiest_share(ok)
        item["test_loss"] = median_test_loss(ok)
        item["parallel_of"] = runs[0]["backend"] if name != runs[0]["backend"] else None
        item["jit_compile"] = (runs[0].get("config") or {}).get("jit_compile")
        item["sync_every"] = runs[0].get("sync_every") or 1
        item["setup"] = setup_of((ok or runs)[0])  # a failed run keeps only what was asked
        summary.append(item)
    by_name = {s["backend"]: s for s in summary}
    for item in summary:
        twin_name = NATIVE_TWIN.get(item["backend"], "")
        if item.pop("jit_compile") == "on" and COMPILED_TWIN.get(twin_name) in by_name:
            twin_name = COMPILED_TWIN[twin_name]
        twin = by_name.get(twin_name)
        item["vs_native"] = (item["step_time_ms"] / twin["step_time_ms"]
                             if twin and item["step_time_ms"] and twin["step_time_ms"] else None)
        ratios = ratios_per_repeat(ok_runs[item["backend"]], ok_runs.get(twin_name, []))
        item["vs_native_min"], item["vs_native_max"] = (
            (min(ratios), max(ratios)) if item["vs_native"] and len(ratios) > 1 else (None, None))
        single = by_name.get(item.pop("parallel_of") or "")
        item["scaling_efficiency"] = scaling_efficiency(item, single) if single else None
    return summary


def ratios_per_repeat(runs, twin_runs):
    """Step time over the twin's, per repeat both finished (a repeat's runs ran minutes apart;
    runs of different repeats, further). Their spread is what a machine whose speed drifts
    does to the median ratio: the table shows it beside "vs native"."""
    twin_by_repeat = {r.get("repeat"): r for r in twin_runs if r.get("step_time_ms")}
    return [r["step_time_ms"] / twin_by_repeat[r.get("repeat")]["step_time_ms"]
            for r in runs if r.get("step_time_ms") and r.get("repeat") in twin_by_repeat]


def ratio_cell(item):
    """'1.14x', or '1.14x (0.98-1.35)' with the per-repeat ratios' range."""
    if item.get("vs_native") is None:
        return "-"
    if item.get("vs_native_min") is None:
        return f"{item['vs_native']:.2f}x"
    return f"{item['vs_native']:.2f}x ({item['vs_native_min']:.2f}-{item['vs_native_max']:.2f})"


def noise_ms(item):
    """Half the p10-p90 spread of a run's step times: what a re-run could move by chance."""
    if item.get("step_time_p10_ms") is None or item.get("step_time_p90_ms") is None:
        return 0.0
    return (item["step_time_p90_ms"] - item["step_time_p10_ms"]) / 2.0


# A run that did not finish, in words: "the baseline's run timed out".
ENDED = {"failed": "failed", "timeout": "timed out", "oom": "ran out of memory",
         "skipped": "was skipped"}


def compare_to_baseline(summary, baseline_rows):
    """Mark each backend 'slower' / 'faster' / 'same' against the baseline's step time: slower
    when the median moved by more than the larger of the two runs' noise."""
    to_target = any(r.get("target_accuracy") is not None for r in baseline_rows)
    base = {} if to_target else {s["backend"]: s for s in summarize(baseline_rows)}
    for item in summary:
        ref = base.get(item["backend"])
        item["baseline_step_time_ms"] = ref["step_time_ms"] if ref else None
        if to_target:  # its step times include no warm-up and whole epochs
            item["vs_baseline"] = "not comparable: the baseline measured time to target"
            continue
        if item["step_time_ms"] is None:  # its own failure is said under the table
            item["vs_baseline"] = None
            continue
        if not ref or ref["step_time_ms"] is None:  # no verdict, and why
            item["vs_baseline"] = ("not comparable: no run of it in the baseline" if not ref
                                   else "not comparable: the baseline's run "
                                        + ENDED.get(ref["status"], f"ended {ref['status']}"))
            continue
        if item["sync_every"] != ref["sync_every"]:  # a sync per step is slower by itself
            item["vs_baseline"] = (f"not comparable: synced every {item['sync_every']} vs "
                                   f"{ref['sync_every']} steps")
            continue
        differ = [f"{key.replace('_', ' ')} {item['setup'][key]} vs {ref['setup'][key]}"
                  for key in SETUP_KEYS
                  if item.get("setup", {}).get(key) != ref.get("setup", {}).get(key)]
        if differ:
            item["vs_baseline"] = "not comparable: " + ", ".join(differ)
            continue
        delta = item["step_time_ms"] - ref["step_time_ms"]
        noise = max(noise_ms(item), noise_ms(ref))
        change = 100.0 * delta / ref["step_time_ms"]
        if delta > noise:
            item["vs_baseline"] = f"slower {change:+.1f}%"
        elif -delta > noise:
            item["vs_baseline"] = f"faster {change:+.1f}%"
        else:
            item["vs_baseline"] = f"same {change:+.1f}% (noise {100 * noise / ref['step_time_ms']:.1f}%)"
    return summary


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(summary, title):
    from rich.table import Table

    t = Table(title=title)
    columns = [("backend", "left"), ("status", "left"), ("ms/step", "right"),
               ("p10-p90 ms", "right"), ("examples/s", "right"), ("compile s", "right"),
               ("peak RSS MB", "right"), ("device MB", "right"), ("TFLOP/s", "right"),
               ("test acc", "right"), ("test loss", "right"), ("vs native", "right")]
    with_baseline = any(s.get("vs_baseline") for s in summary)
    if with_baseline:
        columns.append(("vs baseline", "left"))
    with_input_wait = any(s.get("input_wait_fraction") is not None for s in summary)
    if with_input_wait:
        columns.append(("input wait", "right"))
    with_replicas = any((s.get("num_replicas") or 1) > 1 or s["backend"].endswith(" dp")
                        for s in summary)
    if with_replicas:
        columns[2:2] = [("replicas", "right"), ("scaling eff.", "right")]
    for name, justify in columns:
        t.add_column(name, justify=justify)
    for s in summary:
        spread = (f"{s['step_time_p10_ms']:.1f}-{s['step_time_p90_ms']:.1f}"
                  if s["step_time_p10_ms"] is not None else "-")
        row = [s["backend"], s["status"], _fmt(s["step_time_ms"], ".1f"), spread,
               _fmt(s["examples_per_sec"], ".0f"), _fmt(s["compile_s"], ".1f"),
               _fmt(s["peak_rss_mb"], ".0f"), _fmt(s["peak_device_mb"], ".0f"),
               _fmt(s["achieved_tflops"], ".3f"), _fmt(s["test_accuracy"], ".4f"),
               _fmt(s["test_loss"], ".4f"), ratio_cell(s)]
        if with_baseline:
            row.append(s.get("vs_baseline") or "-")
        if with_input_wait:
            row.append(input_wait_cell(s.get("input_wait_fraction")))
        if with_replicas:
            row[2:2] = [_fmt(s.get("num_replicas"), ".0f"),
                        "-" if s.get("scaling_efficiency") is None
                        else f"{100 * s['scaling_efficiency']:.0f}%"]
        t.add_row(*row)
    return t


def input_wait_cell(fraction):
    """'1.2%', or '35.0% !' past INPUT_WAIT_FLAG; '-' where not measured (Keras-TensorFlow
    fetches its batches inside the compiled step)."""
    if fraction is None:
        return "-"
    return f"{100 * fraction:.1f}%" + (" !" if fraction > INPUT_WAIT_FLAG else "")


def print_input_wait_warnings(summary, console):
    """One line under the table per row that waited for its input past INPUT_WAIT_FLAG."""
    slow = [s for s in summary if (s.get("input_wait_fraction") or 0) > INPUT_WAIT_FLAG]
    for s in slow:
        console.print(f"[yellow]{s['backend']}: {100 * s['input_wait_fraction']:.0f}% of its "
                      "timed steps' time went waiting for the input pipeline (over "
                      f"{100 * INPUT_WAIT_FLAG:.0f}%): its step time measures the pipeline "
                      "too: speed the pipeline up (parallel map calls, cache, prefetch)[/yellow]", markup=True, highlight=False)


def print_ratio_warnings(summary, console):
    """One line under the table per Keras row whose per-repeat ratios to its twin fall on
    both sides of parity: the median ratio's side is then the machine's drift, not kbench's
    (a sweep's rows: per point)."""
    for s in summary:
        low, high = s.get("vs_native_min"), s.get("vs_native_max")
        if low is not None and low <= 1.0 <= high:
            where = f" {s['sweep_field']}={s['sweep_value']}" if s.get("sweep_field") else ""
            console.print(f"[yellow]{s['backend']}{where}: its repeats ran {low:.2f}x to "
                          f"{high:.2f}x its native twin's step time, on both sides of 1.00x: "
                          "these runs cannot tell the two apart; rerun with more --repeats, or "
                          "on a steadier machine[/yellow]", markup=True, highlight=False)


def print_load_warnings(summary, console):
    """One line under the table per row whose runs shared the machine with other work past
    machine_load.OTHER_LOAD_FLAG of its CPU time."""
    from kbench.bench.machine_load import OTHER_LOAD_FLAG

    for s in summary:
        share = s.get("other_cpu_share")
        if share is not None and share > OTHER_LOAD_FLAG:
            where = f" {s['sweep_field']}={s['sweep_value']}" if s.get("sweep_field") else ""
            console.print(f"[yellow]{s['backend']}{where}: other processes took "
                          f"{100 * share:.0f}% of this machine's CPU while it ran (over "
                          f"{100 * OTHER_LOAD_FLAG:.0f}%): its times measure that contention "
                          "too (torch's and TensorFlow's threads suffer most); rerun it on an "
                          "idle machine[/yellow]", markup=True, highlight=False)


def print_garbage_warnings(summary, console):
    """One line under the table (plain, sweep or time-to-target) per row that finished but
    whose test loss is not finite: it was timed, but what it computed is garbage. (Training
    losses are guarded in the run itself: "training diverged".)"""
    for s in summary:
        if s["status"].startswith("ok") and not_finite(s.get("test_loss")):
            where = f" {s['sweep_field']}={s['sweep_value']}" if s.get("sweep_field") else ""
            console.print(f"[red]{s['backend']}{where}: its test loss is {s['test_loss']}: the "
                          "model it trained computes garbage, so what it measured compares "
                          "nothing; run it alone to see why (docs/development.md names a jax "
                          "0.11.2 CPU bug that does this)[/red]", markup=True, highlight=False)


def write_csv(summary, path, fields=CSV_FIELDS):
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for s in summary:
            writer.writerow({k: s.get(k) for k in fields})
    os.replace(path + ".tmp", path)


def save_figure(fig, path):
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def print_errors(summary, console):
    """Why each backend whose runs all failed did, under the table."""
    for s in summary:
        if s["error"]:
            console.print(f"[red]{s['backend']} {s['status']}:[/red] {s['error'].strip()}",
                          markup=True, highlight=False)


def write_chart(summary, path, title):
    """Throughput (with p10-p90 error bars) and test accuracy per backend, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["backend"] for s in summary]
    speed = [s["examples_per_sec"] or 0.0 for s in summary]
    # Throughput at the p90 and p10 step times: the error bar's low and high ends.
    err_low, err_high = [], []
    for s, v in zip(summary, speed):
        if v and s["step_time_ms"] and s["step_time_p10_ms"] and s["step_time_p90_ms"]:
            err_low.append(v - v * s["step_time_ms"] / s["step_time_p90_ms"])
            err_high.append(v * s["step_time_ms"] / s["step_time_p10_ms"] - v)
        else:
            err_low.append(0.0)
            err_high.append(0.0)
    accuracy = [s["test_accuracy"] or 0.0 for s in summary]
    colors = ["tab:gray" if s["backend"].startswith("native") else "tab:blue" for s in summary]
    failed = [not s["status"].startswith("ok") for s in summary]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.6 * len(names) + 2.0))
    ax1.barh(names, speed, xerr=[err_low, err_high], color=colors, capsize=3)
    ax1.set_xlabel("training examples / s (median step; bars: p10-p90)")
    ax2.barh(names, accuracy, color=colors)
    ax2.set_xlabel("test accuracy after the timed steps")
    ax2.set_xlim(0, 1)
    for ax in (ax1, ax2):
        ax.invert_yaxis()
        for i, bad in enumerate(failed):
            if bad:
                ax.text(0, i, "  " + summary[i]["status"], va="center", color="tab:red")
    fig.suptitle(title)
    save_figure(fig, path)


def describe(rows):
    """The table's title: the model a Keras run built (its name and parameter count); when
    every run failed, what was asked."""
    ok = [r for r in rows if r.get("status") == "ok"]
    first = next((r for r in ok if not r["backend"].startswith("native")),
                 ok[0] if ok else rows[0] if rows else {})
    device = (first.get("device") or "").split(",")[0]
    parallel = any(r.get("distribution") not in (None, "none") for r in rows)
    if ok:
        model = first.get("model") or "?"
        if first.get("params"):
            model += f" ({first['params']:,} params)"
    else:  # every run failed (some after building their model): what was asked, defaults
        asked = first.get("model") or "the recipe's model"  # named as such
        model = f"every run failed ({asked} asked)"
    recipe = first.get("recipe") or "?"
    batch = (f"{'global ' if parallel else ''}batch {first['batch_size']}"
             if first.get("batch_size") else "the recipe's batch size")
    return (f"{os.path.basename(recipe)}: {model} on {first.get('dataset') or '?'}, {batch}, "
            f"{first.get('dtype_policy') or '?'}"
            + (f", {device}" if device else "")
            + (f", synced every {first['sync_every']} steps" if (first.get("sync_every") or 1) > 1
               else ""))


def make_console():
    """A rich console; when output goes to a file or pipe, wide enough for the whole table."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def results_line(out_dir, written, results=None):
    """The line that says where a report's files are: the records (`results`, a
    results.jsonl elsewhere than out_dir, or out_dir's) and the files `written` to out_dir."""
    listed = os.path.join(out_dir, "results.jsonl")
    if results and os.path.abspath(results) != os.path.abspath(listed):
        return f"results: {results}; {os.path.join(out_dir, written[0])}, {', '.join(written[1:])}"
    return f"results: {listed}, {', '.join(written)}"


def render(rows, out_dir, baseline=None, console=None, results=None):
    """Print the table and write results.csv and results.png into out_dir; returns the summary.
    `results`: the results.jsonl the rows came from, where not in out_dir (kbench report
    --output)."""
    console = console or make_console()
    if not rows:
        console.print("no runs finished")
        return []
    if any(r.get("target_accuracy") is not None for r in rows):
        from kbench.bench import report_target

        return report_target.render(rows, out_dir, baseline=baseline, console=console,
                                    results=results)
    if any(r.get("sweep_field") for r in rows):
        from kbench.bench import report_sweep

        return report_sweep.render(rows, out_dir, baseline=baseline, console=console,
                                   results=results)
    summary = summarize(rows)
    if baseline:
        compare_to_baseline(summary, read_jsonl(baseline))
    title = describe(rows)
    console.print(table(summary, title))
    print_input_wait_warnings(summary, console)
    print_ratio_warnings(summary, console)
    print_load_warnings(summary, console)
    print_garbage_warnings(summary, console)
    print_errors(summary, console)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(summary, os.path.join(out_dir, "results.csv"))
    write_chart(summary, os.path.join(out_dir, "results.png"), title)
    console.print(results_line(out_dir, ("results.csv", "results.png"), results))
    return summary
