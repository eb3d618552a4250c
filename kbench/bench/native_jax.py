"""The CIFAR ResNet training loop in plain JAX + optax: the twin that Keras-on-JAX is timed against.

Same network, initial weights, batches, loss and optimizer as `recipes/cifar_resnet.py` (see
native_common), written the way a JAX user would: parameters as pytrees, NHWC convolutions with
`jax.lax.conv_general_dilated`, BatchNorm written out, one jitted train step with donated state.
Under a mixed policy it computes as Keras (and Flax's `dtype`/`param_dtype`) does: float32
parameters cast to the compute dtype where used, activations in it, BatchNorm and the logits in
float32; under mixed_float16 with Keras' dynamic loss scaling (native_common.loss_scale).

    run(config, steps, warmup_steps=2) -> dict   # timed training + evaluation
    forward(config, images) -> logits            # inference from the initial weights
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kbench.bench import native_common as common


# --------------------------------------------------------------------------- model


def init_state(weights):
    """(params, BN moving statistics) pytrees from ResNetWeights (already in JAX's layouts)."""
    params = {
        "conv": [jnp.asarray(k) for k in weights.convs],
        "shortcut": [jnp.asarray(k) for k in weights.shortcuts],  # PreAct's 1x1 projections
        "bn": [{"gamma": jnp.asarray(bn["gamma"]), "beta": jnp.asarray(bn["beta"])}
               for bn in weights.bns],
        "dense": {"kernel": jnp.asarray(weights.dense_kernel),
                  "bias": jnp.asarray(weights.dense_bias)},
    }
    stats = [{"mean": jnp.asarray(bn["moving_mean"]), "var": jnp.asarray(bn["moving_variance"])}
             for bn in weights.bns]
    return params, stats


def decay_mask(params):
    """Which parameters get weight decay: conv and dense kernels, not BN gamma/beta nor biases
    (Keras: exclude_from_weight_decay(var_names=["gamma", "beta", "bias"]))."""
    return {
        "conv": [True for _ in params["conv"]],
        "shortcut": [True for _ in params["shortcut"]],
        "bn": [{"gamma": False, "beta": False} for _ in params["bn"]],
        "dense": {"kernel": True, "bias": False},
    }


def conv(x, kernel, stride):
    # "SAME" pads stride-2 convs by (0, 1), as Keras does on every backend.
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm(x, scale, stats, training):
    """keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5) on NHWC, op for op: biased
    batch variance in training, moving = moving * 0.9 + batch * 0.1; computed in float32 and
    returned in the input's dtype, as Keras does under a mixed policy."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if training:
        mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
        momentum = common.BN_MOMENTUM
        stats = {"mean": stats["mean"] * momentum + mean * (1.0 - momentum),
                 "var": stats["var"] * momentum + var * (1.0 - momentum)}
    else:
        mean, var = stats["mean"], stats["var"]
    inv = jax.lax.rsqrt(var + common.BN_EPSILON) * scale["gamma"]
    return (x * inv + (-mean * inv + scale["beta"])).astype(dtype), stats


def shortcut_pad(x, filters):
    """He et al.'s "option A" shortcut (kbench ShortcutPad): subsample by 2, zero-pad channels."""
    x = x[:, ::2, ::2, :]
    extra = filters - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def network(weights, dtype="float32"):
    """`apply(params, stats, images, training) -> (logits, new_stats)` for this ResNet,
    computing in `dtype` (see the module doc); the pixel normalization constants are baked
    in, as they are constants in the Keras model."""
    if weights.model == "preact_resnet18":
        return preact_network(weights, dtype)
    plan = common.stage_plan(weights.depth)
    dtype = jnp.dtype(dtype)
    pixel_mean, pixel_std = (jnp.asarray(weights.pixel_mean, dtype),
                             jnp.asarray(weights.pixel_std, dtype))

    def apply(params, stats, images, training):
        new_stats = []

        def conv_bn(x, i, stride):
            y = conv(x, params["conv"][i].astype(dtype), stride)
            y, s = batch_norm(y, params["bn"][i], stats[i], training)
            new_stats.append(s)
            return y

        x = (images.astype(dtype) - pixel_mean) / pixel_std
        x = jax.nn.relu(conv_bn(x, 0, 1))
        for block, (filters, stride) in enumerate(plan):
            shortcut = x if stride == 1 else shortcut_pad(x, filters)
            y = jax.nn.relu(conv_bn(x, 1 + 2 * block, stride))
            y = conv_bn(y, 2 + 2 * block, 1)
            x = jax.nn.relu(shortcut + y)
        # Keras' mean accumulates in float32; the logits layer computes in float32.
        x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(dtype).astype(jnp.float32)
        logits = x @ params["dense"]["kernel"] + params["dense"]["bias"]
        return logits, new_stats

    return apply


def preact_network(weights, dtype="float32"):
    """network() for PreAct ResNet-18 (kbench.models.resnet.preact_resnet18): BN-ReLU before
    each conv, 1x1 projections of the pre-activated input where a block changes shape."""
    plan = common.preact_plan()
    dtype = jnp.dtype(dtype)
    pixel_mean, pixel_std = (jnp.asarray(weights.pixel_mean, dtype),
                             jnp.asarray(weights.pixel_std, dtype))

    def apply(params, stats, images, training):
        new_stats = []

        def bn_relu(x, i):
            y, s = batch_norm(x, params["bn"][i], stats[i], training)
            new_stats.append(s)
            return jax.nn.relu(y)

        def conv_of(x, kernel, stride):
            return conv(x, kernel.astype(dtype), stride)

        x = (images.astype(dtype) - pixel_mean) / pixel_std
        x = conv_of(x, params["conv"][0], 1)
        projections = iter(params["shortcut"])
        for block, (channels, filters, stride) in enumerate(plan):
            pre = bn_relu(x, 2 * block)
            projects = stride != 1 or channels != filters
            shortcut = conv_of(pre, next(projections), stride) if projects else x
            y = bn_relu(conv_of(pre, params["conv"][1 + 2 * block], stride), 2 * block + 1)
            x = shortcut + conv_of(y, params["conv"][2 + 2 * block], 1)
        x = bn_relu(x, 2 * len(plan))
        # Keras' mean accumulates in float32; the logits layer computes in float32.
        x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(dtype).astype(jnp.float32)
        logits = x @ params["dense"]["kernel"] + params["dense"]["bias"]
        return logits, new_stats

    return apply


# --------------------------------------------------------------------------- optimizer


def keras_sgd(momentum, nesterov, weight_decay, mask):
    """keras.optimizers.SGD with decoupled weight decay, as an optax transformation.

    Keras keeps the learning rate inside the momentum buffer (m = momentum * m - lr * g), which
    optax.sgd does not, and decays masked weights by w -= lr * wd * w before the gradient step.
    `update(grads, momenta, params, learning_rate=lr)` returns the whole change of the weights.
    """

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, momenta, params, *, learning_rate):
        lr = learning_rate
        if momentum:
            momenta = jax.tree.map(lambda m, g: m * momentum - g * lr, momenta, grads)
            if nesterov:
                steps = jax.tree.map(lambda m, g: m * momentum - g * lr, momenta, grads)
            else:
                steps = momenta
        else:
            steps = jax.tree.map(lambda g: -g * lr, grads)
        if weight_decay:
            steps = jax.tree.map(lambda s, w, decay: s - w * weight_decay * lr if decay else s,
                                 steps, params, mask)
        return steps, momenta

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------- steps


