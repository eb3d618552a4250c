"""What the native reference loops (plain JAX + optax, plain TensorFlow, plain PyTorch) share with each other and
with the Keras runs they are compared against.

A native twin must train the very same thing as the Keras run, so everything that defines
"the same thing" comes from kbench itself, never from a recipe module: the initial weights are
copied out of the Keras model kbench's registry builds, the batches come from kbench.tasks'
tf.data pipeline, the learning rate is the Keras schedule evaluated at each step, and the clock is read exactly where `kbench.train.StepTimer`
reads it for Keras. Only the model and the update step are written per framework.
"""

import dataclasses
import math
import time

import numpy as np

from kbench import train
from kbench.bench.compare import CIFAR_RESNETS, TWIN_MODELS  # what each framework's twin has
from kbench.errors import KbenchError
from kbench.evaluation import pad_rows

# The data sets whose images the twins' networks take (32x32x3).
CIFAR_DATASETS = ("cifar10", "cifar100", "synthetic")
# The CIFAR ResNets of kbench.models.resnet.cifar_resnet that have native twins.
CIFAR_RESNET_DEPTHS = {name: int(name[len("resnet"):]) for name in CIFAR_RESNETS}
WIDTHS = (16, 32, 64)
# kbench.models.resnet.preact_resnet18: a 64-wide stem, then 2 pre-activation blocks per stage.
PREACT_WIDTHS = (64, 128, 256, 512)
# BatchNormalization as kbench.models.resnet.BN builds it (Keras momentum; torch's is 1 - this).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# The compute dtype of each dtype policy the twins implement. As Keras runs a mixed policy, so
# do they: float32 variables (master weights) and optimizer, convolutions and activations in the
# compute dtype, BatchNorm in float32 (its statistics too), the logits and loss in float32.
COMPUTE_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}

# What each twin's result reports (records.SETTING_FIELDS says what the settings mean).
SETTING_KEYS = ("compiler", "memory_format", "cudnn_benchmark", "autocast_dtype")
RESULT_KEYS = ("compile_s", "step_times", "steps_timed", "train_loss_history", "test_loss",
               "test_accuracy", "peak_device_mb", "flops_per_step", "flops_source", "device",
               "jit", "params", *SETTING_KEYS)


# --------------------------------------------------------------------------- config


def resnet_depth(model_name):
    """Depth of a CIFAR ResNet name ('resnet20' -> 20); other models have no native twin."""
    if model_name not in CIFAR_RESNET_DEPTHS:
        raise KbenchError(f"native reference has no model {model_name!r}; it covers the CIFAR "
                          f"ResNets only: {', '.join(CIFAR_RESNET_DEPTHS)}")
    return CIFAR_RESNET_DEPTHS[model_name]


def check_model(model_name, framework):
    """Refuse a model the framework's twin does not implement (TWIN_MODELS)."""
    if model_name not in TWIN_MODELS[framework]:
        raise KbenchError(f"native reference has no model {model_name!r} under {framework}; "
                          f"its {framework} twin covers {', '.join(TWIN_MODELS[framework])}")


def check_config(config):
    """Refuse what the native loops do not implement, instead of timing something else: they
    train a model of TWIN_MODELS (the CIFAR ResNets and PreAct ResNet-18;
    checked for the framework Keras runs here, which is the twin's: compare starts each twin
    under its own KERAS_BACKEND) with SGD (momentum, Nesterov, decoupled weight decay, label smoothing)
    on Keras' cosine schedule with linear warmup, under the float32, mixed_bfloat16 or
    mixed_float16 policy, without gradient clipping, on one device."""
    from kbench import backend

    # A twin runs where Keras runs its framework (it builds the Keras model for its weights).
    check_model(config.model, backend.name())
    refused = unsupported_setting(config)
    if refused:
        what, fix = refused
        raise KbenchError(f"native reference implements {what}; use {fix} to compare "
                          "against it")


