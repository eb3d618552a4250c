"""Keras-torch under `--jit-compile on`: Keras' train step under torch.compile, made traceable
by kbench.keras_fixes.torch_compile_ready, trains as the eager step does, in one graph before
loss.backward() and one after, without recompiling in the steady state."""

import inspect
import json

import numpy as np
import pytest

from tests.conftest import BACKEND

torch_only = pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is torch's")


def _tiny_run(jit_compile, steps=10):
    """Per-step float32 losses of kbench's convnet (4 filters, 8x8 digits-sized images:
    Normalization, Conv2D, BatchNormalization, ReLU, pooling, Dense) trained with kbench's
    optimizer (SGD, Nesterov, weight decay, cosine schedule with warmup), and the dynamo
    counters (unique graphs after the first step and after the last)."""
    import keras
    import torch
    from torch._dynamo.utils import counters

    from kbench import fast_path
    from kbench.config import TrainConfig
    from kbench.models import get_model
    from kbench.train import compile_model, setup_run

    config = TrainConfig(epochs=1, batch_size=8, jit_compile=jit_compile, warmup_epochs=0.2,
                         lr=0.05)
    setup_run(config)
    before = fast_path.enabled()
    fast_path.set_enabled(True)
    try:
        torch._dynamo.reset()
        counters.clear()
        model = get_model("convnet", 10, (8, 8, 1), seed=0, widths=(4,))
        compile_model(model, config, steps_per_epoch=steps)
        rng = np.random.default_rng(0)
        x = torch.tensor(rng.integers(0, 256, (8, 8, 8, 1)).astype("float32"))
        y = torch.tensor(keras.utils.to_categorical(np.arange(8) % 10, 10))
        losses, graphs_after_1 = [], None
        for step in range(steps):
            losses.append(model.train_on_batch(x, y, return_dict=True)["loss"])
            if step == 0:
                graphs_after_1 = counters["stats"]["unique_graphs"]
        return (np.array(losses, "float32"), dict(counters["graph_break"]), graphs_after_1,
                counters["stats"]["unique_graphs"])
    finally:
        fast_path.set_enabled(before)


# The compiled run, in a fresh interpreter: there, as in a recipe run, the first step
# kbench.keras_fixes' thread-locals see is a compiled one (one that appeared only after the
# first step once made dynamo recompile the second: docs/compare.md). It ran in a new thread
# before, but under torch 2.11 (the GPU machine's) a compile on the main thread after one in
# another thread (joined before) crashed the interpreter in dynamo; cause not pinned down
# (see also pytorch/pytorch#105943, PT2 is not thread-safe).
COMPILED_TINY_RUN = """
import json
from tests.test_torch_compile import _tiny_run
losses, breaks, graphs_after_1, graphs = _tiny_run("on")
print(json.dumps([losses.tolist(), breaks, graphs_after_1, graphs]))
"""


@torch_only
# torch.compile on CPU: ~80 s of CPU time (14 min on 2 overloaded cores; the child's limit
# is 20)
def test_compiled_training_matches_eager_without_graph_breaks(run_python):
    eager, *_ = _tiny_run("off")
    # -X faulthandler: a crash in the child prints its Python stack
    run = run_python("-X", "faulthandler", "-c", COMPILED_TINY_RUN, timeout=1200)
    assert run.returncode == 0 and run.stdout.strip(), (
        f"the compiled run exited {run.returncode}; stdout: {run.stdout[-500:]!r}; "
        f"stderr: {run.stderr[-3000:]}")
    compiled, breaks, graphs_after_1, graphs = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(compiled, "float32"), eager, rtol=1e-4)
    assert len(set(np.round(eager, 4))) > 1  # it trained: the loss moved
    # The only break is the one every compiled step that calls loss.backward() has (dynamo
    # counts it once for each frame it breaks: Keras' one_step_on_data and each train step
    # function it calls; docs/compare.md).
    assert breaks and all(reason.startswith("Unsupported Tensor.backward()")
                          for reason in breaks), breaks
    assert graphs == graphs_after_1, "the steady state recompiled"


