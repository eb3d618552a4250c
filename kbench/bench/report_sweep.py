"""Sweep reports (`kbench compare --sweep` / `--max-batch`, `kbench report` of their records).

One row per backend and swept value (medians over repeats, as kbench.bench.report's rows,
with the overhead against the native twin at the same point); under `--max-memory` or on a
device, the points that ran out of memory and those skipped for it. A device-count sweep
(`simulate_devices`) gives each data-parallel point's scaling efficiency against the
backend's single-replica run. A batch-size sweep adds the cost model (kbench.bench.cost_model):
step time = a + b x batch per backend, the fit's errors, and where one backend overtakes
another. `--max-batch` adds the largest batch that fits per backend. The chart plots
examples/s and peak memory (device MB where known, else host RSS) against the swept value, one
line per backend, on a log axis where the values grow geometrically. `--baseline` compares two
sweeps of the same field point by point.
"""

import numbers
import os

from kbench.bench import cost_model, report
from kbench.bench.records import read_jsonl

DEVICES = "simulate_devices"  # kbench.bench.sweep's device-count field
MAX_BATCH_TOLERANCE = 0.125  # as kbench.bench.sweep searches
FRAMEWORK_COLORS = {"jax": "tab:blue", "tensorflow": "tab:orange", "torch": "tab:green"}
CSV_FIELDS = ("backend", "sweep_field", "sweep_value", "status", "runs", "step_time_ms",
              "step_time_p10_ms", "step_time_p90_ms", "examples_per_sec", "compile_s",
              "peak_rss_mb", "peak_device_mb", "vs_native", "vs_native_min", "vs_native_max",
              "num_replicas",
              "scaling_efficiency", "vs_baseline", "baseline_step_time_ms", "other_cpu_share",
              "error")
FIT_FIELDS = ("backend", "a_ms", "a_se_ms", "b_ms_per_example", "b_se_ms_per_example", "r2",
              "runs_fitted", "batch_min", "batch_max", "a_minus_twin_ms")
MAX_BATCH_FIELDS = ("backend", "largest_batch", "smallest_oom_batch", "tries",
                    "step_time_ms", "examples_per_sec", "peak_rss_mb", "peak_device_mb",
                    "search")


def is_sweep(rows):
    return any(r.get("sweep_field") for r in rows)


def field_of(rows):
    return next((r["sweep_field"] for r in rows if r.get("sweep_field")), None)


def _numeric(values):
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def values_of(rows):
    """The swept values: ascending when numbers, else in the order they ran."""
    values = []
    for row in rows:
        if row.get("sweep_field") and row["sweep_value"] not in values:
            values.append(row["sweep_value"])
    return sorted(values) if _numeric(values) else values


def summarize(rows):
    """One dict per backend and value (report.summarize at each point), grouped by backend
    in first-seen order, values ascending."""
    field = field_of(rows)
    values = values_of(rows)
    items = []
    for value in values:
        at = [r for r in rows if r.get("sweep_field") and r["sweep_value"] == value]
        for item in report.summarize(at):
            item.update(sweep_field=field, sweep_value=value)
            if item["status"] == "oom":  # the memory it reached when it ran out
                for key in ("peak_rss_mb", "peak_device_mb"):
                    item[key] = max((r[key] for r in at if r.get(key) is not None
                                     and report.run_label(r) == item["backend"]), default=None)
            items.append(item)
    if field == DEVICES:  # efficiency against the single-replica run (the 1-device point)
        single = {i["backend"]: i for i in items if not i["backend"].endswith(" dp")}
        for item in items:
            ref = single.get(item["backend"].removesuffix(" dp"))
            if item["backend"].endswith(" dp") and ref:
                item["scaling_efficiency"] = report.scaling_efficiency(item, ref)
    labels = list(dict.fromkeys(report.run_label(r) for r in rows))
    items.sort(key=lambda i: (labels.index(i["backend"]), values.index(i["sweep_value"])))
    return items


def fit_costs(rows):
    """{backend: LineFit or None} over the ok runs of a batch-size sweep (each repeat a
    point: its median step time against its global batch)."""
    fits = {}
    for label in dict.fromkeys(report.run_label(r) for r in rows):
        ok = [r for r in rows if report.run_label(r) == label and r["status"] == "ok"
              and r.get("step_time_ms") is not None]
        fits[label] = cost_model.fit_line([r["batch_size"] for r in ok],
                                          [r["step_time_ms"] for r in ok])
    return fits


