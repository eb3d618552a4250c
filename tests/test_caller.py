"""What a caller hands a recipe's main (kbench.caller): the mistakes a user of a recipe as a
template makes are one KbenchError line each, raised before anything trains, and nothing of
an earlier run in the output folder is lost."""

import os
import re
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import kbench  # noqa: F401
from kbench import caller, train
from kbench.bench import worker
from kbench.errors import KbenchError
from kbench.flags import parse_config
from kbench.recipe import check_main_takes_callbacks, load_recipe
from recipes import cifar_resnet, mnist_convnet

pytestmark = pytest.mark.backend_independent  # checks before any backend work


def config(tmp_path, **overrides):
    base = dict(dataset="synthetic", model="convnet", epochs=1, steps_per_epoch=2,
                batch_size=16, train_examples=64, test_examples=32, verbose=0,
                output_dir=str(tmp_path / "run"))
    return cifar_resnet.Config(**{**base, **overrides})


def small_model(classes=10, shape=(32, 32, 3), activation=None):
    inputs = keras.Input(shape)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(classes, activation=activation)(x))


def pipeline(n=32, shape=(32, 32, 3), classes=10, one_hot=True, batch=16):
    rng = np.random.default_rng(0)
    x = (rng.random((n, *shape)) * 255).astype("float32")
    y = rng.integers(0, classes, n)
    y = np.eye(classes, dtype="float32")[y] if one_hot else y
    data = tf.data.Dataset.from_tensor_slices((x, y))
    return data.batch(batch) if batch else data


def generator():
    yield np.zeros((16, 32, 32, 3), "float32"), np.eye(10, dtype="float32")[[0] * 16]


def arrays():
    return np.zeros((32, 32, 32, 3), "float32"), np.eye(10, dtype="float32")[[0] * 32]


