"""kbench's fast path (kbench/fast_path.py): the same numbers as stock Keras, through the
framework's fused BatchNorm (torch, tensorflow) and without layout copies (torch); on/off
switch and version gate."""

import contextlib
import types
import warnings

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
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False),
                                           (False, False)])
def test_batch_norm_equals_stock_keras(fast_path, policy, center, scale):
    fast = batch_norm_run(fast_path, True, policy, center, scale)
    stock = batch_norm_run(fast_path, False, policy, center, scale)
    names = ["output", "input gradient"] + ["gamma gradient"] * scale + ["beta gradient"] * center
    names += ["moving mean", "moving variance", "inference output"]
    # The 16-bit tensors (the activation's dtype) are rounded from float32 numbers that
    # agree to float32 round-off, so one at a rounding boundary may land one step apart:
    # the 16-bit dtype's relative step (at most 2^-7 for bfloat16, 2^-10 for float16).
    step = {"float32": 2e-5, "mixed_bfloat16": 2**-7, "mixed_float16": 2**-10}[policy]
    activation_dtype = {"output", "input gradient", "inference output"}
    for name, a, b in zip(names, fast, stock):
        rtol = max(2e-5, step) if name in activation_dtype else 2e-5
        np.testing.assert_allclose(a, b, rtol=rtol, atol=2e-5 * np.abs(b).max(), err_msg=name)


@fused_backends
@pytest.mark.parametrize("shape", [(8, 5), (8, 6, 5), (4, 3, 3, 3, 5)])
def test_batch_norm_of_other_ranks_equals_stock_keras(fast_path, shape):
    """Ranks 2, 3 and 5 (under torch: ATen's kernel for ranks 2 and 3, torch.batch_norm
    for 5, as for images)."""
    fast = batch_norm_run(fast_path, True, "float32", True, True, shape)
    stock = batch_norm_run(fast_path, False, "float32", True, True, shape)
    for a, b in zip(fast, stock):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())


def fused_kernels_run(shape):
    """The names of the fused batch-norm kernels one training call (and its backward) of a
    BatchNormalization layer ran: ATen ops under torch, graph ops under tensorflow."""
    import keras

    layer = keras.layers.BatchNormalization()
    layer.build(shape)
    if BACKEND == "torch":
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Record(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.add(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        x = torch.randn(shape, requires_grad=True)
        with Record() as record:
            layer(x, training=True).sum().backward()
        return {op for op in record.ops if "batch_norm" in op}
    import tensorflow as tf

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(y, x)

    graph = tf.function(step).get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    return {op.type for op in graph.get_operations() if "FusedBatchNorm" in op.type}


@fused_backends
@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (8, 5), (8, 6, 5), (4, 3, 3, 3, 5)])
def test_the_fast_path_runs_the_fused_kernel_and_stock_keras_does_not(fast_path, shape):
    """What the equality tests above compare really is two implementations: the fused
    kernel (every rank under torch, NHWC images under tensorflow) against Keras' own."""
    fast_path.set_enabled(True)
    fused = fused_kernels_run(shape)
    fast_path.set_enabled(False)
    assert fused_kernels_run(shape) == set()
    if BACKEND == "torch":  # on CUDA torch.batch_norm picks cuDNN's; on CPU ATen's
        assert fused == {"native_batch_norm", "native_batch_norm_backward"}
    else:
        assert fused == ({"FusedBatchNormV3", "FusedBatchNormGradV3"} if len(shape) == 4
                         else set())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="FusedBatchNormV3 is tensorflow's")
def test_tensorflow_fused_kernel_takes_16_bit_activations_uncast(fast_path):
    """Under a mixed policy the kernel gets the bfloat16 activation itself (it computes in
    float32): a cast to float32 and back around it made Keras-TF 1.49x its twin's step."""
    import keras
    import tensorflow as tf

    fast_path.set_enabled(True)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = keras.layers.BatchNormalization()
        layer.build((4, 3, 3, 2))
        graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
            tf.TensorSpec((4, 3, 3, 2), tf.bfloat16)).graph
    finally:
        keras.config.set_dtype_policy("float32")
    ops = graph.get_operations()
    fused = [op for op in ops if op.type == "FusedBatchNormV3"]
    assert [op.get_attr("T") for op in fused] == [tf.bfloat16]
    activation_casts = [op for op in ops if op.type == "Cast" and op.outputs[0].shape.rank == 4]
    assert activation_casts == []


