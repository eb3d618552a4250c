"""The CIFAR ResNet (and PreAct ResNet-18) training loop in plain TensorFlow: the twin
Keras-on-TensorFlow is timed against.

Same network, initial weights, batches, loss and optimizer as `recipes/cifar_resnet.py` (see
native_common), written the way a TensorFlow user would without Keras: `tf.Variable`s, NHWC
`tf.nn.conv2d`, the fused batch norm kernel (`tf.raw_ops.FusedBatchNormV3`), a
`tf.GradientTape` train step inside one `tf.function`, with XLA as `--jit-compile` resolves
for Keras (auto: where a GPU is present; on this CPU oneDNN's convolutions beat XLA's).
Under a mixed policy it computes as Keras does: float32 variables cast to the compute dtype
where used, activations in it, BatchNorm and the logits in float32 (the fused batch norm
takes the low-precision activation and computes in float32, as Keras' fast path has it); under
mixed_float16 with Keras' dynamic loss scaling (native_common.loss_scale).

    run(config, steps, warmup_steps=2) -> dict   # timed training + evaluation
    forward(config, images) -> logits            # inference from the initial weights
"""

import tensorflow as tf

from kbench import backend
from kbench.bench import native_common as common


# --------------------------------------------------------------------------- model


class Network(tf.Module):
    """The ResNet's variables and its forward pass; pixel normalization constants baked in.
    A CIFAR ResNet (post-activation blocks, parameter-free shortcuts) or PreAct ResNet-18
    (BN-ReLU before each conv, 1x1 projections where a block changes shape), as
    `weights.model` says."""

    def __init__(self, weights, dtype="float32"):
        super().__init__()
        self.preact = weights.model == "preact_resnet18"
        self.plan = common.preact_plan() if self.preact else common.stage_plan(weights.depth)
        self.dtype = tf.as_dtype(dtype)
        self.pixel_mean = tf.constant(weights.pixel_mean, self.dtype)
        self.pixel_std = tf.constant(weights.pixel_std, self.dtype)
        self.convs = [tf.Variable(k, name=f"conv{i}") for i, k in enumerate(weights.convs)]
        self.shortcuts = [tf.Variable(k, name=f"shortcut{i}")  # PreAct's 1x1 projections
                          for i, k in enumerate(weights.shortcuts)]
        self.gammas = [tf.Variable(bn["gamma"], name=f"gamma{i}")
                       for i, bn in enumerate(weights.bns)]
        self.betas = [tf.Variable(bn["beta"], name=f"beta{i}") for i, bn in enumerate(weights.bns)]
        self.moving_means = [tf.Variable(bn["moving_mean"], trainable=False)
                             for bn in weights.bns]
        self.moving_vars = [tf.Variable(bn["moving_variance"], trainable=False)
                            for bn in weights.bns]
        self.kernel = tf.Variable(weights.dense_kernel, name="dense_kernel")
        self.bias = tf.Variable(weights.dense_bias, name="dense_bias")

    def trainables(self):
        """(variables, decayed?) in one fixed order: weight decay on conv (shortcuts' too) and
        dense kernels only (Keras: exclude_from_weight_decay(var_names=["gamma", "beta",
        "bias"]))."""
        kernels = [*self.convs, *self.shortcuts]
        variables = [*kernels, *self.gammas, *self.betas, self.kernel, self.bias]
        decayed = [True] * len(kernels) + [False] * (2 * len(self.gammas)) + [True, False]
        return variables, decayed

    def batch_norm(self, x, i, training):
        """keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5) through the fused
        kernel. In training the kernel normalizes with the biased batch variance and returns
        the unbiased one (Bessel-corrected, for TF1's moving average); Keras moves its moving
        variance with the biased one, so it is scaled back by (n - 1) / n."""
        if not training:
            y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=self.gammas[i], offset=self.betas[i], mean=self.moving_means[i],
                variance=self.moving_vars[i], epsilon=common.BN_EPSILON, data_format="NHWC",
                is_training=False)
            return tf.cast(y, self.dtype)
        empty = tf.constant([], tf.float32)
        y, mean, unbiased_var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=self.gammas[i], offset=self.betas[i], mean=empty, variance=empty,
            epsilon=common.BN_EPSILON, data_format="NHWC", is_training=True)
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
        var = unbiased_var * (n - 1.0) / n
        momentum = common.BN_MOMENTUM
        self.moving_means[i].assign(self.moving_means[i] * momentum + mean * (1.0 - momentum))
        self.moving_vars[i].assign(self.moving_vars[i] * momentum + var * (1.0 - momentum))
        return tf.cast(y, self.dtype)

    def conv(self, x, kernel, stride):
        # "SAME" pads stride-2 convs by (0, 1), as Keras does on every backend.
        return tf.nn.conv2d(x, tf.cast(kernel, self.dtype), stride, "SAME", data_format="NHWC")

    def __call__(self, images, training):
        x = (tf.cast(images, self.dtype) - self.pixel_mean) / self.pixel_std
        x = self.preact_blocks(x, training) if self.preact else self.cifar_blocks(x, training)
        # Keras' mean accumulates in float32; the logits layer computes in float32.
        x = tf.cast(tf.cast(tf.reduce_mean(tf.cast(x, tf.float32), axis=(1, 2)), self.dtype),
                    tf.float32)
        return tf.matmul(x, self.kernel) + self.bias

    def cifar_blocks(self, x, training):
        def conv_bn(x, i, stride):
            return self.batch_norm(self.conv(x, self.convs[i], stride), i, training)

        x = tf.nn.relu(conv_bn(x, 0, 1))
        for block, (filters, stride) in enumerate(self.plan):
            shortcut = x if stride == 1 else shortcut_pad(x, filters)
            y = tf.nn.relu(conv_bn(x, 1 + 2 * block, stride))
            y = conv_bn(y, 2 + 2 * block, 1)
            x = tf.nn.relu(shortcut + y)
        return x

    def preact_blocks(self, x, training):
        def bn_relu(x, i):
            return tf.nn.relu(self.batch_norm(x, i, training))

        x = self.conv(x, self.convs[0], 1)  # the stem: no BN of its own
        projections = iter(self.shortcuts)
        for block, (channels, filters, stride) in enumerate(self.plan):
            pre = bn_relu(x, 2 * block)
            projects = stride != 1 or channels != filters
            shortcut = self.conv(pre, next(projections), stride) if projects else x
            y = bn_relu(self.conv(pre, self.convs[1 + 2 * block], stride), 2 * block + 1)
            x = shortcut + self.conv(y, self.convs[2 + 2 * block], 1)
        return bn_relu(x, 2 * len(self.plan))


