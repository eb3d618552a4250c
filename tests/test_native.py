"""The native reference loops train what Keras trains: same network, initial weights, batches,
schedule and optimizer, so that `kbench compare`'s Keras / native ratio is framework overhead.

native_jax is checked in the jax pass, native_tensorflow in the tensorflow pass and
native_torch in the torch pass, each against Keras running on the same framework.
"""

import importlib
import math

import numpy as np
import pytest

import kbench  # noqa: F401  (validates KERAS_BACKEND before keras is imported)
import keras
from kbench import train
from kbench.bench import native_common as common
from kbench.errors import KbenchError
from recipes import cifar_resnet  # its Config: the settings compare hands the twins

from tests.conftest import BACKEND  # noqa: E402  (as Keras reads it)
NATIVE = {"jax": "kbench.bench.native_jax", "tensorflow": "kbench.bench.native_tensorflow",
          "torch": "kbench.bench.native_torch"}
needs_twin = pytest.mark.skipif(BACKEND not in NATIVE, reason="no native twin")

TRAIN_STEPS = 4  # all of them compared with Keras; the run() keeps 2 timed steps of these
TIMED, WARMUP = 2, 1


def small_config(**overrides):
    # 72 test examples: the last test batch is partial, as it usually is for real data.
    # lr 0.01: at the recipe's 0.1, the first steps from initialization amplify float rounding
    # so much that Keras' own backends disagree by 5e-4 in the 4th loss and 1% in test loss.
    fields = dict(dataset="synthetic", train_examples=256, test_examples=72, batch_size=16,
                  steps_per_epoch=TRAIN_STEPS, epochs=1, lr=0.01, output_dir=None, verbose=0)
    return cifar_resnet.Config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def native():
    return importlib.import_module(NATIVE[BACKEND])


# Every setting the twins accept, beyond the defaults: no Nesterov, no warmup, no weight decay,
# no label smoothing, cutout; mixed_bfloat16 (float32 variables, bfloat16 compute); all of
# them must train the same numbers as Keras.
VARIANTS = {"defaults": {},
            "variant": dict(nesterov=False, momentum=0.8, warmup_epochs=0.0, weight_decay=0.0,
                            label_smoothing=0.0, cutout=8),
            "bfloat16": dict(dtype_policy="mixed_bfloat16"),
            # PreAct ResNet-18: 1x1 projection shortcuts, pre-activation blocks; in float32 at
            # the bounds above, and gpu-check's case, mixed_bfloat16.
            "preact": dict(model="preact_resnet18"),
            "preact_bfloat16": dict(model="preact_resnet18", dtype_policy="mixed_bfloat16")}
# Left out of `make test` (`make test-slow` runs it): bfloat16 convolutions are slow on a CPU
# (its Keras run and twin took 216 s under torch, 177 s under tensorflow, 46 s under jax on
# our 2-core machine, a third of the suite), and "preact" (the network) and "bfloat16" (the
# casts, on ResNet-20) check its two halves.
SLOW_VARIANTS = {"preact_bfloat16"}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_VARIANTS else name
    for name in VARIANTS])
def variant(request):
    model = VARIANTS[request.param].get("model", "resnet20")
    if model not in common.TWIN_MODELS.get(BACKEND, ()):
        pytest.skip(f"the {BACKEND} twin has no {model}")
    return request.param


@pytest.fixture(scope="module")
def keras_run(variant):
    """Keras' own training of the small config: per-batch logs and the final evaluation."""
    config = small_config(**VARIANTS[variant])
    model = common.build_keras_model(config)
    train_ds, test_ds, steps_per_epoch = common.datasets(config)
    train.compile_model(model, config, steps_per_epoch)
    logged = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: logged.append(float(logs["loss"])))
    model.fit(train_ds.dataset, epochs=1, steps_per_epoch=TRAIN_STEPS, shuffle=False, verbose=0,
              callbacks=[record])
    result = {"running_mean_loss": logged, **train.evaluate(model, test_ds)}
    keras.config.set_dtype_policy("float32")  # setup_run set the variant's for this process
    return result


