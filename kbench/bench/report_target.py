"""Time-to-target reports (`kbench compare --target-accuracy`, `kbench report` of its records).

Time to target is a random variable (the seed moves it by whole evaluation intervals), so each
backend's row aggregates its repeats: runs that reached the target / runs, the median and the
mean ± standard deviation of the time to target over the runs that reached it (a run that
never reached it is counted as such, never averaged in), the median steps and epochs to it,
and the ratio of the median time to the fastest backend's. The chart plots every run's test
accuracy against wall-clock seconds (and against steps, which separates how fast a backend
computes from how fast the model learns), coloured per backend, with the target as a line.
"""

import os
import statistics

from kbench.bench import report
from kbench.bench.records import read_jsonl

FRAMEWORK_COLORS = {"jax": "tab:blue", "tensorflow": "tab:orange", "torch": "tab:green"}
CSV_FIELDS = ("backend", "status", "runs", "reached", "target_accuracy", "eval_every",
              "time_to_target_s", "time_to_target_mean_s", "time_to_target_sd_s",
              "steps_to_target", "epochs_to_target", "compile_s", "eval_seconds",
              "step_time_ms", "best_eval_accuracy", "vs_fastest", "vs_baseline",
              "baseline_time_to_target_s", "other_cpu_share", "error")


def _eval_every(row):
    if row.get("eval_every") == "epoch":
        return "epoch"
    return f"{row.get('eval_every_steps')} steps"


def summarize(rows):
    """One dict per backend (first-seen order; data-parallel runs as "<backend> dp")."""
    summary = []
    for name, runs, ok, status in report.group_runs(rows):
        hit = [r for r in ok if r.get("reached")]
        times = [r["time_to_target_s"] for r in hit]
        summary.append({
            "backend": name, "status": status, "runs": len(runs), "reached": len(hit),
            "reached_text": f"{len(hit)}/{len(runs)}",
            "target_accuracy": runs[0].get("target_accuracy"),
            "eval_every": _eval_every(ok[0] if ok else runs[0]),
            "time_to_target_s": statistics.median(times) if times else None,
            "time_to_target_mean_s": statistics.fmean(times) if times else None,
            "time_to_target_sd_s": statistics.stdev(times) if len(times) > 1 else None,
            "steps_to_target": report._median(hit, "steps_to_target"),
            "epochs_to_target": report._median(hit, "epochs_to_target"),
            "compile_s": report._median(ok, "compile_s"),
            "eval_seconds": report._median(ok, "eval_seconds"),
            "step_time_ms": report._median(ok, "step_time_ms"),
            "best_eval_accuracy": report._median(ok, "best_eval_accuracy"),
            "test_loss": report.median_test_loss(ok),
            "ok_runs": len(ok),
            # How far the runs trained: their last evaluation (every stage of the recipe).
            "trained_epochs": max((r["eval_points"][-1]["epochs"] for r in ok
                                   if r.get("eval_points")), default=None),
            "other_cpu_share": report.busiest_share(ok),
            "error": report.last_error(runs),
        })
    fastest = min((s["time_to_target_s"] for s in summary if s["time_to_target_s"]),
                  default=None)
    for item in summary:
        item["vs_fastest"] = (item["time_to_target_s"] / fastest
                              if fastest and item["time_to_target_s"] else None)
    return summary


