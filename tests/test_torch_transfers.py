"""kbench.torch_transfers: on a CUDA GPU the fast path converts Python numbers, shapes and host
batches to device tensors without PyTorch's blocking copies (each a stream sync). This machine
has no GPU: the tests take the conversions' GPU route on the CPU (`accelerator` patched to say
yes), where a non-blocking move to the CPU is the tensor itself, and check that the route gives
Keras' own values, to the bit, and that an eager training step then leaves no conversion to
Keras' blocking one."""

import math

import numpy as np
import pytest

from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch's host-to-device copies")


@pytest.fixture
def gpu_route(monkeypatch, pinned_memory):
    """The fast path on, and every device taken for a CUDA GPU by torch_transfers; pinned
    memory stood in for (conftest's `pinned_memory`), `gpu_route.pinned` lists what was."""
    from kbench import fast_path, torch_transfers

    before = fast_path.enabled()
    fast_path.set_enabled(True)
    torch_transfers.install(fast_path.enabled, force=True)  # without CUDA it installs nothing
    monkeypatch.setattr(torch_transfers, "accelerator", lambda device: True)
    monkeypatch.setattr(torch_transfers, "pinned", pinned_memory, raising=False)
    yield torch_transfers
    fast_path.set_enabled(before)


def same(a, b):
    import torch

    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    if a.dtype.is_floating_point:  # bit for bit, NaNs and signed zeros included
        a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "float16", "float64", "int32",
                                   "int64", "bool"])
def test_each_conversion_is_keras_own(gpu_route, dtype):
    import tensorflow as tf
    import torch
    from keras.src.backend.torch import core

    stock = gpu_route._state["stock"]
    numbers = [0.1, 1 / 3, -0.0, 1e-45, 65520.0, math.inf, -math.inf, math.nan, 0, 7, -3,
               2**31, 2**40, 2**60 + 2**36 + 1, 2**64, True, False]  # (2**60 + 2**36 + 1
    # rounds twice as Keras makes it a float: through a double)
    arrays = [(2, 10), [1], [3, 4, 5], (0.5, 2), np.arange(6, dtype="float32").reshape(2, 3),
              np.array([1, 255], "uint8"), np.float32(2.5), np.int64(9),
              tf.constant([[1.0, 2.0]]), torch.tensor([1.5, -2.0]),
              torch.tensor([[3, 4]], dtype=torch.int64)]
    checked = 0
    for x in numbers + arrays:
        try:
            expected = stock(x, dtype=dtype)
        except (RuntimeError, OverflowError, ValueError):
            # Keras refuses it (nan as an int, 2**40 as int32, 2**64 as any int): the route
            # leaves it to Keras (None), or refuses it too
            try:
                assert gpu_route.without_sync(x, dtype, "cpu") is None, x
            except (RuntimeError, OverflowError, ValueError):
                pass
            continue
        found = gpu_route.without_sync(x, dtype, "cpu")
        if found is None:  # left to Keras: only an int beyond int64 (as a bool, Keras takes it)
            assert x == 2**64, x
            continue
        same(found, expected)
        checked += 1
    assert checked >= 20
    # What the route leaves to Keras: a float32 overflow (Keras makes it inf; torch.full
    # refuses it), a Variable, a list of tensors, an empty list.
    assert gpu_route.without_sync(1e39, "float32", "cpu") is None
    assert gpu_route.without_sync(core.Variable(np.ones(2, "float32")), dtype, "cpu") is None
    assert gpu_route.without_sync([torch.ones(2)], dtype, "cpu") is None
    assert gpu_route.without_sync([], dtype, "cpu") is None


def test_every_copy_the_route_makes_is_non_blocking(gpu_route):
    """To the `meta` device, a real move off the host that keeps no data: numbers become
    fills there (no copy), and arrays, TensorFlow tensors, shapes and host tensors arrive by
    non-blocking copies, with Keras' dtypes and shapes; a pinned host tensor, which its owner
    may refill once the conversion returns, is copied as Keras copies it (blocking)."""
    import tensorflow as tf
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    copies = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
                copies.append(kwargs.get("non_blocking", False))
            return func(*args, **(kwargs or {}))

    stock = gpu_route._state["stock"]
    moved = [np.ones((2, 3), "float32"), np.array([1, 2], "uint8"), np.float32(2.5),
             tf.constant([[1.0, 2.0]]), (2, 10), [0.5, 1], torch.ones(4)]
    for x in moved + [0.5, 3, True]:
        with Watch():
            found = gpu_route.without_sync(x, None, "meta")
        expected = stock(x)  # on the CPU: Keras' dtype and shape
        assert (found.device.type, found.dtype, found.shape) == \
            ("meta", expected.dtype, expected.shape), x
    assert copies == [True] * len(moved)  # one each, non-blocking; none for the numbers
    # each from a pinned copy of its own, but a host tensor (the caller's, moved from where
    # it is); nothing pinned for a number
    assert len(gpu_route.pinned) == len(moved) - 1
    copies.clear()
    pinned = torch.ones(4)
    pinned.is_pinned = lambda: True  # (pinning itself needs CUDA)
    with Watch():
        gpu_route.without_sync(pinned, None, "meta")
    assert copies == [False]