@pytest.fixture(scope="module")
def native_run(native, variant):
    return native.run(small_config(**VARIANTS[variant]), steps=TIMED, warmup_steps=WARMUP)


# --------------------------------------------------------------------------- shared parts


@pytest.mark.parametrize("warmup_epochs, epochs", [(1.0, 2), (0.0, 1), (2.5, 3)])
def test_schedule_is_keras_schedule(warmup_epochs, epochs):
    config = small_config(warmup_epochs=warmup_epochs, epochs=epochs, lr=0.4)
    schedule = train.learning_rate_schedule(config, 10)
    expected = [float(keras.ops.convert_to_numpy(schedule(s))) for s in range(epochs * 10 + 3)]
    got = common.learning_rates(config, 10, len(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got[0] == (0.0 if warmup_epochs else float(np.float32(0.4)))  # step 0 comes first


@pytest.mark.backend_independent
@pytest.mark.parametrize("sync_every, windows", [(1, [1] * 5), (2, [2, 2, 1]), (10, [5])])
def test_native_timing_reads_losses_only_at_window_edges(sync_every, windows):
    import tensorflow as tf

    class Stream:  # what timed_training reads of a kbench Stream
        dataset = tf.data.Dataset.from_tensors((np.zeros((2, 2)), np.zeros((2,)))).repeat()

    class Loss:  # a device value: reading it is the sync
        newest = None  # the step queued last
        synced_at = []  # the newest step queued at each read

        def __init__(self, step):
            self.step = Loss.newest = step

        def __float__(self):
            Loss.synced_at.append(Loss.newest)
            return float(self.step)

    compile_s, step_times, steps_timed, losses = common.timed_training(
        Stream, lambda step, x, y: Loss(step), steps=5, warmup_steps=2, sync_every=sync_every)
    assert losses == [float(s) for s in range(8)] and steps_timed == 5
    assert len(step_times) == len(windows) and compile_s > 0
    # Synced after step 0 (compile), after the warm-up (step 2), then at each window's end.
    edges = [0, 2] + [2 + sum(windows[:i + 1]) for i in range(len(windows))]
    assert sorted(set(Loss.synced_at)) == edges


@pytest.mark.backend_independent
def test_a_twin_whose_loss_is_not_finite_fails_as_a_keras_run_does():
    """The twins' NaN guard (the Keras runs have checkpoint.StopOnNaN): found at the next
    window edge, where the losses are read anyway, and named by its step."""
    import tensorflow as tf

    class Stream:
        dataset = tf.data.Dataset.from_tensors((np.zeros((2, 2)), np.zeros((2,)))).repeat()

    steps_run = []

    def step_fn(step, images, labels):
        steps_run.append(step)
        return float("nan") if step == 4 else 1.0

    with pytest.raises(KbenchError, match=r"^training diverged: loss is nan at step 4 of the "
                                          r"native loop; lower --lr or train in float32$"):
        common.timed_training(Stream, step_fn, steps=20, warmup_steps=1, sync_every=3,
                              mixed=True)
    assert steps_run[-1] == 4  # the edge of the window it fell in (steps 2-4): no more steps
    with pytest.raises(KbenchError, match=r"native loop; lower --lr$"):  # already float32
        common.timed_training(Stream, step_fn, steps=20, warmup_steps=1, sync_every=3)


@pytest.mark.backend_independent
def test_twin_evaluations_see_one_batch_shape_and_count_every_example_once():
    """common.evaluate pads a shorter last batch to the others' size, as Keras' evaluation
    is padded (kbench.evaluation.predict_all): a compiled evaluation step compiles once in
    the twin as in Keras; the padding's losses and hits are cut off."""
    from kbench import data

    arrays = data.load_dataset("synthetic", test_examples=100, train_examples=8)
    test_ds = data.make_pipeline(arrays.x_test, arrays.y_test, 10, 32, training=False)
    shapes = []

    def eval_fn(images, labels):  # loss: the label's class id; hit: an even class
        shapes.append((images.shape, labels.shape))
        classes = labels.argmax(-1)
        return classes.astype("float32"), classes % 2 == 0

    result = common.evaluate(test_ds, eval_fn)
    assert set(shapes) == {((32, 32, 32, 3), (32, 10))} and len(shapes) == 4  # 3x32 + 4
    classes = arrays.y_test[:100].ravel()
    assert result["test_loss"] == pytest.approx(classes.mean())
    assert result["test_accuracy"] == pytest.approx(np.mean(classes % 2 == 0))


@pytest.mark.backend_independent
def test_models_without_twin_are_one_line_errors():
    with pytest.raises(KbenchError, match="native reference has no model 'resnet9'"):
        common.check_config(small_config(model="resnet9"))
    for policy in common.COMPUTE_DTYPES:  # the twins implement every kbench dtype policy
        common.check_config(small_config(dtype_policy=policy))
    with pytest.raises(KbenchError, match="dtype policies float32, mixed_bfloat16, "
                                          "mixed_float16 only, not 'float16'"):
        common.check_config(small_config(dtype_policy="float16"))


@pytest.mark.backend_independent
@pytest.mark.parametrize("setting, message", [
    ({"schedule": "one_cycle"}, "cosine schedule only"),
    ({"schedule": "step"}, "cosine schedule only"),
    ({"clip_norm": 1.0}, "no gradient clipping"),
    ({"optimizer": "adam"}, "SGD only"),
    ({"distribute": "data_parallel"}, "one device only"),
    ({"dataset": "mnist"}, "CIFAR-shaped data sets only"),
])
def test_settings_the_twins_do_not_implement_are_refused(setting, message):
    with pytest.raises(KbenchError, match=message):
        common.check_config(small_config(**setting))


@pytest.mark.backend_independent
def test_stage_plan_is_he_et_al():
    plan = common.stage_plan(20)
    assert plan == [(16, 1)] * 3 + [(32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1)]
    assert len(common.stage_plan(110)) == 54


# --------------------------------------------------------------------------- the twins


@needs_twin
@pytest.mark.parametrize("model", ["resnet20", "resnet32", "preact_resnet18"])
def test_forward_matches_keras(native, model):
    if model not in common.TWIN_MODELS[BACKEND]:
        pytest.skip(f"the {BACKEND} twin has no {model}")
    config = small_config(model=model)
    images = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    keras_model = common.build_keras_model(config)
    expected = keras.ops.convert_to_numpy(keras_model(images, training=False))
    # At initialization, inference-mode logits reach ~600 (moving statistics are still 0 and
    # 1), so float32 rounding alone makes ~1e-4 absolute: the relative bound covers those.
    np.testing.assert_allclose(native.forward(config, images), expected, rtol=1e-5, atol=1e-4)
    assert common.initial_weights(config).count() == keras_model.count_params()


@needs_twin
def test_mixed_bfloat16_forward_computes_in_bfloat16_as_keras(native):
    """The twin's logits under mixed_bfloat16 are Keras' to bfloat16 rounding, and not its
    float32 logits: it computes in bfloat16 (8 significant bits, unit roundoff 2^-9 = 0.2%).
    19 layers of bfloat16 rounding placed differently by each implementation move the logits
    by up to 0.6% of their largest value (measured, every backend; TensorFlow: identical);
    bfloat16 against float32 moves them by as much, so the second check is against the
    twin's own float32 logits, which bfloat16 must move by more than 0.1%."""
    images = np.random.default_rng(1).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    config = small_config(dtype_policy="mixed_bfloat16")
    expected = keras.ops.convert_to_numpy(common.build_keras_model(config)(images,
                                                                           training=False))
    keras.config.set_dtype_policy("float32")
    got = native.forward(config, images)
    in_float32 = native.forward(small_config(), images)
    scale = np.abs(expected).max()
    assert got.dtype == np.float32  # the logits layer computes in float32, as Keras'
    assert np.abs(got - expected).max() <= 2e-2 * scale
    assert np.abs(got - in_float32).max() > 1e-3 * scale


@needs_twin
def test_preact_shortcut_kernels_get_weight_decay_as_keras_conv_kernels(native):
    if "preact_resnet18" not in common.TWIN_MODELS[BACKEND]:
        pytest.skip(f"the {BACKEND} twin has no preact_resnet18")
    weights = common.initial_weights(small_config(model="preact_resnet18"))
    keras.config.set_dtype_policy("float32")
    assert [k.shape for k in weights.shortcuts] == [(1, 1, 64, 128), (1, 1, 128, 256),
                                                   (1, 1, 256, 512)]
    if BACKEND == "jax":
        params, _ = native.init_state(weights)
        assert native.decay_mask(params)["shortcut"] == [True] * 3
    elif BACKEND == "tensorflow":
        net = native.Network(weights)
        variables, decayed = net.trainables()
        flags = {id(v): d for v, d in zip(variables, decayed)}
        assert len(net.shortcuts) == 3 and all(flags[id(w)] for w in net.shortcuts)
    else:
        model = native.build_model(weights)
        decayed = {id(p) for p in native.decayed_and_plain(model)[0]}
        shortcuts = [b.shortcut.weight for b in model.blocks if b.shortcut is not None]
        assert len(shortcuts) == 3 and all(id(w) in decayed for w in shortcuts)


@needs_twin
def test_loss_scaling_is_keras_loss_scale_optimizer():
    scaling = common.loss_scale(small_config(dtype_policy="mixed_float16"))
    inner = keras.optimizers.SGD()
    keras_default = keras.optimizers.LossScaleOptimizer(inner)
    assert (scaling.initial_scale, scaling.growth_steps) == (
        keras_default.initial_scale, keras_default.dynamic_growth_steps) == (2.0**15, 2000)
    assert common.loss_scale(small_config(dtype_policy="mixed_bfloat16")) is None
    assert common.loss_scale(small_config()) is None


@pytest.mark.skipif(BACKEND != "torch", reason="native-torch's batches")
def test_torch_twin_feeds_a_gpu_from_pinned_memory(native, pinned_memory, monkeypatch):
    """On a CUDA device the twin's batches are copied into pinned memory of their own and
    moved without blocking (conftest's stand-in pinned memory records them); on the CPU they
    are copied into memory of their own. Both arrays of a batch go through host_copy (the
    `meta` device stands in for the GPU's as their destination)."""
    import torch

    images = np.arange(2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    labels = np.eye(10, dtype="float32")[[3, 7]]
    for array in (images, labels):
        array.setflags(write=False)  # as tf.data hands them out
    copied, host_copy = [], native.host_copy
    monkeypatch.setattr(native, "host_copy",
                        lambda array, device: copied.append((array, device))
                        or host_copy(array, device))
    meta = torch.device("meta")
    x, y = native.to_device(images, labels, meta)
    assert [(id(a), d) for a, d in copied] == [(id(images), meta), (id(labels), meta)]
    assert (x.device, x.shape, y.device, y.shape) == (meta, (2, 3, 4, 4), meta, (2, 10))
    assert x.is_contiguous(memory_format=torch.channels_last)
    host = native.host_copy(images, torch.device("cuda"))
    (pinned,) = pinned_memory
    assert host is pinned and host.data_ptr() != images.ctypes.data
    np.testing.assert_array_equal(host.numpy(), images)
    x, y = native.to_device(images, labels, torch.device("cpu"))
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert x.is_contiguous(memory_format=torch.channels_last) and len(pinned_memory) == 1


@pytest.mark.skipif(BACKEND != "torch", reason="native-torch's cuDNN setting")
def test_torch_twin_keeps_the_runs_cudnn_benchmark_setting(native, monkeypatch):
    """--cudnn-benchmark off reaches the twin as it reaches the Keras runs: set in the
    prologue (kbench.backend, tested there), and left as it is when the twin builds its
    model for a CUDA device (a stand-in model: this machine has none)."""
    import torch

    class OnAnyDevice(torch.nn.Module):
        def to(self, *args, **kwargs):
            return self

    monkeypatch.setattr(native, "build_model", lambda weights: OnAnyDevice())
    for asked in (False, True):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", asked)
        native._prepare(small_config(), torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is asked


@pytest.mark.skipif(BACKEND != "jax", reason="native-jax's own loss-scale update")
def test_jax_loss_scale_follows_keras_rules(native):
    update = lambda scale, count, finite: tuple(  # noqa: E731
        float(v) for v in native.update_loss_scale((np.float32(scale), np.int32(count)),
                                                   np.bool_(finite), 2000))
    assert update(8.0, 5, True) == (8.0, 6.0)  # finite: count on
    assert update(8.0, 1999, True) == (16.0, 0.0)  # the 2000th finite step in a row: grow
    assert update(8.0, 1999, False) == (4.0, 0.0)  # not finite: halve, count from 0


@needs_twin
def test_optimizer_is_keras_sgd(native):
    """Three updates of one kernel and one bias: weight decay on the kernel only, Nesterov
    momentum with the learning rate inside the buffer, the warmup schedule's step-0 rate."""
    config = small_config(warmup_epochs=0.5, weight_decay=0.05)
    rng = np.random.default_rng(2)
    start = {"kernel": rng.normal(size=(3, 3, 2, 4)).astype("float32"),
             "bias": rng.normal(size=(4,)).astype("float32")}
    grads = [{k: rng.normal(size=v.shape).astype("float32") for k, v in start.items()}
             for _ in range(3)]

    optimizer = train.build_optimizer(config, TRAIN_STEPS)
    variables = [keras.Variable(start[k], name=k) for k in ("kernel", "bias")]
    for g in grads:
        g = [keras.ops.convert_to_tensor(g[k]) for k in ("kernel", "bias")]
        optimizer.apply_gradients(zip(g, variables))
    expected = {v.name: keras.ops.convert_to_numpy(v) for v in variables}

    rates = common.learning_rates(config, TRAIN_STEPS, len(grads))
    got = NATIVE_SGD[BACKEND](native, config, start, grads, rates)
    for name in start:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
    assert not np.allclose(got["kernel"], start["kernel"])


def _jax_sgd(native, config, start, grads, rates):
    import jax.numpy as jnp
    import optax

    optimizer = native.keras_sgd(config.momentum, config.nesterov, config.weight_decay,
                                 {"kernel": True, "bias": False})
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = optimizer.init(params)
    for g, lr in zip(grads, rates):
        updates, state = optimizer.update(g, state, params, learning_rate=np.float32(lr))
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in params.items()}


def _torch_sgd(native, config, start, grads, rates):
    import torch

    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()}
    optimizer = native.KerasSGD([params["kernel"]], [params["bias"]], config.momentum,
                                config.nesterov, config.weight_decay)
    for g, lr in zip(grads, rates):
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k])
        optimizer.step(lr)
    return {k: p.detach().numpy() for k, p in params.items()}