@pytest.mark.skipif(BACKEND != "tensorflow", reason="FusedBatchNormV3 is tensorflow's")
def test_tensorflow_float64_stays_keras_own(fast_path):
    """FusedBatchNormV3 has no float64; Keras computes a float64 layer in float64."""
    import keras

    fast_path.set_enabled(True)
    keras.config.set_dtype_policy("float64")
    try:
        layer = keras.layers.BatchNormalization(epsilon=1e-24)
        # spread float32 cannot resolve around that mean: in float32 the output is noise
        x = np.random.default_rng(0).normal(1.0, 1e-9, (4, 3, 3, 2))
        y = keras.ops.convert_to_numpy(layer(x, training=True))
    finally:
        keras.config.set_dtype_policy("float32")
    assert y.dtype == np.float64
    expected = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + layer.epsilon)
    np.testing.assert_allclose(y, expected, atol=1e-4)  # expected is about N(0, 1)


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


def steps_counting_calls(model, x, y, steps):
    """One train_on_batch step to build, then `steps` more: their losses and how many times
    Keras' Layer.__call__ ran in them."""
    import keras

    model.train_on_batch(x, y)
    calls = [0]
    stock_call = keras.layers.Layer.__call__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return stock_call(self, *args, **kwargs)

    keras.layers.Layer.__call__ = counted
    try:
        return [float(model.train_on_batch(x, y)) for _ in range(steps)], calls[0]
    finally:
        keras.layers.Layer.__call__ = stock_call


@contextlib.contextmanager
def direct_or_keras(fast_path, direct):
    """The fast path on, and with `direct` False every model run Keras' own way (its
    layers and train step through Keras, as if no model were direct)."""
    stock_direct_model = fast_path._direct_model
    if not direct:
        fast_path._direct_model = lambda model: False
    fast_path.set_enabled(True)
    try:
        yield
    finally:
        fast_path._direct_model = stock_direct_model


def resnet_steps(fast_path, direct, policy, extra_layer=False, steps=3):
    """Losses, weights and the number of Layer.__call__ calls of `steps` train_on_batch
    steps of kbench's ResNet-20 (Normalization, Conv2D, BatchNormalization, ReLU, Add, the
    shortcut pad, pooling, Dense) with dropout before the head, under the fast path, its
    layers called directly or (`direct` False) through Keras' __call__."""
    import keras

    from kbench.models import get_model

    with direct_or_keras(fast_path, direct):
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            body = get_model("resnet20", num_classes=4, seed=0)
            inputs = keras.Input((32, 32, 3))
            features = body(inputs)
            if extra_layer:
                features = keras.layers.Lambda(lambda t: 2 * t)(features)
            x = keras.layers.Dropout(0.5)(features)
            model = keras.Model(inputs, keras.layers.Dense(4, dtype="float32")(x))
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                          loss=keras.losses.CategoricalCrossentropy(from_logits=True))
            x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
            y = keras.utils.to_categorical(np.arange(4), 4)
            losses, calls = steps_counting_calls(model, x, y, steps)
            outputs = model.predict(x, verbose=0)
            weights = [np.asarray(v.numpy(), np.float32) for v in model.weights]
            return losses, weights, outputs, calls
        finally:
            keras.config.set_dtype_policy("float32")


