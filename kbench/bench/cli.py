"""`kbench compare` and `kbench report`: argument parsing only; the work is in compare/report."""

import argparse
import os

from kbench.errors import KbenchError, sigterm_interrupts
from kbench.flags import flag_of


def check_interpreter(path, flag):
    """`path`, where it is an executable file (an interpreter to run children with); else a
    one-line KbenchError naming `flag` as the user gave it."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise KbenchError(f"{flag}: no executable interpreter there")
    return path


# Run by each --python interpreter before any run: exit status 1 where it cannot find kbench.
_FINDS_KBENCH = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kbench') is None)"


def check_imports_kbench(path, flag):
    """A one-line KbenchError naming `flag` unless the interpreter at `path` can import kbench:
    said now, not by every run's worker (`-m kbench.bench.worker`) failing. It asks with the
    worker's working folder and environment (compare's own: the folder and PYTHONPATH that
    make kbench importable here make it so there), and looks kbench up without importing
    it (no framework loads)."""
    import subprocess

    from kbench.bench.compare import stop_with_parent

    try:  # killed with compare, as a worker is (a hung one would outlive a SIGKILLed compare)
        found = subprocess.run([path, "-c", _FINDS_KBENCH], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60,
                               preexec_fn=stop_with_parent()).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no start, or no answer in a minute
        found = False
    if not found:
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        how = (f" ({path} -m pip install -e {checkout})"
               if os.path.isfile(os.path.join(checkout, "pyproject.toml")) else "")
        raise KbenchError(f"{flag}: that interpreter cannot import kbench; install kbench "
                          f"there{how} or point --python at one that has it")


def _python_map(values):
    """['jax=/envs/jax/bin/python', ...] -> {'jax': '/envs/jax/bin/python'}."""
    mapping = {}
    for value in values or []:
        backend, sep, path = value.partition("=")
        if not sep or not path:
            raise KbenchError(f"--python takes BACKEND=PATH (e.g. jax=/envs/jax/bin/python), "
                              f"not {value!r}")
        if mapping.get(backend, path) != path:  # else the last one would win without a word
            raise KbenchError(f"--python {backend}={mapping[backend]} and --python "
                              f"{backend}={path} disagree: give one")
        mapping[backend] = path
    checked = set()  # the command line first, then the interpreters: one look at each
    for backend, path in mapping.items():
        flag = f"--python {backend}={path}"
        check_interpreter(path, flag)
        if path not in checked:
            check_imports_kbench(path, flag)
            checked.add(path)
    return mapping


def _config_overrides(values):
    """['cutout=8', 'lr=0.05'] -> {'cutout': 8, 'lr': 0.05}: values parsed as JSON when they can
    be, else kept as strings."""
    import json

    overrides, given = {}, {}
    for value in values or []:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise KbenchError(f"--set takes FIELD=VALUE (a recipe Config field), not {value!r}")
        field = key.replace("-", "_")
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = raw
        # else one value would be lost (true and 1 are two values: a type is part of one)
        if field in overrides and (type(overrides[field]), overrides[field]) != (type(parsed),
                                                                                  parsed):
            raise KbenchError(f"--set {field}={given[field]} and --set {field}={raw} "
                              "disagree: give one")
        overrides[field], given[field] = parsed, raw
    return overrides


class _StoreGiven(argparse.Action):
    """argparse's store, noting in `namespace.given` that the flag was given (its default
    could also have been typed): a recipe setting compare has a flag for may come through
    `--set` only where the flag was not given at another value, else one value is lost."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _check_set_against_flags(args, overrides):
    for field in sorted(set(overrides) & set(getattr(args, "given", ()))):
        if overrides[field] != getattr(args, field):
            flag = flag_of(field)
            raise KbenchError(f"{flag} {getattr(args, field)} and --set "
                              f"{field}={overrides[field]} disagree: give one ({flag})")


def _backend_list(text):
    """--backends as a tuple of names (None: not given, every installed backend)."""
    if text is None:
        return ()
    names = [b.strip() for b in text.split(",")]
    if not all(names):
        raise KbenchError(f"--backends {text!r} is not allowed: it takes comma-separated "
                          "backend names, e.g. jax,torch (leave it out for every installed one)")
    twice = sorted({b for b in names if names.count(b) > 1})
    if twice:
        raise KbenchError(f"--backends names {twice[0]} twice: to run it again, use --repeats")
    return tuple(names)