def unsupported_setting(config):
    """(what the twins implement, the setting to use instead) for the first setting of
    `config` other than its model that no twin implements, or None. compare leaves the twins
    out of a plan with one (kbench.bench.compare.twins_of); a twin refuses it."""
    refusals = (
        (getattr(config, "optimizer", "sgd") != "sgd",
         f"SGD only, not {getattr(config, 'optimizer', None)!r}", "--set optimizer=sgd"),
        (getattr(config, "schedule", "cosine") != "cosine",
         f"the cosine schedule only, not {getattr(config, 'schedule', None)!r}",
         "--set schedule=cosine"),
        (bool(getattr(config, "clip_norm", 0.0)),
         f"no gradient clipping (clip_norm {getattr(config, 'clip_norm', None)})",
         "--set clip_norm=0"),
        (config.dtype_policy not in COMPUTE_DTYPES,
         f"the dtype policies {', '.join(COMPUTE_DTYPES)} only, not {config.dtype_policy!r}",
         "--dtype-policy float32"),
        (getattr(config, "distribute", "none") != "none", "one device only",
         "--distribute none"),
        (config.dataset not in CIFAR_DATASETS,
         f"the CIFAR-shaped data sets only ({', '.join(CIFAR_DATASETS)}), not "
         f"{config.dataset!r}", "--dataset synthetic"),
    )
    return next(((what, fix) for refused, what, fix in refusals if refused), None)


def compute_dtype(config):
    """The dtype the network computes in under the config's policy ("float32", "bfloat16",
    "float16")."""
    return COMPUTE_DTYPES[config.dtype_policy]


def autocast_dtype(config):
    """The record's autocast_dtype: the compute dtype under a mixed policy, None in float32."""
    dtype = compute_dtype(config)
    return None if dtype == "float32" else dtype


@dataclasses.dataclass(frozen=True)
class LossScale:
    """Dynamic loss scaling as Keras runs it under mixed_float16 (model.compile wraps the
    optimizer in a keras.optimizers.LossScaleOptimizer with its defaults): the loss is
    multiplied by `scale`, the gradients divided by it; a step whose gradients are not all
    finite is skipped and halves the scale, `growth_steps` finite steps in a row double it."""

    initial_scale: float
    growth_steps: int


def loss_scale(config):
    """Keras' LossScaleOptimizer defaults (read from Keras) under mixed_float16, else None.
    One difference is kept: on a skipped step Keras' learning-rate schedule holds (its
    optimizer's step counter does not move), the twins' moves on with the step, as a PyTorch
    scheduler does with torch.amp.GradScaler. Skips are rare: the first steps of a run
    (until the scale fits) and one per 2000 steps after."""
    if config.dtype_policy != "mixed_float16":
        return None
    import inspect

    import keras

    defaults = inspect.signature(keras.optimizers.LossScaleOptimizer).parameters
    return LossScale(float(defaults["initial_scale"].default),
                     int(defaults["dynamic_growth_steps"].default))


def preact_plan():
    """(in_channels, filters, stride) of PreAct ResNet-18's blocks, in order: 2 per stage, the
    first of stages 2-4 downsampling; a block whose shape changes has a 1x1 projection."""
    plan, channels = [], PREACT_WIDTHS[0]
    for stage, filters in enumerate(PREACT_WIDTHS):
        for block in range(2):
            plan.append((channels, filters, 2 if stage > 0 and block == 0 else 1))
            channels = filters
    return plan


def stage_plan(depth):
    """(filters, stride) of every basic block, in order: 3 stages of (depth - 2) / 6 blocks,
    the first block of stages 2 and 3 downsampling, as cifar_resnet builds them."""
    blocks = (depth - 2) // 6
    return [(filters, 2 if stage > 0 and block == 0 else 1)
            for stage, filters in enumerate(WIDTHS) for block in range(blocks)]


# --------------------------------------------------------------------------- weights


@dataclasses.dataclass
class ResNetWeights:
    """A CIFAR ResNet's weights as NumPy arrays, in Keras layouts, in the order they are used.

    convs[0] / bns[0] are the stem; block i uses convs[1 + 2i], convs[2 + 2i] and the BNs with the
    same indices. Kernels are HWIO (kh, kw, in, out); the dense kernel is (in, out).

    PreAct ResNet-18 (`model` "preact_resnet18", depth 18): convs[0] is the stem (no BN);
    block i uses bns[2i] (its pre-activation), convs[1 + 2i], bns[2i + 1], convs[2 + 2i], and
    the next of `shortcuts` (1x1 kernels) where preact_plan() says it projects; bns[-1] is the
    BN before the head.
    """

    depth: int
    num_classes: int
    pixel_mean: np.ndarray  # (C,) raw-pixel mean of the Normalization layer
    pixel_std: np.ndarray  # (C,) what Normalization divides by: max(sqrt(variance), epsilon)
    convs: list
    bns: list  # dicts with gamma, beta, moving_mean, moving_variance
    dense_kernel: np.ndarray
    dense_bias: np.ndarray
    model: str = "cifar_resnet"  # or "preact_resnet18"
    shortcuts: list = dataclasses.field(default_factory=list)  # PreAct's 1x1 projections
    # The Keras model's analytic FLOPs of one example's forward pass (kbench.bench.flops), so
    # that a twin's TFLOP/s is counted as its Keras row's is, with or without that row.
    forward_flops: int | None = None

    def count(self):
        """Number of values incl. BN moving statistics (what keras' count_params() counts); the
        Normalization constants are not counted, as Keras does not count them either."""
        arrays = [*self.convs, *self.shortcuts, *(v for bn in self.bns for v in bn.values()),
                  self.dense_kernel, self.dense_bias]
        return int(sum(a.size for a in arrays))

    def flops_result(self, batch_size):
        """A twin result's FLOP count of one training step and where it comes from."""
        from kbench.bench import flops

        return {"flops_per_step": 3 * self.forward_flops * batch_size if self.forward_flops
                else None, "flops_source": flops.SOURCE if self.forward_flops else None}


