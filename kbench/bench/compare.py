"""`kbench compare`: run one recipe under every backend, each in its own process, and record
honest measurements side by side.

Every run is a fresh interpreter (kbench.bench.worker) with KERAS_BACKEND set, optionally from
its own virtualenv (`--python jax=/envs/jax/bin/python`). With `--distribute data_parallel` each
Keras backend runs twice, on one replica and on N (JAX / TensorFlow: every visible device, or
`--simulate-devices N` CPU devices; torch: N processes under torchrun), with the same global
batch, and the report shows the scaling efficiency. A run that fails to import, crashes,
runs out of memory or passes the timeout is recorded with its status and the tail of its
error; the other runs go on. Each record is written to DIR/results.jsonl as soon as its run
ends (atomically), so Ctrl-C or a crash never loses a finished run. With a target accuracy
(`--target-accuracy`, kbench.target) each run trains until it reaches it instead, and the
report is kbench.bench.report_target's time to target. With `--max-memory MB` a run whose
processes pass MB of resident memory is stopped and recorded as `oom`, as is one that runs out
of device memory; `kbench compare --sweep` / `--max-batch` (kbench.bench.sweep) run these
runs at several points.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import types
import typing

from kbench import backend
from kbench.bench import machine_load, records
from kbench.errors import KbenchError
from kbench.recipe import recipe_path

KERAS_BACKENDS = ("jax", "tensorflow", "torch")
# Keras runs under another name: the backend, and the recipe settings that make them differ.
KERAS_VARIANTS = {"tensorflow-stock": ("tensorflow", {"fast_path": "off"}),  # stock Keras
                  "torch-stock": ("torch", {"fast_path": "off"}),
                  # Keras' torch steps under torch.compile (kbench.keras_fixes makes them
                  # traceable); plain `torch` follows --jit-compile (auto: eager).
                  "torch-compiled": ("torch", {"jit_compile": "on"})}
# Native twin -> the framework it needs (and whose interpreter runs it).
NATIVE = {"native-jax": "jax", "native-tensorflow": "tensorflow", "native-torch": "torch",
          "native-torch-compiled": "torch"}
# The compiled twin: the reference of Keras-torch under torch.compile, run with --jit-compile
# on or beside `torch-compiled` (on this CPU it compiles for ~20 s and then steps slower than
# eager, so it is not in every --reference native run).
COMPILED_TWINS = ("native-torch-compiled",)
# The models each framework's twins implement (kbench.bench.native_common refuses others).
CIFAR_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
TWIN_MODELS = {framework: (*CIFAR_RESNETS, "preact_resnet18")
               for framework in ("jax", "tensorflow", "torch")}
ERROR_TAIL_LINES = 25
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


@dataclasses.dataclass
class CompareOptions:
    recipe: str = "cifar_resnet"
    backends: tuple = ()  # empty: every installed backend
    reference: str = "none"  # "native": add the native twins of the frameworks compared
    dataset: str = "synthetic"
    model: str | None = None  # None: the recipe's default
    batch_size: int | None = None
    steps: int = 20
    warmup_steps: int = 3
    # Steps between device syncs while timing (1: exact per-step times). None: 1, except
    # with a target, where the time to target must not pay for syncs training would not do
    # (the step timer then syncs at evaluations and epoch ends only).
    sync_every: int | None = None
    epochs: int | None = None
    dtype_policy: str = "float32"
    jit_compile: str = "auto"
    float32_precision: str = "tf32"  # one precision for every run: kbench.backend
    repeats: int = 1
    timeout: float = 900.0
    python: dict = dataclasses.field(default_factory=dict)  # backend -> interpreter
    output: str | None = None
    baseline: str | None = None
    extra_config: dict = dataclasses.field(default_factory=dict)
    distribute: str = "none"  # "data_parallel": also run each Keras backend data-parallel
    simulate_devices: int | None = None  # CPU devices (jax, tensorflow) / processes (torch)
    # Time to a target accuracy (kbench.target): each run trains until its test accuracy
    # reaches target_accuracy, evaluating every eval_every steps (None: every epoch), for at
    # most max_epochs epochs (None: the recipe's); repeat r uses the recipe's seed + r.
    target_accuracy: float | None = None
    eval_every: int | None = None
    max_epochs: int | None = None
    # Cost curves (kbench.bench.sweep): sweep = (Config field, [values]); max_batch: search
    # the largest batch that fits, in at most max_batch_tries runs per backend. max_memory:
    # a cap in MB on the resident memory of each run's processes (host RAM; testable on CPU).
    sweep: tuple | None = None
    max_batch: bool = False
    max_batch_tries: int = 10
    max_memory: float | None = None


def installed_backends():
    """Keras backends whose framework this interpreter has (found without importing it)."""
    return [b for b in KERAS_BACKENDS if importlib.util.find_spec(b) is not None]


def plan_runs(options):
    """[(name, runner, framework, distributed)] in the order they will run: with
    --distribute data_parallel, each Keras backend on one replica, then data-parallel."""
    backends = list(options.backends) or installed_backends()
    for name in backends:
        if name not in KERAS_BACKENDS and name not in KERAS_VARIANTS:
            raise KbenchError(f"unknown backend {name!r}; use one of: "
                              f"{', '.join(KERAS_BACKENDS + tuple(KERAS_VARIANTS))}")
    if options.sync_every is not None and options.sync_every < 1:
        raise KbenchError(f"sync_every must be at least 1, not {options.sync_every}")
    if not 0 < options.timeout < float("inf"):  # NaN too
        raise KbenchError(f"--timeout {options.timeout:g} is not allowed: it takes seconds > 0")
    if options.epochs is not None and options.epochs < 1:  # (0 would time --steps instead)
        raise KbenchError(f"--epochs {options.epochs} is not allowed: it takes a number of "
                          "whole epochs >= 1 (or leave it out to time --steps)")
    if options.distribute not in ("none", "data_parallel"):
        raise KbenchError(f"--distribute must be none or data_parallel, not "
                          f"{options.distribute!r}")
    if options.simulate_devices is not None and options.distribute == "none":
        raise KbenchError("--simulate-devices N goes with --distribute data_parallel")
    if options.simulate_devices is not None and not (
            1 <= options.simulate_devices <= backend.MAX_SIMULATED_DEVICES):
        raise KbenchError(f"--simulate-devices {options.simulate_devices} is not allowed: it "
                          f"takes 1 to {backend.MAX_SIMULATED_DEVICES} devices")
    if options.simulate_devices and options.batch_size and (
            options.batch_size % options.simulate_devices):
        # Said before any run: each data-parallel run would refuse it after the one-replica
        # runs had been timed. (The device count of a real machine is known only in a run.)
        raise KbenchError(f"--batch-size {options.batch_size} does not divide among "
                          f"--simulate-devices {options.simulate_devices} replicas: use a "
                          f"multiple of {options.simulate_devices}")
    runs = []
    for b in backends:
        framework = KERAS_VARIANTS[b][0] if b in KERAS_VARIANTS else b
        runs.append((b, "keras", framework, False))
        if options.distribute == "data_parallel":
            runs.append((b, "keras", framework, True))
    if options.reference not in ("native", "none"):
        raise KbenchError(f"--reference must be native or none, not {options.reference!r}")
    for name in options.python:  # (a twin's framework is always a Keras run's)
        if name not in KERAS_BACKENDS:
            raise KbenchError(f"--python {name}=... names no backend; use jax, tensorflow or torch")
        if name not in {framework for _, _, framework, _ in runs}:  # else unused, unsaid
            raise KbenchError(f"--python {name}=... is for {name}, which this compare does not "
                              f"run (backends: {', '.join(backends)}): add {name} to "
                              "--backends, or drop it")
    check_target_options(options)
    if options.reference == "native":  # the twins of the Keras runs: last, as judging them
        wanted, _ = twins_of(runs, options)  # loads the recipe (Keras), after the cheap checks
        runs += [(n, n, fw, False) for n, fw in NATIVE.items() if n in wanted]
    return runs


def twins_of(runs, options):
    """(twins to run, twins left out) for the Keras `runs`: each framework's eager twin, for
    its runs other than `torch-compiled`; the compiled twin for `torch-compiled` and, under
    --jit-compile on, for torch (whose eager twin runs beside it). A twin that cannot train
    what the Keras runs train (its framework has not the model, TWIN_MODELS, or the twins do
    not implement a setting: why_left_out) is left out; compare says so."""
    keras_runs = [(name, framework) for name, runner, framework, _ in runs if runner == "keras"]
    eager = {framework for name, framework in keras_runs if name != "torch-compiled"}
    wanted = {f"native-{framework}" for framework in eager}
    config = run_config(options)  # the flags, or --set model=... and the like
    if any(name == "torch-compiled" for name, _ in keras_runs) or (
            config.get("jit_compile") == "on" and "torch" in eager):
        wanted.add("native-torch-compiled")
    points = judged_points(options)
    left_out = {n for n in wanted if all(why_left_out(n, point) for point in points)}
    return wanted - left_out, left_out


def judged_points(options):
    """The settings a plan's twins are judged on: the options themselves, or for the plan of
    a whole sweep of a recipe setting, each of its points (a twin runs at the points it can
    train: --sweep model=resnet20,resnet9 keeps the twins for resnet20, and a recipe whose
    default model has no twin keeps them for a sweep of CIFAR ResNets)."""
    field, values = options.sweep or (None, ())
    if field is None or field == "simulate_devices" or field in options.extra_config:
        return [options]  # no sweep, a device-count sweep, or one point of a sweep
    return [dataclasses.replace(options, extra_config={**options.extra_config, field: value})
            for value in values]


def why_left_out(twin, options):
    """Why `twin` cannot train what the Keras runs train (one line), or None. The settings
    are the runs': compare's flags and --set over the recipe's defaults (its own model,
    optimizer, data set...), as the twin would get them."""
    from kbench.bench.native_common import unsupported_setting

    framework = NATIVE[twin]
    settings = types.SimpleNamespace(**{**recipe_defaults(options.recipe), **run_config(options)})
    model = getattr(settings, "model", None)
    if model is None:  # a recipe of the user's without the field
        return (f"its {framework} twin trains a model it implements "
                f"({', '.join(TWIN_MODELS[framework])}), and the recipe names none")
    if model not in TWIN_MODELS[framework]:
        return (f"its {framework} twin has no model {model} (it covers "
                f"{', '.join(TWIN_MODELS[framework])})")
    refused = unsupported_setting(settings)
    if refused:
        what, fix = refused
        return f"its {framework} twin implements {what} (use {fix} to compare against it)"
    return None


def recipe_defaults(recipe):
    """{field: default} of the recipe's Config: what a run gets where compare sets nothing.
    Loads the recipe (its imports: Keras); a recipe that cannot load is one line."""
    recipe_path(recipe)  # an unknown name or a missing file: its line, before Keras loads
    return _recipe_defaults(_recipe_for_worker(recipe))  # a file by its absolute path


@functools.lru_cache(maxsize=None)
def _recipe_defaults(recipe):
    from kbench.recipe import load_recipe

    fields = dataclasses.fields(load_recipe(recipe).Config)
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in fields if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}


def say_left_out_twins(options, runs, say, said=()):
    """One line per twin that twins_of left out, before any run starts (at a sweep's point:
    before the point's runs), but those in `said`; returns the twins left out."""
    if options.reference != "native":
        return set()
    left_out = twins_of(runs, options)[1]
    for twin in sorted(left_out - set(said)):
        say(f"[compare] {twin} left out: {why_left_out(twin, judged_points(options)[0])}")
    return left_out


def check_target_options(options):
    """The time-to-target settings: each in its range, and only with --target-accuracy."""
    target = options.target_accuracy
    if target is None:
        if options.eval_every is not None or options.max_epochs is not None:
            raise KbenchError("--eval-every and --max-epochs go with --target-accuracy A")
        return
    if not 0 < target <= 1:  # NaN fails this too
        raise KbenchError(f"--target-accuracy {target} is not allowed: it takes a test "
                          "accuracy > 0 and <= 1 (e.g. 0.95)")
    if options.eval_every is not None and options.eval_every < 1:
        raise KbenchError(f"--eval-every {options.eval_every} is not allowed: it takes a number "
                          "of steps >= 1 (or --eval-every-epoch, the default)")
    if options.max_epochs is not None and options.max_epochs < 1:
        raise KbenchError(f"--max-epochs {options.max_epochs} is not allowed: it takes an "
                          "integer >= 1")
    if options.epochs is not None:
        raise KbenchError("--epochs times whole epochs; with --target-accuracy, cap the "
                          "training with --max-epochs N instead")


def sync_every(options):
    """Steps between the step timer's syncs: --sync-every, by default 1 (exact per-step
    times), or with a target None (windows end at evaluations and epoch ends only)."""
    if options.sync_every is not None:
        return options.sync_every
    return None if options.target_accuracy is not None else 1


def target_spec(options):
    """The worker's `target` setting; None outside time-to-target mode."""
    if options.target_accuracy is None:
        return None
    return {"accuracy": options.target_accuracy, "eval_every_steps": options.eval_every or 0,
            "max_epochs": options.max_epochs}


# Recipe settings compare has flags of the same name for.
COMPARE_FLAG_FIELDS = ("dataset", "model", "batch_size", "dtype_policy", "jit_compile",
                       "float32_precision")


def run_config(options):
    """Overrides of the recipe's Config shared by every run (same model, batch, data, dtype)."""
    overrides = {field: getattr(options, field) for field in COMPARE_FLAG_FIELDS}
    return {**{k: v for k, v in overrides.items() if v is not None}, **options.extra_config}


# Recipe settings kbench.bench.worker sets for every run, which --set would not change.
COMPARE_SETS = {"epochs": "--epochs (or --steps; with a target, --max-epochs)",
                "steps_per_epoch": "--steps",
                "target_accuracy": "--target-accuracy", "eval_every_steps": "--eval-every",
                "epoch_checkpoints": "nothing: runs to a target write none (the twins "
                                     "do not either), the others checkpoint off the clock",
                "validate_every_epoch": "nothing: a compare run evaluates once, at its end",
                "verbose": "nothing: each run's log is in logs/",
                "output_dir": "--output (each run gets its own folder)",
                "resume": "nothing: a compare run starts from scratch",
                # Each backend splits the work its own way (torch: one process per device,
                # started by torchrun), which compare's flags arrange and a recipe setting cannot.
                "distribute": "--distribute data_parallel",
                "simulate_devices": "--simulate-devices N with --distribute data_parallel"}


def check_recipe_settings(options, swept=None):
    """Build the recipe's Config as every run will and check it (kbench.config.check): an
    unknown recipe, an unknown `--set` field or a value out of range is one line before any
    run starts, not the same failure once per run. An unknown recipe is answered before
    Keras loads; the Config's checks need the recipe file, which imports Keras. The
    recipe's messages name its own flags; they are reworded as compare takes them (`--set`,
    or `--sweep` for the field `swept`)."""
    ruled = sorted(set(options.extra_config) & set(COMPARE_SETS))
    if ruled:
        raise KbenchError(f"--set {ruled[0]} is compare's to set, per run: use "
                          f"{COMPARE_SETS[ruled[0]]}")
    recipe_path(options.recipe)
    from kbench.bench import worker
    from kbench.config import check, check_values
    from kbench.recipe import check_main_takes_callbacks, load_recipe

    recipe = load_recipe(_recipe_for_worker(options.recipe))
    check_main_takes_callbacks(recipe)
    spec = {"recipe": options.recipe, "config": run_config(options), "epochs": options.epochs,
            "steps": options.steps, "warmup_steps": options.warmup_steps,
            "target": target_spec(options)}
    try:
        config = worker.run_config(recipe, spec)
        check_values(recipe.Config, dataclasses.asdict(config))  # each field first
        _check_compare_rules(config, options.extra_config, swept)
        config = check(config)
        # A recipe's own check of what must exist before it trains (finetune: its
        # --init-from file), optional in the recipe contract: once here, not as the same
        # failure per run.
        if hasattr(recipe, "check_inputs"):
            recipe.check_inputs(config)
    except KbenchError as exc:
        raise KbenchError(as_set_options(str(exc), recipe.Config, swept)) from None


def _check_compare_rules(config, given=(), swept=None):
    """Rules between a recipe's settings that compare words itself, where the recipe's own
    remedy is a setting compare owns (COMPARE_SETS). `given`: the fields the user set;
    `swept`: as for as_set_options."""
    monitor, patience = getattr(config, "monitor", ""), getattr(config, "early_stopping", 0)
    if patience and monitor.startswith("val_"):
        # The recipe would say "turn on --validate-every-epoch": compare turns it off.
        never_logged = f"a compare run never logs {monitor} (it evaluates once, at its end)"
        if swept == "monitor":
            raise KbenchError(f"--sweep monitor={monitor} with --set early_stopping={patience}: "
                              f"{never_logged}: sweep monitors without val_, or drop --set "
                              "early_stopping")
        stopping = f"{'--sweep' if swept == 'early_stopping' else '--set'} early_stopping"
        watched = (f"--set monitor={monitor}" if "monitor" in given
                   else f"monitor {monitor} (the default)")
        raise KbenchError(f"{stopping}={patience} watches {watched}, but {never_logged}: use "
                          f"--set monitor={monitor.removeprefix('val_')}, or drop {stopping}")


# What follows a flag in a recipe's message when it names a value: a repr (quoted, a
# number, True/False/None) or a placeholder (N, A, PATH). Anything else is the sentence going on.
_VALUE = r"(?:'[^']*'|[-+]?(?:\d|\.\d|inf\b|nan\b)|True\b|False\b|None\b|[A-Z]+\b)"


def as_set_options(message, config, swept=None):
    """A recipe's message in the words of compare, which takes the recipe's own flags as
    `--set FIELD=VALUE`: `--init-from PATH` becomes `--set init_from=PATH`, `--momentum 2`
    `--set momentum=2`, a switch `--early-stopping` `--set early_stopping=true` and a flag
    named without a value `--set FIELD` (`--sweep` where `swept` names the field a sweep
    sets). `config`: the recipe's Config, class or instance."""
    from kbench.flags import _flag_type, flag_of

    config_cls = config if isinstance(config, type) else type(config)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in COMPARE_FLAG_FIELDS or field.name in COMPARE_SETS:
            continue  # compare's own flag, or not the user's to set
        name, option = field.name, "--sweep" if field.name == swept else "--set"
        flag = flag_of(name)
        kind, is_bool = _flag_type(hints[name])
        # Paths and names are printed after their flag; a number or a switch may not be.
        value = r"\S" if kind is str else _VALUE
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?:=| )(?={value})", f"{option} {name}=",
                         message)
        if is_bool:
            message = re.sub(rf"(?<![\w-])--no-{re.escape(flag[2:])}(?![\w-])",
                             f"{option} {name}=false", message)
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])",
                         f"{option} {name}" + ("=true" if is_bool else ""), message)
    return message


