"""Host overhead: what a training step costs the host when the device has next to nothing to do.

A step on a GPU is bounded by the host whenever the framework spends longer per op in Python
than the GPU spends computing it, so that fixed cost decides GPU speed for small models. It
can be measured on any CPU: train at a batch so small that compute vanishes (ResNet-20 at
batch 2) and the step time is the host's work: Python per layer and op, dispatch, the
optimizer's per-variable update, the input iterator.

    python tools/overhead.py [--output DIR] [--model resnet20] [--batch-size 2] [--steps 30]
                             [--repeats 3]
    make overhead

runs `kbench compare` twice, as plain commands one can rerun:
  1. `--backends jax,tensorflow,torch --reference native` with `--jit-compile auto`: each
     framework as it runs by default (jax under XLA, tensorflow and torch eager on a CPU) and
     the native twins;
  2. the compiled rows, `--jit-compile on --reference native`: `--backends torch-compiled`
     when compare knows that variant (else `--backends torch`, whose rows are named
     torch-compiled here), with the `native-torch-compiled` twin (compare's own, which it
     runs beside torch-compiled or under --jit-compile on; else native-torch under
     --jit-compile on, which wraps its network in torch.compile);
with one intra-op thread for torch and TensorFlow (`--threads 1`, the default: OMP_NUM_THREADS
and TF_NUM_INTRAOP_THREADS for every process it starts; `--threads 0` leaves each framework's
default). At batch 2 there is nothing to split across threads, and on a loaded machine
torch's two OpenMP threads made Keras-torch's step 20x slower (4052 vs 198 ms median here,
2 cores shared with other work): that is contention, not host overhead, and a GPU's host
launches kernels from one thread anyway. It then profiles Keras-torch eager in-process,
layer by layer (`profile_layers`: which layers'
Python costs most, and how much of it is Keras' Layer.__call__ around the layer's own call),
and the step's hottest Python functions (cProfile). It writes overhead.md (tables),
overhead.jsonl (every compare record) and profile.json into the output folder after each
part, so a stopped run keeps what it measured.
"""

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

from kbench.bench.cli import check_interpreter
from kbench.bench.records import read_jsonl, read_results
from kbench.errors import KbenchError, exit_on_error, run_child, sigterm_interrupts
from kbench.files import write_text_atomic

ROWS = ("jax", "tensorflow", "torch", "torch-compiled", "native-jax", "native-tensorflow",
        "native-torch", "native-torch-compiled")
TWIN = {"jax": "native-jax", "tensorflow": "native-tensorflow", "torch": "native-torch",
        "torch-compiled": "native-torch-compiled"}


# --------------------------------------------------------------------------- the plan


def plan(keras_variants, natives, model="resnet20", batch_size=2, steps=30, warmup_steps=5,
         repeats=3):
    """[(label, compare arguments, {record backend: row name})]: the compare passes, given
    the names compare knows (`keras_variants`: its KERAS_VARIANTS, `natives`: its NATIVE), so
    that the table has every row of ROWS whether or not this checkout has the compiled
    variants under their own names. Each pass runs its rows `repeats` times, interleaved
    (compare's --repeats): the table gives each row's median run, so that a noisy minute
    on a shared machine moves a ratio less."""
    common = ["--recipe", "cifar_resnet", "--dataset", "synthetic", "--model", model,
              "--batch-size", str(batch_size), "--steps", str(steps),
              "--warmup-steps", str(warmup_steps), "--repeats", str(repeats)]
    eager = ("eager", common + ["--backends", "jax,tensorflow,torch", "--reference", "native",
                                "--jit-compile", "auto"], {})
    # --jit-compile on: compare adds the compiled twin (native-torch-compiled) beside
    # torch-compiled, or beside torch under --jit-compile on with an eager native-torch that
    # the table leaves out (each row comes from its first pass).
    if "torch-compiled" in keras_variants:
        args = ["--backends", "torch-compiled", "--jit-compile", "on", "--reference", "native"]
        renames = {}
    else:
        args = ["--backends", "torch", "--jit-compile", "on", "--reference", "native"]
        renames = {"torch": "torch-compiled"}
    if "native-torch-compiled" not in natives:
        renames["native-torch"] = "native-torch-compiled"
    return [eager, ("compiled", common + args, renames)]


