"""kbench stands alone: it never imports `recipes`, finds its own recipe files by path, and runs a
user's recipe file that follows the recipe contract.

The end-to-end check runs `kbench` from a folder that holds its own `recipes/` package whose
`cifar_resnet.py` raises on import, as a user's project that copied the README's recipes would
(test_compare.py runs every compare, and an evaluate, from such a folder too).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from kbench import recipe as recipe_files
from kbench.errors import KbenchError
from tests.conftest import REPO

pytestmark = pytest.mark.backend_independent

TINY = ["--batch-size", "16", "--steps", "2", "--warmup-steps", "0"]


def test_no_module_of_kbench_imports_recipes():
    pattern = re.compile(r"^\s*(import recipes|from recipes\b)", re.MULTILINE)
    for folder, _, files in os.walk(os.path.join(REPO, "kbench")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    assert not pattern.search(f.read()), os.path.join(folder, name)


def test_recipes_are_found_by_name_or_path_and_checked(tmp_path, monkeypatch):
    assert {"cifar_resnet", "mnist_convnet", "imdb_transformer", "finetune"} <= set(
        recipe_files.installed_recipes())
    module = recipe_files.load_recipe("mnist_convnet")
    assert module.__file__ == os.path.join(REPO, "recipes", "mnist_convnet.py")
    with pytest.raises(KbenchError, match="unknown recipe 'nope'.*--recipe ./my_recipe.py"):
        recipe_files.load_recipe("nope")
    with pytest.raises(KbenchError, match="no such file"):
        recipe_files.load_recipe(str(tmp_path / "missing.py"))
    (tmp_path / "half.py").write_text("Config = dict\n")
    with pytest.raises(KbenchError, match="has no build_model, build_datasets, main"):
        recipe_files.load_recipe(str(tmp_path / "half.py"))
    with pytest.raises(KbenchError, match="is a folder: pass a recipe script in it"):
        recipe_files.load_recipe(str(tmp_path) + os.sep)
    # A file that fails while it is imported: one line, and nothing of it left imported.
    for source, message in [
            ("def broken(:\n", r"syntax.py does not load: SyntaxError at line 1 \("),
            ("raise RuntimeError('boom')\n",
             r"raising.py does not load: RuntimeError: boom while it is imported; run `python "),
            ("import sys\nsys.exit(3)\n",
             r"exiting.py exited \(status 3\) while being imported: .*__name__ == "),
            ("import sys\nsys.exit()\n", r"exit0.py exited \(status 0\) while being imported"),
            ("import helper_with_typo\n",
             r"importing.py does not load: SyntaxError at line 1 of .*helper_with_typo.py ")]:
        name = message.split(".py")[0]
        (tmp_path / f"{name}.py").write_text(source)
        (tmp_path / "helper_with_typo.py").write_text("def broken(:\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        with pytest.raises(KbenchError, match=message):
            recipe_files.load_recipe(str(tmp_path / f"{name}.py"))
        assert f"kbench_recipe_{name}" not in sys.modules


@pytest.fixture
def user_project(tmp_path):
    """A folder with its own broken `recipes` package and a recipe file of the user's own,
    copied from mnist_convnet and edited (another learning rate, its own name)."""
    project = tmp_path / "project"
    (project / "recipes").mkdir(parents=True)
    (project / "recipes" / "__init__.py").write_text("")
    (project / "recipes" / "cifar_resnet.py").write_text(
        "raise RuntimeError('the user recipes package was imported')\n")
    with open(os.path.join(REPO, "recipes", "mnist_convnet.py")) as f:
        source = f.read()
    edited = source.replace('Run(config, "mnist_convnet"', 'Run(config, "my_digits"')
    edited = edited.replace('option(3e-3, "peak learning rate")', 'option(2e-3, "peak rate")')
    assert edited.count("my_digits") == 1 and "2e-3" in edited
    # Its own network, whatever config.model says (the Config's default stays "convnet").
    built = ("    return get_model(config.model, num_classes=num_classes, "
             "input_shape=image_shape,\n                     seed=config.seed)\n")
    assert built in edited
    edited = edited.replace(built, (
        "    import keras\n\n"
        "    inputs = keras.Input(image_shape)\n"
        "    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255.0)(inputs))\n"
        "    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name='my_tiny')\n"))
    (project / "my_digits.py").write_text(edited)
    return project


def kbench(project, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "kbench.cli", *args], cwd=project,
                          capture_output=True, text=True, timeout=timeout,
                          env={**env, "KERAS_BACKEND": "tensorflow"})


def test_compare_and_evaluate_run_a_users_own_recipe_file(user_project):
    out = user_project / "mine"
    # One backend is enough here: test_compare.py runs every backend (from such a folder too).
    result = kbench(user_project, "compare", "--recipe", "./my_digits.py",
                    "--backends", "torch", "--dataset", "digits",
                    "--set", "test_examples=30", *TINY,
                    "--output", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["torch"]
    assert all(r["status"] == "ok" and r["dataset"] == "digits" for r in rows)
    assert "torch" in result.stdout  # the table reports it
    # The records and the table's title name the model that was built: 8x8 pixels -> 10.
    assert all(r["model"] == "my_tiny" and r["params"] == 64 * 10 + 10 for r in rows)
    assert all(r["config"]["model"] == "convnet" for r in rows)  # the Config's, unused
    assert "my_digits.py: my_tiny (650 params) on digits, batch 16" in result.stdout
    metrics = json.loads((out / "runs" / "torch-r0" / "metrics.json").read_text())
    assert metrics["recipe"] == "my_digits"  # the user's file ran, under its own name
    assert metrics["config"]["lr"] == 2e-3
    # Its test split, rebuilt by the user's recipe file.
    result = kbench(user_project, "evaluate", str(out / "runs" / "torch-r0" / "model.keras"),
                    "--recipe", "./my_digits.py", "--output-dir", str(user_project / "ev"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((user_project / "ev" / "eval.json").read_text())["num_examples"] == 30