def _tensorflow_sgd(native, config, start, grads, rates):
    import tensorflow as tf

    variables = [tf.Variable(start[k]) for k in ("kernel", "bias")]
    momenta = [tf.Variable(tf.zeros_like(v)) for v in variables]
    for g, lr in zip(grads, rates):
        native.keras_sgd_update(variables, [tf.constant(g[k]) for k in ("kernel", "bias")],
                                momenta, tf.constant(lr, tf.float32), config.momentum,
                                config.nesterov, config.weight_decay, [True, False])
    return {k: v.numpy() for k, v in zip(("kernel", "bias"), variables)}


NATIVE_SGD = {"jax": _jax_sgd, "tensorflow": _tensorflow_sgd, "torch": _torch_sgd}


# Per-step training losses, relative. float32: measured within 2e-6 for JAX, 1e-5 for torch.
# mixed_bfloat16: bfloat16 keeps 8 significant bits (unit roundoff u = 2^-9 = 1.95e-3), each
# implementation places its roundings differently (casts, conv accumulation, the pooled
# features the float32 logits read), so the float32 loss of the same batch moves by a fraction
# of u: measured 0 to 8.6e-4 over the 4 steps (torch 8.6e-4, JAX 4.2e-4, TensorFlow 8.2e-4).
# The bound is u. (bfloat16 moves Keras' own losses from its float32 ones by 3e-4: these
# bounds cannot tell the policies apart; the forward test above does.)
LOSS_RTOL = {"float32": 1e-4, "mixed_bfloat16": 2e-3}