def _loss_scaling_run(jit_compile):
    """Six train_on_batch steps of a small model under mixed_float16 with Keras'
    LossScaleOptimizer (growth every 2 finite steps), the fifth step's input holding an inf
    (non-finite gradients): each step's loss, scale, counter, iterations and weights, and the
    dynamo counters (graph breaks; unique graphs after the first step and after the last)."""
    import keras
    import torch
    from torch._dynamo.utils import counters

    from kbench import fast_path, keras_fixes

    before = fast_path.enabled()
    fast_path.set_enabled(True)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        torch._dynamo.reset()
        counters.clear()
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01, momentum=0.9), initial_scale=16.0,
            dynamic_growth_steps=2), loss="mse", jit_compile=jit_compile)
        if jit_compile:
            keras_fixes.torch_compile_ready(model)
        x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
        y = torch.full((4, 1), 0.5)
        steps, graphs_after_1 = [], None
        for step in range(6):
            inputs = torch.tensor(x)
            if step == 4:
                inputs[0, 0] = float("inf")
            loss = model.train_on_batch(inputs, y)
            optimizer = model.optimizer
            steps.append((loss, float(optimizer.dynamic_scale.value),
                          int(optimizer.step_counter.value), int(optimizer.iterations.value),
                          [keras.ops.convert_to_numpy(w)
                           for w in (*model.weights, *optimizer.variables)]))
            if step == 0:
                graphs_after_1 = counters["stats"]["unique_graphs"]
        return steps, dict(counters["graph_break"]), graphs_after_1, \
            counters["stats"]["unique_graphs"]
    finally:
        keras.config.set_dtype_policy("float32")
        fast_path.set_enabled(before)


@torch_only
def test_loss_scaling_compiles_without_breaks_and_skips_as_eager():
    """Keras' LossScaleOptimizer branches on device values (finite gradients? grow the
    scale?), each a graph break that sends the update out of the graph and recompiles it;
    under torch.compile kbench selects instead (keras_fixes.select_in_loss_scaling): the same
    scales, counters and skipped step as the eager run, losses and weights within float16's
    reach (inductor computes float16 elementwise work in float32), one graph break."""
    eager, *_ = _loss_scaling_run(False)
    compiled, breaks, graphs_after_1, graphs = _loss_scaling_run(True)
    assert [step[1:4] for step in compiled] == [step[1:4] for step in eager] == [
        (16.0, 1, 1), (32.0, 0, 2), (32.0, 1, 3), (64.0, 0, 4),  # grown at steps 2 and 4
        (32.0, 0, 4),  # the inf step: skipped (no iteration), scale halved
        (32.0, 1, 5)]
    finite = [i for i in range(6) if i != 4]
    # within two float16 epsilons (9.8e-4 each): measured 1.2e-3 at the last step
    np.testing.assert_allclose([compiled[i][0] for i in finite], [eager[i][0] for i in finite],
                               rtol=2e-3)
    for compiled_step, eager_step in zip(compiled, eager):
        for a, b in zip(compiled_step[4], eager_step[4]):
            np.testing.assert_allclose(a, b, atol=1e-3)
    assert breaks and all(reason.startswith("Unsupported Tensor.backward()")
                          for reason in breaks), breaks
    assert graphs == graphs_after_1, "the steady state recompiled"


def _numpy_batches_run(jit_compile):
    """train_on_batch (plain, then with class_weight, whose sample weights Keras computes as
    NumPy), test_on_batch and predict_on_batch of a small model, every batch a NumPy array
    (float64 inputs, NumPy's default): each call's results and the dynamo graph breaks."""
    import keras
    import torch
    from torch._dynamo.utils import counters

    from kbench import fast_path, keras_fixes

    before = fast_path.enabled()
    fast_path.set_enabled(True)
    try:
        torch._dynamo.reset()
        counters.clear()
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                                  keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=jit_compile)
        if jit_compile:
            keras_fixes.torch_compile_ready(model)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 6))
        y = np.eye(3, dtype="float32")[[0, 1, 2, 1]]
        results = [model.train_on_batch(x, y),
                   model.train_on_batch(x, y, class_weight={0: 2.0, 1: 1.0, 2: 0.5}),
                   model.test_on_batch(x, y), model.predict_on_batch(x)]
        return results, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    finally:
        fast_path.set_enabled(before)


