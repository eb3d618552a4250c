"""The CIFAR ResNet training loop in plain PyTorch: the twins Keras-on-PyTorch is timed against.

Same network, initial weights, batches, loss and optimizer as `recipes/cifar_resnet.py` (see
native_common), written the way PyTorch practitioners train a CNN: an nn.Module with nn.Conv2d
and nn.BatchNorm2d, model and inputs in `channels_last` memory, on a GPU each batch copied
from pinned host memory without blocking (`host_copy`), autograd, the optimizer update
as `torch._foreach_*` ops, and under a mixed dtype policy `torch.autocast` to its compute dtype
over float32 master weights (a `torch.amp.GradScaler` with Keras' LossScaleOptimizer settings
under mixed_float16). Two twins:

- `native-torch` (run(config, ...)): eager; on CUDA with `torch.backends.cudnn.benchmark` as
  the run's --cudnn-benchmark sets it (on by default, as for the Keras runs).
- `native-torch-compiled` (run(config, ..., compiled=True)): the same step under torch.compile
  (inductor, default mode), in the two regions PyTorch's own tutorials compile: the forward
  pass with the loss (dynamo cannot trace `loss.backward()`, so AOTAutograd compiles the
  backward with it and autograd runs that), and the optimizer step (lr passed as a tensor so a
  new learning rate does not recompile it). Compiling is on the clock of the first step
  (compile_s); evaluation runs the same module eagerly, off the clock.

    run(config, steps, warmup_steps=2, compiled=False) -> dict   # timed training + evaluation
    forward(config, images) -> logits                            # inference, initial weights

Why not torch.optim.SGD(fused=True): its momentum buffer does not hold the learning rate
(Keras': m = momentum * m - lr * g) and its weight decay is L2 on the gradient, not Keras'
decoupled w -= lr * wd * w, so under a changing learning rate it trains something else.

Measured on a 2-core AMD EPYC (AVX-512) with torch 2.13, ResNet-20, batch 128, eager, float32,
median of 20 steps of run(): channels_last 127-130 ms, contiguous NCHW 165 ms (both oneDNN), so
the model and its inputs are channels_last (the NCHW view of a NHWC batch already is). Torch's
default 2 threads beat torch.set_num_threads(1) (223 ms), so threads are left alone. (These CPU
figures came in with commit `ea0545e`, 2026-11-23, timing that day's run(); not re-run since.)
On an H200, plain PyTorch ResNet-20 at batch 1024 took 36.7 ms/step eager NCHW float32, 9.6
with channels_last + cudnn.benchmark + bf16 autocast, 7.7 compiled (2026-12-04, issue 20's
measurements of a plain PyTorch program, outside kbench; not re-run since): the CUDA settings
here are those.

Two differences from Keras' maths are kept because they are what PyTorch does: nn.BatchNorm2d's
moving variance takes the unbiased batch variance, n/(n-1) times Keras' biased one (n = batch * H
* W, at least 8192 at batch 128; ResNet-20, batch 128, 25 steps: test loss 1.69163 instead of
1.69182 with Keras' update, the same test accuracy); and autocast computes the pixel
normalization in float32 where Keras computes it in the compute dtype (one rounding less).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kbench import torch_transfers
from kbench.bench import native_common as common


MEMORY_FORMAT = torch.channels_last  # on CPU (measured, above) and on CUDA (cuDNN's fast NHWC)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- model


class Normalize(nn.Module):
    """keras.layers.Normalization with fixed statistics: (x - mean) / std, per channel."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv3x3(in_channels, out_channels, stride):
    # padding=1 on both sides, as PyTorch's ResNets, also at stride 2, where Keras' "same"
    # pads 0 before and 1 after: the network runs on mirrored images (see flip_images).
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def flip_images(x):
    """Mirror NCHW images in height and width: the twins' networks run on mirrored images.

    Keras' padding="same" pads a stride-2 3x3 convolution by 0 pixels before and 1 after
    (TensorFlow's convention), which torch.nn.Conv2d cannot express; an explicit F.pad before
    each such conv can, but costs its own copies, and under torch.compile on a CPU much more
    (inductor's CPU code for the pad fused into BatchNorm's kernel). ResNet-20, batch 128,
    this twin's step with pads against mirrored, interleaved in one process on our 2-core
    Intel Xeon (2026-12-07, a one-off script): compiled 130.4 against 100.8 ms/step under
    mixed_bfloat16, 191.3 against 169.2 in float32; eager 107.2 against 104.5 and 178.1
    against 175.2, the same losses to round-off. Mirrored, the padding becomes 1
    before and 0 after, and with the kernels mirrored too a stride-2 conv with padding=1 is
    then exactly Keras' conv, mirrored, as are stride-1 convs, BatchNorm, ReLU and the sums;
    option A shortcuts take the odd pixels instead of the even ones (the same pixels,
    mirrored), and global average pooling ends the mirroring: the logits are Keras'. One
    flip of the 3-channel input per step (fused with the normalization when compiled)
    replaces the pads, so the twin is a plain padding=1 network, as PyTorch users write it,
    that computes Keras' model. This needs even heights and widths before every stride-2
    layer (an odd one gets 1 pixel on each side from Keras too): 32, 16 and 8 here, as the
    twins take CIFAR-shaped data only (native_common)."""
    return x.flip(2, 3)