def init_loss_scale(scaling):
    """The dynamic loss scale's state (native_common.LossScale): (scale, finite steps in a
    row); None without loss scaling."""
    if scaling is None:
        return None
    return (jnp.asarray(scaling.initial_scale, jnp.float32), jnp.asarray(0, jnp.int32))


def make_steps(apply, optimizer, label_smoothing, scaling=None):
    """(train_step, eval_step) pure functions of the training state (params, stats, optimizer
    state, loss scale state). With `scaling` (native_common.LossScale) the step scales the
    loss and unscales the gradients, and applies the update only where they are all finite,
    as Keras' LossScaleOptimizer does."""

    def loss_fn(params, stats, images, labels, scale):
        logits, stats = apply(params, stats, images, training=True)
        targets = optax.smooth_labels(labels, label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return (loss if scale is None else loss * scale), (loss, stats)

    def train_step(state, images, labels, learning_rate):
        params, stats, opt_state, loss_scale = state
        scale = None if loss_scale is None else loss_scale[0]
        (_, (loss, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, images, labels, scale)
        if scale is not None:
            grads = jax.tree.map(lambda g: g / scale, grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params,
                                                  learning_rate=learning_rate)
        new_params = optax.apply_updates(params, updates)
        if loss_scale is None:
            return (new_params, new_stats, new_opt_state, None), loss
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g))
                                      for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old)
        loss_scale = update_loss_scale(loss_scale, finite, scaling.growth_steps)
        # A skipped step changes nothing but the scale (Keras: the BN statistics the
        # forward pass moved are kept; they are not gradients).
        return (keep(new_params, params), new_stats, keep(new_opt_state, opt_state),
                loss_scale), loss

    def eval_step(params, stats, images, labels):
        # Keras' model.evaluate reports the compiled loss, label smoothing included.
        logits, _ = apply(params, stats, images, training=False)
        losses = optax.softmax_cross_entropy(logits, optax.smooth_labels(labels, label_smoothing))
        hits = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
        return losses, hits  # per example: common.evaluate cuts off a padded batch's extra

    return train_step, eval_step