def build_keras_model(config):
    """The Keras model the Keras runs train (kbench's registry, seeded the same way)."""
    from kbench import data
    from kbench.models import get_model

    check_config(config)
    train.setup_run(config)
    return get_model(config.model, num_classes=data.num_classes(config.dataset),
                     seed=config.seed)


def initial_weights(config):
    """Copy the initial weights out of the recipe's Keras model (see ResNetWeights)."""
    import keras

    from kbench.bench import flops

    model = build_keras_model(config)
    preact = config.model == "preact_resnet18"
    depth = 18 if preact else resnet_depth(config.model)
    # Every 3x3 conv and BN lies on the main path, one after the other, so any topological
    # order of model.layers lists them in the order the network applies them; so are PreAct's
    # 1x1 projection shortcuts among themselves (the CIFAR ResNets' are parameter-free).
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    shortcuts = [layer for layer in convs if tuple(layer.kernel_size) == (1, 1)]
    convs = [layer for layer in convs if tuple(layer.kernel_size) != (1, 1)]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    projections = sum(1 for c, f, s in preact_plan() if s != 1 or c != f) if preact else 0
    expected = (depth - 1, projections, depth - 1)
    if (len(convs), len(shortcuts), len(bns)) != expected:
        raise RuntimeError(f"{model.name}: expected {expected} 3x3 convs, 1x1 convs and BNs, "
                           f"found {(len(convs), len(shortcuts), len(bns))}; the native twins "
                           "no longer match kbench.models.resnet")
    norm = model.get_layer("normalize_pixels")
    dense = model.get_layer("logits")
    as_numpy = lambda v: np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float32)  # noqa: E731
    variance = as_numpy(norm.variance).reshape(-1)
    return ResNetWeights(
        depth=depth,
        num_classes=int(dense.units),
        pixel_mean=as_numpy(norm.mean).reshape(-1),
        pixel_std=np.maximum(np.sqrt(variance), np.float32(keras.backend.epsilon())),
        convs=[as_numpy(layer.kernel) for layer in convs],
        bns=[dict(gamma=as_numpy(bn.gamma), beta=as_numpy(bn.beta),
                  moving_mean=as_numpy(bn.moving_mean),
                  moving_variance=as_numpy(bn.moving_variance)) for bn in bns],
        dense_kernel=as_numpy(dense.kernel),
        dense_bias=as_numpy(dense.bias),
        model="preact_resnet18" if preact else "cifar_resnet",
        shortcuts=[as_numpy(layer.kernel) for layer in shortcuts],
        forward_flops=flops.forward_flops(model) or None,
    )


# --------------------------------------------------------------------------- schedule


def keras_learning_rate(schedule, step):
    """keras.optimizers.schedules.CosineDecay(...)(step) in NumPy float32, op for op.

    Keras evaluates the schedule at `optimizer.iterations` *before* incrementing it, so the
    first update uses step 0 (learning rate 0 during a warmup from 0).
    """
    f32 = np.float32
    initial = f32(schedule.initial_learning_rate)
    decay_steps = f32(schedule.decay_steps)
    step = f32(step)

    def decay(step, decay_from):
        cosine = f32(0.5) * (f32(1.0) + np.cos(f32(math.pi) * (step / decay_steps)))
        decayed = f32(1 - schedule.alpha) * cosine + f32(schedule.alpha)
        return decay_from * decayed

    if schedule.warmup_target is None:
        return decay(np.minimum(step, decay_steps), initial)
    target = f32(schedule.warmup_target)
    warmup_steps = f32(schedule.warmup_steps)
    step = np.minimum(step, decay_steps + warmup_steps)
    if step < warmup_steps:
        return (target - initial) * (step / warmup_steps) + initial
    return decay(step - warmup_steps, target)


