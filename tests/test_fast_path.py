"""kbench's fast path (kbench/fast_path.py): the same numbers as stock Keras, through the
framework's fused BatchNorm (torch, tensorflow) and without layout copies (torch); on/off
switch and version gate."""

import numpy as np
import pytest

from tests.conftest import BACKEND

torch_only = pytest.mark.skipif(BACKEND != "torch", reason="layout copies are torch's")
fused_backends = pytest.mark.skipif(BACKEND == "jax", reason="jax has no fast path")


@pytest.fixture
def fast_path():
    from kbench import fast_path

    before = fast_path.enabled()
    yield fast_path
    fast_path.set_enabled(before)


def batch_norm_run(fast_path, on, policy, center, scale, shape=(8, 6, 6, 5)):
    """Outputs (training and inference), gradients and moving statistics of one training
    call, with the fast path on or off."""
    import keras

    fast_path.set_enabled(on)
    keras.config.set_dtype_policy(policy)
    try:
        layer = keras.layers.BatchNormalization(center=center, scale=scale, momentum=0.9)
        layer.build(shape)
        if scale:
            layer.gamma.assign(np.linspace(0.5, 1.5, shape[-1]))
        if center:
            layer.beta.assign(np.linspace(-1, 1, shape[-1]))
        x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype("float32")
        weights = np.random.default_rng(1).normal(size=shape).astype("float32")
        y, grads = GRADIENTS[BACKEND](layer, x, weights)
        inference = keras.ops.convert_to_numpy(layer(x, training=False))
        return [np.asarray(t, np.float32) for t in (
            y, *grads, keras.ops.convert_to_numpy(layer.moving_mean),
            keras.ops.convert_to_numpy(layer.moving_variance), inference)]
    finally:
        keras.config.set_dtype_policy("float32")


def _torch_gradients(layer, x, weights):
    import torch

    x = torch.tensor(x).to(getattr(torch, layer.compute_dtype)).requires_grad_(True)
    y = layer(x, training=True)
    grads = torch.autograd.grad((y.float() * torch.tensor(weights)).sum(),
                                [x] + [v.value for v in layer.trainable_variables])
    return y.detach().float().numpy(), [g.float().numpy() for g in grads]


def _tensorflow_gradients(layer, x, weights):
    import tensorflow as tf

    x = tf.cast(tf.constant(x), layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
    grads = tape.gradient(loss, [x] + [v.value for v in layer.trainable_variables])
    return tf.cast(y, tf.float32).numpy(), [tf.cast(g, tf.float32).numpy() for g in grads]


GRADIENTS = {"torch": _torch_gradients, "tensorflow": _tensorflow_gradients}


@fused_backends
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False),
                                           (False, False)])
def test_batch_norm_equals_stock_keras(fast_path, policy, center, scale):
    fast = batch_norm_run(fast_path, True, policy, center, scale)
    stock = batch_norm_run(fast_path, False, policy, center, scale)
    names = ["output", "input gradient"] + ["gamma gradient"] * scale + ["beta gradient"] * center
    names += ["moving mean", "moving variance", "inference output"]
    for name, a, b in zip(names, fast, stock):
        # float32 round-off; a bfloat16 output is rounded from the same float32 numbers
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max(), err_msg=name)


def conv_net():
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(keras.layers.ReLU()(x))
    x = keras.layers.MaxPooling2D(2)(keras.layers.BatchNormalization(scale=False)(x))
    x = keras.layers.AveragePooling2D(2, padding="same")(x)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(x)  # every user of
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # the layout transpose in Keras
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


@fused_backends
def test_a_conv_net_trains_the_same_and_without_layout_copies(fast_path):
    import keras

    x = np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(16) % 4, 4)
    results = {}
    for on in (True, False):
        fast_path.set_enabled(on)
        keras.utils.set_random_seed(0)
        model = conv_net()
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results[on] = (history.history["loss"], model.predict(x, verbose=0),
                       [v.numpy() for v in model.weights])
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[True][2], results[False][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if BACKEND != "torch":
        return
    import torch
    from keras.src.backend.torch import nn as torch_nn

    nhwc = torch.zeros(2, 5, 5, 3)
    fast_path.set_enabled(True)
    assert torch_nn._transpose_spatial_inputs(nhwc).data_ptr() == nhwc.data_ptr()  # a view
    fast_path.set_enabled(False)
    assert torch_nn._transpose_spatial_inputs(nhwc).is_contiguous()  # Keras' own copy


def test_switch_and_version_gate(fast_path, monkeypatch, capsys):
    import keras

    from kbench import train
    from recipes import cifar_resnet

    fast_path.set_enabled(False)
    with train.Run(cifar_resnet.Config(fast_path="off", output_dir=None), "cifar_resnet"):
        assert not fast_path.enabled()
    with train.Run(cifar_resnet.Config(output_dir=None), "cifar_resnet"):
        assert fast_path.enabled() == (BACKEND != "jax")  # a no-op under jax
    assert not fast_path.enabled()  # a run's setting ends with it
    if BACKEND == "jax":
        return
    monkeypatch.setattr(keras, "version", lambda: "3.99.0")
    monkeypatch.setitem(fast_path._state, "warned", False)
    assert fast_path.set_enabled(True) is False and not fast_path.enabled()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this is keras 3.99.0" in err[0] and "stock Keras" in err[0]


@pytest.mark.backend_independent
def test_compare_runs_stock_keras_as_its_own_row():
    from kbench.bench.compare import CompareOptions, plan_runs
    from kbench.errors import KbenchError

    runs = plan_runs(CompareOptions(backends=("torch", "torch-stock", "tensorflow-stock"),
                                    reference="native"))
    assert runs == [("torch", "keras", "torch", False), ("torch-stock", "keras", "torch", False),
                    ("tensorflow-stock", "keras", "tensorflow", False),
                    ("native-tensorflow", "native-tensorflow", "tensorflow", False),
                    ("native-torch", "native-torch", "torch", False)]  # the twins compared
    with pytest.raises(KbenchError, match="torch-stock"):
        plan_runs(CompareOptions(backends=("pytorch",)))