def batch_norm(channels):
    # torch's momentum weighs the new batch: 1 - Keras' momentum.
    return nn.BatchNorm2d(channels, eps=common.BN_EPSILON, momentum=1 - common.BN_MOMENTUM)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU; "option A" shortcut when downsampling."""

    def __init__(self, in_channels, filters, stride):
        super().__init__()
        self.stride = stride
        self.conv1 = conv3x3(in_channels, filters, stride)
        self.bn1 = batch_norm(filters)
        self.conv2 = conv3x3(filters, filters, 1)
        self.bn2 = batch_norm(filters)
        extra = filters - in_channels
        self.channel_pad = (extra // 2, extra - extra // 2)  # as kbench's ShortcutPad

    def forward(self, x):
        shortcut = x
        if self.stride != 1:  # Keras' even pixels, mirrored: the odd ones (flip_images)
            shortcut = F.pad(x[:, :, 1::2, 1::2], (0, 0, 0, 0, *self.channel_pad))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(shortcut + y)


class CifarResNet(nn.Module):
    """kbench.models.resnet.cifar_resnet in NCHW: raw 0..255 pixels in, logits out."""

    def __init__(self, depth, num_classes, pixel_mean, pixel_std):
        super().__init__()
        self.normalize = Normalize(pixel_mean, pixel_std)
        self.conv = conv3x3(len(pixel_mean), common.WIDTHS[0], 1)
        self.bn = batch_norm(common.WIDTHS[0])
        blocks, channels = [], common.WIDTHS[0]
        for filters, stride in common.stage_plan(depth):
            blocks.append(BasicBlock(channels, filters, stride))
            channels = filters
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.normalize(flip_images(x)))))
        x = self.blocks(x)
        # Keras' logits layer computes in float32 under a mixed policy: so does this head.
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(x.mean(dim=(2, 3)).float())

    def convs_and_bns(self):
        """(conv, bn) pairs in the order the network applies them (= ResNetWeights order)."""
        pairs = [(self.conv, self.bn)]
        for block in self.blocks:
            pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        return pairs


class PreActBlock(nn.Module):
    """BN-ReLU, then conv-BN-ReLU-conv, plus the input (or its 1x1 projection of the
    pre-activated input where the shape changes): kbench.models.resnet.preact_resnet18's."""

    def __init__(self, in_channels, filters, stride):
        super().__init__()
        self.stride = stride
        self.bn1 = batch_norm(in_channels)
        self.conv1 = conv3x3(in_channels, filters, stride)
        self.bn2 = batch_norm(filters)
        self.conv2 = conv3x3(filters, filters, 1)
        # Keras' 1x1 stride-2 "same" conv pads nothing and samples pixels 0, 2, ...; on
        # mirrored images (flip_images) those are the odd pixels, sliced before a stride-1 conv.
        self.shortcut = (nn.Conv2d(in_channels, filters, 1, bias=False)
                         if stride != 1 or in_channels != filters else None)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(pre if self.stride == 1 else pre[:, :, 1::2, 1::2])
        y = F.relu(self.bn2(self.conv1(pre)))
        return shortcut + self.conv2(y)