@needs_twin
def test_training_matches_keras_fit(native_run, keras_run, variant):
    """Same data, same initial weights, same optimizer: the losses agree step by step.

    Keras logs the running mean of the epoch's losses; undoing the mean gives its per-step
    losses. Step 0 trains at learning rate 0 (warmup), steps 1-2 move the weights, so steps
    2-3 check the gradients and the update.
    """
    rtol = LOSS_RTOL[small_config(**VARIANTS[variant]).dtype_policy]
    losses = native_run["train_loss_history"]
    assert len(losses) == TRAIN_STEPS
    running_mean = np.cumsum(losses) / np.arange(1, len(losses) + 1)
    np.testing.assert_allclose(running_mean, keras_run["running_mean_loss"], rtol=rtol)
    np.testing.assert_allclose(losses, per_step(keras_run["running_mean_loss"]), rtol=rtol)


def per_step(running_means):
    """Per-step values from the running means Keras logs: x_k = k m_k - (k - 1) m_(k-1)."""
    sums = np.asarray(running_means, np.float64) * np.arange(1, len(running_means) + 1)
    return np.diff(sums, prepend=0.0)


# Test loss after the same 4 steps. JAX: BN written as Keras writes it (measured 3e-5). torch:
# nn.BatchNorm2d updates its moving variance with the unbiased batch variance (Keras: biased),
# i.e. n/(n-1) times the batch's share, n = 16*8*8 in the last stage (measured 4e-4).
# TensorFlow's PreAct ResNet-18 twin in float32: measured 1.1e-4.
EVAL_RTOL = {"jax": 2e-4, "tensorflow": 2e-4, "torch": 2e-3}