def row_name(record, renames):
    """The ROWS name of a compare record of a pass with `renames`; a renamed twin only when it
    did compile (its `jit` or `compiler` says torch.compile), never by position alone."""
    name = renames.get(record["backend"], record["backend"])
    if name == "native-torch-compiled" and record["backend"] == "native-torch":
        compiled = "torch.compile" in f"{record.get('jit')} {record.get('compiler')}"
        if not compiled and record.get("status") == "ok":
            return None  # an eager twin: the eager pass has its row already
    return name


# --------------------------------------------------------------------------- tables


def summarize(named_records):
    """{row: {step_time_ms, p10, p90, compile_s, status, error}} from (row, record) pairs,
    medians over repeats."""
    by_row = {}
    for name, record in named_records:
        by_row.setdefault(name, []).append(record)
    summary = {}
    for name, found in by_row.items():
        ok = [r for r in found if r["status"] == "ok"]
        median = (lambda key: statistics.median(r[key] for r in ok) if ok else None)
        summary[name] = {
            "status": "ok" if ok else found[-1]["status"],
            "step_time_ms": median("step_time_ms"), "p10": median("step_time_p10_ms"),
            "p90": median("step_time_p90_ms"), "compile_s": median("compile_s"),
            "error": None if ok else error_line(found[-1].get("error")),
        }
    return summary


