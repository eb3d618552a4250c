"""Evaluate a classifier on a test split: accuracy, top-5, loss, per-class precision / recall /
F1 and the confusion matrix, written as eval.json and confusion_matrix.png.

Recipes call `evaluate_model` + `write_evaluation` at the end of a run; `kbench evaluate` calls
them on a saved model.keras. One pass of `predict_on_batch` over the test set collects every
logit and label; all metrics are then computed in NumPy / scikit-learn from those arrays, so
they are the same numbers whatever backend ran the model.
"""

import dataclasses
import io
import math
import os

import numpy as np

from kbench.data.stream import as_stream
from kbench.errors import KbenchError
from kbench.files import write_bytes_atomic, write_json_atomic
from kbench.flags import flag_of

TOP_K = 5
TOP_K_MIN_CLASSES = 10  # below this, top-5 of a handful of classes says little
ANNOTATE_MAX_CLASSES = 20  # write the count in every cell up to this many classes


def evaluate_model(model, test_ds, class_names=None):
    """Run `model` over `test_ds` once and return `evaluate_predictions` of the results.

    `test_ds` yields (inputs, labels) batches: a tf.data pipeline (kbench's yield one-hot float
    labels) or any iterable of pairs; labels may be one-hot rows or integer class ids.
    """
    return evaluate_predictions(*predict_all(model, test_ds), class_names)


def predict_all(model, test_ds):
    """(outputs, labels) of every test example, as NumPy arrays, from one pass over test_ds."""
    import keras

    if not isinstance(test_ds, (list, tuple)):  # a Stream or a tf.data pipeline
        test_ds = as_stream(test_ds, training=False).dataset
    batches = test_ds.as_numpy_iterator() if hasattr(test_ds, "as_numpy_iterator") else test_ds
    # Under a TensorFlow strategy with several replicas, predict_on_batch hands every replica
    # the whole batch (N copies of the outputs come back); calling the model runs it once, on
    # the variables' primary copies, which kbench.distribute keeps in sync.
    strategy = getattr(model, "distribute_strategy", None)
    replicated = strategy is not None and strategy.num_replicas_in_sync > 1
    torch_backend = keras.backend.backend() == "torch"
    logits, labels = [], []
    full = None  # the first batch's size, which every later batch is given
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise KbenchError("the test data must yield (inputs, labels) pairs")
        x, y = batch[0], batch[1]
        arrays = keras.tree.flatten(x)
        rows = len(next((a for a in arrays if a is not None), y))
        full = full or rows
        if 0 < rows < full and all(a is None or isinstance(a, np.ndarray) for a in arrays):
            x = pad_rows(x, full)  # the last batch, to the others' shape (see pad_rows)
        if torch_backend:  # Keras' torch predict_on_batch hands NumPy to a compiled step as is
            x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)  # dict inputs too
        outputs = model(x, training=False) if replicated else model.predict_on_batch(x)
        logits.append(keras.ops.convert_to_numpy(outputs)[:rows])
        labels.append(np.asarray(y))
    if not logits:
        raise KbenchError("the test split is empty: nothing to evaluate "
                          "(check --test-examples and the data)")
    return np.concatenate(logits), np.concatenate(labels)


def pad_rows(x, rows):
    """`x` (an array, or a structure of arrays: one example per row) with its last example
    repeated up to `rows` rows. A compiled predict step (jax.jit, XLA, torch.compile) is
    compiled for its input's shape: a shorter last batch is another compile, for a handful
    of examples (ResNet-20's under torch.compile: 9 s on our 2-core CPU, as long as the
    first; under jax.jit 0.4 s). In inference each example's output of kbench's models, and
    of any model without a layer that mixes the examples of a batch, depends on it alone
    (BatchNormalization uses its moving statistics), so the extra rows change nothing but
    the work (to float rounding: kernels may differ by batch size), and the caller cuts
    them off the output. Used by predict_all (NumPy inputs only) and the native twins'
    evaluations (kbench.bench.native_common.evaluate), so that both compile alike."""
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])
    import keras

    return keras.tree.map_structure(
        lambda a: None if a is None else pad_rows(np.asarray(a), rows), x)


