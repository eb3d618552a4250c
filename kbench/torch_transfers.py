"""The fast path's conversions to device tensors under torch on a GPU: none waits for the device.

Keras' torch `convert_to_tensor` makes a device tensor of a Python number with
`torch.as_tensor(x, device=...)` and moves a host tensor with `x.to(device)`. On a CUDA device
both are blocking copies from host memory, which PyTorch ends with `cudaStreamSynchronize`
(`memcpy_and_sync` in ATen's copy kernel; pytorch/pytorch#120996: `torch.tensor(3.14,
device="cuda")` syncs, `torch.full((), 3.14, device="cuda")` does not): the host waits until
the GPU has run everything queued so far, and then cannot queue ahead. An eager Keras-torch
step of kbench's recipes made 12 such conversions (counted on this CPU as
tests/test_torch_transfers.py counts them): the learning-rate schedule's constants (5), the
iteration counter's increment, the loss's class count and its divisor (the values' shape), the
loss tracker's and the accuracy's sample counts (those 4 are now kbench.torch_objective's, made
on the device), and the batch's images and labels; the native twin makes none (its batches
move from pinned memory with `non_blocking=True`, its learning rate is a Python float).

While the fast path is on, eagerly, where Keras' device is a CUDA GPU:
  - a Python bool, int or float becomes `torch.full((), x, dtype=..., device=...)`: a fill
    kernel, no copy; the same value (both convert the Python number to the dtype alike, an
    int to a float through a Python float; a number `full` refuses, such as a float32
    overflow that `as_tensor` makes inf, stays Keras');
  - a host tensor, the caller's own, moves from where it is with `non_blocking=True` (from
    pageable memory the driver stages the copy and may wait for the stream, below; PyTorch
    adds no sync of its own); one in pinned memory, which its owner may refill as soon as
    the conversion returns, moves as Keras moves it;
  - anything Keras converts through NumPy (an array, a NumPy scalar, a TensorFlow tensor: the
    batches of a tf.data pipeline, which Keras' DataLoader converts so), or a list or tuple of
    Python numbers (a shape), is copied into new page-locked ("pinned") host memory
    (`page_locked`; up to PIN_LIMIT, 512 MiB, larger ones move from where they are) and moves
    from there with `non_blocking=True`. An array or a TensorFlow tensor whose dtype Keras
    keeps (KEPT_DTYPES, and no other dtype asked) is copied there directly, once: Keras would
    first copy it into an array of its own (`np.array`; 0.9 ms for a batch of 1024 CIFAR
    images here), where a TensorFlow tensor's NumPy view costs nothing. Anything else becomes
    Keras' own host tensor first (its dtype rules), then is pinned. So batches reach the GPU
    as PyTorch practitioners feed them (a DataLoader with
    `pin_memory=True`, which pins on a thread of its own, then `.to(device,
    non_blocking=True)`; here the training thread pins). From pageable memory the CUDA
    driver first copies the data into its own pinned staging buffers and may wait for the
    stream to drain before it does (the CUDA runtime API's "API synchronization behavior"): a
    host that queues steps ahead would wait for the step queued before. From pinned memory
    the copy is a DMA queued on the stream, and the host goes on; the copy into pinned memory
    takes the place of the driver's staging copy.
Anything else (a Variable, a tensor already on the device, a list of tensors, complex
numbers, symbolic sizes, sparse or ragged requests), everything on a CPU, and everything under
torch.compile (where constants are part of the graph) is Keras' own conversion.
"""

import numpy as np
import torch

_state = {"enabled": lambda: False, "stock": None, "accelerator": {}, "core": None,
          "Variable": None}
_NUMBERS = (bool, int, float)
# The largest conversion copied through pinned memory: batches are, a one-off array of a GB
# (a big embedding's initial value) moves from where it is. PyTorch's caching host allocator
# keeps every pinned buffer it made (rounded up to a power of two) for the process's life.
PIN_LIMIT = 512 * 2**20


def install(enabled, force=False):
    """Replace Keras' torch convert_to_tensor wherever Keras holds it (every keras module that
    imported it by name), once, where torch sees a CUDA GPU (or with `force`: the tests); the
    replacement defers to Keras unless `enabled()`. Without CUDA nothing is replaced: the
    replacement would only cost its checks (about a microsecond a call, 70 calls a step)."""
    import sys

    from keras.src.backend.common.variables import Variable
    from keras.src.backend.torch import core

    _state["enabled"] = enabled
    if _state["stock"] is not None or not (force or torch.cuda.is_available()):
        return
    _state["core"], _state["Variable"] = core, Variable
    stock = _state["stock"] = core.convert_to_tensor

    def convert_to_tensor(x, dtype=None, sparse=None, ragged=None):
        if not sparse and not ragged and _state["enabled"]() \
                and not torch.compiler.is_compiling():
            device = core.get_device()
            if accelerator(device):
                found = without_sync(x, dtype, device)
                if found is not None:
                    return found
        return stock(x, dtype=dtype, sparse=sparse, ragged=ragged)

    convert_to_tensor.__doc__ = stock.__doc__
    convert_to_tensor.__wrapped__ = stock
    for name, module in list(sys.modules.items()):
        if name.startswith("keras") and getattr(module, "convert_to_tensor", None) is stock:
            module.convert_to_tensor = convert_to_tensor


