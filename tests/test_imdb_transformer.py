"""recipes/imdb_transformer.py under the active backend: both architectures on synthetic text,
and the template use (a user's own model)."""

import csv
import dataclasses
import json

import numpy as np
import pytest

import kbench  # noqa: F401
from kbench.flags import build_parser
from recipes import imdb_transformer
from tests.conftest import BACKEND


def tiny(**overrides):
    base = dict(dataset="synthetic", train_examples=64, test_examples=32, batch_size=16,
                epochs=1, steps_per_epoch=2, vocab_size=300, sequence_length=24, verbose=0)
    return imdb_transformer.Config(**{**base, **overrides})


def check_results(out_dir, metrics, arch, epochs, sequence_length):
    """What a run writes: metrics (its own and on disk), a history row per epoch, and a
    model.keras that loads (PositionEmbedding registered) and predicts."""
    assert metrics["backend"] == BACKEND and metrics["model"] == f"text_{arch}"
    assert metrics["epochs"] == epochs and np.isfinite(metrics["test_loss"])
    on_disk = json.loads((out_dir / "metrics.json").read_text())
    assert on_disk["config"]["arch"] == arch
    assert on_disk["config"]["sequence_length"] == sequence_length
    with open(out_dir / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == [str(e) for e in range(epochs)]
    import keras

    saved = keras.saving.load_model(out_dir / "model.keras")
    ids = np.zeros((2, sequence_length), np.int32)
    assert tuple(saved.predict(ids, verbose=0).shape) == (2, 2)


def test_lstm_trains_and_writes_results(tmp_path):
    """(The transformer's run is test_transformer_learns_the_synthetic_task's.)"""
    metrics = imdb_transformer.main(tiny(arch="lstm", output_dir=str(tmp_path)))
    check_results(tmp_path, metrics, "lstm", epochs=1, sequence_length=24)


def test_trains_on_imdb_reviews_from_a_tfds_dir(tmp_path):
    """Raw review text, tokenized in tf.data by TextVectorization: under every backend."""
    import tensorflow_datasets as tfds

    version = tmp_path / "imdb_reviews" / "plain_text" / "1.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(json.dumps({"name": "imdb_reviews"}))
    with tfds.testing.mock_data(num_examples=48):
        metrics = imdb_transformer.main(tiny(dataset="imdb", data_dir=str(tmp_path),
                                             output_dir=str(tmp_path / "out")))
    assert metrics["dataset"] == "imdb" and np.isfinite(metrics["test_loss"])


def test_transformer_learns_the_synthetic_task(tmp_path):
    config = tiny(train_examples=1024, test_examples=256, batch_size=32, steps_per_epoch=None,
                  epochs=2, sequence_length=32, lr=3e-3, output_dir=str(tmp_path))
    metrics = imdb_transformer.main(config)
    assert metrics["test_accuracy"] > 0.8, metrics["test_accuracy"]  # chance: 0.5
    check_results(tmp_path, metrics, "transformer", epochs=2, sequence_length=32)


def test_main_takes_a_users_own_model(tmp_path):
    import keras

    inputs = keras.Input((24,), dtype="int32")
    x = keras.layers.Embedding(300, 8)(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(x))
    mine = keras.Model(inputs, outputs, name="bag_of_words")
    metrics = imdb_transformer.main(tiny(output_dir=str(tmp_path)), model=mine)
    assert metrics["model"] == "bag_of_words" and metrics["params"] == mine.count_params()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


@pytest.mark.backend_independent
def test_every_config_field_is_a_flag():
    parser = build_parser(imdb_transformer.Config)
    assert {a.dest for a in parser._actions} - {"help"} == {
        f.name for f in dataclasses.fields(imdb_transformer.Config)}
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--dataset", "--data-dir", "--arch", "--vocab-size", "--sequence-length",
            "--epochs", "--batch-size", "--output-dir"} <= options


@pytest.mark.parametrize("settings, message", [
    (dict(embed_dim=7, num_heads=3), "--embed-dim 7 is not a multiple of --num-heads 3"),
    (dict(arch="lstm", model="text_transformer"), "name different models: drop one"),
])
def test_settings_that_build_no_model_are_one_line_errors_before_anything_runs(settings,
                                                                               message):
    from kbench.config import check
    from kbench.errors import KbenchError

    with pytest.raises(KbenchError, match=message):
        check(tiny(**settings))
    check(tiny(arch="lstm", embed_dim=7, num_heads=3))  # an LSTM has no heads