def max_batches(rows):
    """Per backend of a --max-batch search: the largest batch that ran ok (with its
    measurements), the smallest above it that ran out of memory, the tries and the outcome."""
    found = []
    for label in dict.fromkeys(report.run_label(r) for r in rows):
        tries = [r for r in rows if report.run_label(r) == label]
        ok = [r for r in tries if r["status"] == "ok"]
        best = max(ok, key=lambda r: r["batch_size"], default=None)
        fit = best["batch_size"] if best else None
        misses = [r["batch_size"] for r in tries if r["status"] == "oom"
                  and (fit is None or r["batch_size"] > fit)]
        miss = min(misses, default=None)
        broken = [r for r in tries if r["status"] not in ("ok", "oom")]
        if broken:
            outcome = f"stopped: batch {broken[-1]['batch_size']} {broken[-1]['status']}"
        elif fit is None:
            outcome = "nothing fits" if miss == 1 else "no batch fitted within the tries"
        elif miss is None:
            outcome = "every batch tried fits (raise --max-batch-tries)"
        elif miss - fit <= 1 or miss <= fit * (1 + MAX_BATCH_TOLERANCE):
            outcome = f"limit in [{fit}, {miss})"
        else:
            outcome = f"limit in [{fit}, {miss}); tries ran out"
        found.append({"backend": label, "largest_batch": fit, "smallest_oom_batch": miss,
                      "tries": len(tries), "search": outcome,
                      **{k: best.get(k) if best else None for k in (
                          "step_time_ms", "examples_per_sec", "peak_rss_mb",
                          "peak_device_mb")}})
    return found


def compare_to_baseline(items, baseline_rows):
    """Point by point against a baseline sweep of the same field (report's noise rule)."""
    field, base_field = items[0]["sweep_field"] if items else None, field_of(baseline_rows)
    if base_field != field:
        why = (f"swept {base_field}" if base_field else "is no sweep")
        for item in items:
            item.update(vs_baseline=f"not comparable: the baseline {why}",
                        baseline_step_time_ms=None)
        return items
    for value in dict.fromkeys(i["sweep_value"] for i in items):
        report.compare_to_baseline([i for i in items if i["sweep_value"] == value],
                                   [r for r in baseline_rows if r.get("sweep_field")
                                    and r["sweep_value"] == value])
    return items


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _pm(value, se, spec):
    return "-" if value is None else (format(value, spec)
                                       + ("" if se is None else " ± " + format(se, spec)))


def table(items, title):
    from rich.table import Table

    field = items[0]["sweep_field"]
    t = Table(title=title)
    columns = ["backend", field, "status", "ms/step", "p10-p90 ms", "examples/s", "compile s",
               "peak RSS MB", "device MB", "vs native"]
    with_efficiency = any(i.get("scaling_efficiency") is not None for i in items)
    with_baseline = any(i.get("vs_baseline") for i in items)
    columns += ["replicas", "scaling eff."] if with_efficiency else []
    columns += ["vs baseline"] if with_baseline else []
    for name in columns:
        t.add_column(name, justify="left" if name in ("backend", field, "status",
                                                      "vs baseline") else "right")
    for i in items:
        spread = (f"{i['step_time_p10_ms']:.1f}-{i['step_time_p90_ms']:.1f}"
                  if i["step_time_p10_ms"] is not None else "-")
        row = [i["backend"], str(i["sweep_value"]), i["status"], _fmt(i["step_time_ms"], ".1f"),
               spread, _fmt(i["examples_per_sec"], ".0f"), _fmt(i["compile_s"], ".1f"),
               _fmt(i["peak_rss_mb"], ".0f"), _fmt(i["peak_device_mb"], ".0f"),
               report.ratio_cell(i)]
        if with_efficiency:
            row += [_fmt(i.get("num_replicas"), ".0f"),
                    "-" if i.get("scaling_efficiency") is None
                    else f"{100 * i['scaling_efficiency']:.0f}%"]
        if with_baseline:
            row.append(i.get("vs_baseline") or "-")
        t.add_row(*row)
    return t