@torch_only
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layers_called_directly_train_as_keras_calls_them(fast_path, policy):
    fast = resnet_steps(fast_path, True, policy)
    stock = resnet_steps(fast_path, False, policy)
    # No Layer.__call__ ran: not the layers' (the ResNet inside is called directly too), nor
    # the outer model's (train_step's outermost call), against one per layer under stock
    # Keras.
    assert fast[3] == 0 and stock[3] > 60 * 3
    # The same ops in the same order on the same numbers: the same bits.
    np.testing.assert_array_equal(fast[0], stock[0])
    for a, b in zip(fast[1], stock[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast[2], stock[2])


@torch_only
def test_a_sequential_block_inside_is_called_directly_too(fast_path):
    import keras

    def steps(direct):
        with direct_or_keras(fast_path, direct):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((8, 8, 3))
            block = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                                      keras.layers.BatchNormalization(), keras.layers.ReLU()])
            x = keras.layers.GlobalAveragePooling2D()(block(inputs))
            model = keras.Model(inputs, keras.layers.Dense(2)(x))
            model.compile(optimizer="sgd", loss="mse")
            x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
            y = np.zeros((4, 2), "float32")
            losses, calls = steps_counting_calls(model, x, y, 2)
            return losses, [v.numpy() for v in model.weights], calls

    direct, through_keras = steps(True), steps(False)
    assert direct[2] == 0 and through_keras[2] > 2 * 5  # not even the outer model's
    np.testing.assert_array_equal(direct[0], through_keras[0])
    for a, b in zip(direct[1], through_keras[1]):
        np.testing.assert_array_equal(a, b)


@torch_only
def test_a_model_with_another_layer_runs_keras_calls(fast_path):
    import torch

    # A global forward hook (a profiler's, say) must see every layer: Keras' way.
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert resnet_steps(fast_path, True, "float32", steps=1)[3] > 60
    finally:
        handle.remove()
    keras_way = resnet_steps(fast_path, True, "float32", extra_layer=True, steps=1)
    # The Lambda is not on the list: the outer model calls each of its layers (the ResNet,
    # the Lambda, Dropout, Dense) through __call__; the ResNet's own layers are all listed.
    assert keras_way[3] == 5


def test_switch_and_version_gate(fast_path, monkeypatch, capsys, tmp_path):
    import keras

    from kbench import train
    from recipes import cifar_resnet

    monkeypatch.chdir(tmp_path)  # output_dir=None: the default runs/ folder, here, not the repo's
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