class PreActResNet18(nn.Module):
    """kbench.models.resnet.preact_resnet18 in NCHW: raw 0..255 pixels in, logits out."""

    def __init__(self, num_classes, pixel_mean, pixel_std):
        super().__init__()
        self.normalize = Normalize(pixel_mean, pixel_std)
        self.conv = conv3x3(len(pixel_mean), common.PREACT_WIDTHS[0], 1)
        self.blocks = nn.Sequential(*(PreActBlock(*block) for block in common.preact_plan()))
        self.bn = batch_norm(common.PREACT_WIDTHS[-1])
        self.fc = nn.Linear(common.PREACT_WIDTHS[-1], num_classes)

    def forward(self, x):
        x = self.blocks(self.conv(self.normalize(flip_images(x))))
        x = F.relu(self.bn(x))
        with torch.autocast(x.device.type, enabled=False):  # as CifarResNet's head
            return self.fc(x.mean(dim=(2, 3)).float())

    def layers_in_order(self):
        """(3x3 convs, 1x1 shortcut convs, BNs) in the order the network applies them (=
        ResNetWeights order)."""
        convs, shortcuts, bns = [self.conv], [], []
        for block in self.blocks:
            convs += [block.conv1, block.conv2]
            bns += [block.bn1, block.bn2]
            shortcuts += [block.shortcut] if block.shortcut is not None else []
        return convs, shortcuts, bns + [self.bn]


def build_model(weights):
    """A CifarResNet or PreActResNet18 holding the Keras model's initial weights
    (ResNetWeights)."""
    if weights.model == "preact_resnet18":
        model = PreActResNet18(weights.num_classes, weights.pixel_mean, weights.pixel_std)
        convs, shortcuts, bns = model.layers_in_order()
    else:
        model = CifarResNet(weights.depth, weights.num_classes, weights.pixel_mean,
                            weights.pixel_std)
        convs, bns = zip(*model.convs_and_bns())
        shortcuts = []
    with torch.no_grad():
        for conv, kernel in zip([*convs, *shortcuts], [*weights.convs, *weights.shortcuts],
                                strict=True):
            # Keras kernels are (kh, kw, in, out); torch's are (out, in, kh, kw), here
            # mirrored as the images are (flip_images).
            conv.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1).flip(2, 3))
        for bn, stats in zip(bns, weights.bns, strict=True):
            bn.weight.copy_(torch.from_numpy(stats["gamma"]))
            bn.bias.copy_(torch.from_numpy(stats["beta"]))
            bn.running_mean.copy_(torch.from_numpy(stats["moving_mean"]))
            bn.running_var.copy_(torch.from_numpy(stats["moving_variance"]))
        model.fc.weight.copy_(torch.from_numpy(weights.dense_kernel).T)
        model.fc.bias.copy_(torch.from_numpy(weights.dense_bias))
    return model


def decayed_and_plain(model):
    """Parameters that get weight decay (conv and dense kernels) and those that do not (BN
    gamma/beta, the dense bias), as Keras' exclude_from_weight_decay(["gamma", "beta", "bias"])."""
    decayed = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ids = {id(p) for p in decayed}
    return decayed, [p for p in model.parameters() if id(p) not in ids]


# --------------------------------------------------------------------------- optimizer


