"""kbench.models under the active backend: shapes, parameter counts, seeded weights, saving."""

import re

import numpy as np
import pytest

import kbench  # noqa: F401  (registers layers)
import keras
from kbench.errors import KbenchError
from kbench.models import get_model, list_models
from kbench.models.layers import PortableNormal, ShortcutPad

# Trainable parameters: He et al. (2016) give 0.27M for ResNet-20, 0.46M / 0.66M / 0.85M /
# 1.7M for 32 / 44 / 56 / 110 (option A shortcuts). PreAct ResNet-18: the common CIFAR
# version's 11,171,146 plus the final BN before pooling that He et al.'s pre-activation design
# has (2 x 512). ResNet-9: Page's DAWNBench net.
TRAINABLE = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "preact_resnet18": 11_172_170, "resnet9": 6_573_120,
}


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_shapes_and_parameter_counts(name):
    model = get_model(name, num_classes=10)
    assert trainable_params(model) == TRAINABLE[name]
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    logits = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_resnet20_is_0_27m_and_num_classes_sets_the_head():
    model = get_model("resnet20", num_classes=100)
    assert 0.26e6 < trainable_params(model) < 0.28e6
    assert model.output_shape == (None, 100)


def test_registry_lists_all_and_rejects_unknown():
    assert set(TRAINABLE) | {"convnet", "text_transformer", "text_lstm"} == set(list_models())
    with pytest.raises(KbenchError, match="unknown model 'resnet21'.*resnet20"):
        get_model("resnet21")


def test_a_recipes_model_flag_takes_the_names_registered_for_its_inputs(monkeypatch):
    """--model is checked against the registry before any data or training: a wrong name, or
    a text model for images, is one line; a model a user adds with register_model is taken."""
    import kbench.models as models
    from kbench.config import check
    from recipes import cifar_resnet, imdb_transformer

    images = "it takes a name registered in kbench.models for images (convnet, preact_resnet18, "
    for name in ("my_net", "text_lstm"):
        with pytest.raises(KbenchError, match=re.escape(f"--model {name!r} is not allowed: "
                                                        f"{images}")):
            check(cifar_resnet.Config(model=name))
    with pytest.raises(KbenchError, match=re.escape("--model 'resnet20' is not allowed: it "
                                                    "takes a name registered in kbench.models "
                                                    "for tokens (text_lstm, text_transformer)")):
        check(imdb_transformer.Config(model="resnet20"))
    assert check(imdb_transformer.Config(model="text_lstm")).model == "text_lstm"
    # registered for real (in copies of the registry, which the test then drops)
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    monkeypatch.setattr(models, "_INPUTS", dict(models._INPUTS))
    models.register_model("my_net", lambda **kwargs: None)  # images, by default
    models.register_model("my_text_net", lambda **kwargs: None, inputs="tokens")
    assert check(cifar_resnet.Config(model="my_net")).model == "my_net"
    assert check(imdb_transformer.Config(model="my_text_net")).model == "my_text_net"
    assert "my_net" in str(models.IMAGE_MODELS) and "my_net" not in str(models.TEXT_MODELS)
    # a text model registered without inputs= is an image model: the refusal says how to fix it
    with pytest.raises(KbenchError, match=re.escape(
            "; my_net is registered for images: if it takes tokens, register it with "
            "register_model(..., inputs='tokens')")):
        check(imdb_transformer.Config(model="my_net"))
    with pytest.raises(KbenchError, match="inputs is one of images, tokens"):
        models.register_model("my_other_net", None, inputs="pixels")
    assert "my_other_net" not in models.list_models()


def test_seed_fixes_weights_independently_of_backend():
    """Weights come from NumPy, so these sums are the same under jax, tensorflow and torch."""
    a = get_model("resnet20", seed=3).get_weights()
    b = get_model("resnet20", seed=3).get_weights()
    c = get_model("resnet20", seed=4).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    first_kernel = next(w for w in a if w.ndim == 4)
    assert first_kernel.shape == (3, 3, 3, 16)
    # He-normal: std sqrt(2 / fan_in) with fan_in = 3 * 3 * 3.
    assert abs(first_kernel.std() - np.sqrt(2 / 27)) < 0.05


def test_portable_normal_matches_numpy():
    init = PortableNormal(seed=11, scale=2.0)
    got = keras.ops.convert_to_numpy(init((3, 3, 4, 8)))
    want = np.random.default_rng(11).normal(0, np.sqrt(2 / 36), size=(3, 3, 4, 8))
    np.testing.assert_allclose(got, want.astype("float32"))


def test_shortcut_pad_subsamples_and_pads_channels():
    x = np.arange(2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    y = keras.ops.convert_to_numpy(ShortcutPad(8, 2)(x))
    assert y.shape == (2, 2, 2, 8)
    np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
    assert (y[..., :2] == 0).all() and (y[..., 5:] == 0).all()


def test_model_takes_raw_pixels():
    """Normalisation is inside the model: its first layer standardizes 0..255 pixels."""
    model = get_model("resnet20")
    norm = model.get_layer("normalize_pixels")
    x = np.full((1, 32, 32, 3), 125.307, dtype="float32")
    out = keras.ops.convert_to_numpy(norm(x))
    assert abs(float(out[..., 0].mean())) < 1e-3


def test_saved_model_loads_after_import_kbench(tmp_path):
    model = get_model("resnet20", seed=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(model.predict(x, verbose=0)),
                               atol=1e-5)
    assert any(isinstance(layer, ShortcutPad) for layer in loaded.layers)
