"""Keras-torch under `--jit-compile on`: Keras' train step under torch.compile, made traceable
by kbench.keras_fixes.torch_compile_ready, trains as the eager step does, in one graph before
loss.backward() and one after, without recompiling in the steady state."""

import inspect

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


@torch_only
# torch.compile on CPU: ~80 s of CPU time (14 min on 2 overloaded cores)
def test_compiled_training_matches_eager_without_graph_breaks():
    eager, *_ = _tiny_run("off")
    compiled, breaks, graphs_after_1, graphs = _tiny_run("on")
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert len(set(np.round(eager, 4))) > 1  # it trained: the loss moved
    # The only break is the one every compiled step that calls loss.backward() has (dynamo
    # counts it once per attempt at the frame: its first trace, and the restart at the break).
    assert breaks and all(reason.startswith("Unsupported Tensor.backward()") for reason in breaks), \
        breaks
    assert graphs == graphs_after_1, "the steady state recompiled"


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
