"""The three backends train the same numbers, and a model.keras is portable: trained under any
backend, it predicts the same logits when loaded under JAX, TensorFlow and PyTorch.

Each backend needs its own interpreter (KERAS_BACKEND is read once), so this one test trains
and loads in subprocesses and runs once, in the tensorflow pass of the suite.
"""

import itertools
import json

import numpy as np
import pytest

BACKENDS = ("jax", "tensorflow", "torch")
TOLERANCE = 1e-4  # max abs logit difference; float32 kernels of three libraries

# Loads every model.keras named on the command line and saves its logits on one batch.
PREDICT = """
import sys
import numpy as np
import kbench
from kbench.models.saving import load_model

batch, out, *models = sys.argv[1:]
x = np.load(batch)
logits = {name: np.asarray(load_model(path).predict(x, verbose=0))
          for name, path in (m.split("=", 1) for m in models)}
np.savez(out, **logits)
"""


@pytest.mark.backend_independent
def test_backends_train_alike_and_their_models_predict_alike_under_each_backend(run_pythons,
                                                                               tmp_path):
    """Same seed: same initial weights, same batches, same optimizer, so the three backends'
    losses agree to float32 round-off (1e-3 relative after 4 steps); then every model.keras,
    loaded under every backend, gives the logits it gives under the others. (The three
    trainings run side by side, as do the three loadings: each in its own interpreter.)"""
    models, metrics = {}, {}
    trainings = run_pythons(*[(
        ["recipes/cifar_resnet.py", "--dataset", "synthetic", "--model", "resnet20",
         "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "32",
         "--train-examples", "128", "--test-examples", "64", "--no-validate-every-epoch",
         "--verbose", "0", "--output-dir", str(tmp_path / "runs" / backend)],
        dict(backend=backend)) for backend in BACKENDS])
    for backend, result in zip(BACKENDS, trainings):
        out_dir = tmp_path / "runs" / backend
        assert result.returncode == 0, (backend, result.stderr[-3000:])
        metrics[backend] = json.loads((out_dir / "metrics.json").read_text())
        assert metrics[backend]["backend"] == backend
        models[backend] = out_dir / "model.keras"
    for backend in ("tensorflow", "torch"):
        ours, ref = metrics[backend], metrics["jax"]
        assert ours["history"]["loss"] == pytest.approx(ref["history"]["loss"], rel=1e-3), backend
        assert ours["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-2), backend

    batch = tmp_path / "batch.npy"
    np.save(batch, np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32"))
    logits = {}  # (trained under, loaded under) -> (8, 10) logits
    loadings = run_pythons(*[(
        ["-c", PREDICT, str(batch), str(tmp_path / f"logits_{loader}.npz"),
         *[f"{b}={path}" for b, path in models.items()]], dict(backend=loader))
        for loader in BACKENDS])
    for loader, result in zip(BACKENDS, loadings):
        assert result.returncode == 0, (loader, result.stderr[-3000:])
        with np.load(tmp_path / f"logits_{loader}.npz") as saved:
            for trainer in BACKENDS:
                logits[trainer, loader] = saved[trainer]

    for trainer in BACKENDS:
        assert all(logits[trainer, b].shape == (8, 10) for b in BACKENDS)
        assert np.all(np.isfinite(logits[trainer, "jax"]))
        for a, b in itertools.combinations(BACKENDS, 2):
            diff = np.max(np.abs(logits[trainer, a] - logits[trainer, b]))
            print(f"trained under {trainer}: loaded under {a} vs {b}: max abs diff {diff:.2e}")
            assert diff < TOLERANCE, (f"model trained under {trainer}: its logits loaded under "
                                      f"{a} and {b} differ by {diff:.2e}")