@torch_only
def test_stock_batch_normalization_traces_in_one_graph():
    """With the fast path off (stock Keras layers under --jit-compile on), BatchNormalization
    hands its reduction axes, a list Keras' tracker wrapped (TrackedList), to
    keras.ops.moments: dynamo could not pass it to torch.mean, broke the graph there inside
    Keras' name_scope and ran the ResNets' layer calls eagerly, recompiling to its limit.
    The traced moments take them as a tuple (kbench.keras_fixes)."""
    import keras
    import torch

    from kbench import fast_path, keras_fixes

    before = fast_path.enabled()
    fast_path.set_enabled(False)
    try:
        layer = keras.layers.BatchNormalization()
        model = keras.Sequential([keras.Input((4, 4, 3)), layer])
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
        keras_fixes.torch_compile_ready(model)
        # Keras' own list, left as it is: the tracked kind dynamo could not pass on
        assert type(layer._reduction_axes).__name__ == "TrackedList"
        x = torch.tensor(np.random.default_rng(0).normal(size=(8, 4, 4, 3)).astype("float32"))
        eager = layer(x, training=True)
        torch._dynamo.reset()
        # fullgraph: any graph break raises
        traced = torch.compile(lambda t: layer(t, training=True), fullgraph=True,
                               dynamic=False)
        np.testing.assert_allclose(traced(x).detach().numpy(), eager.detach().numpy(),
                                   atol=1e-5)
    finally:
        fast_path.set_enabled(before)


@torch_only
@pytest.mark.parametrize("raised", ["stop", "error"])
def test_a_stop_or_error_raised_while_compiling_is_one_line(raised, capsys):
    """A second Ctrl-C (or SIGTERM) during torch.compile raises Interrupted from its signal
    handler inside dynamo, which reraises it as its own error: exit_on_error unwraps it to
    its one line and exit status, as it does a KbenchError. (Here the compiler raises, which
    dynamo wraps as BackendCompilerFailed; a signal that lands in dynamo's own Python came
    out as TorchRuntimeError or InternalTorchDynamoError in one-off scripts, 2026-12-07.)"""
    import torch

    from kbench.errors import Interrupted, KbenchError, exit_on_error

    def compiler(graph, inputs):
        if raised == "stop":  # (where dynamo traced user code it appends its lines: cut)
            raise Interrupted("SIGINT", "at a second signal, without a checkpoint",
                              "run the same command again")
        raise KbenchError("a bad value: give a good one")

    torch._dynamo.reset()
    step = torch.compile(lambda x: x * 2 + 1, backend=compiler)
    with pytest.raises(SystemExit) as exit:
        exit_on_error(step, torch.ones(3))
    assert exit.value.code == (130 if raised == "stop" else 2)
    assert capsys.readouterr().err == (
        "stopped by SIGINT at a second signal, without a checkpoint: run the same command "
        "again\n" if raised == "stop" else "error: a bad value: give a good one\n")


@torch_only
def test_the_lines_dynamo_adds_to_our_message_are_cut():
    """Where a signal lands while dynamo traces (kbench.torch_step's code, in a recipe run
    stopped twice during its first compile), dynamo appends where it was tracing and how to
    learn more to the Interrupted it then wraps: the one line printed is ours alone."""
    import traceback

    from torch._dynamo import exc as dynamo_exc

    from kbench.errors import Interrupted, raised_inside

    stop = Interrupted("SIGTERM", "at a second signal, without a checkpoint", "run again")
    stop.real_stack = traceback.StackSummary.extract(traceback.walk_stack(None))
    # (config.patch, not pytest's monkeypatch, whose undo left torch's config module without
    # the attribute for the tests after it)
    with dynamo_exc.config.patch(verbose=False):  # as without TORCHDYNAMO_VERBOSE=1
        dynamo_exc.augment_exc_message(stop)  # what dynamo does to it
    assert "from user code" in str(stop) and "TORCHDYNAMO_VERBOSE" in str(stop)
    try:
        try:
            raise stop
        except Interrupted as raised:  # as convert_frame reraises it
            raise dynamo_exc.InternalTorchDynamoError(str(raised)) from None
    except dynamo_exc.InternalTorchDynamoError as wrapper:
        assert raised_inside(wrapper) is stop
    assert str(stop) == "stopped by SIGTERM at a second signal, without a checkpoint: run again"