def smoothed_loss(logits, labels, label_smoothing):
    """Mean categorical cross-entropy against labels smoothed as Keras smooths them
    (y * (1 - s) + s / classes): the training objective, as model.evaluate reports it."""
    logits = np.asarray(logits, dtype=np.float64)
    num_classes = logits.shape[1]
    target = np.eye(num_classes)[class_ids(labels, num_classes)]
    target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return float(-np.mean(np.sum(target * log_probabilities(logits), axis=1)))


def evaluate_predictions(logits, labels, class_names=None):
    """Metrics of a classifier's outputs against the true labels.

    `logits`: (N, C) model outputs. They are taken as logits (softmax gives the probabilities)
    unless every row is already a probability distribution (non-negative, summing to 1), as a
    model ending in a softmax outputs: those are used as they are.
    `labels`: (N,) or (N, 1) integer class ids, or (N, C) one-hot (or smoothed) rows.
    `class_names`: C names, or None (classes are then named by their index).

    Returns a JSON-ready dict: `accuracy`, `top5_accuracy` (only with >= 10 classes, where
    top-5 means something), `loss` (mean categorical cross-entropy, no label smoothing),
    `macro_f1`, `num_examples`, `num_classes`, `per_class` (a list, every class, even those
    absent from the test split: name, precision, recall, f1, support), `confusion_matrix`
    (rows: true class, columns: predicted class).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise KbenchError(f"expected (examples, classes) model outputs, got shape {logits.shape}")
    n, num_classes = logits.shape
    true = class_ids(labels, num_classes)
    if len(true) != n:
        raise KbenchError(f"{n} model outputs but {len(true)} labels")
    if class_names is not None and len(class_names) != num_classes:
        raise KbenchError(f"the model has {num_classes} outputs but the dataset has "
                          f"{len(class_names)} classes: evaluate it on the dataset it was "
                          "trained on")
    names = [str(c) for c in class_names] if class_names is not None else \
        [str(i) for i in range(num_classes)]

    log_probs = log_probabilities(logits)
    predicted = np.argmax(logits, axis=1)
    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, predicted, labels=classes, zero_division=0)
    result = {
        "accuracy": float(np.mean(predicted == true)),
        "loss": float(-np.mean(log_probs[np.arange(n), true])),
        "macro_f1": float(np.mean(f1)),
        "num_examples": int(n),
        "num_classes": int(num_classes),
    }
    if num_classes >= TOP_K_MIN_CLASSES:
        # A true class is in the top k when fewer than k classes score strictly higher
        # (tf.math.in_top_k's rule: ties at the boundary count as in).
        true_scores = logits[np.arange(n), true][:, None]
        result[f"top{TOP_K}_accuracy"] = float(np.mean(np.sum(logits > true_scores, 1) < TOP_K))
    result["per_class"] = [
        {"class": i, "name": names[i], "precision": float(precision[i]),
         "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i in classes
    ]
    result["confusion_matrix"] = confusion_matrix(true, predicted, labels=classes).tolist()
    return result


def class_ids(labels, num_classes):
    """Integer class ids from (N,) / (N, 1) ids or (N, num_classes) one-hot rows."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == num_classes and num_classes > 1:
        ids = np.argmax(labels, axis=1)
    elif labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        ids = labels.reshape(-1)
        if not np.all(ids == np.round(ids)):
            raise KbenchError("labels must be integer class ids or one-hot rows")
        ids = ids.astype(np.int64)
    else:
        raise KbenchError(f"labels of shape {labels.shape} fit neither class ids nor one-hot "
                          f"rows for a model with {num_classes} outputs")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise KbenchError(f"label {int(ids.max())} is out of range for a model with "
                          f"{num_classes} outputs: evaluate it on the dataset it was trained on")
    return ids


