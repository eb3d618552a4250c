"""How cost grows: `kbench compare --sweep FIELD=V1,V2,...` and `kbench compare --max-batch`.

A sweep runs compare's runs (every backend and twin, kbench.bench.compare) once per value of
one recipe Config field that changes the work: `batch_size`, `model` (resnet20,resnet56,...),
`sequence_length`, or with `--distribute data_parallel` the device count `simulate_devices`
(the single-replica runs then run once, as the 1-device reference of the scaling efficiency).
Each point of each backend is its own worker process, `--repeats` times, and its record
carries `sweep_field` and `sweep_value`.

Out of memory is a result: a point that runs out of device memory, or passes `--max-memory
MB` of resident memory, is recorded as `oom`, and the backend's larger values are `skipped`
(they would need more); the other backends go on.

`--max-batch` searches, per backend, the largest batch that trains: from `--batch-size` (the
recipe's by default) it doubles until a batch runs out of memory (or halves until one fits),
then bisects between the largest that fits and the smallest that did not until they are
within MAX_BATCH_TOLERANCE of each other, in at most `--max-batch-tries` runs of
MAX_BATCH_STEPS timed steps each.

kbench.bench.report_sweep renders the table, the cost model and the curves.
"""

import dataclasses
import json
import numbers
import os
import re
import time

from kbench.bench import compare as comparing
from kbench.bench import records
from kbench.errors import KbenchError

DEVICES = "simulate_devices"  # the device-count sweep's field (data-parallel runs)
# Fields a sweep cannot take, and what sets them instead.
# The device count is compare's own option (--simulate-devices), which its sweep sets per point.
NOT_SWEPT = {**{field: use for field, use in comparing.COMPARE_SETS.items() if field != DEVICES},
             "distribute": "--distribute data_parallel (runs one replica and N)",
             "data_dir": "nothing: the data's location does not change the work"}
# The compare flags that set a field; a sweep of the field replaces them.
FLAG_OF = {"batch_size": "--batch-size", "model": "--model", DEVICES: "--simulate-devices"}
MAX_BATCH_STEPS = 3  # timed steps per try: enough to know it fits, and a throughput
MAX_BATCH_TOLERANCE = 0.125  # bisect until the largest fit and smallest miss are this close
# A sweep reports speed and memory, no accuracy, so each run evaluates on this many test
# examples unless --set test_examples says otherwise: at batch 2 the whole synthetic test
# split (2,000 images, 1,000 batches) took Keras-torch minutes, far longer than its training.
SWEEP_TEST_EXAMPLES = 256


def parse_sweep(text):
    """'batch_size=2,8,32' -> ('batch_size', [2, 8, 32]): values parsed as JSON when they can
    be (as --set's), else kept as strings; the field spelt with - or _."""
    field, sep, raw = text.partition("=")
    field = field.strip().replace("-", "_")
    values = [v.strip() for v in raw.split(",")]
    if not sep or not field or not raw.strip() or not all(values):
        raise KbenchError(f"--sweep takes FIELD=V1,V2,... (a recipe Config field and its "
                          f"values, e.g. batch_size=2,8,32,128), not {text!r}")
    parsed = []
    for value in values:
        try:
            parsed.append(json.loads(value))
        except json.JSONDecodeError:
            parsed.append(value)
    repeated = sorted({str(v) for v in parsed if parsed.count(v) > 1})
    if repeated:
        raise KbenchError(f"--sweep {field}: value {repeated[0]} is given twice")
    return field, parsed


def check_sweep(options):
    """One line before any run for a field the recipe lacks or compare sets itself, a flag
    that sets the same field, or a value the field does not take (kbench.config.check)."""
    from kbench.recipe import load_recipe

    field, values = options.sweep
    recipe = load_recipe(comparing._recipe_for_worker(options.recipe))
    if field not in {f.name for f in dataclasses.fields(recipe.Config)}:
        raise KbenchError(f"--sweep {field}: recipe {options.recipe} has no setting {field}")
    if field in NOT_SWEPT:
        raise KbenchError(f"--sweep {field}: compare sets {field} itself; use "
                          f"{NOT_SWEPT[field]}")
    if field in options.extra_config:
        raise KbenchError(f"--sweep {field} and --set {field}: give the values once, in "
                          "--sweep")
    if field in FLAG_OF and _flag_value(options, field) is not None:
        raise KbenchError(f"--sweep {field} and {FLAG_OF[field]}: the sweep sets {field}; "
                          f"drop {FLAG_OF[field]}")
    if field == DEVICES and options.distribute != "data_parallel":
        raise KbenchError(f"--sweep {DEVICES}=... sweeps the device count of data-parallel "
                          "runs: add --distribute data_parallel")
    for value in values:
        if field == DEVICES and (isinstance(value, bool) or not isinstance(value, int)
                                 or value < 1):
            raise KbenchError(f"--sweep {DEVICES}={value}: a device count is an integer >= 1")
        try:
            comparing.check_recipe_settings(point_options(options, field, value), swept=field)
        except KbenchError as exc:
            message = str(exc)  # a recipe's own words name the point already
            unknown = re.match(r"recipe .+ has no setting\(s\) (.*)$", message)
            if unknown and field not in unknown.group(1).split(", "):
                raise KbenchError(f"--set: {message}") from None  # not the sweep's field
            if not message.startswith(f"--sweep {field}="):
                message = f"--sweep {field}={value}: {message}"
            raise KbenchError(message) from None