class KerasSGD:
    """keras.optimizers.SGD with decoupled weight decay, as Keras' own torch backend runs it.

    Keras keeps the learning rate inside the momentum buffer (m = momentum * m - lr * g), which
    torch.optim.SGD does not, and decays kernels by w *= 1 - lr * wd before the gradient step.
    `step(lr)` takes lr as a float or a 0-d tensor (what a compiled step needs); `param_groups`
    is what torch.amp.GradScaler reads to unscale and check the gradients.
    """

    def __init__(self, decayed, plain, momentum, nesterov, weight_decay):
        self.decayed = decayed
        self.params = decayed + plain
        self.param_groups = [{"params": self.params}]
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.momenta = [torch.zeros_like(p) for p in self.params] if momentum else []

    @torch.no_grad()
    def step(self, lr):
        grads = [p.grad for p in self.params]
        if self.weight_decay:  # w -= lr * wd * w, written as Keras' torch backend writes it
            torch._foreach_mul_(self.decayed, 1 - self.weight_decay * lr)
        scaled = torch._foreach_mul(grads, lr)  # lr * g
        if not self.momentum:
            torch._foreach_sub_(self.params, scaled)
            return
        torch._foreach_mul_(self.momenta, self.momentum)
        torch._foreach_sub_(self.momenta, scaled)
        if self.nesterov:  # w += momentum * m - lr * g
            torch._foreach_sub_(self.params, scaled)
            torch._foreach_add_(self.params, self.momenta, alpha=self.momentum)
        else:
            torch._foreach_add_(self.params, self.momenta)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


# --------------------------------------------------------------------------- steps


def to_device(images, labels, device):
    """A NumPy batch (NHWC images, one-hot labels) -> (NCHW images, labels) on `device`."""
    return (images_to_device(images, device),
            host_copy(labels, device).to(device, non_blocking=True))


def images_to_device(images, device):
    # The NCHW view of NHWC memory already is channels_last: on CPU no second copy is made,
    # and to a GPU the copy is one transfer of the whole buffer.
    x = host_copy(images, device).permute(0, 3, 1, 2)
    return x.to(device, memory_format=MEMORY_FORMAT, non_blocking=True)


def host_copy(array, device):
    """`array` (tf.data's, read-only) as a host tensor of its own to move to `device`: for a
    CUDA GPU in page-locked memory, as a DataLoader with pin_memory=True hands batches out
    (pinned here on the training thread), so that the non-blocking copy to the GPU never
    waits for the steps queued before it (from pageable memory the driver stages it and may
    wait: kbench.torch_transfers); one host copy, where the private copy and the driver's
    staging made two."""
    if device.type == "cuda":
        return torch_transfers.page_locked(array)
    return torch.from_numpy(array.copy())


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _describe(device):
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _prepare(config, device):
    """(ResNetWeights, model on device in channels_last, autocast context factory).
    cudnn.benchmark is the run's setting (--cudnn-benchmark, on by default), set with the
    Keras runs' in the prologue (native_common.training_plan), not here."""
    weights = common.initial_weights(config)
    model = build_model(weights).to(device, memory_format=MEMORY_FORMAT)
    dtype = common.autocast_dtype(config)

    def autocast():
        # Under float32 a disabled autocast: the step is the same code for every policy.
        return torch.autocast(device.type, dtype=TORCH_DTYPES[dtype or "bfloat16"],
                              enabled=dtype is not None)

    return weights, model, autocast


def settings(config, device, compiled):
    """The record's execution settings (records.SETTING_FIELDS) of this twin's run."""
    return {"compiler": "torch.compile" if compiled else "eager",
            "memory_format": "channels_last",
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "autocast_dtype": common.autocast_dtype(config)}


# --------------------------------------------------------------------------- entry points