def update_loss_scale(loss_scale, finite, growth_steps):
    """Keras' LossScaleOptimizer: finite -> count, doubling the scale (count reset) when the
    count reaches growth_steps; not finite -> halve the scale, reset the count."""
    scale, count = loss_scale
    grow = finite & (count == growth_steps - 1)
    new_scale = jnp.where(finite, jnp.where(grow, scale * 2.0, scale), scale * 0.5)
    new_count = jnp.where(finite & ~grow, count + 1, 0)
    return new_scale, new_count.astype(jnp.int32)


def _flops(compiled):
    """FLOPs of one step from XLA's cost analysis (a dict, or a one-dict list in older JAX)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _peak_device_mb(device):
    stats = device.memory_stats()  # None on CPU
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


def _describe(device):
    return f"{device.platform}:{device.id} ({device.device_kind})"


# --------------------------------------------------------------------------- entry points


def run(config, steps, warmup_steps=2, epochs=None, sync_every=1):
    """Train `1 + warmup_steps + steps` steps (with `epochs`: that many epochs in all),
    evaluate on the test split; see the module doc and native_common.timed_training for what
    each number means."""
    train_ds, test_ds, steps, rates, probe = common.training_plan(config, steps,
                                                                  warmup_steps, epochs)
    weights = common.initial_weights(config)

    params, stats = init_state(weights)
    optimizer = keras_sgd(config.momentum, config.nesterov, config.weight_decay,
                          decay_mask(params))
    scaling = common.loss_scale(config)
    train_step, eval_step = make_steps(network(weights, common.compute_dtype(config)),
                                       optimizer, config.label_smoothing, scaling)
    state = (params, stats, optimizer.init(params), init_loss_scale(scaling))
    compiled = None

    def step_fn(step, images, labels):
        nonlocal state, compiled
        lr = np.float32(rates[step])
        if compiled is None:  # compiled ahead of time, inside the first timed step
            compiled = jax.jit(train_step, donate_argnums=0).lower(
                state, images, labels, lr).compile()
        state, loss = compiled(state, images, labels, lr)
        # Reading the loss waits for the step's executable, which also produced the new
        # state; the next step consumes that state, so no device work escapes the clock.
        return loss

    jitted_eval = jax.jit(eval_step)

    def test_metrics():  # of the weights trained so far
        params, stats, _, _ = state
        return common.evaluate(test_ds, lambda x, y: jitted_eval(params, stats, x, y))

    compile_s, step_times, steps_timed, losses = common.timed_training(
        train_ds, step_fn, steps, warmup_steps, sync_every, probe,
        accuracy_fn=lambda: test_metrics()["test_accuracy"],
        mixed=common.compute_dtype(config) != "float32")
    test = test_metrics()
    device = jax.devices()[0]
    return {
        "compile_s": compile_s,
        "step_times": step_times,
        "steps_timed": steps_timed,
        "train_loss_history": losses,
        **test,
        "peak_device_mb": _peak_device_mb(device),
        **weights.flops_result(config.batch_size),
        "xla_flops_per_step": _flops(compiled),  # XLA's own count, beside the analytic one
        "device": _describe(device),
        "jit": "jax.jit (XLA), train state donated",
        "params": weights.count(),  # incl. BN moving statistics, as keras count_params()
        "compiler": "xla",
        "memory_format": "channels_last",  # NHWC; XLA picks the device's layout inside
        "cudnn_benchmark": None,  # XLA autotunes its convolutions on GPUs itself
        "autocast_dtype": common.autocast_dtype(config),
        **(probe.summary() if probe else {}),
    }


def forward(config, images):
    """Logits of the native network at its initial weights, BN in inference mode."""
    weights = common.initial_weights(config)
    params, stats = init_state(weights)
    apply = network(weights, common.compute_dtype(config))
    logits, _ = jax.jit(lambda p, s, x: apply(p, s, x, training=False))(
        params, stats, jnp.asarray(images, jnp.float32))
    return np.asarray(logits)