def error_line(text):
    """[the line that names the exception] of a failed run's log tail (Keras prints its
    call arguments after it), else [its last line]; [] without text."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "")  # Keras' bold around the message
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line or line.startswith("error:")]
    return (named or lines)[-1:]


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def host_table(summary):
    """Markdown: host ms per step of every row, and each Keras row over its twin."""
    lines = ["| run | status | host ms/step | p10-p90 ms | vs native twin | compile s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name in ROWS + tuple(sorted(set(summary) - set(ROWS))):
        item = summary.get(name)
        if item is None:
            lines.append(f"| {name} | not run | - | - | - | - |")
            continue
        twin = summary.get(TWIN.get(name, ""))
        ratio = (item["step_time_ms"] / twin["step_time_ms"]
                 if twin and item["step_time_ms"] and twin["step_time_ms"] else None)
        spread = (f"{item['p10']:.1f}-{item['p90']:.1f}" if item["p10"] is not None else "-")
        status = item["status"] + (f": {item['error'][0][:80]}" if item["error"] else "")
        lines.append(f"| {name} | {status} | {_fmt(item['step_time_ms'], '.1f')} | {spread} "
                     f"| {'-' if ratio is None else f'{ratio:.2f}x'} "
                     f"| {_fmt(item['compile_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def profile_tables(profile):
    """Markdown: the layer-by-layer profile and the hottest functions."""
    steps = profile["step_ms"]
    lines = [f"Keras-{profile['backend']} eager, {profile['model']} at batch "
             f"{profile['batch_size']}: {steps:.1f} ms per train_on_batch step (median of "
             f"{profile['steps']}), of which the forward pass (the model's __call__) "
             f"{profile['forward_ms']:.1f} ms; the rest ({steps - profile['forward_ms']:.1f} "
             "ms) is the loss, autograd's backward, the optimizer and the metrics.", "",
             "| layer class | runs as | calls/step | ms/step | of which the layer's call() "
             "| Keras around it, us/call |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in profile["layers"]:
        around = ((row["call_ms"] - row["inner_ms"]) * 1000 / row["calls"]
                  if row["inner_ms"] is not None and row["calls"] else None)
        lines.append(f"| {row['layer']} | {row.get('runs_as', 'Layer.__call__')} | "
                     f"{row['calls']:g} | {row['call_ms']:.2f} | "
                     f"{_fmt(row['inner_ms'], '.2f')} | {_fmt(around, '.0f')} |")
    lines += ["", "Hottest Python functions of the step (cProfile, own time, ms/step; "
                  "cProfile's own cost inflates them alike):", "",
              "| function | ms/step | calls/step |", "| --- | ---: | ---: |"]
    lines += [f"| `{f['function']}` | {f['own_ms']:.2f} | {f['calls']:g} |"
              for f in profile["functions"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the profile


def profile_layers(model="resnet20", batch_size=2, steps=20, warmup_steps=5, top=15):
    """Profile the active backend's Keras training step (model.train_on_batch, the
    cifar_resnet recipe's model, optimizer and loss, eager) on one synthetic batch:
    per layer class, how it ran (through Keras' Layer.__call__, or as a step of the fast
    path's plan) and the time spent there (excluding nested layers) and in the layer's own
    call(); and the `top` functions by own time under cProfile. Returns a dict (what
    profile.json holds)."""
    import keras

    from kbench import backend, fast_path, train
    from kbench.recipe import load_recipe

    recipe = load_recipe("cifar_resnet")
    config = recipe.Config(dataset="synthetic", model=model, batch_size=batch_size,
                           train_examples=max(64, batch_size), test_examples=max(64, batch_size),
                           jit_compile="off", verbose=0)
    train.setup_run(config)
    fast_path.set_enabled(config.fast_path == "on")
    net = recipe.build_model(config)
    train.compile_model(net, config, steps_per_epoch=100)
    train_ds, _ = recipe.build_datasets(config)
    x, y = next(train_ds.dataset.as_numpy_iterator())
    for _ in range(warmup_steps):
        net.train_on_batch(x, y)

    def step_ms():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            net.train_on_batch(x, y)
            backend.synchronize(net)
            times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    plain_ms = step_ms()
    layers, forward_s = _timed_layers(keras, net, lambda: [net.train_on_batch(x, y)
                                                           for _ in range(steps)])
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        net.train_on_batch(x, y)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    hottest = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {
        "backend": backend.name(), "model": model, "batch_size": batch_size, "steps": steps,
        "step_ms": plain_ms, "forward_ms": 1000 * forward_s / steps,
        "layers": [{"layer": name, "runs_as": how, "calls": n / steps,
                    "call_ms": 1000 * own / steps,
                    "inner_ms": None if inner is None else 1000 * inner / steps}
                   for name, (n, own, inner, how) in sorted(layers.items(),
                                                            key=lambda i: -i[1][1])],
        "functions": [{"function": _function_name(key), "own_ms": 1000 * tottime / steps,
                       "calls": calls / steps}
                      for key, (_, calls, tottime, _, _) in hottest],
    }


def _timed_layers(keras, model, work):
    """Run `work()` with each layer of `model` timed: {class name: [calls, seconds less nested
    layers, seconds in the layer's own call() (leaf layers run through Keras' __call__; else
    None), how it ran]}, and the model's whole forward seconds. A layer runs through Keras'
    Layer.__call__ ("Layer.__call__") or, under the fast path's plan (kbench.torch_plan), as
    a plan step: lowered ("plan, lowered: channels_first" ...) or its own call() ("plan,
    call()"). The patches live only while `work` runs."""
    Layer = keras.layers.Layer
    original = Layer.__call__
    ours = {id(layer) for layer in model._flatten_layers(include_self=True)}
    totals, stack, forward = {}, [], [0.0]

    def account(name, how, seconds, nested):
        if stack:
            stack[-1] += seconds
        else:
            forward[0] += seconds
        entry = totals.setdefault(name, [0, 0.0, None, how])
        entry[0] += 1
        entry[1] += seconds - nested

    def timed_call(self, *args, **kwargs):
        if id(self) not in ours:
            return original(self, *args, **kwargs)
        stack.append(0.0)
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            account(type(self).__name__, "Layer.__call__", seconds, stack.pop())

    leaves = [layer for layer in model._flatten_layers(include_self=False)
              if not list(layer._flatten_layers(include_self=False))]
    for layer in leaves:
        def timed_inner(*args, _call=layer.call, _name=type(layer).__name__, **kwargs):
            start = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                entry = totals.setdefault(_name, [0, 0.0, None, "Layer.__call__"])
                entry[2] = (entry[2] or 0.0) + time.perf_counter() - start

        object.__setattr__(layer, "call", timed_inner)  # past Keras' attribute tracking
    plans = [plan for layer in model._flatten_layers(include_self=True)
             if (plan := layer.__dict__.get("_kbench_plan")) is not None]
    kept_steps = [plan.steps for plan in plans]
    for plan in plans:
        plan.steps = [(_timed_step(run, account, stack), *rest) for run, *rest in plan.steps]
    Layer.__call__ = timed_call
    try:
        work()
    finally:
        Layer.__call__ = original
        for layer in leaves:
            object.__delattr__(layer, "call")
        for plan, steps in zip(plans, kept_steps):
            plan.steps = steps
    return totals, forward[0]


def _timed_step(run, account, stack):
    """A plan step that reports its time to `account` as its layer's."""
    how = "plan, call()" if not hasattr(run, "lowered") else f"plan, lowered: {run.lowered}"
    name = type(run.layer).__name__

    def timed(*args):
        stack.append(0.0)
        start = time.perf_counter()
        try:
            return run(*args)
        finally:
            account(name, how, time.perf_counter() - start, stack.pop())

    return timed


def _function_name(key):
    path, line, name = key
    parts = path.split(os.sep)
    short = os.sep.join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts \
        else os.path.basename(path)
    return f"{short}:{line} {name}"


# --------------------------------------------------------------------------- the command


def thread_env(threads):
    """The environment of every process the tool starts: `threads` intra-op threads for
    torch (OpenMP) and TensorFlow; 0 leaves them as they are."""
    if not threads:
        return dict(os.environ)
    return {**os.environ, "OMP_NUM_THREADS": str(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads)}


def run_compare(python, args, out_dir, timeout, env=None):
    """The records of one `kbench compare`. On Ctrl-C or SIGTERM the compare is let stop
    cleanly (run_child: it stops its running worker and writes what finished) and the stop
    goes on up."""
    command = [python, "-m", "kbench.cli", "compare", *args, "--timeout", str(timeout),
               "--output", out_dir]
    print("overhead: " + " ".join(command[1:]), flush=True)
    run_child(command, env=env)  # a failed run is in its records; go on
    return read_results(out_dir)


def run_profile(python, args, timeout):
    """profile_layers under KERAS_BACKEND=torch in its own interpreter (the backend is read
    once per process); None with the reason printed when it fails."""
    command = [python, "-m", "kbench.bench.overhead", "--profile-only", "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    print("overhead: KERAS_BACKEND=torch " + " ".join(command[1:]), flush=True)
    env = {**thread_env(args.threads), "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        print("overhead: the layer profile failed:\n" + done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as kbench's own commands answer
        _fail(f"{message} (see {self.prog} --help)")


def parse_args(argv):
    parser = _Parser(prog="tools/overhead.py",
                     description="Host overhead per training step: every backend and twin at "
                                 "a tiny batch.")
    parser.add_argument("--output", default=None,
                        help="results folder (default runs/overhead/<timestamp>)")
    parser.add_argument("--model", default="resnet20",
                        help="a model every framework's native twin has: a CIFAR ResNet "
                             "(resnet20, 32, 44, 56 or 110) or preact_resnet18")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each row, interleaved; the table gives the median run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of torch and TensorFlow in every run "
                             "(OMP_NUM_THREADS, TF_NUM_INTRAOP_THREADS); 0: their defaults")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    parser.add_argument("--plan", action="store_true",
                        help="print the compare commands and exit")
    parser.add_argument("--no-profile", action="store_true",
                        help="leave out the layer-by-layer profile of Keras-torch")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="print the tables of an earlier run's folder again (and rewrite "
                             "its overhead.md) without running anything")
    parser.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:  # it runs nothing: a flag beside it would be ignored without a word
        from kbench.flags import given_fields

        beside = sorted(given_fields(parser, argv) - {"report"})
        if beside:
            _fail(f"--report DIR renders a saved measurement again and runs nothing: drop "
                  f"{', '.join('--' + name.replace('_', '-') for name in beside)}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                               ("--warmup-steps", args.warmup_steps, 0),
                               ("--repeats", args.repeats, 1),
                               ("--threads", args.threads, 0),
                               ("--timeout", args.timeout, 1)):
        if not value >= least:  # NaN too
            _fail(f"{flag} {value} is not allowed: it takes a number >= {least}")
    try:
        check_interpreter(args.python, f"--python {args.python}")
    except KbenchError as bad:
        _fail(str(bad))
    if not args.report:  # every row has its twin (a plan shows what would run)
        from kbench.bench.compare import TWIN_MODELS

        everywhere = [m for m in TWIN_MODELS["torch"]
                      if all(m in models for models in TWIN_MODELS.values())]
        if args.model not in everywhere:
            _fail(f"--model {args.model} is not allowed: every framework's native twins cover "
                  f"{', '.join(everywhere)}")
    if args.output and not (args.plan or args.report):  # made last: all else was right
        from kbench.files import new_results_folder

        try:
            new_results_folder(args.output, "overhead.jsonl", "a measurement's")
        except KbenchError as bad:
            _fail(str(bad))
    return args


HEADER_START = "Host overhead:"  # overhead.md's first line: what was measured, and how


def report(out_dir):
    """Render DIR/overhead.md again from DIR/overhead.jsonl (and profile.json)."""
    path = os.path.join(out_dir, "overhead.jsonl")
    if not os.path.isfile(path):
        _fail(f"{path} does not exist; pass the folder tools/overhead.py wrote")
    try:
        records = read_jsonl(path)  # each line checked: a compare record
    except KbenchError as bad:
        _fail(str(bad))
    named = [(r["overhead_row"], r) for r in records if r.get("overhead_row")]
    text = host_table(summarize(named))
    profile_path = os.path.join(out_dir, "profile.json")
    if os.path.isfile(profile_path):
        try:
            with open(profile_path) as f:
                profile = json.load(f)
            text += "\n" + profile_tables(profile)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            _fail(f"{profile_path} is not a profile tools/overhead.py wrote ({exc!r}); delete it "
                  "to render the host table alone")
    old = os.path.join(out_dir, "overhead.md")
    header = ""
    if os.path.isfile(old):
        with open(old) as f:
            first = f.readline().strip()
        if first.startswith(HEADER_START):  # the measurement's own line, kept; not a table's
            header = first + "\n\n"
    write_text_atomic(old, header + text)
    print(header + text)
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.profile_only:  # the child of run_profile: one JSON line
        import kbench  # noqa: F401  (validates KERAS_BACKEND)

        print(json.dumps(profile_layers(args.model, args.batch_size, args.steps,
                                        args.warmup_steps)))
        return 0
    if args.report:
        return report(args.report)
    from kbench.bench import compare

    passes = plan(compare.KERAS_VARIANTS, compare.NATIVE, args.model, args.batch_size,
                  args.steps, args.warmup_steps, args.repeats)
    if args.plan:
        for label, compare_args, renames in passes:
            print(f"{label}: kbench compare {' '.join(compare_args)}"
                  + (f"  (rows renamed: {renames})" if renames else ""))
        return 0
    out_dir = os.path.abspath(args.output or os.path.join("runs", "overhead",
                                                          time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out_dir, exist_ok=True)
    header = (f"{HEADER_START} {args.model} at batch {args.batch_size}, synthetic data, "
              f"{args.steps} timed steps after {args.warmup_steps} warm-up, synced every step, "
              f"median of {args.repeats} interleaved run(s) per row, "
              + (f"{args.threads} intra-op thread(s) for torch and TensorFlow"
                 if args.threads else "each framework's default threads")
              + f" (`python tools/overhead.py{' --threads 0' if not args.threads else ''}`)")
    named, records, profile = [], [], None
    row_of = {}  # id(record) -> its row in the table (None: not shown)

    def write():
        text = header + "\n\n" + host_table(summarize(named))
        if profile:
            text += "\n" + profile_tables(profile)
        write_text_atomic(os.path.join(out_dir, "overhead.md"), text)
        write_text_atomic(os.path.join(out_dir, "overhead.jsonl"), "".join(
            json.dumps({"overhead_row": row_of.get(id(r)), **r}, default=str) + "\n"
            for r in records))

    def add(found, renames):
        records.extend(found)
        seen = {name for name, _ in named}
        for record in found:
            name = row_name(record, renames)
            if name is not None and name not in seen:  # each row from its first pass
                named.append((name, record))
                row_of[id(record)] = name
        write()

    write()  # overhead.jsonl first: a rerun into this folder is refused even if pass 1 dies
    for label, compare_args, renames in passes:
        pass_dir = os.path.join(out_dir, label)
        try:
            found = run_compare(args.python, compare_args, pass_dir, args.timeout,
                                env=thread_env(args.threads))
        except KeyboardInterrupt:  # the stopped pass's finished runs go in the tables too
            add(read_results(pass_dir), renames)
            print(f"overhead: stopped; what finished is in {out_dir}/overhead.md",
                  file=sys.stderr)
            raise
        add(found, renames)
    if not args.no_profile:
        profile = run_profile(args.python, args, args.timeout)
        if profile:
            write_text_atomic(os.path.join(out_dir, "profile.json"), json.dumps(profile))
        write()
    with open(os.path.join(out_dir, "overhead.md")) as f:
        print("\n" + f.read())
    print(f"overhead: wrote {out_dir}/overhead.md, overhead.jsonl"
          + (", profile.json" if profile else ""))
    return 0


def run_main():
    """main as a command: Ctrl-C and SIGTERM stop it cleanly (exit 130 / 143)."""
    with sigterm_interrupts():
        return exit_on_error(main)


if __name__ == "__main__":
    sys.exit(run_main())