def run(config, steps, warmup_steps=2, epochs=None, sync_every=1, compiled=False):
    """Train `1 + warmup_steps + steps` steps (with `epochs`: that many epochs in all),
    evaluate on the test split; eager, or with `compiled` under torch.compile (see the module
    doc and native_common.timed_training for what each number means)."""
    train_ds, test_ds, steps, rates, probe = common.training_plan(config, steps,
                                                                  warmup_steps, epochs)
    device = _device()
    weights, model, autocast = _prepare(config, device)
    optimizer = KerasSGD(*decayed_and_plain(model), config.momentum, config.nesterov,
                         config.weight_decay)
    scaling = common.loss_scale(config)
    # Under mixed_float16: Keras' LossScaleOptimizer, as GradScaler (same rules; it reads
    # one flag per step from the device to decide whether to skip the update).
    scaler = None if scaling is None else torch.amp.GradScaler(
        device.type, init_scale=scaling.initial_scale, growth_interval=scaling.growth_steps)
    # No reset of the peak memory statistics here: every row's peak_device_mb is its whole
    # process's (setup, compiling, cudnn.benchmark's trials, training, evaluation), as JAX,
    # which cannot reset its peak, and Keras-torch's rows report theirs.

    def forward_loss(x, y):
        with autocast():
            return F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)

    update = optimizer.step
    if compiled:
        forward_loss = torch.compile(forward_loss)
        update = torch.compile(update)
        # The compiled update takes the learning rate as a device tensor: a Python float
        # would be a constant of the graph, recompiled at every new value.
        rates = torch.tensor(rates, dtype=torch.float32, device=device)
        optimizer.step = update  # what GradScaler.step calls under mixed_float16

    def step_fn(step, images, labels):
        x, y = to_device(images, labels, device)
        loss = forward_loss(x, y)
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            update(rates[step])
        else:
            scaler.scale(loss).backward()
            # GradScaler.step unscales and checks the gradients, then calls optimizer.step.
            scaler.step(optimizer, rates[step])
            scaler.update()
        # Reading the loss (a copy queued on the stream after the update) waits for the step.
        return loss.detach()

    @torch.inference_mode()
    def eval_fn(images, labels):
        x, y = to_device(images, labels, device)
        with autocast():
            logits = model(x)
        # Keras' model.evaluate reports the compiled loss, label smoothing included.
        losses = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing,
                                 reduction="none")
        hits = logits.argmax(-1) == y.argmax(-1)
        # per example: common.evaluate cuts off a padded batch's extra
        return losses.cpu().numpy(), hits.cpu().numpy()

    def test_accuracy():  # of the weights trained so far, BN in inference mode; then train on
        model.eval()
        accuracy = common.evaluate(test_ds, eval_fn)["test_accuracy"]
        model.train()
        return accuracy

    model.train()
    compile_s, step_times, steps_timed, losses = common.timed_training(
        train_ds, step_fn, steps, warmup_steps, sync_every, probe, accuracy_fn=test_accuracy,
        watch_syncs=device.type == "cuda", mixed=common.compute_dtype(config) != "float32")
    model.eval()
    test = common.evaluate(test_ds, eval_fn)
    return {
        "compile_s": compile_s,
        "step_times": step_times,
        "steps_timed": steps_timed,
        "train_loss_history": losses,
        **test,
        "peak_device_mb": (torch.cuda.max_memory_allocated(device) / 2**20
                           if device.type == "cuda" else None),
        **weights.flops_result(config.batch_size),
        "device": _describe(device),
        "jit": ("torch.compile (inductor, default mode): forward + loss, optimizer step"
                if compiled else "eager"),
        "params": weights.count(),  # incl. BN moving statistics, as keras count_params()
        **settings(config, device, compiled),
        **(probe.summary() if probe else {}),
    }


def forward(config, images):
    """Logits of the native network at its initial weights, BN in inference mode."""
    device = _device()
    _, model, autocast = _prepare(config, device)
    model.eval()
    with torch.inference_mode(), autocast():
        return model(images_to_device(images, device)).float().cpu().numpy()