def compare_to_baseline(summary, baseline_rows):
    """Mark each backend 'slower' / 'faster' / 'same' in median time to target against the
    baseline's: slower when it moved by more than the larger of the two standard deviations
    over repeats (with a single reaching run on either side there is no noise estimate, and
    the change is given without a verdict)."""
    base = {s["backend"]: s for s in summarize(
        [r for r in baseline_rows if r.get("target_accuracy") is not None])}
    for item in summary:
        ref = base.get(item["backend"])
        item["baseline_time_to_target_s"] = ref["time_to_target_s"] if ref else None
        if ref is None:
            item["vs_baseline"] = ("not comparable: the baseline has no time to target"
                                   if not base else "not comparable: no run of it in the "
                                                    "baseline")
            continue
        if ref["target_accuracy"] != item["target_accuracy"] or ref["eval_every"] != item["eval_every"]:
            item["vs_baseline"] = (f"not comparable: target {ref['target_accuracy']:g} every "
                                   f"{ref['eval_every']} in the baseline")
            continue
        if item["time_to_target_s"] is None or ref["time_to_target_s"] is None:
            item["vs_baseline"] = (f"reached {item['reached_text']} vs {ref['reached_text']} "
                                   "in the baseline")
            continue
        delta = item["time_to_target_s"] - ref["time_to_target_s"]
        change = 100.0 * delta / ref["time_to_target_s"]
        if item["time_to_target_sd_s"] is None or ref["time_to_target_sd_s"] is None:
            item["vs_baseline"] = f"{change:+.1f}% (one reaching run: no noise estimate)"
            continue
        noise = max(item["time_to_target_sd_s"], ref["time_to_target_sd_s"])
        if delta > noise:
            item["vs_baseline"] = f"slower {change:+.1f}%"
        elif -delta > noise:
            item["vs_baseline"] = f"faster {change:+.1f}%"
        else:
            item["vs_baseline"] = (f"same {change:+.1f}% (sd "
                                   f"{100 * noise / ref['time_to_target_s']:.1f}%)")
    return summary


def table(summary, title):
    from rich.table import Table

    fmt = report._fmt
    t = Table(title=title)
    columns = [("backend", "left"), ("status", "left"), ("reached", "right"),
               ("time to target s", "right"), ("mean ± sd s", "right"), ("steps", "right"),
               ("epochs", "right"), ("compile s", "right"), ("eval s", "right"),
               ("ms/step", "right"), ("best acc", "right"), ("vs fastest", "right")]
    with_baseline = any(s.get("vs_baseline") for s in summary)
    if with_baseline:
        columns.append(("vs baseline", "left"))
    for name, justify in columns:
        t.add_column(name, justify=justify)
    for s in summary:
        spread = ("-" if s["time_to_target_mean_s"] is None else
                  f"{s['time_to_target_mean_s']:.1f}"
                  + (f" ± {s['time_to_target_sd_s']:.1f}" if s["time_to_target_sd_s"] is not None
                     else ""))
        row = [s["backend"], s["status"], s["reached_text"],
               fmt(s["time_to_target_s"], ".1f"), spread, fmt(s["steps_to_target"], ".0f"),
               fmt(s["epochs_to_target"], ".2f"), fmt(s["compile_s"], ".1f"),
               fmt(s["eval_seconds"], ".1f"), fmt(s["step_time_ms"], ".1f"),
               fmt(s["best_eval_accuracy"], ".4f"),
               "-" if s["vs_fastest"] is None else f"{s['vs_fastest']:.2f}x"]
        if with_baseline:
            row.append(s.get("vs_baseline") or "-")
        t.add_row(*row)
    return t


def not_reached_lines(summary):
    """What the table's dashes mean, for each backend with ok runs that missed the target."""
    lines = []
    for s in summary:
        missed = s["ok_runs"] - s["reached"]  # failed runs are reported as failed
        if missed:
            lines.append(f"{s['backend']}: {missed} of {s['runs']} run(s) did not reach "
                         f"{s['target_accuracy']:g} within {s['trained_epochs']:g} epoch(s); "
                         f"median best test accuracy {report._fmt(s['best_eval_accuracy'], '.4f')}")
    return lines


def chart_runs(rows):
    """What the chart draws for each run that finished ok: its label, its evaluations
    (seconds since training began, steps, accuracy) and, when it reached the target, the
    crossing: the evaluation the table's time to target is, (seconds, steps, accuracy)."""
    drawn = []
    for row in rows:
        points = row.get("eval_points") or []
        if row["status"] != "ok" or not points:
            continue
        hit = None
        if row.get("reached"):
            point = next(p for p in points if p["steps"] == row["steps_to_target"])
            hit = (row["time_to_target_s"], row["steps_to_target"], point["accuracy"])
        drawn.append({"label": report.run_label(row),
                      "seconds": [p["seconds"] for p in points],
                      "steps": [p["steps"] for p in points],
                      "accuracy": [p["accuracy"] for p in points], "hit": hit})
    return drawn