def cmd_compare(args):
    from kbench.bench.compare import CompareOptions, compare
    from kbench.bench.report import make_console

    if args.target_accuracy is not None and args.steps is not None:
        raise KbenchError("--steps times a fixed number of steps; --target-accuracy trains "
                          "until the target (cap it with --max-epochs)")
    if args.epochs is not None and args.steps is not None:  # else --steps went unheeded
        raise KbenchError("--steps times a fixed number of steps; --epochs trains whole "
                          "epochs and times every step: give one of them")
    if args.eval_every_epoch and args.target_accuracy is None:
        raise KbenchError("--eval-every-epoch goes with --target-accuracy A")
    args.steps = 20 if args.steps is None else args.steps
    if args.steps < 1 or args.repeats < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise KbenchError("--steps, --repeats and --batch-size must be at least 1")
    if args.sync_every is not None and args.sync_every < 1:
        raise KbenchError(f"--sync-every {args.sync_every} is not allowed: it takes an integer "
                          ">= 1 (1: sync after every step)")
    if args.warmup_steps < 0:
        raise KbenchError(f"--warmup-steps {args.warmup_steps} is not allowed: it takes an "
                          "integer >= 0")
    if args.simulate_devices is not None and args.distribute != "data_parallel":
        raise KbenchError("--simulate-devices N goes with --distribute data_parallel")
    sweep_options = _sweep_options(args)
    extra_config = _config_overrides(args.set)
    _check_set_against_flags(args, extra_config)
    options = CompareOptions(
        recipe=args.recipe,
        backends=_backend_list(args.backends),
        reference=args.reference, dataset=args.dataset, model=args.model,
        batch_size=args.batch_size, steps=args.steps, warmup_steps=args.warmup_steps,
        sync_every=args.sync_every,
        epochs=args.epochs, dtype_policy=args.dtype_policy, jit_compile=args.jit_compile,
        float32_precision=args.float32_precision,
        repeats=args.repeats, timeout=args.timeout, python=_python_map(args.python),
        output=args.output, baseline=_results_file(args.baseline), extra_config=extra_config,
        distribute=args.distribute, simulate_devices=args.simulate_devices,
        target_accuracy=args.target_accuracy, eval_every=args.eval_every,
        max_epochs=args.max_epochs, **sweep_options,
    )
    if options.baseline:
        if not os.path.isfile(options.baseline):
            raise KbenchError(f"--baseline {options.baseline}: no such file")
        _check_baseline(options.baseline)  # now, not after every run
    # SIGTERM stops compare as Ctrl-C does: the running worker's process group is killed
    # and the finished runs' results kept (the workers run in groups of their own, which a
    # signal to compare alone would leave running)
    with sigterm_interrupts():
        if options.sweep or options.max_batch:
            from kbench.bench import sweep

            run = sweep.max_batch if options.max_batch else sweep.sweep
            return 0 if sweep.finished(run(options, console=make_console())) else 1
        rows = compare(options, console=make_console())
    return 0 if rows and all(r["status"] == "ok" for r in rows) else 1


def _sweep_options(args):
    """--sweep, --max-batch, --max-batch-tries, --max-memory, checked against each other."""
    import math

    if args.max_memory is not None and not (math.isfinite(args.max_memory)
                                            and args.max_memory > 0):
        raise KbenchError(f"--max-memory {args.max_memory:g} is not allowed: it takes MB > 0")
    if args.max_batch_tries is not None and not args.max_batch:
        raise KbenchError("--max-batch-tries N goes with --max-batch")
    given = list(dict.fromkeys(args.sweep or ()))  # the same one twice loses nothing
    if len(given) > 1:  # else the last would win without a word
        raise KbenchError(f"--sweep {given[0]} and --sweep {given[1]}: a compare sweeps one "
                          "field; give one --sweep FIELD=V1,V2,...")
    if args.sweep and args.max_batch:
        raise KbenchError("--sweep and --max-batch are two runs: give one")
    if (args.sweep or args.max_batch) and args.target_accuracy is not None:
        raise KbenchError(f"{'--sweep' if args.sweep else '--max-batch'} times steps; it does "
                          "not go with --target-accuracy")
    if args.max_batch and args.epochs is not None:  # a big batch has too few steps an epoch
        raise KbenchError("--max-batch times steps; it does not go with --epochs")
    sweep = None
    if args.sweep:
        from kbench.bench.sweep import parse_sweep

        sweep = parse_sweep(args.sweep[0])
    return {"sweep": sweep, "max_batch": args.max_batch, "max_memory": args.max_memory,
            "max_batch_tries": 10 if args.max_batch_tries is None else args.max_batch_tries}