def forward_permutes(model, x):
    """How many aten permutes one training forward of `model` on `x` runs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        permutes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.permute.default:
                Count.permutes += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(torch.as_tensor(x), training=True)
    return Count.permutes


@torch_only
def test_resnet_runs_lowered_and_keeps_channels_first_between_its_layers(fast_path):
    import keras

    from kbench.models import get_model

    fast_path.set_enabled(True)
    keras.utils.set_random_seed(0)
    model = get_model("resnet20", num_classes=10, seed=0)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    model(x, training=True)
    steps = fast_path._plan(model).describe()
    assert all(how != "call" for _, how in steps), steps  # every layer of it is lowered
    kinds = dict(steps)
    assert kinds["Conv2D"] == kinds["BatchNormalization"] == kinds["ShortcutPad"] \
        == kinds["GlobalAveragePooling2D"] == "channels_first"
    assert kinds["ReLU"] == kinds["Add"] == "any"
    assert kinds["Normalization"] == kinds["Dense"] == "channels_last"
    # One permute into channels first after the pixel normalization, each convolution's
    # kernel view (HWIO -> OIHW) and the shortcut pads' two (to NHWC and back, see
    # test_resnet_gradients_keep_one_memory_format): none between layers, against 5 per
    # conv-BN pair before.
    convs = sum(name == "Conv2D" for name, _ in steps)
    pads = sum(name == "ShortcutPad" for name, _ in steps)
    assert forward_permutes(model, x) == 1 + convs + 2 * pads


@torch_only
def test_resnet_gradients_keep_one_memory_format(fast_path):
    """In a lowered ResNet-20 training step no op mixes channels_last and contiguous NCHW
    4-D tensors (a strided, slower pass; on a GPU, uncoalesced) but the one PyTorch's own
    global average pooling makes: the mean's gradient, a broadcast, meets the last ReLU's
    channels_last output (the native twin has it too). ShortcutPad's slice of the NCHW view
    made its gradient contiguous NCHW, which autograd added to the convolution branch's
    channels_last one in each downsampling block: 5 such ops then."""
    import keras
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from kbench.models import get_model

    def layout(t):
        if t.is_contiguous():
            return "nchw"
        return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "other"

    mixed = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            images = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4
                      and a.shape[1] > 1 and a.shape[2] * a.shape[3] > 1]
            if len({layout(a) for a in images}) > 1:
                mixed.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    fast_path.set_enabled(True)
    keras.utils.set_random_seed(0)
    model = get_model("resnet20", num_classes=10, seed=0)
    x = torch.as_tensor(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)),
                        dtype=torch.float32)
    model(x, training=True)  # the plan is built on the first call
    with Watch():
        logits = model(x, training=True)
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    # (the pooling gradient's ReLU backward by name would tie the test to how this torch
    # version's kernels pick formats: at most that one, and no gradient sum)
    assert len(mixed) <= 1 and "add" not in mixed, mixed


@torch_only
def test_layouts_meet_where_lowered_and_other_layers_do(fast_path):
    """Lowered layers hand a channels-first value to a layer that takes Keras' layout (max
    pooling, a model output, two consumers of one value) and take it back: the same bits as
    Keras' own calls, forward and in training."""
    import keras

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        a = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
        b = keras.layers.BatchNormalization()(a)
        pooled = keras.layers.MaxPooling2D(2)(b)  # its own call(): NHWC
        c = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(b)
        joined = keras.layers.ReLU()(keras.layers.Add()([pooled, c]))  # NHWC + NCHW
        head = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(joined))
        model = keras.Model(inputs, [head, a])  # a channels-first value as an output
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=["mse", "mse"])
        return model

    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    ys = [np.ones((4, 2), "float32"), np.zeros((4, 8, 8, 4), "float32")]
    results = {}
    for direct in (True, False):
        with direct_or_keras(fast_path, direct):
            model = build()
            losses = [model.train_on_batch(x, ys) for _ in range(3)]
            outputs = [keras.ops.convert_to_numpy(o) for o in model(x, training=False)]
            results[direct] = (losses, outputs, [v.numpy() for v in model.weights])
            if direct:
                kinds = [how for _, how in fast_path._plan(model).describe()]
                assert "call" in kinds and "channels_first" in kinds
    assert results[True][1][1].shape == (4, 8, 8, 4)  # NHWC, as Keras gives it
    np.testing.assert_array_equal(np.array(results[True][0]), np.array(results[False][0]))
    for a, b in zip(results[True][1] + results[True][2], results[False][1] + results[False][2]):
        np.testing.assert_array_equal(a, b)


def sgd_run(fast_path, on, steps=4):
    """Losses and weights of `steps` steps of a Dense model under Keras' SGD with a warmup
    + cosine schedule, Nesterov momentum and weight decay that excludes biases."""
    import keras

    fast_path.set_enabled(on)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=0.1,
                                                      warmup_steps=2)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    y = np.random.default_rng(1).normal(size=(6, 3)).astype("float32")
    losses = [model.train_on_batch(x, y) for _ in range(steps)]
    return losses, [v.numpy() for v in model.weights + optimizer.variables]