def distribute_config(framework, options):
    """The recipe settings of a data-parallel run. JAX and TensorFlow split the CPU into
    --simulate-devices devices in one process; torch replicas are processes (torchrun)."""
    config = {"distribute": "data_parallel"}
    if options.simulate_devices and framework != "torch":
        config["simulate_devices"] = options.simulate_devices
    return config


def worker_command(python, framework, distributed, options, spec_path, result_path,
                   log_dir=None):
    """The worker's command line: torch data-parallel runs start under torchrun, one process
    per --simulate-devices (CPU, gloo) or per GPU. `log_dir`: the folder torchrun makes its
    per-attempt, per-rank folders in (empty unless a rank records its error, or torchrun is
    told to redirect output); without one it makes a new folder in /tmp for every job and
    leaves it there."""
    worker = ["-m", "kbench.bench.worker", spec_path, result_path]
    if distributed and framework == "torch":
        processes = str(options.simulate_devices) if options.simulate_devices else "gpu"
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                processes, *(["--log-dir", log_dir] if log_dir else []), *worker]
    return [python, *worker]


def run_one(name, runner, framework, options, out_dir, repeat, distributed=False, point=None):
    """Run one worker process and return its record (ok, failed, timeout or oom). `point`:
    (field, value) of a sweep, written into the record and into the run's file names."""
    python = options.python.get(framework, sys.executable)
    label = f"{name}-dp" if distributed else name
    if point is not None:
        label += f"-{point[0]}={point[1]}"
    spec = {"recipe": _recipe_for_worker(options.recipe), "runner": runner, "steps": options.steps,
            "warmup_steps": options.warmup_steps, "epochs": options.epochs,
            "sync_every": sync_every(options), "target": target_spec(options),
            # Time to target is a random variable: its repeats sample it with other seeds.
            "seed_offset": repeat if options.target_accuracy is not None else 0,
            "config": {**run_config(options),
                       **KERAS_VARIANTS.get(name, (None, {}))[1],
                       **(distribute_config(framework, options) if distributed else {}),
                       "output_dir": os.path.join(out_dir, "runs", f"{label}-r{repeat}")}}
    if runner != "keras":
        spec["config"]["output_dir"] = None
    log_path = os.path.join(out_dir, "logs", f"{label}-r{repeat}.log")
    torchrun_dir = os.path.join(out_dir, "logs", f"{label}-r{repeat}-torchrun")  # torch DDP only
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        command = worker_command(python, framework, distributed, options, spec_path,
                                 result_path, log_dir=torchrun_dir)
        env = {**os.environ, "KERAS_BACKEND": framework, "PYTHONUNBUFFERED": "1"}
        record = records.new_record(name, spec, options, command=_user_command(),
                                    python=python, repeat=repeat)
        if distributed:  # what was asked; the worker's result says what ran
            record.update(distribution="data_parallel",
                          num_replicas=options.simulate_devices)
        if point is not None:
            record.update(sweep_field=point[0], sweep_value=point[1])
        record["max_memory_mb"] = options.max_memory
        start, others = time.monotonic(), machine_load.OtherLoad()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True,  # its own group: killable as one
                                    preexec_fn=stop_with_parent())
            try:
                returncode, over_cap_mb = _wait(proc, options.timeout, options.max_memory)
            except KeyboardInterrupt:  # Ctrl-C: stop this run's whole process group too
                _kill_group(proc)
                raise
        record["wall_s"] = time.monotonic() - start
        record["other_cpu_share"] = others.share()
        result = _read_result(result_path)
        if over_cap_mb is not None:
            record.update(status="oom", peak_rss_mb=over_cap_mb,
                          error=f"out of memory: its processes' resident memory reached "
                                f"{over_cap_mb:.0f} MB, over the --max-memory cap of "
                                f"{options.max_memory:g} MB; stopped")
        elif result is not None and result.get("out_of_memory"):
            record.update(status="oom", error=f"out of memory: {result['out_of_memory']}",
                          peak_rss_mb=result.get("peak_rss_mb"),
                          peak_device_mb=result.get("peak_device_mb"))
        elif returncode is None:
            record.update(status="timeout",
                          error=(f"no result after {options.timeout:g} s (--timeout)\n"
                                 + _tail(log_path, 5)).rstrip("\n"))
        elif returncode != 0 or result is None or "error" in result:
            record.update(status="failed",
                          error=_explain(returncode, _tail(log_path), (result or {}).get("error")))
        else:
            records.fill_measurements(record, result)
            _check_peak(record, options.max_memory)
    record["log"] = os.path.relpath(log_path, out_dir)
    return record