def test_batches_move_from_pinned_memory_of_their_own(gpu_route):
    """A batch (a read-only NumPy array, as tf.data hands out, or a TensorFlow tensor) is
    copied once into pinned memory, which no one else holds, and its values, Keras' dtype
    (dtype= included) and shape arrive; no warning about the read-only array."""
    import warnings

    import tensorflow as tf
    import torch

    stock = gpu_route._state["stock"]
    images = np.arange(24, dtype="float32").reshape(2, 2, 2, 3)
    images.setflags(write=False)
    for x, dtype in [(images, None), (images, "bfloat16"), (tf.constant(images), None),
                     (np.array([[0, 1]], "uint8"), "float32")]:
        gpu_route.pinned.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            found = gpu_route.without_sync(x, dtype, "cpu")
        same(found, stock(x, dtype=dtype))
        (host,) = gpu_route.pinned
        same(host, stock(x, dtype=dtype))  # what was pinned: the batch in Keras' dtype
    # A batch of a dtype Keras keeps goes into pinned memory directly, without Keras' own
    # copy (np.array) first; a dtype Keras changes (asked for, or its own rules: uint32 ->
    # int64, the TF tensor's float64 when float32 is asked) goes through Keras
    through_keras = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(gpu_route._state, "stock",
                      lambda x, dtype=None, **kw: through_keras.append(dtype) or stock(x, dtype))
        for x, dtype, keras_copies in [
                (images, None, 0), (images, "float32", 0), (tf.constant(images), None, 0),
                (np.array([[0, 1]], "int64"), None, 0), (np.array([True]), "bool", 0),
                (images[:, ::-1], None, 0), (np.asfortranarray(images[0, 0]), None, 0),
                (np.array(2.5, "float16"), None, 0), (images, torch.float32, 0),
                (tf.constant([1.5], tf.float64), None, 0),  # Keras keeps an array's float64
                (images, "bfloat16", 1), (np.array([7], "uint32"), None, 1),
                (tf.constant([1.5], tf.float64), "float32", 1)]:
            through_keras.clear()
            gpu_route.pinned.clear()
            same(gpu_route.without_sync(x, dtype, "cpu"), stock(x, dtype=dtype))
            assert len(through_keras) == keras_copies and len(gpu_route.pinned) == 1, (x, dtype)
        through_keras.clear()
        with pytest.raises(ValueError, match="byte order"):  # Keras' to refuse, as it does
            gpu_route.without_sync(np.array([1.5], ">f4"), None, "cpu")
        assert through_keras == [None]
    # beyond PIN_LIMIT an array moves from where it is (non-blocking), not pinned
    gpu_route.pinned.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_route, "PIN_LIMIT", images.nbytes - 1)
        same(gpu_route.without_sync(images, None, "cpu"), stock(images))
    assert gpu_route.pinned == []
    # page_locked takes NumPy arrays too (the native twin's batches), read-only ones quietly,
    # and copies a host tensor even where it is pinned already: a buffer of its own
    gpu_route.pinned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = gpu_route.page_locked(images)
    same(copy, torch.from_numpy(images.copy()))
    assert copy is gpu_route.pinned[0] and copy.data_ptr() != images.ctypes.data
    host = torch.ones(3)
    host.is_pinned = lambda: True
    copy = gpu_route.page_locked(host)
    same(copy, host)
    assert copy is gpu_route.pinned[1] and copy.data_ptr() != host.data_ptr()


def test_an_eager_step_leaves_no_conversion_to_a_blocking_copy(gpu_route):
    """Keras' conversions in kbench's eager ResNet-20 training (fit on a tf.data pipeline,
    its DataLoader, SGD and its warmup + cosine schedule) all take the route, and training
    computes the same numbers as with Keras' own conversions."""
    import torch
    from keras.src.backend.common import global_state
    from torch.overrides import TorchFunctionMode

    from kbench import train
    from kbench.recipe import load_recipe

    blocking = []

    class Watch(TorchFunctionMode):
        # Keras' blocking conversion: torch.as_tensor(data, device=Keras' device); the route's
        # own host conversion runs inside device_scope("cpu")
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (getattr(func, "__name__", "") in ("as_tensor", "tensor") and args
                    and not isinstance(args[0], torch.Tensor)
                    and (kwargs or {}).get("device") is not None
                    and global_state.get_global_attribute("torch_device") is None):
                blocking.append(type(args[0]).__name__)
            return func(*args, **(kwargs or {}))

    recipe = load_recipe("cifar_resnet")
    config = recipe.Config(dataset="synthetic", model="resnet20", batch_size=2,
                           train_examples=8, test_examples=8, epochs=2, warmup_epochs=1.0,
                           jit_compile="off", verbose=0)

    def trained(route):
        if not route:
            gpu_route.accelerator = lambda device: False  # (monkeypatch restores it)
        train.setup_run(config)
        model = recipe.build_model(config)
        train.compile_model(model, config, steps_per_epoch=2)
        train_ds, _ = recipe.build_datasets(config)
        with Watch():
            history = model.fit(train_ds.dataset.repeat(), steps_per_epoch=2, epochs=2,
                                verbose=0)
        return history.history["loss"], [v.numpy() for v in model.weights]

    route_losses, route_weights = trained(route=True)
    assert blocking == []
    # every step's images and labels came through pinned memory (as did the initial weights,
    # NumPy arrays made variables)
    shapes = [tuple(t.shape) for t in gpu_route.pinned]
    assert shapes.count((2, 32, 32, 3)) >= 4 and shapes.count((2, 10)) >= 4, shapes
    keras_losses, keras_weights = trained(route=False)
    # Keras' own route: the batch's images and labels, the schedule's 5 constants and the
    # step counter's increment, 8 a step (12 before kbench.torch_objective took the loss's
    # and the metrics' 4), and a few at the epoch's end
    assert blocking.count("ndarray") >= 2 * 4 and len(blocking) >= 8 * 4, blocking
    assert route_losses == keras_losses
    for a, b in zip(route_weights, keras_weights, strict=True):
        np.testing.assert_array_equal(a, b)