@torch_only
def test_numpy_batches_reach_the_compiled_steps_as_tensors():
    """Keras' *_on_batch calls hand NumPy arrays to the compiled step as they come, where
    reading an array's dtype breaks the graph where the step converts them, the rest in
    pieces: kbench converts them before the step (keras_fixes._hand_compiled_steps_tensors).
    Compiled: no break but loss.backward()'s; two graphs for each train call (the second,
    with sample weights, is a new input structure), one each for test and predict; and the
    eager run's numbers (the fast path's eager step)."""
    eager, *_ = _numpy_batches_run(False)
    compiled, breaks, graphs = _numpy_batches_run(True)
    for found, expected in zip(compiled, eager):
        np.testing.assert_allclose(np.asarray(found), np.asarray(expected), rtol=1e-5)
    assert breaks and all(reason.startswith("Unsupported Tensor.backward()")
                          for reason in breaks), breaks
    assert graphs == 2 + 2 + 1 + 1, graphs  # without the conversion: 24


@torch_only
def test_compiled_steps_compile_each_batch_shape_statically_and_leave_the_process_default():
    """Keras' compiled steps compile each new batch shape with static shapes (dynamo's
    "automatic dynamic" recompile with symbolic shapes failed in inductor on the ResNets), and
    only they: the process's own torch.compile calls keep dynamo's default."""
    import keras
    import torch
    from torch._dynamo.utils import counters

    from kbench import keras_fixes

    torch._dynamo.reset()
    counters.clear()
    default = torch._dynamo.config.automatic_dynamic_shapes
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    keras_fixes.torch_compile_ready(model)
    for batch in (2, 3, 5):
        model.predict_on_batch(torch.ones(batch, 6))
    # Static: one graph per shape (automatic dynamic: 2, the third shape reusing the second's).
    assert counters["stats"]["unique_graphs"] == 3
    assert torch._dynamo.config.automatic_dynamic_shapes == default is True
    # fit and evaluate (a last partial batch each) reach their compiled steps through it too
    x, y = np.ones((5, 6), "float32"), np.zeros((5, 3), "float32")
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    model.evaluate(x, y, batch_size=2, verbose=0)
    for step in (model.train_function, model.test_function, model.predict_function):
        assert getattr(step, "_kbench_tensors", False)
    assert torch._dynamo.config.automatic_dynamic_shapes is True


def _loss_scale_steps(traced, monkeypatch):
    """Every variable after each of 8 LossScaleOptimizer.apply calls (Adam with weight decay
    and an EMA that overwrites the weights every 2 steps, growth every 2 finite steps;
    non-finite gradients at steps 2, 4 and 6; steps 4 and 5 update one of the two weights), with
    Keras' branches, or with `traced`: the selects kbench's compiled step runs, here run
    eagerly with torch.compiler.is_compiling() answering True."""
    import keras
    import torch

    from kbench import fast_path, keras_fixes

    keras_fixes.install_selects()
    fast_path.set_enabled(False)  # eagerly: Keras' own code unless `traced`
    if traced:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    a, b = keras.Variable(np.linspace(-1, 1, 3), name="a"), keras.Variable([0.5, 2.0], name="b")
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(0.1, weight_decay=0.01, use_ema=True, ema_overwrite_frequency=2),
        initial_scale=16.0, dynamic_growth_steps=2)
    optimizer.build([a, b])
    states = []
    for step in range(8):
        grads = [torch.full((3,), 0.3 * (step + 1)), torch.full((2,), -0.2)]
        if step in (2, 4):  # step 4: an EMA overwrite step (iterations 3), a subset
            grads[0][1] = float("inf")
        if step == 6:
            grads[1][0] = float("nan")
        if step in (4, 5):
            optimizer.apply(grads[:1], [a])
        else:
            optimizer.apply(grads, [a, b])
        states.append([keras.ops.convert_to_numpy(v) for v in (a, b, *optimizer.variables)])
    return states


