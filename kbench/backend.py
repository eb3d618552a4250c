"""Which Keras backend runs, its versions and devices, seeding, and simulated CPU devices.

One of the few modules allowed to import jax, tensorflow or torch directly.
"""

import os
import platform
import random

from kbench.errors import KbenchError

BACKENDS = ("jax", "tensorflow", "torch")


def requested_backend():
    """The backend Keras will run, validated: KERAS_BACKEND's, else (as Keras decides) the
    "backend" of $KERAS_HOME/keras.json (default ~/.keras), else tensorflow.

    Called before keras is imported: Keras would otherwise fail with a long traceback. A
    name with spaces around it (` torch`) is set back into KERAS_BACKEND without them, so
    that Keras reads the backend kbench checked.
    """
    given = os.environ.get("KERAS_BACKEND")
    if given:  # an empty one Keras ignores too (its config falls back to keras.json)
        name, source = given.strip(), None
        if name != given and name in BACKENDS:
            os.environ["KERAS_BACKEND"] = name
    else:
        name, source = _keras_json_backend()
    if name not in BACKENDS:
        where = f"KERAS_BACKEND={name!r}" if source is None else f"backend {name!r} in {source}"
        raise KbenchError(f"unknown {where}; use one of: {', '.join(BACKENDS)} "
                          "(e.g. KERAS_BACKEND=jax)")
    return name


def _keras_json_backend():
    """(backend, the file it was read from) from Keras' config file, or ("tensorflow", None)
    without one; a file Keras could not read either leaves Keras at its default."""
    import json

    if "KERAS_HOME" in os.environ:  # where keras.src.backend.config looks, as it looks
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    path = os.path.expanduser(os.path.join(home, "keras.json"))
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return "tensorflow", None
    backend = saved.get("backend", "tensorflow") if isinstance(saved, dict) else "tensorflow"
    return backend, path  # as Keras reads it: not stripped


def keep_tensorflow_off_the_gpus():
    """Under jax or torch, TensorFlow only runs the tf.data input pipelines, on the CPU: hide
    the GPUs from it before its runtime starts, or it would reserve most of every GPU's
    memory that JAX or PyTorch needs. (JAX's own preallocation stays as JAX sets it.)
    kbench.imports calls it as TensorFlow is imported; it imports no Keras."""
    import importlib.util

    from kbench.imports import configured_backend

    if (configured_backend() == "tensorflow" or not nvidia_gpu_present()
            or importlib.util.find_spec("tensorflow") is None):
        return  # without a GPU, importing TensorFlow here would only cost start-up time
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # its runtime already started: TensorFlow was used before kbench
        import sys

        print("note: TensorFlow was started before kbench could hide the GPUs from it; it "
              "may hold GPU memory (import kbench first)", file=sys.stderr)


def nvidia_gpu_present():
    """Whether this machine has an NVIDIA GPU for its driver, asked without starting any
    framework: the driver's device files."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.isdir("/proc/driver/nvidia/gpus")


def tensorflow_sees_gpu():
    """Whether TensorFlow has a GPU here, asked without starting its runtime (physical
    devices; listing logical ones would start it and fix its device settings)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def name():
    """The backend Keras is running on."""
    import keras

    return keras.backend.backend()