# Test accuracy: JAX identical; torch's moving-variance difference (above) can move one of the
# 72 near-chance predictions across an argmax (measured once: the variant, 6 vs 7 right).
EVAL_ACCURACY_ABS = {"jax": 1e-6, "tensorflow": 1e-6, "torch": 1.01 / 72}


# Under mixed_bfloat16 the bounds are bfloat16's unit roundoff (2^-8) and one of the 72
# predictions, on every backend. Measured: 1.5e-4 to 4.8e-4 test loss, the same accuracy; and
# 3.2e-3 under torch on an AMD EPYC machine (2026-12-06: 3.5846 against 3.5961; its training
# losses agree within test_training_matches_keras_fit's bound), where the bound was 2e-3.
BFLOAT16_EVAL = (2.0**-8, 1.01 / 72)
# PreAct ResNet-18 in bfloat16: 21 layers of bfloat16 rounding, placed differently by each
# implementation, under BN moving statistics 4 steps from their initial 0 and 1 (inference
# logits in the hundreds). Measured 1.1e-3 under jax, 2.6e-3 under tensorflow and 5.7e-3 under
# torch (whose float32
# PreAct twin is within EVAL_RTOL, so the gap is bfloat16's, not the network's); bfloat16 moves
# logits by up to 0.6% of their largest value (the forward test's finding).
PREACT_BFLOAT16_EVAL = (1e-2, 1.01 / 72)