@torch_only
def test_compiled_loss_scaling_selects_what_keras_branches_choose(monkeypatch):
    """The compiled step's LossScaleOptimizer (keras_fixes.select_in_loss_scaling) computes
    the update either way and selects: every variable, the EMA's and the weights it
    overwrites included, equals Keras' branches to the bit, across growths, skipped steps
    and a step that updates a subset of the weights."""
    from kbench import fast_path

    before = fast_path.enabled()
    try:
        keras_branches = _loss_scale_steps(False, monkeypatch)
        selects = _loss_scale_steps(True, monkeypatch)
    finally:
        fast_path.set_enabled(before)
    for keras_state, select_state in zip(keras_branches, selects):
        for expected, found in zip(keras_state, select_state):
            np.testing.assert_array_equal(found, expected)
            assert found.dtype == expected.dtype

@pytest.mark.backend_independent
def test_traceable_bind_binds_as_inspect_does():
    """The binder Layer.__call__ gets under torch.compile returns what inspect's does."""
    from kbench.keras_fixes import _bind, _Bound

    def call(inputs, training=None, mask=None, *args, scale=1.0, **kwargs):
        pass

    signature = inspect.signature(call)
    params = tuple((p.name, p.kind, p.default) for p in signature.parameters.values())
    for args, kwargs in [((1,), {}), ((1,), {"training": True}), ((1, 2, 3, 4), {"x": 5}),
                         ((), {"inputs": 1, "scale": 2.0}), ((1,), {"mask": 0, "y": 1})]:
        expected = signature.bind(*args, **kwargs)
        bound = _Bound(_bind(params, args, kwargs), params)
        assert bound.arguments == dict(expected.arguments)
        expected.apply_defaults()
        bound.apply_defaults()
        assert list(bound.arguments.items()) == list(expected.arguments.items())

    def strict(inputs, training=None):
        pass

    strict_params = tuple((p.name, p.kind, p.default)
                          for p in inspect.signature(strict).parameters.values())
    for args, kwargs in [((), {}), ((1,), {"inputs": 2}), ((1,), {"nope": 1}), ((1, 2, 3), {})]:
        with pytest.raises(TypeError):
            inspect.signature(strict).bind(*args, **kwargs)
        with pytest.raises(TypeError):
            _bind(strict_params, args, kwargs)


@torch_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_compiled_kernel_view_as_strides_is_the_permuted_kernel(dtype):
    """kbench.torch_plan hands a compiled convolution its OIHW kernel as `torch.as_strided` of
    the HWIO value (inductor copies a permuted weight, not a strided one). Under a mixed policy
    that value is a cast, an intermediate buffer whose layout inductor chooses: the strided
    view must still read the values the permute reads, for the fast path's kernel layout and
    for a contiguous one. Exact: the same convolution of the same values."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    h, w, i, o = 3, 3, 4, 8
    contiguous = torch.randn(h, w, i, o)
    laid_out = torch.empty_strided(contiguous.shape, (w * i, i, 1, h * w * i))  # fast_path's
    laid_out.copy_(contiguous)
    x = torch.randn(2, i, 6, 6).contiguous(memory_format=torch.channels_last)
    cast = getattr(torch, dtype)

    def strided(x, kernel):
        value = kernel.to(cast)
        view = value.permute(3, 2, 0, 1)
        return F.conv2d(x.to(cast), torch.as_strided(value, view.shape, view.stride()))

    def permuted(x, kernel):
        return F.conv2d(x.to(cast), kernel.to(cast).permute(3, 2, 0, 1))

    torch._dynamo.reset()
    compiled = torch.compile(strided)
    for kernel in (laid_out, contiguous):
        torch.testing.assert_close(compiled(x, kernel), permuted(x, kernel), rtol=0, atol=0)