def learning_rates(config, steps_per_epoch, count):
    """The learning rate of optimizer steps 0 .. count-1, as Python floats, computed before the
    timed loop so the clock measures training, not schedule arithmetic."""
    schedule = train.learning_rate_schedule(config, steps_per_epoch)
    return [float(keras_learning_rate(schedule, step)) for step in range(count)]


# --------------------------------------------------------------------------- data + timing


def datasets(config):
    """The (train, test) Streams the Keras runs train on (kbench.tasks, augmented as the
    config says) and the steps per epoch."""
    from kbench import tasks
    from kbench.data.stream import as_stream

    train_ds, test_ds = tasks.image_streams(config)
    train_ds = as_stream(train_ds, config.steps_per_epoch)
    return train_ds, test_ds, train_ds.steps_per_epoch


def training_plan(config, steps, warmup_steps, epochs):
    """What every twin's `run` starts with: the config checked against what the twins
    implement, the Keras run's (train, test) Streams, how many steps to time, the learning
    rate of every step, and with --target-accuracy (config.target_accuracy) the
    kbench.target.TargetProbe the Keras run would use, over at most config.epochs epochs.
    Returns (train_ds, test_ds, steps, rates, probe or None)."""
    from kbench.target import TargetProbe

    check_config(config)
    # The float32 precision and cudnn.benchmark every Keras run of the comparison sets too
    # (kbench.backend.apply_execution_settings): the twin computes as they do.
    train.apply_execution_settings(config)
    train_ds, test_ds, steps_per_epoch = datasets(config)
    probe = None
    if getattr(config, "target_accuracy", None) is not None:
        epochs = config.epochs
        probe = TargetProbe(config.target_accuracy, config.eval_every_steps, steps_per_epoch)
    steps = timed_steps(steps, warmup_steps, epochs, steps_per_epoch)
    return train_ds, test_ds, steps, learning_rates(config, steps_per_epoch,
                                                    1 + warmup_steps + steps), probe


def timed_steps(steps, warmup_steps, epochs, steps_per_epoch):
    """How many steps to time: `steps`, or with `epochs` as many as make epochs x
    steps_per_epoch steps in all, as long as the Keras runs train."""
    if epochs:
        return max(1, epochs * steps_per_epoch - 1 - warmup_steps)
    return steps