def _results_file(path):
    """A compare's folder stands for the results.jsonl in it."""
    return os.path.join(path, "results.jsonl") if path and os.path.isdir(path) else path


def _check_baseline(path):
    """A baseline that holds records report can read, or a one-line error."""
    from kbench.bench.records import read_jsonl

    if not read_jsonl(path):
        raise KbenchError(f"--baseline {path} holds no runs; pass the results.jsonl of a "
                          "compare that finished some")


def cmd_report(args):
    from kbench.bench.records import read_jsonl
    from kbench.bench.report import mixed_compares, render
    from kbench.files import writable_folder

    results, baseline = _results_file(args.results), _results_file(args.baseline)
    rows = read_jsonl(results)
    if not rows:  # compare writes a record per run as it ends, failed ones included
        raise KbenchError(f"{args.results} holds no runs: the compare that writes it stopped "
                          "before its first run ended; nothing to report")
    mixed = mixed_compares(rows)
    if mixed:  # files joined by hand: one title and one median per backend would mislead
        raise KbenchError(f"{args.results} holds runs of more than one compare ({mixed}): "
                          "report each compare's results.jsonl on its own, or compare them "
                          "with --baseline")
    if baseline:
        _check_baseline(baseline)
    out_dir = args.output or os.path.dirname(os.path.abspath(results))
    others = os.path.join(out_dir, "results.jsonl")
    if os.path.isfile(others) and not os.path.samefile(others, results):
        # results.csv and results.png there would describe other runs than its results.jsonl
        where = f"--output {args.output}" if args.output else out_dir
        raise KbenchError(f"{where} holds another compare's results.jsonl, whose results.csv "
                          "and results.png these would replace: pass --output NEW_FOLDER")
    writable_folder(out_dir, "--output")
    render(rows, out_dir, baseline=baseline, results=os.path.abspath(results))
    return 0