def fit_rows(fits):
    """The cost model per backend as CSV / table rows; a Keras backend's fixed cost is also
    given against its native twin's (the framework overhead per step)."""
    out = []
    for name, fit in fits.items():
        if fit is None:
            continue
        twin = fits.get(report.NATIVE_TWIN.get(name.removesuffix(" dp"), ""))
        out.append({"backend": name, "a_ms": fit.a, "a_se_ms": fit.a_se,
                    "b_ms_per_example": fit.b, "b_se_ms_per_example": fit.b_se, "r2": fit.r2,
                    "runs_fitted": fit.n, "batch_min": fit.x_min, "batch_max": fit.x_max,
                    "a_minus_twin_ms": fit.a - twin.a if twin and not name.endswith(" dp")
                    else None})
    return out


def fit_table(rows):
    from rich.table import Table

    t = Table(title="cost model: step time = a + b x batch (least squares over every timed "
                    "run, weighted by 1/time^2; ± standard error)")
    for name in ("backend", "a ms/step", "b ms/example", "R^2", "runs", "a - twin's a ms",
                 "examples/s at large batch (1000/b)"):
        t.add_column(name, justify="left" if name == "backend" else "right")
    for r in rows:
        t.add_row(r["backend"], _pm(r["a_ms"], r["a_se_ms"], ".2f"),
                  _pm(r["b_ms_per_example"], r["b_se_ms_per_example"], ".3f"),
                  _fmt(r["r2"], ".3f"), str(r["runs_fitted"]),
                  _fmt(r["a_minus_twin_ms"], "+.2f"),
                  _fmt(1000.0 / r["b_ms_per_example"] if r["b_ms_per_example"] > 0 else None,
                       ".0f"))
    return t


def max_batch_table(found):
    from rich.table import Table

    t = Table(title="largest batch that trains (--max-batch)")
    for name in ("backend", "largest batch", "smallest oom", "tries", "ms/step", "examples/s",
                 "peak RSS MB", "device MB", "search"):
        t.add_column(name, justify="left" if name in ("backend", "search") else "right")
    for f in found:
        t.add_row(f["backend"], _fmt(f["largest_batch"], "d"), _fmt(f["smallest_oom_batch"], "d"),
                  str(f["tries"]), _fmt(f["step_time_ms"], ".1f"),
                  _fmt(f["examples_per_sec"], ".0f"), _fmt(f["peak_rss_mb"], ".0f"),
                  _fmt(f["peak_device_mb"], ".0f"), f["search"])
    return t


def describe(rows):
    """The setting of the sweep, leaving out the field it varies."""
    field = field_of(rows)
    first = next((r for r in rows if r.get("status") == "ok"), rows[0])
    values = values_of(rows)
    model = "" if field == "model" else f": {first.get('model', '?')}"
    text = f"{first.get('recipe', '?')}{model} on {first.get('dataset', '?')}"
    if field != "batch_size":
        text += f", batch {first.get('batch_size', '?')}"
    device = (first.get("device") or "").split(",")[0]
    search = any(r.get("search") == "max_batch" for r in rows)
    text += f", {first.get('dtype_policy', '?')}" + (f", {device}" if device else "")
    text += ("; largest batch search" if search
             else f"; swept {field} over {', '.join(map(str, values))}")
    cap = first.get("max_memory_mb")
    return text + (f"; --max-memory {cap:g} MB" if cap else "")


def print_problems(items, console):
    """Why a point did not run ok: out of memory (what it reached), skipped, failed."""
    for i in items:
        if i["error"]:
            color = "yellow" if i["status"] in ("oom", "skipped") else "red"
            console.print(f"[{color}]{i['backend']} {i['sweep_field']}={i['sweep_value']} "
                          f"{i['status']}:[/{color}] {i['error'].strip().splitlines()[-1]}",
                          markup=True, highlight=False)


def _framework(label):
    return label.removesuffix(" dp").removeprefix("native-").removesuffix("-stock")


def log_scale(values):
    """Whether the values grow geometrically (positive numbers spanning 8x or more)."""
    return _numeric(values) and min(values) > 0 and max(values) >= 8 * min(values)


