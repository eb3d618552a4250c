"""One benchmark run in a fresh interpreter: `python -m kbench.bench.worker SPEC.json RESULT.json`.

`kbench compare` starts one worker per backend with KERAS_BACKEND set (Keras reads it once, at
import), so no run can inherit another's compiled functions, memory or thread pools. The worker
trains the recipe for 1 + warmup + N steps (with a `target`: until the target accuracy,
kbench.target), times them with the device synchronized after every
step or, with `sync_every` k, every k steps (kbench.train.StepTimer),
evaluates the trained model on the test split and writes its measurements as JSON.

Spec keys: recipe (a kbench recipe's name or a recipe file's path), runner ("keras" |
"native-jax" | "native-tensorflow" | "native-torch" | "native-torch-compiled"), config
(overrides of the recipe's Config, `distribute` and `simulate_devices` included), steps, warmup_steps, epochs
(null: time `steps` steps of one epoch), sync_every (default 1; null: at epoch ends and
evaluations only), target ({accuracy,
eval_every_steps, max_epochs}: train to a target accuracy, kbench.target; the result gains
its time-to-target fields), seed_offset (added to the recipe's seed). A data-parallel torch run starts one worker per rank
under torchrun; rank 0 writes the result, with the global batch's throughput.

A run that runs out of memory (a framework's out-of-memory error on a device, or MemoryError
on the host) writes `{"out_of_memory": message, peak memory}` and exits with OOM_EXIT: to a
sweep that is a result (`status: oom`), not a crash.
"""

import dataclasses
import importlib
import json
import os
import resource
import sys
import time
import traceback

from kbench.errors import Interrupted, KbenchError, reason

OOM_EXIT = 3
# The out-of-memory errors of the frameworks, by name (this module imports none of them):
# torch.cuda.OutOfMemoryError, tf.errors.ResourceExhaustedError, Python's MemoryError;
# jax raises XlaRuntimeError whose message starts RESOURCE_EXHAUSTED.
OOM_ERRORS = ("OutOfMemoryError", "ResourceExhaustedError", "MemoryError")
OOM_MESSAGES = ("RESOURCE_EXHAUSTED", "out of memory")


