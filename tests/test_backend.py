"""kbench.backend and the `kbench env` command."""

import json

import pytest

from tests.conftest import BACKEND


def test_backend_reports_itself():
    from kbench import backend

    info = backend.describe()
    assert info["backend"] == BACKEND
    assert info["versions"]["keras"] and info["versions"][
        {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[BACKEND]]
    assert info["devices"] and all(isinstance(d, str) for d in info["devices"])


def test_versions_name_tensorflow_installed_as_tensorflow_cpu(monkeypatch):
    """The GPU machine's TensorFlow (tf.data only) is the tensorflow-cpu distribution."""
    from importlib import metadata

    from kbench import backend

    installed = {"keras": "3.15.1", "tensorflow-cpu": "2.21.0", "torch": "2.11.0"}

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "version", version)
    found = backend.versions()
    assert (found["keras"], found["tensorflow"], found["torch"]) == ("3.15.1", "2.21.0", "2.11.0")
    assert found["jax"] is None and "tensorflow-cpu" not in found


def test_set_seed_makes_backend_randomness_repeat():
    import keras

    from kbench import backend

    backend.set_seed(5)
    a = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    backend.set_seed(5)
    b = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    assert (a == b).all()


def test_jit_compile_auto_is_keras_choice_which_matches_what_we_measured():
    """--jit-compile auto leaves the choice to Keras: XLA under jax, under tensorflow only with
    a GPU (oneDNN beat XLA on CPU here), torch eager."""
    import keras

    from kbench import backend, train

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", jit_compile=train.resolve_jit_compile("auto"))
    expected = {"jax": True, "tensorflow": backend.accelerator() == "gpu", "torch": False}
    assert model.jit_compile is expected[BACKEND]


def test_kbench_env_command(entry_point):
    from kbench import cli

    status, out, err = entry_point(cli.main, ["env", "--json"])
    assert status == 0, err
    info = json.loads(out)
    assert info["backend"] == BACKEND and "keras" in info["versions"]


@pytest.mark.backend_independent
def test_unknown_backend_is_one_line(run_python):
    out = run_python("-c", "import kbench", backend="mxnet", timeout=60)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines == ["error: unknown KERAS_BACKEND='mxnet'; use one of: jax, tensorflow, torch "
                     "(e.g. KERAS_BACKEND=jax)"]


def test_tensorflow_is_kept_off_the_gpus_under_jax_and_torch(monkeypatch):
    """Under jax or torch TensorFlow only feeds the input pipeline: where a GPU is present,
    kbench hides it from TensorFlow (which would otherwise reserve its memory); under
    tensorflow, TensorFlow trains on it."""
    import tensorflow as tf

    from kbench import backend

    hidden = []
    monkeypatch.setattr(backend, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(tf.config, "set_visible_devices",
                        lambda devices, kind: hidden.append((devices, kind)))
    backend.keep_tensorflow_off_the_gpus()
    assert hidden == ([] if BACKEND == "tensorflow" else [([], "GPU")])
    if BACKEND != "tensorflow":
        assert tf.config.get_visible_devices("GPU") == []


def framework_precision():
    """The active framework's own float32 setting: True for TF32 allowed, False for full."""
    if BACKEND == "jax":
        import jax

        return {"tensorfloat32": True, "highest": False}[jax.config.jax_default_matmul_precision]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.config.experimental.tensor_float_32_execution_enabled()
    import torch

    modes = {torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.rnn.fp32_precision}
    assert len(modes) == 1, modes  # matmuls, convolutions and cuDNN's RNNs alike
    tf32 = {"tf32": True, "ieee": False}[modes.pop()]
    # torch's legacy getters, which inductor reads, are readable (they raise where the two
    # APIs disagree: torch.compile failed on CUDA so) and say the same
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")
    return tf32


def test_one_float32_precision_is_set_on_the_framework_and_recorded(monkeypatch):
    from kbench import backend
    from kbench.errors import KbenchError

    try:
        assert backend.apply_execution_settings("highest", "off")["float32_precision"] == "highest"
        assert framework_precision() is False
        settings = backend.apply_execution_settings("tf32", "on")
        assert framework_precision() is True
        assert backend.execution_settings() == settings
        # cudnn.benchmark exists only under torch on CUDA: None elsewhere, never a guess.
        gpu_torch = BACKEND == "torch" and backend.accelerator() == "gpu"
        assert settings["cudnn_benchmark"] is (True if gpu_torch else None)
        backend.apply_execution_settings("highest")  # and back: each setting replaces the last
        assert framework_precision() is False
        if BACKEND == "torch":  # on CUDA: as asked, and recorded (cuDNN stood in for)
            import torch

            with monkeypatch.context() as cuda:
                cuda.setattr(torch.cuda, "is_available", lambda: True)
                cuda.setattr(torch.backends.cudnn, "is_available", lambda: True)
                cuda.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
                for asked, on in (("off", False), ("on", True)):
                    settings = backend.apply_execution_settings("tf32", asked)
                    assert settings["cudnn_benchmark"] is on
                    assert torch.backends.cudnn.benchmark is on
        with pytest.raises(KbenchError, match="--float32-precision must be one of tf32, highest"):
            backend.apply_execution_settings("fp32")
    finally:
        backend.apply_execution_settings()  # kbench's default, as every run sets it


def _git_repo(folder, project_name):
    """A git work tree holding a kbench package folder and a pyproject.toml naming
    `project_name`, committed; returns its HEAD."""
    import subprocess

    (folder / "kbench").mkdir(parents=True)
    (folder / "kbench" / "__init__.py").write_text("")
    (folder / "pyproject.toml").write_text(f'[project]\nname = "{project_name}"\n')
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.backend_independent
def test_provenance_names_kbench_s_own_checkout_only(tmp_path):
    """kbench's version always; a commit and the dirty flag only from kbench's own checkout,
    never from another repository kbench was copied or installed into."""
    from kbench import __version__, backend

    foreign = tmp_path / "their_project"
    _git_repo(foreign, "their-app")
    assert backend.provenance(str(foreign / "kbench")) == {
        "kbench_version": __version__, "git_commit": None, "git_dirty": None}
    nested = tmp_path / "their_app2"  # kbench vendored one folder down in their repository
    _git_repo(nested, "their-app")
    (nested / "vendor").mkdir()
    (nested / "vendor" / "pyproject.toml").write_text('[project]\nname = "kbench"\n')
    (nested / "vendor" / "kbench").mkdir()
    assert backend.provenance(str(nested / "vendor" / "kbench"))["git_commit"] is None
    assert backend.provenance(str(tmp_path / "nowhere" / "kbench"))["git_commit"] is None

    ours = tmp_path / "kbench_checkout"
    head = _git_repo(ours, "kbench")
    assert backend.provenance(str(ours / "kbench")) == {
        "kbench_version": __version__, "git_commit": head, "git_dirty": False}
    (ours / "kbench" / "__init__.py").write_text("# edited\n")
    assert backend.provenance(str(ours / "kbench"))["git_dirty"] is True
    (ours / "kbench" / "__init__.py").write_text("")
    (ours / "scratch.txt").write_text("untracked files are not changes to kbench")
    assert backend.provenance(str(ours / "kbench"))["git_dirty"] is False