@torch_only
def test_sgd_step_is_keras_own_to_the_bit(fast_path, monkeypatch):
    from kbench import torch_sgd

    steps = []  # the fast path's own update ran: the two runs compare two implementations
    original = torch_sgd._step
    monkeypatch.setattr(torch_sgd, "_step", lambda *a: steps.append(1) or original(*a))
    fast = sgd_run(fast_path, True)
    assert len(steps) == 4
    stock = sgd_run(fast_path, False)
    assert len(steps) == 4
    np.testing.assert_array_equal(fast[0], stock[0])
    for a, b in zip(fast[1], stock[1]):
        np.testing.assert_array_equal(a, b)
    # The way taken for a rate on a device whose value is not read (a GPU's): the gradients
    # times the rate as a tensor, within float32 round-off of the foreach alpha.
    import torch

    grads = [torch.randn(7, 3), torch.randn(4)]
    targets = [torch.randn(7, 3), torch.randn(4)]
    rate = torch.tensor(0.037)
    by_alpha, by_tensor = [t.clone() for t in targets], [t.clone() for t in targets]
    torch_sgd._add_scaled(by_alpha, grads, 0.037, None)
    torch_sgd._add_scaled(by_tensor, grads, rate, torch._foreach_mul(grads, -rate))
    for a, b in zip(by_alpha, by_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@torch_only
def test_an_eager_step_reads_no_tensor_value_but_a_cpu_rate(fast_path):
    """Each host read of a tensor's value (bool(), .item(), float(), ...) waits for the
    device on a GPU. kbench's eager train step (ResNet-20, its SGD, the recipes' warmup +
    cosine schedule, across the warmup's end) makes one only where its learning rate is a
    CPU tensor (kbench.torch_sgd); CosineDecay's warmup `ops.cond`, an `if` on the step
    counter that read it at every step, selects instead (keras_fixes.select_in_schedules):
    the same rates, to the bit (test_sgd_step_is_keras_own_to_the_bit)."""
    import os
    import traceback

    import torch
    from torch.overrides import TorchFunctionMode

    from kbench import train
    from kbench.config import TrainConfig
    from kbench.models import get_model

    reads = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "item", "__float__", "__int__",
                                                 "__index__", "tolist", "numpy", "__array__"):
                caller = [f for f in traceback.extract_stack()[:-1]
                          if f"{os.sep}torch{os.sep}" not in f.filename][-1]
                reads.append(f"{os.path.basename(caller.filename)}:{func.__name__}")
            return func(*args, **(kwargs or {}))

    fast_path.set_enabled(True)
    model = get_model("resnet20", num_classes=10, seed=0)
    config = TrainConfig(epochs=2, warmup_epochs=1.0)
    train.compile_model(model, config, steps_per_epoch=2)  # warmup: steps 0 and 1
    x = torch.as_tensor(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)),
                        dtype=torch.float32)
    y = torch.nn.functional.one_hot(torch.tensor([1, 2]), 10).float()
    model.make_train_function()
    rates = []
    for _ in range(4):
        with Watch():
            model.train_function([(x, y)])
        rates.append(float(model.optimizer._get_current_learning_rate()))
    assert reads == ["torch_sgd.py:item"] * 4, reads  # the CPU rate's, once a step
    # the rate after each step: up the warmup to lr at its end, then down the cosine
    assert rates == pytest.approx([config.lr / 2, config.lr, config.lr / 2, 0.0])


def loss_scaling_run(fast_path, on):
    """Under mixed_float16, six train_on_batch steps of a small model with Keras'
    LossScaleOptimizer (growth every 2 finite steps), the fifth step's gradients overflowing
    float16: the losses, every variable after each step, and the steps' reads of tensor
    values (bool(), .item(), ...) through Keras' `if`s."""
    import keras
    import torch
    from torch.overrides import TorchFunctionMode

    reads = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "item"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    fast_path.set_enabled(on)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01, momentum=0.9), initial_scale=16.0,
            dynamic_growth_steps=2), loss="mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 6)).astype("float32")
        losses, states = [], []
        for step in range(6):
            # the error's gradient, 2 * 4e4 times the scale (64 by then), overflows float16's
            # 65504 in the float16 hidden layer's backward pass
            y = np.full((4, 1), 4e4 if step == 4 else 0.5, "float32")
            with Watch():
                losses.append(model.train_on_batch(x, y))
            optimizer = model.optimizer
            states.append([keras.ops.convert_to_numpy(v) for v in [
                optimizer.dynamic_scale, optimizer.step_counter, *optimizer.variables,
                *model.weights]])
        return losses, states, reads
    finally:
        keras.config.set_dtype_policy("float32")