# A poll of the worker's process tree costs about 1 ms of CPU (psutil walks /proc): every
# 250 ms that is 0.4% of a core taken from the run it measures. What a poll misses between
# two, the peak RSS check at the end (_check_peak) still catches.
MEMORY_POLL_S = 0.25


def _wait(proc, timeout, cap_mb):
    """Wait for the worker: (its exit status or None after `timeout` s, None or the resident
    MB of its process group when that passed `cap_mb` and it was stopped). RLIMIT_AS would
    not do as the cap: JAX and TensorFlow reserve far more address space than they touch."""
    if cap_mb is None:
        try:
            return proc.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, None
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        rss = _group_rss_mb(proc.pid)
        if rss > cap_mb:
            _kill_group(proc)
            return proc.returncode, rss
        if time.monotonic() > deadline:
            _kill_group(proc)
            return None, None
        time.sleep(MEMORY_POLL_S)
    return proc.returncode, None


def _group_rss_mb(pid):
    """Resident MB of a process and its descendants (a torchrun job is several)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _check_peak(record, cap_mb):
    """A run that finished but whose peak RSS (the kernel's high-water mark, exact where the
    polling can miss a short spike) passed the cap ran out of memory under it too."""
    if cap_mb is not None and (record.get("peak_rss_mb") or 0) > cap_mb:
        record.update(status="oom", error=f"out of memory: peak RSS {record['peak_rss_mb']:.0f} "
                                          f"MB, over the --max-memory cap of {cap_mb:g} MB")


def _recipe_for_worker(recipe):
    """A recipe name as it is; a recipe file as an absolute path."""
    if recipe.endswith(".py") or os.sep in recipe:
        return recipe_path(recipe)
    return recipe


def stop_with_parent():
    """A preexec_fn that has the kernel send the worker SIGTERM when this process dies
    (Linux's PR_SET_PDEATHSIG), or None elsewhere. A compare stopped by SIGTERM or Ctrl-C
    stops its workers itself; one killed (SIGKILL: the out-of-memory killer) could not, and
    its worker, in a session of its own, ran on: its timings were lost and it skewed the
    next benchmark's. The worker (or torchrun, which passes it on) stops cleanly on SIGTERM.
    The C function is looked up here, before the fork: the child only calls it. (preexec_fn
    is safe only while this process runs one thread, as compare does; and the kernel ties
    the signal to the thread that started the worker, the main thread, which lives as long
    as compare.)"""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call: no signal would come
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path, lines=ERROR_TAIL_LINES):
    with open(path, errors="replace") as f:
        text = f.read().strip().splitlines()
    # Drop TensorFlow/XLA start-up chatter so the tail shows the actual error.
    text = [line for line in text if not line.startswith(("I0000", "WARNING: All log"))]
    return "\n".join(text[-lines:])


def _read_result(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _explain(returncode, tail, failure=None):
    """A failed run's error: its first line says why (the worker's exception, type and
    message, or how the process ended), the log's tail follows."""
    if failure:
        return f"{failure}\n{tail}"
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode).name
        hint = " (killed: out of memory?)" if sig == "SIGKILL" else ""
        return f"worker died with {sig}{hint}\n{tail}"
    # No word from the worker (it never got that far: e.g. a broken interpreter): the
    # log's last exception line, or else, when it failed, its last line (an interpreter
    # without kbench: "python: Error while finding module specification for ... (...)").
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    raised = [line for line in lines if EXCEPTION_LINE.match(line)] or (
        lines[-1:] if returncode else [])
    return (f"worker exited with status {returncode}"
            + (f": {raised[-1]}" if raised else "") + f"\n{tail}")


