"""Optimizers and learning-rate schedules, chosen by name from a recipe's config.

Everything here is Keras' own (SGD, Adam, AdamW, CosineDecay, ExponentialDecay,
PiecewiseConstantDecay, LossScaleOptimizer, global-norm clipping) except two small schedules
Keras lacks: a linear warmup in front of any schedule, and one-cycle. Both are written with
keras.ops and registered, so a saved model.keras (which holds its optimizer) loads anywhere
after `import kbench`. Keras has an equivalent for every choice below, so no optax optimizer is
plugged in under JAX: all three backends run the same optimizer code.

Schedules are functions of the optimizer's step counter, which checkpoints save; a resumed run
therefore continues its schedule where it stopped.
"""

import keras

from kbench.errors import KbenchError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "exponential", "cosine", "one_cycle")


@keras.saving.register_keras_serializable(package="kbench")
class LinearWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Rise linearly from 0 to `after(0)` over `warmup_steps`, then follow `after`, whose step
    counter starts when the warmup ends."""

    def __init__(self, after, warmup_steps):
        self.after = after
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = float(self.warmup_steps)
        rest = self.after(keras.ops.maximum(step - warmup, 0.0))
        ramp = self.after(0.0) * step / max(warmup, 1.0)
        return keras.ops.where(step < warmup, ramp, rest)

    def get_config(self):
        return {"after": keras.optimizers.schedules.serialize(self.after),
                "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["after"] = keras.optimizers.schedules.deserialize(config["after"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="kbench")
class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """The same rate at every step (a schedule object, so LinearWarmup can wrap it)."""

    def __init__(self, learning_rate):
        self.learning_rate = float(learning_rate)

    def __call__(self, step):
        return keras.ops.convert_to_tensor(self.learning_rate, "float32")

    def get_config(self):
        return {"learning_rate": self.learning_rate}


@keras.saving.register_keras_serializable(package="kbench")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle (Smith & Topin 2019, as torch.optim.lr_scheduler.OneCycleLR with cosine
    annealing): from max_lr / div_factor up to max_lr over the first `pct_start` of the steps,
    then cosine down to max_lr / (div_factor * final_div_factor) at `total_steps`."""

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4):
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor
        up = max(1.0, self.pct_start * self.total_steps - 1)
        down = max(1.0, self.total_steps - 1 - up)

        def cosine(a, b, fraction):
            fraction = ops.clip(fraction, 0.0, 1.0)
            return b + (a - b) * 0.5 * (1.0 + ops.cos(3.141592653589793 * fraction))

        return ops.where(step <= up, cosine(start, self.max_lr, step / up),
                         cosine(self.max_lr, end, (step - up) / down))

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps,
                "pct_start": self.pct_start, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor}


def learning_rate_schedule(config, steps_per_epoch):
    """The schedule `config.schedule` names, over `config.epochs * steps_per_epoch` steps.

    constant / step / exponential / cosine start with a linear warmup of `warmup_epochs`
    (0 disables it); cosine decays to 0 (Keras' CosineDecay with its own warmup, which the
    native reference loops reproduce step for step); step multiplies the rate by `decay_rate`
    every `decay_epochs` epochs; exponential decays smoothly to lr * decay_rate at the end;
    one_cycle ramps up over its first 30% and ignores warmup_epochs.
    """
    kind = getattr(config, "schedule", "cosine")
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    schedules = keras.optimizers.schedules
    if kind == "cosine":
        return schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else config.lr,
            decay_steps=total - warmup,
            warmup_target=config.lr if warmup else None,
            warmup_steps=warmup,
        )
    if kind == "one_cycle":
        return OneCycle(config.lr, total)
    decay_rate = getattr(config, "decay_rate", 0.1)
    if kind == "constant":
        after = Constant(config.lr)
    elif kind == "step":
        every = max(1, int(round((getattr(config, "decay_epochs", None)
                                  or max(1, config.epochs // 3)) * steps_per_epoch)))
        # PiecewiseConstantDecay keeps values[i] up to and including boundaries[i].
        boundaries = [b - 1 for b in range(every, total - warmup, every)]
        after = (schedules.PiecewiseConstantDecay(
            boundaries, [config.lr * decay_rate ** i for i in range(len(boundaries) + 1)])
            if boundaries else Constant(config.lr))
    elif kind == "exponential":
        after = schedules.ExponentialDecay(config.lr, decay_steps=max(1, total - warmup),
                                           decay_rate=decay_rate)
    else:
        raise KbenchError(f"unknown learning-rate schedule {kind!r}; "
                          f"use one of: {', '.join(SCHEDULES)}")
    return LinearWarmup(after, warmup) if warmup else after


def build_optimizer(config, steps_per_epoch):
    """SGD with (Nesterov) momentum, Adam or AdamW, on the configured schedule, with decoupled
    weight decay kept off BatchNorm and biases, optional global-norm gradient clipping, and
    dynamic loss scaling under mixed_float16.

    Keras applies `weight_decay` as `w -= lr * wd * w` before the gradient step; the native
    reference loops do exactly the same for SGD, so the comparison trains the same thing.
    """
    schedule = learning_rate_schedule(config, steps_per_epoch)
    choice = getattr(config, "optimizer", "sgd")
    clip = getattr(config, "clip_norm", 0.0) or None
    if choice == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay or None,
            global_clipnorm=clip,
        )
    elif choice == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=schedule,
                                          weight_decay=config.weight_decay or None,
                                          global_clipnorm=clip)
    elif choice == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule,
                                           weight_decay=config.weight_decay,
                                           global_clipnorm=clip)
    else:
        raise KbenchError(f"unknown optimizer {choice!r}; use one of: {', '.join(OPTIMIZERS)}")
    # Decay only conv/dense kernels: BN scale/offset and biases are not regularized.
    # (Under mixed_float16, model.compile wraps this in a LossScaleOptimizer itself.)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer
