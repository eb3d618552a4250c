"""What `import kbench` arranges for frameworks it does not load itself.

`import kbench` must be instant (`kbench --help` answers before any framework loads), yet
kbench's custom layers must be registered whenever Keras is there to load a kbench model, and
TensorFlow must be quiet and, under jax or torch, kept off the GPUs. So kbench hooks the import
of `keras` and `tensorflow` (a finder at the front of sys.meta_path) and does that work when, and
only when, they are imported, by anyone; or at once when they already were.
"""

import contextlib
import importlib.abc
import os
import re
import sys
import tempfile

# TensorFlow's C++ start-up lines: absl log lines ("I0000 00:00:1796... port.cc:153] oneDNN
# custom operations are on ...") and absl's notice that they precede its initialisation.
# They are printed while its libraries load, before TF_CPP_MIN_LOG_LEVEL is read.
ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^ ]+:\d+\] ")
ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}  # TF_CPP_MIN_LOG_LEVEL's levels
# A CUDA build of TensorFlow on a machine without an NVIDIA driver logs, as an error, at its
# first op: "E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed
# call to cuInit: UNKNOWN ERROR (303)". It says only that the machine has no GPU, which the
# user knows, and reads like a fault: without a GPU it is dropped (with one it is kept: a
# driver TensorFlow cannot use is worth seeing).
NO_GPU_CUINIT = re.compile(r"failed call to cuInit")
OURS = "KBENCH_SET_TF_CPP_MIN_LOG_LEVEL"  # marks the level as kbench's (child processes too)


def verbose():
    """Whether the user asked for the frameworks' start-up logs (KBENCH_VERBOSE=1, or the
    `kbench --verbose` flag, which sets it)."""
    return os.environ.get("KBENCH_VERBOSE", "").strip() not in ("", "0")


def quiet_tensorflow_logs():
    """Set TF_CPP_MIN_LOG_LEVEL=2 (warnings and info off, errors on) unless the user set it
    or asked for verbose output. Returns the level kbench filters TensorFlow's start-up lines
    at, or None where it leaves them alone."""
    if verbose():
        if os.environ.pop(OURS, None):  # kbench's, from a parent process: not the user's
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        return None
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and OURS not in os.environ:
        return None  # the user's own setting: TensorFlow prints what it says
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ[OURS] = "1"
    return int(os.environ["TF_CPP_MIN_LOG_LEVEL"])


def filter_startup_lines(text, level, gpu_present=True):
    """The lines of `text` a user should see: absl lines below `level` and absl's preamble
    dropped, and without `gpu_present` TensorFlow's cuInit error (NO_GPU_CUINIT); everything
    else (Python warnings, errors) kept."""
    kept = []
    for line in text.splitlines(keepends=True):
        match = ABSL_LINE.match(line)
        if line.startswith(ABSL_PREAMBLE) or (match and SEVERITY[match.group(1)] < level):
            continue
        if match and not gpu_present and NO_GPU_CUINIT.search(line):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def tensorflow_import_filtered(level):
    """Around TensorFlow's import: its start-up lines filtered, and on a machine without an
    NVIDIA GPU its CUDA probe made at once, inside the filter (list_physical_devices; 1 ms),
    so that its cuInit error is not printed at the first op."""
    from kbench.backend import nvidia_gpu_present

    gpu_present = nvidia_gpu_present()
    with stderr_filtered(level, gpu_present):
        yield
        if not gpu_present:
            try:
                sys.modules["tensorflow"].config.list_physical_devices("GPU")
            except Exception:  # noqa: BLE001  only to move a log line: never fail the import
                pass  # (TensorFlow's first op meets whatever broke here, and says so)


@contextlib.contextmanager
def stderr_filtered(level, gpu_present=True):
    """Catch what is written to file descriptor 2 (C++ libraries write there directly) and
    pass on what filter_startup_lines keeps, once the block ends."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no file descriptor 2 (or no stderr) here
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = filter_startup_lines(caught.read().decode(errors="replace"), level,
                                        gpu_present)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


class ImportHooks(importlib.abc.MetaPathFinder):
    """Runs `around` (a context manager factory) around a module's first execution and `after`
    once it is done. Finds nothing itself: it wraps the spec the other finders return."""

    def __init__(self):
        self.around, self.after = {}, {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.around and fullname not in self.after:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, exec_module = spec.loader, spec.loader.exec_module

        def exec_hooked(module):
            # Once, at the import that runs the module (importlib.util.find_spec also asks
            # finders, for specs it never executes).
            del loader.exec_module  # the loader's own method again
            around = self.around.pop(fullname, contextlib.nullcontext)
            after = self.after.pop(fullname, lambda: None)
            with around():
                exec_module(module)
            after()

        loader.exec_module = exec_hooked
        return spec


def configured_backend():
    """The backend Keras runs or will run, asked without importing Keras: Keras' own answer
    once its config is loaded (it also reads ~/.keras/keras.json), else KERAS_BACKEND's."""
    config = sys.modules.get("keras.src.backend.config")
    if config is not None and hasattr(config, "backend"):
        return config.backend()
    from kbench.backend import requested_backend

    return requested_backend()


def register_kbench_layers():
    import kbench.models  # noqa: F401  (its modules register kbench's layers with Keras)


def tensorflow_imported():
    from kbench.backend import keep_tensorflow_off_the_gpus

    keep_tensorflow_off_the_gpus()  # before anything runs a TensorFlow op


def install(level):
    """Hook `keras` and `tensorflow`, or act now on those already imported. `level`: what
    quiet_tensorflow_logs returned."""
    hooks = ImportHooks()
    if "tensorflow" in sys.modules:
        tensorflow_imported()
    else:
        if level is not None:
            hooks.around["tensorflow"] = lambda: tensorflow_import_filtered(level)
        hooks.after["tensorflow"] = tensorflow_imported
    if "keras" in sys.modules:
        register_kbench_layers()
    else:
        hooks.after["keras"] = register_kbench_layers
    if hooks.around or hooks.after:
        sys.meta_path.insert(0, hooks)
        HOOKS.append(hooks)


HOOKS = []  # the installed ImportHooks (show_startup_logs takes its filter out)


def show_startup_logs():
    """`kbench --verbose`: let TensorFlow print its start-up lines, here and in the processes
    this one starts (compare's workers)."""
    os.environ["KBENCH_VERBOSE"] = "1"
    quiet_tensorflow_logs()
    for hooks in HOOKS:
        hooks.around.pop("tensorflow", None)