def framework_of(name):
    """The framework a run's name runs on ("torch-stock" -> "torch", "native-jax" -> "jax")."""
    return NATIVE.get(name) or KERAS_VARIANTS.get(name, (name,))[0]


def refused_alike(done):
    """The error line when runs under two different frameworks, and every run so far, were
    refused with the same kbench error (data that is not there, a setting the recipe
    refuses, ...): every other run would be refused alike, each after its start-up; None
    otherwise (torch and torch-stock, or torch and native-torch, are one framework)."""
    if len(done) < 2 or any(r["status"] != "ok" and not (r.get("error") or "").startswith(
            "KbenchError: ") for r in done) or any(r["status"] == "ok" for r in done):
        return None
    messages = {(r.get("error") or "").strip().splitlines()[0] for r in done}
    frameworks = {framework_of(r["backend"]) for r in done}
    if len(messages) == 1 and len(frameworks) > 1:
        return "every run was refused alike: " + messages.pop().removeprefix("KbenchError: ")
    return None


def _user_command():
    return "kbench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "kbench"


def open_output(options):
    """(results folder, its FolderLock held) for one compare, sweep or search: --output, or
    runs/compare/<timestamp>. A folder that already holds a compare's results.jsonl is
    refused rather than overwritten, and no two compares write into one folder at once."""
    from kbench.files import MADE_FOLDERS

    if options.output:
        return _open_results_folder(options.output)
    # Two compares started in the same second (a script's, two terminals') get -2, -3...:
    # each folder is made by the one compare whose mkdir succeeds.
    stamp = os.path.join("runs", "compare", time.strftime("%Y%m%d-%H%M%S"))
    for attempt in range(1, 100):
        out_dir = stamp if attempt == 1 else f"{stamp}-{attempt}"
        try:
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            os.mkdir(out_dir)
            MADE_FOLDERS.append((os.path.abspath(out_dir),) * 2)  # taken back if left empty
        except FileExistsError:
            continue
        except OSError:  # unwritable: said in one line below
            pass
        return _open_results_folder(out_dir)
    raise KbenchError(f"{stamp} and 98 more folders like it exist: pass --output DIR")