def shortcut_pad(x, filters):
    """He et al.'s "option A" shortcut (kbench ShortcutPad): subsample by 2, zero-pad channels."""
    x = x[:, ::2, ::2, :]
    extra = filters - x.shape[-1]
    return tf.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])


# --------------------------------------------------------------------------- optimizer


def keras_sgd_update(variables, grads, momenta, lr, momentum, nesterov, weight_decay, decayed):
    """keras.optimizers.SGD with decoupled weight decay, op for op: the learning rate lives in
    the momentum buffer (m = momentum * m - lr * g), decayed weights lose lr * wd * w first."""
    for variable, grad, buffer, decay in zip(variables, grads, momenta, decayed):
        if weight_decay and decay:
            variable.assign_sub(variable * (weight_decay * lr))
        if momentum:
            buffer.assign(buffer * momentum - grad * lr)
            step = buffer * momentum - grad * lr if nesterov else buffer
        else:
            step = -grad * lr
        variable.assign_add(step)


# --------------------------------------------------------------------------- entry points


def _describe(gpus):
    if not gpus:
        return "cpu:0"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"gpu:0 ({details.get('device_name', gpus[0].name)})"


def _use_xla():
    return backend.tensorflow_sees_gpu()


def run(config, steps, warmup_steps=2, epochs=None, sync_every=1):
    """Train `1 + warmup_steps + steps` steps (with `epochs`: that many epochs in all),
    evaluate on the test split; see the module doc and native_common.timed_training for what
    each number means."""
    train_ds, test_ds, steps, rates, probe = common.training_plan(config, steps,
                                                                  warmup_steps, epochs)
    weights = common.initial_weights(config)
    net = Network(weights, common.compute_dtype(config))
    variables, decayed = net.trainables()
    momenta = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables]
    smoothing = float(config.label_smoothing)
    # XLA as the Keras run resolves --jit-compile: auto is XLA where a GPU is present.
    xla = {"on": True, "off": False}.get(config.jit_compile, _use_xla())

    def smoothed(labels):
        return labels * (1.0 - smoothing) + smoothing / tf.cast(tf.shape(labels)[-1], tf.float32)

    scaling = common.loss_scale(config)
    if scaling is not None:  # Keras' LossScaleOptimizer state: scale, finite steps in a row
        scale = tf.Variable(scaling.initial_scale, trainable=False, dtype=tf.float32)
        finite_steps = tf.Variable(0, trainable=False, dtype=tf.int32)

    def update(grads, lr):
        keras_sgd_update(variables, grads, momenta, lr, config.momentum, config.nesterov,
                         config.weight_decay, decayed)

    def update_if_finite(scaled_grads, lr):
        """Keras' LossScaleOptimizer: unscale and apply finite gradients (doubling the
        scale after growth_steps of them in a row); skip the rest and halve the scale."""
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in scaled_grads])

        def apply():
            update([g / scale for g in scaled_grads], lr)
            grow = finite_steps == scaling.growth_steps - 1
            scale.assign(tf.where(grow, scale * 2.0, scale))
            finite_steps.assign(tf.where(grow, 0, finite_steps + 1))
            return tf.constant(True)

        def skip():
            scale.assign(scale * 0.5)
            finite_steps.assign(0)
            return tf.constant(False)

        tf.cond(finite, apply, skip)

    @tf.function(jit_compile=xla)
    def train_step(images, labels, lr):
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(smoothed(labels),
                                                                          logits))
            scaled = loss if scaling is None else loss * scale
        grads = tape.gradient(scaled, variables)
        if scaling is None:
            update(grads, lr)
        else:
            update_if_finite(grads, lr)
        return loss

    @tf.function(jit_compile=xla)
    def eval_step(images, labels):
        logits = net(images, training=False)
        # Keras' model.evaluate reports the compiled loss, label smoothing included.
        losses = tf.nn.softmax_cross_entropy_with_logits(smoothed(labels), logits)
        hits = tf.argmax(logits, -1) == tf.argmax(labels, -1)
        return losses, hits  # per example: common.evaluate cuts off a padded batch's extra

    def step_fn(step, images, labels):
        # Reading the loss (a host copy) waits for the step: the device runs the step's ops,
        # updates included, in order.
        return train_step(tf.constant(images), tf.constant(labels), tf.constant(rates[step],
                                                                                tf.float32))

    def test_metrics():  # of the weights trained so far
        return common.evaluate(test_ds, lambda x, y: eval_step(tf.constant(x), tf.constant(y)))

    compile_s, step_times, steps_timed, losses = common.timed_training(
        train_ds, step_fn, steps, warmup_steps, sync_every, probe,
        accuracy_fn=lambda: test_metrics()["test_accuracy"],
        mixed=common.compute_dtype(config) != "float32")
    test = test_metrics()
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "compile_s": compile_s,
        "step_times": step_times,
        "steps_timed": steps_timed,
        "train_loss_history": losses,
        **test,
        "peak_device_mb": (tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
                           if gpus else None),
        **weights.flops_result(config.batch_size),
        "device": _describe(gpus),
        "jit": "tf.function (XLA)" if xla else "tf.function",
        "params": weights.count(),  # incl. BN moving statistics, as keras count_params()
        "compiler": "xla" if xla else "tf.function",
        "memory_format": "channels_last",  # NHWC, as Keras' default data_format
        "cudnn_benchmark": None,  # TensorFlow autotunes cuDNN convolutions by default
        "autocast_dtype": common.autocast_dtype(config),
        **(probe.summary() if probe else {}),
    }


def forward(config, images):
    """Logits of the native network at its initial weights, BN in inference mode."""
    net = Network(common.initial_weights(config), common.compute_dtype(config))
    return net(tf.constant(images, tf.float32), training=False).numpy()