def is_out_of_memory(exc):
    """Whether `exc`, or an error it was raised from (Keras re-raises some), is an
    allocation that failed for want of memory."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if type(exc).__name__ in OOM_ERRORS or any(m.lower() in text.lower()
                                                     for m in OOM_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_config(recipe, spec):
    """The recipe Config for this run: the user's overrides plus the benchmark's own settings."""
    overrides = dict(spec.get("config") or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(recipe.Config)}
    if unknown:
        raise KbenchError(f"recipe {spec['recipe']} has no setting(s) {', '.join(sorted(unknown))}")
    overrides["validate_every_epoch"] = False  # one evaluation at the end is enough
    overrides["verbose"] = 0
    target = spec.get("target")
    if target:  # train until the target, at most max_epochs (default: the recipe's epochs)
        overrides["target_accuracy"] = target["accuracy"]
        overrides["eval_every_steps"] = target.get("eval_every_steps") or 0
        # Writing a checkpoint each epoch (70-110 ms for ResNet-20 here) would be on the
        # clock of the Keras runs only: the twins write none, and neither does MLPerf.
        overrides["epoch_checkpoints"] = False
        if target.get("max_epochs"):
            overrides["epochs"] = target["max_epochs"]
    elif spec.get("epochs"):
        overrides["epochs"] = spec["epochs"]
    else:
        overrides["epochs"] = 1
        overrides["steps_per_epoch"] = 1 + spec["warmup_steps"] + spec["steps"]
    config = recipe.Config(**overrides)
    if spec.get("seed_offset"):  # repeats of a time-to-target run: seed, seed + 1, ...
        config = dataclasses.replace(config, seed=config.seed + spec["seed_offset"])
    return config


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_keras(recipe, config, spec):
    from kbench import backend, train
    from kbench.bench import flops

    # With --epochs or a target every epoch's steps but its first are timed; else the steps
    # after warm-up.
    whole_epochs = spec.get("epochs") or spec.get("target")
    timer = train.StepTimer(config.batch_size, sync_every=spec.get("sync_every", 1),
                            warmup_steps=0 if whole_epochs else spec["warmup_steps"])
    metrics = recipe.main(config, callbacks=[timer])
    if not isinstance(metrics, dict) or "test_accuracy" not in metrics:
        raise KbenchError(f"recipe {spec['recipe']}'s main returned {type(metrics).__name__}, "
                          "not the metrics run.finish(model) returns: end it with `return "
                          "run.finish(model)`")
    model = timer.model  # Keras hands every callback the model it trains
    return {
        "compile_s": timer.compile_s,
        "step_times": timer.step_times,
        "steps_timed": timer.steps_timed,
        "input_wait_fraction": timer.input_wait_fraction,
        "syncs_per_step": timer.syncs_per_step,  # torch on CUDA: its warm-up steps'
        "sync_sites": timer.sync_sites or None,
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "flops_per_step": flops.training_flops(model, config.batch_size),
        "flops_source": flops.SOURCE,
        "peak_device_mb": backend.peak_device_mb(backend.name()),
        "jit": str(metrics["jit_compile"]),
        "compiler": metrics.get("compiler") or backend.keras_compiler(metrics["jit_compile"]),
        # Whether it ran (a Keras other than the tested one runs stock); None under jax.
        "fast_path": metrics.get("fast_path") if backend.name() != "jax" else None,
        # What was built: a recipe's build_model may ignore config.model.
        "model": metrics["model"],
        "params": metrics["params"],
        "device": ", ".join(backend.devices()),
        "num_replicas": metrics.get("num_replicas", 1),
        "distribution": metrics.get("distribution", "none"),
        "memory_format": layer_layout(model),
        "autocast_dtype": mixed_compute_dtype(model),
        **backend.execution_settings(),  # float32_precision, cudnn_benchmark as set
        **(metrics.get("time_to_target") or {}),
    }


def layer_layout(model):
    """The record's memory_format for a Keras run: the data_format of the layers that have one
    (Keras' default channels_last: NHWC under jax and TensorFlow; under torch, Keras and the
    fast path hand its convolutions NCHW views of NHWC tensors, i.e. channels_last memory, as
    native-torch runs); None for a model without such layers (the text models)."""
    formats = {layer.data_format for layer in model._flatten_layers()
               if isinstance(getattr(layer, "data_format", None), str)}
    return ", ".join(sorted(formats)) or None


def mixed_compute_dtype(model):
    """The record's autocast_dtype for a Keras run: the compute dtype of the model's policy
    under a mixed one (Keras casts per layer where torch's twin autocasts), None in float32."""
    compute = model.dtype_policy.compute_dtype
    return None if compute == model.dtype_policy.variable_dtype else compute


# Native runner -> (the twin's module in kbench.bench, extra arguments of its run()).
NATIVE_RUNNERS = {"native-jax": ("native_jax", {}),
                  "native-tensorflow": ("native_tensorflow", {}),
                  "native-torch": ("native_torch", {}),
                  "native-torch-compiled": ("native_torch", {"compiled": True})}


def run_native(runner, config, spec, recipe=None):
    from kbench import backend

    if recipe is not None:
        check_twin_trains_the_runs_images(recipe, config)
    name, extra = NATIVE_RUNNERS[runner]
    module = importlib.import_module(f"kbench.bench.{name}")
    # With a target every step but the first is timed, as in the Keras runs (run_keras).
    warmup_steps = 0 if spec.get("target") else spec["warmup_steps"]
    result = module.run(config, steps=spec["steps"], warmup_steps=warmup_steps,
                        epochs=spec.get("epochs"), sync_every=spec.get("sync_every", 1),
                        **extra)
    framework = name.removeprefix("native_")
    from kbench.bench import native_common

    for key, value in backend.execution_settings().items():  # as the prologue set them
        result.setdefault(key, value)
    result.setdefault("input_wait_fraction", native_common.input_wait_fraction())
    for key, value in native_common.syncs().items():  # the torch twin on CUDA
        result.setdefault(key, value)
    result.setdefault("peak_device_mb", backend.peak_device_mb(framework))
    result.setdefault("device", ", ".join(backend.devices()))
    return result


def check_twin_trains_the_runs_images(recipe, config):
    """A twin trains kbench's CIFAR-shaped images (32x32x3, the data set's classes). A recipe
    whose model takes others would have its runs timed against another network: the
    mnist_convnet recipe's synthetic set is 28x28x1, and its twin timed a 32x32x3 ResNet
    beside it. The recipe's model is built here, in the twin's own process (in compare's,
    it would hold memory on a GPU the runs need)."""
    import gc

    from kbench import data

    try:
        model = recipe.build_model(config)
        runs = (tuple(model.inputs[0].shape[1:]), int(model.outputs[0].shape[-1]))
    except Exception:  # noqa: BLE001 (the recipe's own failure: its Keras runs report it)
        return
    del model
    gc.collect()
    twin = ((32, 32, 3), data.num_classes(config.dataset))
    if runs != twin:
        raise KbenchError(f"the native twin trains {config.dataset} images of shape {twin[0]} "
                          f"in {twin[1]} classes, and this recipe's model takes {runs[0]} in "
                          f"{runs[1]} classes: compare with --recipe cifar_resnet, or "
                          "--reference none")


def failure_line(exc):
    """`ValueError: message`: the exception's type and its message's first line (Keras
    appends its layer's arguments below it; the log keeps everything)."""
    return reason(exc, limit=1000)


def write_failure(result_path, exc):
    """Tell compare why the run failed: a result with only `error` (rank 0 of torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from kbench.files import write_json_atomic

    write_json_atomic(result_path, {"error": failure_line(exc)})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    start = time.perf_counter()
    recipe = None
    try:
        import kbench  # noqa: F401  (validates KERAS_BACKEND, registers layers)
        from kbench import backend
        from kbench.recipe import load_recipe

        recipe = load_recipe(spec["recipe"])
        config = run_config(recipe, spec)
        if spec["runner"] == "keras":
            result = run_keras(recipe, config, spec)
        else:
            result = run_native(spec["runner"], config, spec, recipe)
    except KbenchError as exc:
        if recipe is not None:  # its flags as compare takes them: "lower --set lr", not "--lr"
            from kbench.bench.compare import as_set_options

            exc = KbenchError(as_set_options(str(exc), recipe.Config))
        print(f"error: {exc}", file=sys.stderr)
        write_failure(result_path, exc)
        return 2
    except Interrupted as stop:  # the run's own line, without its hint: a compare has no
        where = Interrupted(stop.signal_name, stop.where)  # --resume; its run folder is its own
        print(where, file=sys.stderr)
        write_failure(result_path, where)
        return stop.status
    except Exception as exc:  # the traceback goes to the run's log, the one line to compare
        if is_out_of_memory(exc):  # out of memory is a result, not a failure
            return report_out_of_memory(exc, spec, result_path)
        traceback.print_exc()
        write_failure(result_path, exc)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # torchrun started this rank too; rank 0 reports for the job
    result.update(
        peak_rss_mb=peak_rss_mb(),
        wall_s=time.perf_counter() - start,
        versions=backend.versions(),
        config=dataclasses.asdict(config),
        **backend.provenance(),
    )
    from kbench.files import write_json_atomic

    write_json_atomic(result_path, result)
    return 0


def report_out_of_memory(exc, spec, result_path):
    """Write what the run reached before memory ran out; returns OOM_EXIT."""
    import traceback

    from kbench import backend
    from kbench.files import write_json_atomic

    traceback.print_exc()  # into the run's log
    runner = spec["runner"]
    framework = (os.environ.get("KERAS_BACKEND") if runner == "keras"  # native_torch -> torch
                 else NATIVE_RUNNERS[runner][0].removeprefix("native_"))
    message = reason(exc, limit=500)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(result_path, {"out_of_memory": message[:500],
                                        "peak_rss_mb": peak_rss_mb(),
                                        "peak_device_mb": backend.peak_device_mb(framework)})
    return OOM_EXIT


if __name__ == "__main__":
    sys.exit(main())