def write_chart(items, rows, path, title):
    """examples/s and peak memory against the swept value, one line per backend; points that
    ran out of memory are crosses at the memory they reached, the cap a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field = items[0]["sweep_field"]
    values = values_of(rows)
    numeric = _numeric(values)
    where = (lambda v: v) if numeric else values.index
    device = any(i.get("peak_device_mb") for i in items)
    memory_key, memory_label = (("peak_device_mb", "peak device memory MB") if device
                                else ("peak_rss_mb", "peak host RSS MB"))
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    labels = list(dict.fromkeys(i["backend"] for i in items))
    for label in labels:
        color = FRAMEWORK_COLORS.get(_framework(label), "tab:gray")
        style = ("--" if label.startswith("native") else "-." if "-stock" in label else "-")
        marker = "s" if label.endswith(" dp") else "o"
        ok = [i for i in items if i["backend"] == label and i["examples_per_sec"]]
        single = next((i for i in items if i["examples_per_sec"] and field == DEVICES
                       and label.endswith(" dp") and i["backend"] == label[:-3]), None)
        if single:  # a device-count line starts at its single-replica run
            ok = [single] + ok
        xs = [where(i["sweep_value"]) for i in ok]
        speed_ax.plot(xs, [i["examples_per_sec"] for i in ok], style, marker=marker,
                      color=color, label=label)
        if single:
            speed_ax.plot(xs, [single["examples_per_sec"] * x for x in xs], ":", color=color,
                          alpha=0.6, label=f"{label}: linear scaling")
        memory = [(where(i["sweep_value"]), i[memory_key]) for i in ok if i[memory_key]]
        if memory:
            memory_ax.plot(*zip(*memory), style, marker=marker, color=color, label=label)
        ran_out = [(where(r["sweep_value"]), r.get(memory_key)) for r in rows
                   if report.run_label(r) == label and r["status"] == "oom" and r.get(memory_key)]
        if ran_out:
            memory_ax.plot(*zip(*ran_out), "x", color=color, markersize=10, mew=2)
    cap = next((r.get("max_memory_mb") for r in rows if r.get("max_memory_mb")), None)
    if cap and not device:
        memory_ax.axhline(cap, color="tab:red", linestyle=":", label=f"--max-memory {cap:g} MB")
    for ax in (speed_ax, memory_ax):
        ax.set_xlabel(field)
        if numeric and log_scale(values):
            ax.set_xscale("log", base=2)
        if numeric:
            ax.set_xticks(values, [str(v) for v in values])
        else:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.grid(alpha=0.3)
    if numeric and log_scale([i["examples_per_sec"] for i in items if i["examples_per_sec"]]
                             or [0]):
        speed_ax.set_yscale("log")
    speed_ax.set_ylabel("training examples / s (median step)")
    memory_ax.set_ylabel(memory_label + " (x: ran out of memory)")
    speed_ax.legend(fontsize="small")
    memory_ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    report.save_figure(fig, path)


def render(rows, out_dir, baseline=None, console=None, results=None):
    """Print the sweep's tables and write results.csv, results.png (and cost_model.csv or
    max_batch.csv) into out_dir; returns the per-point summary."""
    rows = [r for r in rows if r.get("sweep_field")]
    items = summarize(rows)
    if baseline:
        compare_to_baseline(items, read_jsonl(baseline))
    title = describe(rows)
    console.print(table(items, title))
    print_problems(items, console)
    report.print_ratio_warnings(items, console)
    report.print_load_warnings(items, console)
    report.print_garbage_warnings(items, console)
    os.makedirs(out_dir, exist_ok=True)
    report.write_csv(items, os.path.join(out_dir, "results.csv"), fields=CSV_FIELDS)
    written = ["results.csv", "results.png"]
    if field_of(rows) == "batch_size":
        fits = fit_costs(rows)
        fitted = fit_rows(fits)
        if fitted:
            console.print(fit_table(fitted))
            statements, same_order, poor = cost_model.crossovers(fits)
            for text in statements:
                console.print(text, markup=False, highlight=False)
            if same_order:
                console.print(f"{len(statements) and 'the other ' or ''}{same_order} pair(s) of "
                              "backends keep their order over the swept batches",
                              markup=False, highlight=False)
            if poor:
                console.print(f"no crossover for {', '.join(poor)}: a line fits its timings "
                              f"with R^2 < {cost_model.MIN_R2} (not linear, or too noisy), or "
                              "through two runs only (untested)",
                              markup=False, highlight=False)
            report.write_csv(fitted, os.path.join(out_dir, "cost_model.csv"),
                             fields=FIT_FIELDS)
            written.append("cost_model.csv")
    if any(r.get("search") == "max_batch" for r in rows):
        found = max_batches(rows)
        console.print(max_batch_table(found))
        report.write_csv(found, os.path.join(out_dir, "max_batch.csv"),
                         fields=MAX_BATCH_FIELDS)
        written.append("max_batch.csv")
    write_chart(items, rows, os.path.join(out_dir, "results.png"), title)
    console.print(report.results_line(out_dir, written, results))
    return items