def _flag_value(options, field):
    return {"batch_size": options.batch_size, "model": options.model,
            DEVICES: options.simulate_devices}[field]


def lean(options, field=None):
    """The options with SWEEP_TEST_EXAMPLES test examples, unless the user set or sweeps
    test_examples, or the recipe has no such setting."""
    from kbench.recipe import load_recipe

    recipe = load_recipe(comparing._recipe_for_worker(options.recipe))
    if ("test_examples" in options.extra_config or field == "test_examples"
            or "test_examples" not in {f.name for f in dataclasses.fields(recipe.Config)}):
        return options
    return dataclasses.replace(options, extra_config={**options.extra_config,
                                                      "test_examples": SWEEP_TEST_EXAMPLES})


def point_options(options, field, value):
    """The compare options of one point: the device count is compare's own option (torch
    starts that many processes); any other field is a recipe setting of every run."""
    if field == DEVICES:
        return dataclasses.replace(options, simulate_devices=value)
    return dataclasses.replace(options, extra_config={**options.extra_config, field: value})


def larger(value, than, values):
    """Whether `value` asks more than `than`: numerically for numbers, else by its place in
    the sweep (resnet20,resnet56,resnet110 grow in that order)."""
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (value, than)):
        return value > than
    return values.index(value) > values.index(than)


def plan_points(options, runs):
    """[(value, point options, [runs])] in the order they run. In a device-count sweep the
    single-replica runs do not depend on the count: they run once, as the 1-device point."""
    field, values = options.sweep
    if field != DEVICES:
        points = [(v, point_options(options, field, v)) for v in values]
        return [(v, point, with_twins_of(point, runs)) for v, point in points]
    single = [run for run in runs if not run[3]]
    parallel = [run for run in runs if run[3]]
    return ([(1, options, single)] if single else []) + [
        (v, point_options(options, field, v), parallel) for v in values]


def with_twins_of(point, runs):
    """The runs of one point less the twins that cannot train it (a model sweep:
    resnet20,resnet9 runs the twins at resnet20 only; an optimizer sweep sgd,adam at sgd
    only; compare.twins_of)."""
    _, left_out = comparing.twins_of(runs, point)
    return [run for run in runs if run[0] not in left_out]


def skipped_record(oom, field, value, repeat):
    """The record of a point not run: a smaller value of the same backend ran out of memory."""
    record = dict.fromkeys(records.FIELDS)
    for key in ("backend", "recipe", "dataset", "model", "batch_size", "dtype_policy",
                "distribution", "num_replicas", "sync_every", "command", "python",
                "git_commit", "max_memory_mb", "search"):
        record[key] = oom.get(key)
    record.update(status="skipped", sweep_field=field, sweep_value=value, repeat=repeat,
                  config={**(oom.get("config") or {}), field: value},
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  error=f"not run: {field}={oom['sweep_value']} already ran out of memory")
    if field in ("model", "batch_size", "dataset", "dtype_policy"):
        record[field] = value
    return record


class Session:
    """The runs of one sweep or search: where they go, what they print, every record."""

    def __init__(self, options, console):
        self.options = options
        self.console = console
        self.out_dir, self._lock = comparing.open_output(options)
        self.results_path = os.path.join(self.out_dir, "results.jsonl")
        self.done = []

    def say(self, text):
        if self.console is None:
            print(text, flush=True)
        else:
            self.console.print(text, markup=False, highlight=False)

    def keep(self, record, label):
        self.done.append(record)
        # Said before it is written: if the write fails (a full disk), the line is its record
        self.say(f"[compare] {label}: {records.one_line(record)}")
        records.write_jsonl_atomic(self.results_path, self.done)

    def run(self, run, options, point, repeat, search=None):
        name, runner, framework, distributed = run
        label = f"{name}{' data_parallel' if distributed else ''} {point[0]}={point[1]}"
        self.say(f"[compare] {label} (run {repeat + 1}/{options.repeats}) ...")
        record = comparing.run_one(name, runner, framework, options, self.out_dir, repeat,
                                   distributed=distributed, point=point)
        record["search"] = search
        self.keep(record, label)
        return record

    def render(self):
        """The tables and files of every finished run: the session's last act (at its end, or
        when interrupted), after which its folder is free."""
        from kbench.bench import report

        try:
            return report.render(self.done, self.out_dir, baseline=self.options.baseline,
                                 console=self.console)
        finally:
            self.close()

    def close(self):
        self._lock.release()

    def interrupted(self):
        self.say(f"[compare] interrupted: {len(self.done)} finished run(s) kept in "
                 f"{self.results_path}" if self.done
                 else "[compare] interrupted before any run finished")
        self.render()