@torch_only
def test_loss_scaling_reads_the_device_once_a_step_and_moves_as_keras(fast_path):
    """Keras' LossScaleOptimizer branches twice a step under torch, each an `if` on a device
    tensor (a wait for the GPU): whether the gradients are finite, and whether to double the
    scale. The fast path selects for the second (keras_fixes.select_in_loss_scaling), as
    GradScaler reads only the first: the same scale, counter and weights to the bit, across
    two growths and a skipped step."""
    fast = loss_scaling_run(fast_path, True)
    stock = loss_scaling_run(fast_path, False)
    assert fast[0] == stock[0]
    for fast_step, stock_step in zip(fast[1], stock[1]):
        for a, b in zip(fast_step, stock_step):
            np.testing.assert_array_equal(a, b)
    scales = [float(state[0]) for state in fast[1]]  # dynamic_scale after each step
    counters = [int(state[1]) for state in fast[1]]
    assert scales == [16.0, 32.0, 32.0, 64.0, 32.0, 32.0]  # grown twice, halved at the inf
    assert counters == [1, 0, 1, 0, 0, 1]
    # stock: both ifs every finite step; the fast path: the finite check alone
    assert fast[2].count("__bool__") == 6 and stock[2].count("__bool__") == 11


def objective_run(fast_path, monkeypatch, objective, label_smoothing, how, steps=4):
    """The logs (each step's under train_on_batch, the epoch's under fit, whose labels come
    from Keras' DataLoader as tensors) and every variable (weights, metric and optimizer
    variables) of cifar_resnet's ResNet-20, with kbench.torch_objective's path or Keras' own;
    and whether each step took kbench's."""
    import keras

    from kbench import torch_objective, train
    from kbench.recipe import load_recipe

    fast_path.set_enabled(True)
    stock = torch_objective.standard
    taken = []

    def standard(*args):
        found = stock(*args) if objective else None
        taken.append(found is not None)
        return found

    monkeypatch.setattr(torch_objective, "standard", standard)
    recipe = load_recipe("cifar_resnet")
    config = recipe.Config(dataset="synthetic", model="resnet20", batch_size=4,
                           train_examples=16, test_examples=8, jit_compile="off", verbose=0,
                           label_smoothing=label_smoothing)
    train.setup_run(config)
    keras.utils.set_random_seed(0)
    model = recipe.build_model(config)
    train.compile_model(model, config, steps_per_epoch=2)
    train_ds, _ = recipe.build_datasets(config)
    if how == "fit":
        logs = model.fit(train_ds.dataset.take(steps), epochs=1, verbose=0).history
    else:
        batches = list(train_ds.dataset.take(steps).as_numpy_iterator())
        assert not batches[0][1].flags.writeable  # tf.data's arrays: read-only
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logs = [model.train_on_batch(x, y, return_dict=True) for x, y in batches]
        # The objective's check of the labels once made torch warn that they are not
        # writable (torch says it once per process: this sees it where this run is first)
        assert not [w for w in caught if "not writable" in str(w.message)], \
            [str(w.message) for w in caught]
    variables = [v.numpy() for v in model.weights + model.metrics_variables
                 + model.optimizer.variables]
    return logs, variables, taken


@torch_only
@pytest.mark.parametrize("label_smoothing, how", [(0.1, "train_on_batch"),
                                                  (0.0, "train_on_batch"), (0.1, "fit")])
def test_the_standard_objective_is_keras_own_to_the_bit(fast_path, monkeypatch,
                                                         label_smoothing, how):
    """kbench.torch_objective's loss, loss tracker and accuracy give Keras' own logs, weights,
    metric and optimizer variables, to the bit, step after step."""
    logs, variables, taken = objective_run(fast_path, monkeypatch, True, label_smoothing, how)
    keras_logs, keras_variables, keras_taken = objective_run(fast_path, monkeypatch, False,
                                                             label_smoothing, how)
    assert taken == [True] * 4 and keras_taken == [False] * 4
    assert logs == keras_logs
    if how == "train_on_batch":
        assert len(set(log["loss"] for log in logs)) == 4
    for a, b in zip(variables, keras_variables, strict=True):
        np.testing.assert_array_equal(a, b)