def timed_training(train_ds, step_fn, steps, warmup_steps, sync_every=1, probe=None,
                   accuracy_fn=None, watch_syncs=False, mixed=False):
    """Run 1 + warmup_steps + steps training steps and time them as StepTimer times Keras.

    `step_fn(step, images, labels)` takes a NumPy batch (NHWC float32 pixels, one-hot labels),
    queues a training step on it and returns the step's loss as a device value; reading it
    (`float`) waits for the step's device work. The clock starts before the input iterator
    is made (Keras' on_train_begin comes before its epoch iterator starts too), `compile_s`
    ends with the first step, the next `warmup_steps` steps are untimed, and the `steps`
    after them are timed in windows of `sync_every` steps (None: one window to the end, or
    to each evaluation): the losses are read (a sync) only at window edges, so the host keeps
    queueing steps in between.
    With a kbench.target.TargetProbe, `accuracy_fn()` (the test accuracy of the current
    weights, as a Python float) runs whenever the probe says so, as the Keras runs' evaluation
    does (kbench.target.TargetAccuracy): the clock started with the probe's, the open window
    closed before it and a new one opened after it, training stopping once it reached the
    target, and a last evaluation after the last step when none fell there.
    The time spent in the input iterator's `next` inside the timed windows, over the windows'
    time, is kept for `input_wait_fraction()` (what kbench.train.InputClock measures for the
    Keras runs: the wait for tf.data plus the copy of the batch out of it).
    With `watch_syncs` (the torch twin on CUDA), PyTorch's synchronizing operations in the
    warm-up steps are counted for `syncs()`, as StepTimer counts the Keras runs' (not with a
    probe, whose evaluations read the device). `mixed`: the step computes under a mixed
    policy (a diverged run is then told it may train in float32).
    Returns (compile_s, seconds per step of each window, steps timed, losses of all steps).
    """
    if steps < 1 or warmup_steps < 0 or (sync_every is not None and sync_every < 1):
        raise KbenchError(f"need steps >= 1, warmup_steps >= 0 and sync_every >= 1, got "
                          f"{steps}, {warmup_steps} and {sync_every}")
    from kbench import sync_watch

    losses, pending, windows = [], [], []
    waited = [0.0, 0.0]  # input wait in the open window, in all closed windows
    watch = (sync_watch.SyncWatch() if watch_syncs and probe is None and warmup_steps > 0
             and sync_watch.available() else None)

    def synced_clock():
        first = len(losses)
        losses.extend(float(loss) for loss in pending)
        pending.clear()
        # The twins' NaN guard, as the Keras runs' (checkpoint.StopOnNaN): a run whose loss
        # is not finite fails instead of timing garbage. Checked where the losses are read
        # anyway, so it adds no sync.
        now = time.perf_counter()
        bad = next((i for i in range(first, len(losses)) if not math.isfinite(losses[i])), None)
        if bad is not None:
            raise KbenchError(f"training diverged: loss is {losses[bad]} at step {bad} of the "
                              "native loop; lower --lr"
                              + (" or train in float32" if mixed else ""))
        return now

    start = time.perf_counter()
    if probe is not None:
        probe.start()
    batches = train_ds.dataset.as_numpy_iterator()
    total = 1 + warmup_steps + steps
    compile_s = opened = None
    in_window = 0
    try:
        for step in range(total):
            fetch = time.perf_counter()
            images, labels = next(batches)
            waited[0] += time.perf_counter() - fetch
            pending.append(step_fn(step, images, labels))
            done = step + 1
            evaluate = probe is not None and (
                probe.due(done, epoch_end=done % probe.steps_per_epoch == 0)
                or (step == total - 1 and probe.due_at_end(done)))
            if step == 0:
                opened = synced_clock()
                compile_s = opened - start
                waited[0] = 0.0
                if watch is not None:
                    watch.start()
            elif step == warmup_steps:
                if watch is not None:
                    watch.stop(warmup_steps)  # before the losses are read
                opened = synced_clock()
                waited[0] = 0.0
            elif step > warmup_steps:
                in_window += 1
                if in_window == sync_every or step == total - 1 or evaluate:  # None: never
                    now = synced_clock()
                    windows.append((in_window, now - opened))
                    opened, in_window = now, 0
                    waited[1] += waited[0]
                    waited[0] = 0.0
            if evaluate:
                synced_clock()
                if probe.evaluate(done, accuracy_fn):
                    break
                opened = synced_clock()  # the next window starts after the evaluation
    finally:
        if watch is not None and watch.watching:  # failed or stopped inside the warm-up
            watch.stop(None)
    synced_clock()
    timed = sum(seconds for _, seconds in windows)
    _measured["input_wait_fraction"] = waited[1] / timed if timed else None
    _measured["syncs_per_step"] = watch.syncs_per_step if watch is not None else None
    _measured["sync_sites"] = (watch.sites or None) if watch is not None else None
    return (compile_s, [seconds / n for n, seconds in windows], sum(n for n, _ in windows),
            losses)


# What the last timed_training measured beside its return value; kbench.bench.worker adds it
# to the twin's result (kept here so that every twin reports it without code of its own).
_measured = {}


def input_wait_fraction():
    """The share of the last timed_training's timed windows spent waiting for batches (None
    before any)."""
    return _measured.get("input_wait_fraction")


def syncs():
    """{"syncs_per_step", "sync_sites"} of the last timed_training that watched (else
    empty)."""
    return {key: _measured[key] for key in ("syncs_per_step", "sync_sites")
            if _measured.get(key) is not None}


def evaluate(test_ds, eval_fn):
    """Test loss and accuracy over every test example, as keras' model.evaluate reports them.

    `eval_fn(images, labels)` returns (per-example losses, per-example hits: whether the
    argmax is the label) for one batch, as arrays. A shorter last batch is padded to the
    others' size, as kbench.evaluation.predict_all pads Keras' (a compiled evaluation step
    then compiles once, in the twin as in Keras), and its padding cut off the results.
    Keras weights each batch's mean loss by its size, which is the same mean.
    """
    total_loss, correct, count, full = 0.0, 0, 0, None
    for images, labels in test_ds.dataset.as_numpy_iterator():
        rows = len(images)
        full = full or rows
        if 0 < rows < full:
            images, labels = pad_rows(images, full), pad_rows(labels, full)
        losses, hits = eval_fn(images, labels)
        total_loss += float(np.sum(np.asarray(losses)[:rows], dtype=np.float64))
        correct += int(np.sum(np.asarray(hits)[:rows]))
        count += rows
    return {"test_loss": total_loss / count, "test_accuracy": correct / count}