def sweep(options, console=None):
    """Run every backend at every point of options.sweep; returns the records."""
    runs = comparing.plan_runs(options)
    check_sweep(options)
    field, values = options.sweep
    options = lean(options, field)
    session = Session(options, console)
    ran_out = {}  # run label -> its oom record: larger values are skipped
    try:  # from here on the session holds the folder's lock: every way out frees it
        # twins no point can train (--model, --set optimizer=adam, ...), then at each point
        # those that sit it out (a model, an optimizer it lacks)
        said = comparing.say_left_out_twins(options, runs, session.say)
        for value, point, point_runs in plan_points(options, runs):
            if field != DEVICES:
                comparing.say_left_out_twins(point, runs, session.say, said=said)
            for repeat in range(options.repeats):
                for run in comparing.in_repeat_order(point_runs, repeat):
                    key = (run[0], run[3])
                    oom = ran_out.get(key)
                    if oom is not None and larger(value, oom["sweep_value"], values):
                        name = f"{run[0]}{' data_parallel' if run[3] else ''}"
                        session.keep(skipped_record(oom, field, value, repeat),
                                     f"{name} {field}={value}")
                        continue
                    record = session.run(run, point, (field, value), repeat)
                    if record["status"] == "oom" and key not in ran_out:
                        ran_out[key] = record
    except KeyboardInterrupt:
        session.interrupted()
        raise
    except BaseException:  # a failure of its own: the folder is free again
        session.close()
        raise
    session.render()
    return session.done


def search_max_batch(fits, start, tries, tolerance=MAX_BATCH_TOLERANCE):
    """The largest batch for which fits(batch) is "ok": doubling from `start` while it is
    (halving while it is "oom"), then bisection, in at most `tries` calls. Any other answer
    (a failed run) ends the search. Returns (largest "ok" or None, smallest "oom" above it or
    None, why it stopped)."""
    fit, miss, tried = None, None, 0
    batch = start
    while tried < tries:
        answer = fits(batch)
        tried += 1
        if answer == "ok":
            fit = batch
        elif answer == "oom":
            miss = batch
        else:
            return fit, miss, f"stopped: batch {batch} {answer}"
        if miss is None:
            batch = fit * 2
        elif fit is None:
            if miss == 1:
                return None, 1, "even batch 1 runs out of memory"
            batch = miss // 2
        elif miss - fit <= 1 or miss <= fit * (1 + tolerance):
            return fit, miss, "found"
        else:
            batch = (fit + miss) // 2
    return fit, miss, f"{tries} tries used (--max-batch-tries)"


def max_batch(options, console=None):
    """Search the largest batch that trains, per backend and twin; returns the records."""
    from kbench.recipe import load_recipe

    if options.max_batch_tries < 2:  # before the plan, which may load the recipe
        raise KbenchError(f"--max-batch-tries {options.max_batch_tries} is not allowed: the "
                          "search needs at least 2 runs per backend")
    runs = comparing.plan_runs(options)
    comparing.check_recipe_settings(options)
    start = options.batch_size or load_recipe(
        comparing._recipe_for_worker(options.recipe)).Config().batch_size
    short = dataclasses.replace(lean(options), steps=min(options.steps, MAX_BATCH_STEPS),
                                warmup_steps=min(options.warmup_steps, 1), repeats=1,
                                batch_size=None)
    session = Session(short, console)
    try:
        comparing.say_left_out_twins(options, runs, session.say)
        if options.max_memory is None:  # a GPU's own out-of-memory error ends the search
            session.say("[compare] note: no --max-memory: on a CPU the search grows the batch "
                        "until the machine's memory runs out; give --max-memory MB")
        for run in runs:
            def fits(batch, run=run):
                point = point_options(short, "batch_size", batch)
                record = session.run(run, point, ("batch_size", batch), 0, search="max_batch")
                return record["status"]

            fit, miss, why = search_max_batch(fits, start, options.max_batch_tries)
            session.say(f"[compare] {run[0]}{' data_parallel' if run[3] else ''}: largest "
                        f"batch that fits {fit if fit else 'none'} ({why})")
    except KeyboardInterrupt:
        session.interrupted()
        raise
    except BaseException:  # a failure of its own: the folder is free again
        session.close()
        raise
    session.render()
    return session.done


def finished(rows):
    """A sweep or search succeeded when every point ran ok, ran out of memory or was
    skipped for it, and at least one ran ok."""
    return (any(r["status"] == "ok" for r in rows)
            and all(r["status"] in ("ok", "oom", "skipped") for r in rows))