@needs_twin
def test_evaluation_matches_keras_evaluate(native_run, keras_run, variant):
    rtol, accuracy_abs = EVAL_RTOL[BACKEND], EVAL_ACCURACY_ABS[BACKEND]
    if "bfloat16" in variant:
        rtol, accuracy_abs = PREACT_BFLOAT16_EVAL if "preact" in variant else BFLOAT16_EVAL
    assert native_run["test_loss"] == pytest.approx(keras_run["test_loss"], rel=rtol)
    assert native_run["test_accuracy"] == pytest.approx(keras_run["test_accuracy"],
                                                        abs=accuracy_abs)


# The execution settings each twin reports on this CPU (records.SETTING_FIELDS).
CPU_SETTINGS = {"jax": dict(compiler="xla", memory_format="channels_last", cudnn_benchmark=None),
                "tensorflow": dict(compiler="tf.function", memory_format="channels_last",
                                   cudnn_benchmark=None),
                "torch": dict(compiler="eager", memory_format="channels_last",
                              cudnn_benchmark=None)}


@needs_twin
def test_run_reports_timings_and_metrics(native_run, variant):
    result = native_run
    assert {k: result[k] for k in CPU_SETTINGS[BACKEND]} == CPU_SETTINGS[BACKEND]
    assert result["autocast_dtype"] == ("bfloat16" if "bfloat16" in variant else None)
    # native-jax adds XLA's own FLOP count beside the analytic one
    assert set(result) == set(common.RESULT_KEYS) | ({"xla_flops_per_step"}
                                                       if BACKEND == "jax" else set())
    assert len(result["step_times"]) == TIMED
    assert all(0 < t < 60 for t in result["step_times"])
    assert 0 < result["compile_s"] < 600
    assert all(math.isfinite(v) for v in result["train_loss_history"])
    assert math.isfinite(result["test_loss"]) and 0 <= result["test_accuracy"] <= 1
    # incl. BN moving statistics, as Keras counts
    assert result["params"] == (11_179_978 if "preact" in variant else 271_098)
    assert result["device"] and result["jit"]
    # Every twin counts its step's FLOPs as its Keras row does: the same Keras model's
    # analytic count (ResNet-20, batch 16: about 3.7 GFLOP), whatever the framework
    from kbench.bench import flops

    config = small_config(**VARIANTS[variant])
    assert result["flops_per_step"] == flops.training_flops(common.build_keras_model(config),
                                                            config.batch_size) > 1e9
    assert result["flops_source"] == flops.SOURCE
    if BACKEND == "jax":
        assert result["xla_flops_per_step"] > 1e9