def chart_figure(rows, title):
    """Test accuracy against wall-clock seconds and against steps, one colour per backend.
    Each evaluation is a marker; the accuracy holds until the next one (a step, not a slope:
    the target only counts at an evaluation), so a line crosses the target where the table
    says, at the ringed marker. Both axes start at 0, the start of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(report.run_label(r) for r in rows))
    colors, spare = {}, iter(plt.get_cmap("tab10").colors[3:] * 10)
    for label in labels:  # a framework's colour for its Keras runs, variants and twin
        framework = label.removeprefix("native-").removesuffix(" dp").removesuffix("-stock")
        colors[label] = FRAMEWORK_COLORS.get(framework) or next(spare)
    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for run in chart_runs(rows):
        color = colors[run["label"]]
        style = dict(color=color, alpha=0.85, linewidth=1.4, marker=".",
                     linestyle=_line_style(run["label"]), where="post")
        by_time.step(run["seconds"], run["accuracy"], **style)
        by_steps.step(run["steps"], run["accuracy"], **style)
        if run["hit"]:
            seconds, steps, accuracy = run["hit"]
            ring = dict(marker="o", markersize=9, markerfacecolor="none", color=color,
                        linestyle="none")
            by_time.plot([seconds], [accuracy], **ring)
            by_steps.plot([steps], [accuracy], **ring)
    target = rows[0]["target_accuracy"]
    for ax in (by_time, by_steps):
        ax.axhline(target, color="tab:red", linestyle=":", linewidth=1.2)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    by_time.set_xlabel("seconds since training began (compile and evaluations included)")
    by_time.set_ylabel("test accuracy at each evaluation (held until the next)")
    by_steps.set_xlabel("optimizer steps (runs that learn alike lie on top of each other)")
    handles = [plt.Line2D([], [], color=colors[label], linestyle=_line_style(label),
                          label=label) for label in labels]
    handles.append(plt.Line2D([], [], color="tab:red", linestyle=":",
                              label=f"target {target:g}"))
    handles.append(plt.Line2D([], [], color="gray", marker="o", markerfacecolor="none",
                              linestyle="none", label="reached (time to target)"))
    by_steps.legend(handles=handles, loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig


def write_chart(rows, path, title):
    report.save_figure(chart_figure(rows, title), path)


def _line_style(label):
    """Solid: Keras with kbench's fast path; dashed: the native twin; dash-dot: stock Keras;
    densely dotted: data-parallel."""
    if label.startswith("native-"):
        return "--"
    if label.endswith(" dp"):
        return (0, (1, 1))
    return "-." if label.endswith("-stock") else "-"


def describe(rows):
    first = next((r for r in rows if r.get("status") == "ok"), rows[0])
    return (report.describe(rows) + f"; time to test accuracy {first['target_accuracy']:g}, "
            f"evaluated every {_eval_every(first)}")


def render(rows, out_dir, baseline=None, console=None, results=None):
    """Print the time-to-target table and write results.csv and results.png into out_dir."""
    console = console or report.make_console()
    summary = summarize(rows)
    if baseline:
        compare_to_baseline(summary, read_jsonl(baseline))
    title = describe(rows)
    console.print(table(summary, title))
    for line in not_reached_lines(summary):
        console.print(line, markup=False, highlight=False)
    report.print_garbage_warnings(summary, console)
    report.print_load_warnings(summary, console)
    report.print_errors(summary, console)
    os.makedirs(out_dir, exist_ok=True)
    report.write_csv(summary, os.path.join(out_dir, "results.csv"), CSV_FIELDS)
    write_chart(rows, os.path.join(out_dir, "results.png"), title)
    console.print(report.results_line(out_dir, ("results.csv", "results.png"), results))
    return summary