def add_verbs(verbs):
    compare = verbs.add_parser(
        "compare", help="run a recipe under every backend and compare speed, memory, accuracy",
        description="Run a recipe under each backend in its own process and report "
                    "throughput, compile time, memory and accuracy side by side.")
    compare.add_argument("--recipe", default="cifar_resnet", metavar="NAME_OR_FILE",
                         help="one of kbench's recipes by name, or the path of your own recipe "
                              "file (e.g. ./my_recipe.py)")
    compare.add_argument("--backends", default=None,
                         help="comma-separated, e.g. jax,tensorflow,torch (default: installed); "
                              "torch-stock, tensorflow-stock: without kbench's fast path")
    compare.add_argument("--reference", choices=("none", "native"), default="none",
                         help="native: also run the twins in plain JAX+optax, TensorFlow and "
                              "PyTorch of the backends compared")
    compare.add_argument("--dataset", default="synthetic", action=_StoreGiven,
                         help="the recipe's dataset: synthetic, digits, cifar10, ... (see "
                              "docs/recipes.md)")
    compare.add_argument("--model", default=None, action=_StoreGiven,
                         help="model name (default: the recipe's)")
    compare.add_argument("--batch-size", type=int, default=None, action=_StoreGiven,
                         help="global batch size (default: the recipe's)")
    compare.add_argument("--steps", type=int, default=None,
                         help="timed steady-state steps (default 20)")
    compare.add_argument("--warmup-steps", type=int, default=3,
                         help="untimed steps after the first (compile) step")
    compare.add_argument("--sync-every", type=int, default=None, metavar="K",
                         help="wait for the device every K steps while timing: 1 (the "
                              "default) gives exact per-step times (p10-p90); on a GPU a sync "
                              "per step holds the host back, so K=10 measures throughput as "
                              "training sees it. With --target-accuracy the default is no "
                              "sync but at evaluations and epoch ends, as training alone")
    compare.add_argument("--epochs", type=int, default=None,
                         help="train full epochs instead (accuracy parity); times every step")
    compare.add_argument("--dtype-policy", default="float32", action=_StoreGiven,
                         choices=("float32", "mixed_float16", "mixed_bfloat16"),
                         help="Keras dtype policy of every run (the twins follow it)")
    compare.add_argument("--jit-compile", default="auto", action=_StoreGiven,
                         choices=("auto", "on", "off"),
                         help="Keras' jit_compile: auto lets Keras decide (XLA under jax, "
                              "and under tensorflow on a GPU; torch eager); on: XLA, or "
                              "torch.compile under torch")
    compare.add_argument("--float32-precision", default="tf32", action=_StoreGiven,
                         choices=("tf32", "highest"),
                         help="float32 convolutions and matmuls on GPUs with TF32 units, the "
                              "same for every run: tf32 (JAX's and TensorFlow's default; "
                              "kbench sets torch alike) or highest (full float32). No effect "
                              "on a CPU; recorded either way")
    compare.add_argument("--distribute", choices=("none", "data_parallel"), default="none",
                         help="data_parallel: run each Keras backend on one replica and on N, "
                              "same global batch, and report the scaling efficiency")
    compare.add_argument("--simulate-devices", type=int, default=None, metavar="N",
                         help="with --distribute data_parallel on CPU: N devices for jax and "
                              "tensorflow, N torchrun processes for torch (default: every "
                              "device / one process per GPU)")
    target = compare.add_argument_group(
        "time to accuracy", "train each run until its test accuracy reaches a target, as "
                            "MLPerf Training measures (clock from the start of training, "
                            "compile and evaluations on it)")
    target.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                        help="test accuracy to reach, 0 < A <= 1")
    when = target.add_mutually_exclusive_group()
    when.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                      help="evaluate every STEPS optimizer steps")
    when.add_argument("--eval-every-epoch", action="store_true",
                      help="evaluate after every epoch (the default)")
    target.add_argument("--max-epochs", type=int, default=None, metavar="N",
                        help="give up after N epochs (default: the recipe's epochs)")
    cost = compare.add_argument_group(
        "how cost grows", "run every backend at several points of one setting, or find the "
                          "largest batch that fits (docs/compare.md, 'How cost grows')")
    # appended, so that a second --sweep is refused rather than silently replacing the first
    cost.add_argument("--sweep", action="append", default=None, metavar="FIELD=V1,V2,...",
                      help="one run per backend and value of a recipe Config field, e.g. "
                           "batch_size=2,8,32,128 (with a cost model: step time = a + b x "
                           "batch), model=resnet20,resnet56, or with --distribute "
                           "data_parallel simulate_devices=1,2,4 (scaling efficiency)")
    cost.add_argument("--max-batch", action="store_true",
                      help="per backend, the largest batch that trains without running out "
                           "of memory: doubling from --batch-size, then bisection")
    cost.add_argument("--max-batch-tries", type=int, default=None, metavar="N",
                      help="runs per backend for --max-batch (default 10)")
    cost.add_argument("--max-memory", type=float, default=None, metavar="MB",
                      help="stop a run whose processes pass MB of resident host memory and "
                           "record it as out of memory (oom), as a device that runs out is")
    compare.add_argument("--repeats", type=int, default=1,
                         help="runs per backend (with --target-accuracy: seeds seed, "
                              "seed + 1, ...)")
    compare.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    compare.add_argument("--python", action="append", metavar="BACKEND=PATH",
                         help="interpreter (virtualenv) for a backend; repeatable")
    compare.add_argument("--set", action="append", metavar="FIELD=VALUE",
                         help="any other recipe Config field, e.g. --set cutout=8; repeatable")
    compare.add_argument("--output", default=None,
                         help="results folder (default runs/compare/<timestamp>)")
    compare.add_argument("--baseline", default=None,
                         help="results.jsonl (or its folder) to compare against")
    compare.set_defaults(func=cmd_compare)

    report = verbs.add_parser("report", help="re-render table, CSV and chart from results.jsonl")
    report.add_argument("results", help="a results.jsonl written by kbench compare, or its folder")
    report.add_argument("--baseline", default=None,
                        help="results.jsonl (or its folder) to compare against")
    report.add_argument("--output", default=None, help="where results.csv/png go "
                                                       "(default: next to results.jsonl)")
    report.set_defaults(func=cmd_report)