def _open_results_folder(out_dir):
    from kbench.files import FolderLock, new_results_folder

    for name in ("metrics.json", "checkpoint.json", "config.json"):  # a recipe run's folder
        if os.path.isfile(os.path.join(out_dir, name)):
            raise KbenchError(f"--output {out_dir} holds a training run ({name}): give the "
                              "compare a folder of its own")
    new_results_folder(out_dir, "results.jsonl", "a compare's")
    lock = FolderLock(out_dir, flag="--output").acquire()
    try:  # again under the lock: a compare that raced this one may have written meanwhile
        new_results_folder(out_dir, "results.jsonl", "a compare's")
    except KbenchError:
        lock.release()
        raise
    return out_dir, lock


def compare(options, console=None):
    """Run every planned run, write results as they finish; returns the list of records."""
    runs = plan_runs(options)
    check_recipe_settings(options)
    out_dir, lock = open_output(options)
    try:
        return _compare(options, runs, out_dir, console)
    finally:
        lock.release()


def in_repeat_order(runs, repeat):
    """The runs of repeat `repeat`: in plan order in even repeats, reversed in odd ones
    (A B C, C B A, A B C, ...). A machine whose speed drifts over a comparison then favours
    no run by its place: in one order the twins, run after the Keras rows, always caught the
    faster minutes (one run here gave a Keras row 0.98x its twin in its first repeat and
    1.35x in its second; docs/compare.md, "What we measured")."""
    return list(runs) if repeat % 2 == 0 else list(runs)[::-1]