def versions():
    """Versions of Python, Keras and the frameworks that are installed (None when missing)."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    # Each name, then the other distributions that install the same module (a GPU machine
    # whose TensorFlow serves only tf.data has tensorflow-cpu)
    for dist, *others in (("keras",), ("jax",), ("jaxlib",), ("tensorflow", "tensorflow-cpu"),
                          ("torch",), ("numpy",), ("optax",), ("tensorflow-datasets",)):
        found[dist] = None
        for name in (dist, *others):
            try:
                found[dist] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                pass
    try:
        from kbench import __version__

        found["kbench"] = __version__
    except ImportError:  # pragma: no cover - partial install
        pass
    return found


def devices():
    """Devices the active backend computes on, as strings like 'cpu:0' or 'gpu:0 (NVIDIA H100)'."""
    backend = name()
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id}" + (f" ({d.device_kind})" if d.platform != "cpu" else "")
                for d in jax.devices()]
    if backend == "tensorflow":
        import tensorflow as tf

        found = []
        for kind in ("GPU", "CPU"):
            for i, d in enumerate(tf.config.list_logical_devices(kind)):
                found.append(f"{kind.lower()}:{i}")
        return found
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    return ["cpu:0"]


def synchronize(model):
    """Wait until the device has finished every training step queued for `model`: the clock
    read next covers them. Under jax the freshest state is the one `fit` keeps on the model
    between steps (`_jax_state`, what Keras' own `jax_state_sync` reads), else the variables;
    under torch the CUDA stream; under tensorflow, reading the step counter waits for the
    update that wrote it."""
    backend = name()
    if backend == "jax":
        import jax

        state = getattr(model, "_jax_state", None)
        # Keras wraps it in its TrackedDict/TrackedList, which jax's tree functions would
        # take for one opaque leaf (and then wait for nothing): unwrap to plain lists.
        arrays = ([list(group or ()) for group in state.values()] if state
                  else [v.value for v in model.variables])
        jax.block_until_ready(arrays)
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        import keras

        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            keras.ops.convert_to_numpy(optimizer.iterations)


FLOAT32_PRECISIONS = ("tf32", "highest")
# --simulate-devices' ceiling: TensorFlow's runtime, asked for 1000 CPU devices, made thousands
# of threads and hung past SIGTERM; a simulation of more splits the CPU no more usefully.
MAX_SIMULATED_DEVICES = 64
_settings = {}  # what apply_execution_settings set last in this process


def apply_execution_settings(float32_precision="tf32", cudnn_benchmark="on"):
    """Set how the active backend computes, the same way for every backend, once per run
    (kbench.train.setup_run: every Keras run and every native twin). Returns, and keeps for
    `execution_settings`, what each record says about it.

    float32_precision: on GPUs with TensorFloat-32 units, JAX and TensorFlow run float32
    convolutions and matmuls in TF32 by default while PyTorch does so for convolutions only,
    so the same model was not computed alike. "tf32" allows TF32 for both op kinds on every
    backend; "highest" asks each for full float32 (JAX "highest", TensorFlow's TF32 off,
    torch "ieee"). On a CPU no backend has TF32: nothing changes, the setting is recorded.
    cudnn_benchmark: under torch on CUDA, "on" lets cuDNN time its algorithms per input
    shape (what PyTorch practitioners turn on for CNNs with fixed shapes); recorded as a bool
    there, None where it does not apply (no cuDNN in use).
    """
    if float32_precision not in FLOAT32_PRECISIONS:
        raise KbenchError(f"--float32-precision must be one of {', '.join(FLOAT32_PRECISIONS)}, "
                          f"not {float32_precision!r}")
    if cudnn_benchmark not in ("on", "off"):
        raise KbenchError(f"--cudnn-benchmark must be on or off, not {cudnn_benchmark!r}")
    tf32 = float32_precision == "tf32"
    backend = name()
    benchmark = None
    if backend == "jax":
        import jax

        # The default for float32 operands of dots and convolutions without a precision of
        # their own (Keras passes none): "tensorfloat32" or "highest".
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(tf32)
    else:
        import torch

        _set_torch_float32_precision(torch, tf32)
        if torch.cuda.is_available() and torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = benchmark = cudnn_benchmark == "on"
    _settings.clear()
    _settings.update(float32_precision=float32_precision, cudnn_benchmark=benchmark)
    return dict(_settings)


def _set_torch_float32_precision(torch, tf32):
    """TF32 for torch's float32 matmuls, cuDNN convolutions and RNNs, or full float32, through
    both of torch's APIs. Since torch 2.9 each getter raises when the legacy flag and the new
    `fp32_precision` disagree ("... mix of the legacy and new APIs"), and inductor still
    reads the legacy ones (`torch.get_float32_matmul_precision()` in its cache keys, for
    one): a precision written through the new API alone has been reported to make
    torch.compile fail on CUDA GPUs (pytorch/pytorch#166387, torch 2.9-2.10). The legacy
    setters first (they fill in the new API too), then the new API, explicitly for
    convolutions and recurrent layers (the legacy cuDNN setter leaves them "none", which
    defers to a process-wide setting): every getter then agrees."""
    import warnings

    with warnings.catch_warnings():
        # torch 2.9-2.10 warn that the legacy setters "will be deprecated": set on purpose.
        warnings.filterwarnings("ignore", message=".*new API settings to control TF32")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        mode = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        torch.backends.cudnn.rnn.fp32_precision = mode  # the LSTM recipe's cuDNN kernels


def keras_compiler(jit_compile, framework=None):
    """What compiled a Keras run's train step (records.SETTING_FIELDS' `compiler`), from what
    Keras resolved jit_compile to."""
    framework = framework or name()
    if framework == "torch":
        return "torch.compile" if jit_compile else "eager"
    if framework == "tensorflow":
        return "xla" if jit_compile else "tf.function"  # Keras' tensorflow steps: tf.function
    return "xla" if jit_compile else "eager"  # jax: jax.jit, or op by op


def execution_settings():
    """{"float32_precision", "cudnn_benchmark"} as apply_execution_settings set them in this
    process (None each before it ran)."""
    return {"float32_precision": _settings.get("float32_precision"),
            "cudnn_benchmark": _settings.get("cudnn_benchmark")}


def simulate_cpu_devices(n):
    """Split the host CPU into `n` devices for the backend KERAS_BACKEND names (jax: XLA's
    `jax_num_cpu_devices`; tensorflow: n logical CPU devices), so data-parallel code can run
    on a laptop. Only possible before the backend's runtime starts; torch has no such thing
    (its replicas are processes: torchrun). Returns nothing; raises KbenchError.
    """
    if n < 1:
        raise KbenchError(f"--simulate-devices must be at least 1, not {n}")
    wanted = requested_backend()
    if wanted == "torch":
        raise KbenchError("--simulate-devices is for jax and tensorflow; torch replicas are "
                          "processes: torchrun --standalone --nproc_per_node N "
                          "<recipe>.py --distribute data_parallel")
    too_late = (f"--simulate-devices {n} came too late: the {wanted} runtime already started "
                "with a different device count; split the CPU first thing in the process "
                "(kbench.distribute.simulate_devices before any model, tensor or dataset)")
    if wanted == "jax":
        import jax

        # jax checks this itself: the update raises once a backend is up, unless the value
        # is unchanged. The GPU check waits for distribute.setup: looking for devices here
        # would start the backend before jax.distributed.initialize may run.
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            if len(jax.devices("cpu")) != n:
                raise KbenchError(too_late) from None
        return
    import tensorflow as tf

    if tensorflow_sees_gpu():  # without starting the TF runtime, which would fix the devices
        raise KbenchError("--simulate-devices splits the CPU, but TensorFlow sees a GPU here: "
                          "drop --simulate-devices to train on the GPUs, or hide them with "
                          "CUDA_VISIBLE_DEVICES=")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError:  # "Virtual devices cannot be modified after being initialized"
        if len(tf.config.list_logical_devices("CPU")) != n:
            raise KbenchError(too_late) from None


def accelerator():
    """'gpu' when the active backend sees a GPU, else 'cpu'."""
    return "gpu" if any(not d.startswith("cpu") for d in devices()) else "cpu"


def peak_device_mb(framework):
    """Peak accelerator memory of this process, where the framework reports it (None on CPU)."""
    try:
        if framework == "jax":
            import jax

            device = jax.devices()[0]
            if device.platform == "cpu":
                return None
            stats = device.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            return peak / 2**20 if peak else None
        if framework == "torch":
            import torch

            if not torch.cuda.is_available():
                return None
            return torch.cuda.max_memory_allocated() / 2**20
        if framework == "tensorflow":
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                return None
            return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    except Exception:  # noqa: BLE001 - memory stats are best effort, never fail a run
        return None
    return None


def provenance(package_dir=None):
    """What ran, for records and metrics.json: `kbench_version` always; `git_commit` and
    `git_dirty` (uncommitted changes to tracked files) only when kbench runs from its own git
    checkout: its package folder `kbench/` at the top of a git work tree whose pyproject.toml
    names the project kbench. kbench copied or installed inside another repository gets None
    for both, not that repository's commit."""
    from kbench import __version__

    found = {"kbench_version": __version__, "git_commit": None, "git_dirty": None}
    top = kbench_checkout(package_dir or os.path.dirname(os.path.abspath(__file__)))
    if top is not None:
        found["git_commit"] = _git(top, "rev-parse", "HEAD")
        status = _git(top, "status", "--porcelain", "--untracked-files=no")
        found["git_dirty"] = None if status is None else bool(status)
    return found


def kbench_checkout(package_dir):
    """The top folder of kbench's own git checkout that `package_dir` is the package of, or
    None (no git, not a work tree, or another project's)."""
    import tomllib

    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if not top or os.path.realpath(os.path.dirname(package_dir)) != os.path.realpath(top):
        return None
    try:
        with open(os.path.join(top, "pyproject.toml"), "rb") as f:
            name = tomllib.load(f).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return top if name == "kbench" else None


def _git(folder, *args):
    """`git ARGS` in `folder`: its output, stripped, or None when git fails or is missing."""
    import subprocess

    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit():
    """The commit of kbench's own checkout, or None (see provenance)."""
    return provenance()["git_commit"]


def set_seed(seed):
    """Seed Python, NumPy, the backend and TensorFlow (tf.data) from one integer."""
    import keras
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)  # python, numpy, tf and the active backend's global RNG
    if name() != "tensorflow":
        # tf.data runs under every backend; keras seeds TF only when it is importable.
        import tensorflow as tf

        tf.random.set_seed(seed)


def describe():
    """A dict for `kbench env` and for metrics.json."""
    return {"backend": name(), "devices": devices(), "versions": versions()}