def accelerator(device):
    """Whether Keras' `device` (a name: "cuda", "cuda:0", "cpu", "meta", ...) is a CUDA GPU."""
    found = _state["accelerator"].get(device)
    if found is None:
        found = _state["accelerator"][device] = torch.device(device).type == "cuda"
    return found


def without_sync(x, dtype, device):
    """Keras' convert_to_tensor(x, dtype) on `device` without a blocking host-to-device copy,
    or None where this module leaves `x` to Keras (see the module doc)."""
    core = _state["core"]
    kind = type(x)
    if kind in _NUMBERS:
        if dtype is not None:
            torch_dtype = core.to_torch_dtype(dtype)
        elif kind is bool:
            torch_dtype = torch.bool
        elif kind is int:  # Keras' rule: int32 unless the value needs 64 bits
            torch_dtype = torch.int64 if x < -(2**31) or x >= 2**31 else torch.int32
        else:
            torch_dtype = core.to_torch_dtype(core.floatx())
        try:
            # as_tensor makes a float of an int through a Python float (a double): so must
            # full, which would round an int64 to float32 directly (once, not twice)
            value = float(x) if kind is int and torch_dtype.is_floating_point else x
            return torch.full((), value, dtype=torch_dtype, device=device)
        except (RuntimeError, OverflowError):  # 1e39 as float32 (Keras: inf), 2**64, ...
            return None
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            return None
        # (not from pinned memory, which its owner may refill once the conversion returns:
        # from there a non-blocking copy would still be reading it)
        moved = x.to(device, non_blocking=not x.is_pinned())
        return moved if dtype is None else moved.to(core.to_torch_dtype(dtype))
    if isinstance(x, (_state["Variable"], torch.SymInt, torch.SymFloat, complex)):
        return None  # its value on the device already, or symbolic, or complex: Keras'
    if isinstance(x, (list, tuple)) and not (len(x) > 0 and all(type(v) in _NUMBERS for v in x)):
        return None  # empty, or holding tensors (Keras stacks them) or anything else
    # A NumPy array or scalar, or what Keras makes one of (a TensorFlow tensor: the
    # batches of a tf.data pipeline, which Keras' DataLoader converts here), or a shape.
    host = _array_kept_as_is(x)  # pinned from where it is, or from Keras' host tensor
    if host is None or host.nbytes > PIN_LIMIT or (
            dtype is not None and core.standardize_dtype(dtype) != host.dtype.name):
        with core.device_scope("cpu"):
            host = _state["stock"](x, dtype=dtype)
        if host.nbytes > PIN_LIMIT:
            return host.to(device, non_blocking=True)
    return page_locked(host).to(device, non_blocking=True)


# NumPy dtypes (native byte order) Keras' torch conversion keeps as they are (it turns
# uint16 into int32, uint32 into int64, and ml_dtypes' bfloat16 into float32 first)
KEPT_DTYPES = frozenset(map(np.dtype, ("bool", "uint8", "int8", "int16", "int32", "int64",
                                       "float16", "float32", "float64")))


def _array_kept_as_is(x):
    """`x` as a NumPy array without a copy, where it is a NumPy array or a TensorFlow eager
    tensor (np.asarray views its buffer) of a dtype Keras keeps; else None."""
    if not isinstance(x, np.ndarray):
        kind = type(x)
        if kind.__name__ != "EagerTensor" or not kind.__module__.startswith("tensorflow."):
            return None
        x = np.asarray(x)
    return x if x.dtype in KEPT_DTYPES else None


def page_locked(x):
    """A new copy of `x` (a host tensor, or a NumPy array: a read-only one too, as tf.data
    hands out) in page-locked memory, ours alone: no one refills it, and PyTorch's caching
    host allocator does not hand the buffer out again before the non-blocking copies made
    from it have run (it records an event on their stream). Needs CUDA."""
    if isinstance(x, np.ndarray):
        copy = _pinned_empty(x.shape, torch.from_numpy(np.empty(0, x.dtype)).dtype)
        copy.numpy()[...] = x  # (torch.from_numpy(x) would warn of a read-only x)
        return copy
    return _pinned_empty(x.shape, x.dtype).copy_(x)


def _pinned_empty(shape, dtype):
    """A new contiguous pinned host tensor (tests stand in for it: pinning needs CUDA)."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)