@torch_only
def test_the_objective_steps_aside_for_anything_else(fast_path):
    """Sample weights, another metric, a weighted metric, a regularizer's loss, a loss of
    another class or integer labels: Keras' own loss and metrics run."""
    import keras
    import torch

    from kbench import torch_objective

    fast_path.set_enabled(True)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    y = np.eye(4, dtype="float32")[[0, 1, 2, 3]]
    found = []
    stock = torch_objective.standard

    def run(y=y, sample_weight=None, regularizer=None, loss=None, **compile_args):
        keras.utils.set_random_seed(0)
        model = conv_net()
        if regularizer:  # (what Conv2D(kernel_regularizer=...) gives its kernel)
            model.layers[1].kernel.regularizer = keras.regularizers.L2(1e-3)
        model.compile(optimizer="sgd", loss=loss or keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=0.1), **{"metrics": [
                keras.metrics.CategoricalAccuracy(name="accuracy")], **compile_args})
        torch_objective.standard = lambda *args: found.append(stock(*args)) or found[-1]
        try:
            model.train_on_batch(x, y, sample_weight=sample_weight)
        finally:
            torch_objective.standard = stock
        return found.pop() is not None

    assert run()  # the standard objective itself
    assert run(metrics=["accuracy"])  # (Keras makes it CategoricalAccuracy("accuracy"))
    assert not run(sample_weight=np.ones(4, "float32"))
    assert not run(y=y.astype("float64"))
    assert not run(loss=keras.losses.CategoricalCrossentropy(from_logits=True, reduction="sum"))
    assert not run(loss=keras.losses.CategoricalCrossentropy(from_logits=True, dtype="float64"))
    assert not run(loss_weights=[0.5])
    assert not run(metrics=[keras.metrics.CategoricalAccuracy(name="loss")])  # a name clash
    assert not run(metrics=[keras.metrics.CategoricalAccuracy(), "mse"])
    assert not run(weighted_metrics=["mse"])
    assert not run(regularizer=True)
    assert not run(loss=keras.losses.CategoricalCrossentropy())  # on probabilities
    assert not run(y=np.arange(4), loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=[keras.metrics.SparseCategoricalAccuracy()])
    assert torch.is_grad_enabled()


@torch_only
def test_a_plan_takes_an_array_given_to_call_itself(fast_path, monkeypatch):
    """`model.call(array)` skips Layer.__call__'s conversion; the plan converts the array
    before its first step permutes it, and computes what Keras' own call does."""
    import keras

    from kbench import torch_plan

    planned_runs = []  # the plan itself ran (not Keras' call), so two ways are compared
    original = torch_plan.Plan.run
    monkeypatch.setattr(torch_plan.Plan, "run",
                        lambda self, *a: planned_runs.append(1) or original(self, *a))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    fast_path.set_enabled(True)
    planned = keras.ops.convert_to_numpy(model.call(x))
    assert len(planned_runs) == 1
    fast_path.set_enabled(False)
    np.testing.assert_array_equal(planned, keras.ops.convert_to_numpy(model.call(x)))
    assert len(planned_runs) == 1