CASES = {
    "config a dict": (lambda c: dict(config=dict(dataset="synthetic")),
                      r"^cifar_resnet takes its Config \(a dataclass of settings\), not a dict: "
                      r"pass cifar_resnet.Config\(\*\*settings\)$"),
    "another recipe's config": (lambda c: dict(config=mnist_convnet.Config(dataset="synthetic")),
                                r"^cifar_resnet was handed mnist_convnet's Config: pass "
                                r"cifar_resnet.Config\(\*\*settings\)$"),
    "callback not a callback": (
        lambda c: dict(callbacks=[print]),
        r"^callbacks takes keras.callbacks.Callback objects, not a builtin_function_or_method: "
        "wrap a function in keras.callbacks.LambdaCallback$"),
    "model a builder": (lambda c: dict(model=small_model),
                        r"^model= takes a keras.Model, not a function: pass the model it "
                        r"builds, small_model\(...\), not small_model itself$"),
    "model a name": (lambda c: dict(model="resnet20"), r"^model= takes a keras.Model, not a str$"),
    "datasets one pipeline": (lambda c: dict(datasets=pipeline()),
                              r"^datasets= takes a \(train, test\) pair of tf.data Datasets or "
                              r"kbench Streams, not a tensorflow.+Dataset$"),
    "datasets three": (lambda c: dict(datasets=(pipeline(),) * 3),
                       r"not a tuple of 3$"),
    "a generator": (lambda c: dict(datasets=(generator(), generator())),
                    r"^the training data is a Python generator or iterator, which can be read "
                    r"only once: pass tf.data.Dataset.from_generator\(...\)"),
    "arrays": (lambda c: dict(datasets=(arrays(), arrays())),
               r"^the training data is a tuple, not a pipeline: wrap \(x, y\) arrays as "
               r"tf.data.Dataset.from_tensor_slices\(\(x, y\)\).batch\(batch_size\)$"),
    "empty training data": (lambda c: dict(datasets=(pipeline().take(0), pipeline())),
                            r"^the training data is empty \(it holds no batch\)$"),
    "endless test data": (lambda c: dict(datasets=(pipeline(), pipeline().repeat())),
                          r"^the test data repeats without end, so evaluating on it would never "
                          r"end: drop its .repeat\(\), or .take\(n\) batches of it$"),
    "more steps than batches": (
        lambda c: dict(config=config(c, steps_per_epoch=5), datasets=(pipeline(), pipeline())),
        r"^--steps-per-epoch 5 is more than the 2 batches the training data holds: pass at "
        r"most 2, or .repeat\(\) the data$"),
    "images only": (lambda c: dict(datasets=(pipeline().map(lambda x, y: x), pipeline())),
                    r"^the training data's elements are single tensors of shape \(None, 32, 32, "
                    r"3\): main\(\) trains on a tf.data.Dataset of \(inputs, one-hot labels\)"),
    "dict elements": (lambda c: dict(datasets=(pipeline().map(lambda x, y: {"image": x,
                                                                          "label": y}),
                                               pipeline())),
                      r"^the training data's elements are dicts \(keys image, label\)"),
    "unbatched": (lambda c: dict(datasets=(pipeline(batch=0), pipeline(batch=0))),
                  r"^the training data is not batched \(its elements have shape \(32, 32, 3\); "
                  r"the model takes batches of \(32, 32, 3\)\): call .batch\(batch_size\) on it$"),
    "other image shape": (lambda c: dict(model=small_model(shape=(28, 28, 1))),
                          r"^the training data's inputs have shape \(16, 32, 32, 3\), but the "
                          r"model takes \(None, 28, 28, 1\): pass a model and data that match$"),
    "integer labels": (lambda c: dict(datasets=(pipeline(one_hot=False),
                                                pipeline(one_hot=False))),
                       r"^the training data's labels have shape \(None,\) \(class indices\?\), "
                       r"but kbench trains on one-hot labels for the model's 10 outputs: map "
                       r"them with tf.one_hot\(label, 10\)"),
    "one output": (lambda c: dict(model=small_model(classes=1),
                                  datasets=(pipeline(classes=1), pipeline(classes=1))),
                   r"^the model has 1 output, but kbench trains a softmax over the classes "
                   r"\(categorical cross-entropy on logits\): build it with 2 outputs for two "
                   r"classes, with one-hot labels \(tf.one_hot\(label, 2\)\)$"),
    "callbacks a dict": (lambda c: dict(callbacks={"log": keras.callbacks.History()}),
                         r"^callbacks takes a list of keras.callbacks.Callback, not a dict$"),
    "other class count": (lambda c: dict(model=small_model(classes=7)),
                          r"^the training data's labels are one-hot over 10 classes, but the "
                          r"model has 7 outputs: build the model with 10 outputs$"),
    "softmax output": (lambda c: dict(model=small_model(activation="softmax")),
                       r"^the model's output comes from a softmax \(dense.*\), but kbench "
                       r"trains on logits .*: drop its activation=\"softmax\"$"),
    "softmax op, mixed policy": (
        lambda c: dict(config=config(c, dtype_policy="mixed_bfloat16"), model=keras.Model(
            (inputs := keras.Input((32, 32, 3))),
            keras.ops.softmax(small_model()(inputs)))),
        r"^the model's output comes from a softmax \(softmax.*\), but kbench trains on logits "
        r".*: end the model before it; keep the output float32 under the mixed policy, e.g. "
        r"keras.layers.Activation\(\"linear\", dtype=\"float32\"\)$"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_main_refuses_what_it_cannot_take_before_training(case, tmp_path):
    make, message = CASES[case]
    # An earlier, unfinished run's files: a fresh run forgets its checkpoint (to start
    # afresh), but one refused for what it was handed must not
    earlier = {"metrics.json": "{}", "checkpoint.json": "{}", "checkpoint-0.weights.h5": "w",
               "history.csv": "epoch\n0\n", "config.json": "{}"}
    (tmp_path / "run").mkdir()
    for name, text in earlier.items():
        (tmp_path / "run" / name).write_text(text)
    kwargs = {"config": config(tmp_path), **make(tmp_path)}
    with pytest.raises(KbenchError, match=message):
        cifar_resnet.main(kwargs.pop("config"), **kwargs)
    assert {name: (tmp_path / "run" / name).read_text() for name in earlier} == earlier


@pytest.mark.parametrize("data_shape, model_shape, extra", [
    ((28, 28), (28, 28, 1), ()),  # keras.datasets.mnist's images: Keras adds the channel axis
    ((28, 28, 1), (28, 28), ()),
    ((32, 32, 3), (32, 32, 3), (tf.TensorSpec((None,)),)),  # sample weights
])
def test_data_a_keras_model_takes_is_taken(data_shape, model_shape, extra):
    specs = {"training": (tf.TensorSpec((None, *data_shape)), tf.TensorSpec((None, 10)),
                          *extra)}
    caller.check_data_fits_model(small_model(shape=model_shape) if len(model_shape) == 3
                                 else flat_model(model_shape), specs)
    # A Sequential built on first call, a model of dict inputs: nothing to check, no refusal
    lazy = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(10)])
    caller.check_data_fits_model(lazy, specs)
    caller.check_logits_output(lazy)
    inputs = {"pixels": keras.Input(model_shape, name="pixels")}
    two = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs["pixels"])))
    caller.check_data_fits_model(two, {"training": ({"pixels": specs["training"][0]},
                                                    specs["training"][1])})
    # What finds a functional model's output layer: Keras' own record of it
    assert caller._output_layer(small_model()).name.startswith("dense")