def _compare(options, runs, out_dir, console):
    from kbench.bench import report

    results_path = os.path.join(out_dir, "results.jsonl")
    done = []
    def say(text):
        if console is None:
            print(text, flush=True)
        else:
            console.print(text, markup=False, highlight=False)
    say_left_out_twins(options, runs, say)
    try:
        for repeat in range(options.repeats):
            for name, runner, framework, distributed in in_repeat_order(runs, repeat):
                label = f"{name} data_parallel" if distributed else name
                say(f"[compare] {label} (run {repeat + 1}/{options.repeats}) ...")
                record = run_one(name, runner, framework, options, out_dir, repeat,
                                 distributed=distributed)
                done.append(record)
                # Said before it is written: if the write fails (a full disk, a folder made
                # read-only), the line is all that is left of the run's record
                say(f"[compare] {label}: {records.one_line(record, folder=out_dir)}")
                records.write_jsonl_atomic(results_path, done)
                refused = refused_alike(done)
                if refused:
                    raise KbenchError(f"{refused} (the runs so far are in {results_path})")
    except KeyboardInterrupt:
        say(f"[compare] interrupted: {len(done)} finished run(s) kept in {results_path}" if done
            else "[compare] interrupted before any run finished")
        report.render(done, out_dir, baseline=options.baseline, console=console)
        raise
    report.render(done, out_dir, baseline=options.baseline, console=console)
    return done