@torch_only
def test_train_step_without_walks_is_keras_own(fast_path, monkeypatch):
    """kbench.torch_step's train_step (one walk of the layer tree per step) gives Keras' own
    train_step's losses, gradients' updates and `model.losses`, to the bit: a weight
    regularizer, a frozen BatchNormalization, a layer loss added by hand; and a weight
    frozen between steps stops moving, as under Keras. So does the step DDP runs
    (kbench.keras_fixes.ddp_train_step), its forward pass through the wrapper, with the
    fast path on (one walk) and off (Keras' walks)."""
    import keras
    import torch

    from kbench import keras_fixes, torch_step

    ran = []
    kbench_step = torch_step.keras_train_step
    monkeypatch.setattr(torch_step, "keras_train_step", lambda model, data, **kw: (
        ran.append(kw.get("walk", False)) or kbench_step(model, data, **kw)))

    forwards = []

    def run(direct, through_wrapper=False):
        with direct_or_keras(fast_path, direct):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((8, 8, 3))
            x = keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(0.1))(inputs)
            frozen = keras.layers.BatchNormalization()
            x = keras.layers.ReLU()(frozen(x))
            x = keras.layers.GlobalAveragePooling2D()(x)
            head = keras.layers.Dense(2, bias_regularizer=keras.regularizers.L1(0.01))
            model = keras.Model(inputs, head(x))
            frozen.trainable = False
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
            if through_wrapper:  # the step DDP runs, its forward pass through a stand-in
                def wrapper(*args, **kwargs):
                    forwards.append(1)
                    return model(*args, **kwargs)

                model.train_step = types.MethodType(keras_fixes.ddp_train_step(wrapper), model)
            x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
            y = np.random.default_rng(1).normal(size=(4, 2)).astype("float32")
            losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
            head.bias.trainable = False
            head._losses.append(torch.tensor(0.5))  # a loss no call cleared yet
            layer_losses = [float(t.detach()) for t in model.losses]
            losses += [float(model.train_on_batch(x, y)) for _ in range(2)]
            return losses, layer_losses, [v.numpy() for v in model.weights]

    fast = run(True)
    assert ran == [True] * 5
    ran.clear()
    stock = run(False)
    assert not ran
    ddp_fast = run(True, through_wrapper=True)  # one walk
    assert ran == [True] * 5 and len(forwards) == 5
    ran.clear()
    ddp_keras = run(False, through_wrapper=True)  # Keras' walks
    assert ran == [False] * 5 and len(forwards) == 10
    for other in (fast, ddp_fast, ddp_keras):
        assert other[0] == stock[0]
        # the hand-added loss, then the kernel's regularization (the frozen bias has none)
        assert other[1] == stock[1] and len(other[1]) == 2
        for a, b in zip(other[2], stock[2]):
            np.testing.assert_array_equal(a, b)


@torch_only
def test_outermost_call_keeps_keras_contract(fast_path):
    """The outermost call that skips Layer.__call__ keeps what it owes the caller: a
    one-output list model returns the tensor (Functional's unpack_singleton); a wrong input
    shape is Keras' error, arrays included, after good calls; a call that raises midway
    still writes the moving variance of the BatchNorm layers that ran."""
    import keras
    import torch

    fast_path.set_enabled(True)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    norm = keras.layers.BatchNormalization()
    x = keras.layers.GlobalAveragePooling2D()(norm(keras.layers.Conv2D(4, 3)(inputs)))
    model = keras.Model(inputs, [keras.layers.Dense(2)(x)])
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    for _ in range(2):  # the first call is Keras' own, the next the fast path's
        out = model(x, training=True)
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 2)
    assert model.predict(x, verbose=0).shape == (2, 2)
    for bad in (np.zeros((2, 9, 9, 3), "float32"), torch.zeros(2, 9, 9, 3)):
        with pytest.raises(ValueError, match="incompatible"):
            model(bad)
    plan = model._kbench_plan
    before = norm.moving_variance.numpy().copy()
    pooling_step = next(i for i, step in enumerate(plan.steps)
                        if type(step[0].layer).__name__ == "GlobalAveragePooling2D")
    run, *rest = plan.steps[pooling_step]

    def broken(*args):
        raise RuntimeError("a later layer fails")

    broken.layer = run.layer
    plan.steps[pooling_step] = (broken, *rest)
    try:
        with pytest.raises(RuntimeError):
            model(x, training=True)
    finally:
        plan.steps[pooling_step] = (run, *rest)
    assert not plan.moves and not np.array_equal(norm.moving_variance.numpy(), before)