def flat_model(shape):
    inputs = keras.Input(shape)
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))


def test_a_single_callback_and_a_compiled_model_are_taken(tmp_path, capsys):
    """Keras users pass one callback as it is, and compile before handing a model over: both
    train, and the recompile is said (the run's optimizer, not theirs)."""
    model = small_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    seen = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *a, **k: seen.append(1))
    metrics = cifar_resnet.main(config(tmp_path), model=model, callbacks=callback,
                                datasets=(pipeline(), pipeline()))
    assert len(seen) == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert ("note: the model you passed was compiled already; kbench compiles it again with "
            "the run's optimizer (sgd), schedule and loss, not yours") in capsys.readouterr().out


def test_run_used_out_of_order_is_one_line(tmp_path):
    run = train.Run(config(tmp_path), "cifar_resnet")
    with pytest.raises(KbenchError, match=r"^a Run works inside a with statement"):
        run.datasets(cifar_resnet.build_datasets)
    with train.Run(config(tmp_path), "cifar_resnet") as run:
        with pytest.raises(KbenchError, match=r"^build_datasets\(config\) must return a "
                                              r"\(train, test\) pair of tf.data Datasets or "
                                              r"kbench Streams, not a tensorflow"):
            run.datasets(build_datasets)
        train_ds, test_ds = run.datasets(cifar_resnet.build_datasets)
        with pytest.raises(KbenchError, match=r"^build_model\(config\) returned None"):
            run.model(build_model)
        with pytest.raises(KbenchError, match=r"^run.fit needs the run's checkpoint state: "
                                              r"call run.model\(build, given=model\) first$"):
            run.fit(small_model(), train_ds, test_ds)


def build_model(config):  # a builder that forgot its return
    return None


def build_datasets(config):  # a builder that returns its training data alone
    return pipeline()


def test_compare_refuses_a_recipe_main_it_cannot_call(tmp_path):
    source = open(cifar_resnet.__file__).read()
    path = tmp_path / "two_args.py"
    path.write_text(source.replace("def main(config, model=None, datasets=None, callbacks=()):",
                                   "def main(config):"))
    recipe = load_recipe(str(path))  # a recipe still: it runs as a script, kbench evaluate takes it
    with pytest.raises(KbenchError, match=rf"^{path}'s main\(config\) cannot be called as "
                                          r"main\(config, callbacks=\[...\]\)"):
        check_main_takes_callbacks(recipe)
    # A main that trains but does not return run.finish's metrics: named after its run
    recipe = types.SimpleNamespace(main=lambda config, callbacks: None)
    with pytest.raises(KbenchError, match=r"^recipe mine's main returned NoneType, not the "
                                          r"metrics run.finish\(model\) returns"):
        worker.run_keras(recipe, config(tmp_path), {"recipe": "mine", "warmup_steps": 0})
    assert os.path.exists(path)


def test_a_config_without_its_dataclass_decorator_is_one_line(tmp_path):
    """A Config subclass left undecorated still counts as a dataclass (TrainConfig is one),
    while its own option(...) fields stay raw Field objects: it failed deep in training, as a
    recipe script and under kbench compare."""
    source = open(cifar_resnet.__file__).read()
    assert "@dataclasses.dataclass\nclass Config(TrainConfig):" in source
    path = tmp_path / "undecorated.py"
    path.write_text(source.replace("@dataclasses.dataclass\nclass Config(", "class Config("))
    said = "Config is not a dataclass (its fields dataset, model, epochs, batch_size"
    for _ in range(2):  # a refused file is not kept as loaded
        with pytest.raises(KbenchError, match=re.escape(f"{path}'s {said}")):
            load_recipe(str(path))
    module = types.ModuleType("undecorated")
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    with pytest.raises(KbenchError, match=re.escape(f"{said}")):
        parse_config(module.Config, ["--epochs", "1"])
    with pytest.raises(KbenchError, match=re.escape(f"cifar_resnet's {said}")):  # as a template
        module.main(module.Config(output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(KbenchError, match=r"^dict is not a dataclass: put @dataclasses"):
        parse_config(dict, [])