@pytest.mark.skipif(BACKEND != "torch", reason="native-torch-compiled is a torch twin")
def test_compiled_torch_twin_trains_as_the_eager_one(native):
    """native-torch-compiled: the same step under torch.compile (forward + loss, optimizer
    step), compiled within the first step, then the same losses as eager to float32 round-off
    (inductor fuses and reorders). One tiny case, slow: compiling ResNet-20's step took 1 to
    3.5 minutes on this loaded 2-core CPU."""
    native_run = native.run(small_config(), steps=TIMED, warmup_steps=WARMUP)
    compiled = native.run(small_config(), steps=TIMED, warmup_steps=WARMUP, compiled=True)
    assert compiled["compiler"] == "torch.compile" and native_run["compiler"] == "eager"
    assert compiled["jit"].startswith("torch.compile")
    # Issue 20's bound: 1e-4 relative (measured: 1.2e-5 at most, at the fourth step).
    np.testing.assert_allclose(compiled["train_loss_history"], native_run["train_loss_history"],
                               rtol=1e-4)
    # The compile is on the first step's clock, apart from the steady-state steps (15 s of
    # compiling against steps of 0.1-3.4 s, the slowest under heavy load).
    assert compiled["compile_s"] > max(compiled["step_times"])


@needs_twin
def test_run_refuses_models_without_twin(native):
    missing = [m for m in ("resnet9", "preact_resnet18") if m not in common.TWIN_MODELS[BACKEND]]
    for model in missing:  # resnet9 has no twin anywhere
        with pytest.raises(KbenchError, match=f"native reference has no model '{model}' under "
                                              f"{BACKEND}"):
            native.run(small_config(model=model), steps=1)