def is_probabilities(outputs, atol=1e-3):
    """True when every row is non-negative and sums to 1 (a softmax output), not logits."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=-1), 1.0, atol=atol))


def log_probabilities(outputs):
    """Log-probabilities of model outputs: log-softmax of logits, or the log of outputs that are
    already probabilities (clipped at 1e-7 as Keras' cross-entropy clips them)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if is_probabilities(outputs):
        return np.log(np.clip(outputs, 1e-7, 1.0))
    shifted = outputs - outputs.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def probabilities(outputs):
    """Class probabilities of model outputs (softmax of logits; probabilities as they are)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return outputs if is_probabilities(outputs) else np.exp(log_probabilities(outputs))


# --------------------------------------------------------------------------- files


def write_evaluation(result, output_dir):
    """Write output_dir/eval.json and output_dir/confusion_matrix.png, each atomically.

    Returns the two paths.
    """
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, "eval.json")
    png_path = os.path.join(output_dir, "confusion_matrix.png")
    write_json_atomic(json_path, result)
    title = " on ".join(str(result[k]) for k in ("model", "dataset") if result.get(k))
    write_bytes_atomic(png_path, confusion_matrix_png(result, title=title or None))
    return json_path, png_path


def confusion_matrix_png(result, title=None):
    """The confusion matrix as PNG bytes, coloured by the fraction of each true class (so a
    rare class is as readable as a common one), with counts written in the cells for up to
    20 classes. Class names label the axes; with many classes (CIFAR-100) the figure grows so
    every class keeps a labelled row and column."""
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed,
    # and the caller's matplotlib backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    counts = np.asarray(result["confusion_matrix"], dtype=np.int64)
    k = counts.shape[0]
    names = [c["name"] for c in result.get("per_class", [])] or [str(i) for i in range(k)]
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape), where=row_sums > 0)

    side = min(24.0, max(5.0, 0.16 * k + 3.0))  # 100 classes -> 19 inches: a row per 0.16 in
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # A square-root colour scale: the few-percent confusions that matter stay visible next to
    # a dark diagonal.
    image = ax.imshow(fractions, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    label_size = 10 if k <= 20 else max(5.0, 9.0 - k / 20)
    ax.set_xticks(range(k), names, rotation=90, fontsize=label_size)
    ax.set_yticks(range(k), names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if k <= ANNOTATE_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if fractions[i, j] > 0.5 else "black")
    summary = f"accuracy {result['accuracy']:.4f} on {result['num_examples']} examples"
    if f"top{TOP_K}_accuracy" in result:
        summary += f", top-{TOP_K} {result[f'top{TOP_K}_accuracy']:.4f}"
    ax.set_title(f"{title}\n{summary}" if title else summary)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def summary_line(result):
    """`accuracy 0.9123, top-5 0.9950, loss 0.3012, macro F1 0.9101 on 10000 examples`."""
    parts = [f"accuracy {result['accuracy']:.4f}"]
    if f"top{TOP_K}_accuracy" in result:
        parts.append(f"top-{TOP_K} {result[f'top{TOP_K}_accuracy']:.4f}")
    loss = result["loss"]
    parts.append(f"loss {loss:.4f}" if math.isfinite(loss) else "loss nan")
    parts.append(f"macro F1 {result['macro_f1']:.4f}")
    return ", ".join(parts) + f" on {result['num_examples']} examples"


# --------------------------------------------------------------------------- kbench evaluate


def evaluate_saved_model(model_path, output_dir, dataset=None, data_dir=None,
                         test_examples=None, batch_size=None, recipe=None, download=False):
    """`kbench evaluate`: load model.keras, build its dataset's test split as the training run
    built it, evaluate, write eval.json and confusion_matrix.png.

    Settings come from the metrics.json (or config.json) a recipe wrote next to the model
    (dataset, data_dir, seed, train/test_examples, batch_size...), then from the arguments,
    which win. The test split comes from kbench.tasks, or with `recipe` (a kbench recipe's
    name or a recipe file's path) from that recipe's `build_datasets`: the way to evaluate on
    a data set of your own. Returns the result dict, with the run's context added.
    """
    import keras

    from kbench import tasks
    from kbench.config import TrainConfig
    from kbench.data.registry import class_names
    from kbench.models.saving import load_model, run_info

    model = load_model(model_path)
    run = run_info(model_path) or {"recipe": None, "config": {}}
    saved = run["config"]
    if run.get("data_given") and not dataset and not recipe:
        raise KbenchError(f"{model_path} was trained on data given to main(), not on its "
                          f"config's dataset {saved.get('dataset')!r}: pass --dataset NAME, or "
                          "--recipe FILE whose build_datasets gives that data")
    dataset = dataset or saved.get("dataset")
    if not dataset:
        raise KbenchError(f"no metrics.json next to {model_path} says which dataset trained "
                          "it: pass --dataset NAME")
    if dataset != saved.get("dataset"):  # another dataset: the run's settings do not apply
        saved = {}
    overrides = {k: v for k, v in dict(dataset=dataset, data_dir=data_dir,
                                       test_examples=test_examples, batch_size=batch_size,
                                       download=download).items() if v is not None}
    settings = {**saved, "download": False, **overrides}  # downloads only when asked now
    from_file = {k: v for k, v in saved.items() if k not in overrides}  # flags: checked
    if recipe is not None:
        config = recipe_config(recipe, settings, model, from_file, run.get("path"),
                               saved_by=run.get("recipe"))
        test_ds = as_stream(config.build_datasets(config.config)[1], training=False)
        settings = dataclasses.asdict(config.config)
    else:
        check_saved_settings(TrainConfig, {k: v for k, v in from_file.items()
                                           if k in EVAL_SETTINGS}, run.get("path"))
        test_ds = tasks.test_stream(dataset, model, settings)
    check_compatible(model, test_ds, model_path, dataset)
    try:
        names = class_names(dataset)
    except KbenchError:  # a recipe's own dataset: classes are numbered
        names = None
    result = evaluate_model(model, test_ds, names)
    context = {"model_path": os.path.abspath(model_path), "model": model.name,
               "dataset": dataset, "recipe": recipe or run["recipe"],
               "backend": keras.backend.backend(),
               "config": split_config(settings.get, test_ds)}
    result = {**context, **result}
    write_evaluation(result, output_dir)
    return result


# What eval.json's `config` records: the settings its test split was built with.
SPLIT_SETTINGS = ("dataset", "data_dir", "seed", "train_examples", "test_examples",
                  "batch_size")


def split_config(setting, test_ds):
    """eval.json's `config` (`kbench evaluate`'s and a recipe run's alike): each of
    SPLIT_SETTINGS by `setting(name)`, the seed 0 (kbench.tasks' default) where none was
    given, and the batch size the test split has."""
    config = {name: setting(name) for name in SPLIT_SETTINGS}
    config["seed"] = 0 if config["seed"] is None else config["seed"]
    config["batch_size"] = getattr(test_ds, "batch_size", None) or config["batch_size"]
    return config

# The saved settings kbench.tasks builds a test split with (text models: also their shape),
# and those `kbench evaluate` has a flag for, which win over the file.
EVAL_SETTINGS = ("data_dir", "seed", "train_examples", "test_examples", "batch_size",
                 "sequence_length", "vocab_size")
EVALUATE_FLAGS = ("data_dir", "test_examples", "batch_size")


def check_saved_settings(config_cls, saved, path, saved_by=None):
    """One line naming the file when a setting read back from a run's metrics.json (or
    config.json) is not one `config_cls` allows: the file was edited or is not kbench's.
    Without this a bad value surfaces as a NumPy or tf.data error deep in building the data."""
    from kbench.config import check_values

    for name in ("sequence_length", "vocab_size"):  # text models' shape: not TrainConfig's
        value = saved.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise KbenchError(f"{path} holds {name}={value!r}, which is not allowed (it takes "
                              "an integer >= 1): mend the file")
    for name, value in saved.items():
        try:
            check_values(config_cls, {name: value})
        except KbenchError as exc:
            if saved_by and _allowed_by(saved_by, name, value):
                # a setting of the recipe that trained the model, not of the one given
                raise KbenchError(f"{path} was written by recipe {saved_by}, whose settings "
                                  f"this recipe does not take ({exc}): pass --recipe "
                                  f"{saved_by}, or leave --recipe out") from None
            flag = flag_of(name)
            instead = f", or pass {flag}" if name in EVALUATE_FLAGS else ""
            raise KbenchError(f"{path} holds a setting that is not allowed ({exc}): mend the "
                              f"file{instead}") from None


def _allowed_by(recipe, name, value):
    """Whether the recipe named `recipe` (kbench's own, or one found by that name) allows
    `value` for its setting `name`; False where it cannot be found."""
    from kbench.config import check_values
    from kbench.recipe import load_recipe

    try:
        config_cls = load_recipe(recipe).Config
        if name not in {f.name for f in dataclasses.fields(config_cls)}:
            return False
        check_values(config_cls, {name: value})
    except KbenchError:
        return False
    return True


def recipe_config(recipe, settings, model, from_file=None, path=None, saved_by=None):
    """The recipe (name or file) loaded, and its Config for evaluation: its defaults, then
    `settings` where it has such fields. Text models without saved settings get their
    sequence length and vocabulary size from the model itself. Returns a namespace with
    `config` and `build_datasets`. `from_file`: the settings read from the run's file at
    `path`, checked (check_saved_settings) where the Config has such fields: the recipe's
    build_datasets may read any of them. `saved_by`: the recipe that wrote that file."""
    import types

    from kbench.models.saving import vocab_size
    from kbench.recipe import load_recipe

    module = load_recipe(recipe)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = {k: v for k, v in settings.items() if k in fields}
    if path is not None:
        # Another recipe's settings may not fit this one's (finetune saves model: null): then
        # the file is fine and the recipe is not the one that trained the model.
        name = os.path.splitext(os.path.basename(recipe))[0]
        check_saved_settings(module.Config, {k: v for k, v in from_file.items()
                                             if k in fields}, path,
                             saved_by=saved_by if saved_by and saved_by != name else None)
    if "sequence_length" in fields and "sequence_length" not in values:
        length = model.inputs[0].shape[1] if len(model.inputs[0].shape) == 2 else None
        if length:
            values["sequence_length"] = int(length)
    if "vocab_size" in fields and "vocab_size" not in values and vocab_size(model):
        values["vocab_size"] = vocab_size(model)
    return types.SimpleNamespace(config=module.Config(**values),
                                 build_datasets=module.build_datasets)


def check_compatible(model, test_ds, model_path, dataset):
    """One line instead of a shape error deep inside the model: inputs and classes must fit."""
    x_spec, y_spec = as_stream(test_ds, training=False).dataset.element_spec[:2]
    model_shape = tuple(model.inputs[0].shape[1:])
    data_shape = tuple(x_spec.shape[1:])
    fits = len(model_shape) == len(data_shape) and all(
        m is None or d is None or m == d for m, d in zip(model_shape, data_shape))
    model_ids = "int" in str(model.inputs[0].dtype)
    data_ids = x_spec.dtype.is_integer
    if not fits or model_ids != data_ids:
        what = lambda ids, shape: f"{'token ids' if ids else 'images'} {shape}"  # noqa: E731
        raise KbenchError(f"{model_path} takes {what(model_ids, model_shape)} but {dataset} "
                          f"gives {what(data_ids, data_shape)}: pass the --dataset (and the "
                          "settings) it was trained with")
    outputs, classes = model.outputs[0].shape[-1], y_spec.shape[-1]
    if outputs != classes:
        raise KbenchError(f"{model_path} has {outputs} outputs but {dataset} has {classes} "
                          "classes: pass the --dataset it was trained on")
