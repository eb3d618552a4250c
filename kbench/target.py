"""Training to a target accuracy, timed as MLPerf Training times it (`--target-accuracy`).

A run evaluates its test accuracy at a frequency fixed before it starts (every
`eval_every_steps` optimizer steps, or after every epoch) and stops at the first evaluation
that reaches the target. The clock starts when training starts (Keras' `on_train_begin`:
after the model is built and the data is loaded), so compiling is on it, and so is every
evaluation; it stops at the end of the evaluation that reached the target.

`TargetProbe` keeps that clock and the evaluation points, framework-free: the Keras runs
(`TargetAccuracy`, a callback kbench.train.Run adds) and the native twins
(kbench.bench.native_common.timed_training) share it, so both follow the same rules.
"""

import time

import keras
import numpy as np


class TargetProbe:
    """When to evaluate, and what the evaluations found.

    `target`: the test accuracy to reach (0 < target <= 1). `eval_every_steps`: evaluate
    after every that many optimizer steps, 0 for after every epoch (`steps_per_epoch` steps).
    Steps are counted from the start of the run, across epochs and stages.
    """

    def __init__(self, target, eval_every_steps, steps_per_epoch):
        self.target = float(target)
        self.per_epoch = not eval_every_steps
        self.every = int(eval_every_steps or steps_per_epoch)
        self.steps_per_epoch = int(steps_per_epoch)
        self.points = []  # {"steps", "epochs", "seconds", "accuracy", "eval_s"}, in order
        self.reached_at = None  # index into points of the first one at or above the target
        self._start = None

    def start(self):
        """Start the clock (once: a later stage of the same run keeps it running)."""
        if self._start is None:
            self._start = time.perf_counter()

    @property
    def reached(self):
        return self.reached_at is not None

    def due(self, steps, epoch_end=False):
        """Whether to evaluate after `steps` steps: at every epoch end in per-epoch mode,
        else at every multiple of `every`; never twice at the same step."""
        if steps <= 0 or (self.points and self.points[-1]["steps"] == steps):
            return False
        return epoch_end if self.per_epoch else steps % self.every == 0

    def due_at_end(self, steps):
        """Whether the run's last step, `steps`, still needs its evaluation (so a run that
        misses the target ends with its final accuracy)."""
        return steps > 0 and not (self.points and self.points[-1]["steps"] == steps)

    def evaluate(self, steps, accuracy_fn):
        """Evaluate with `accuracy_fn()` (which must return a Python float, i.e. wait for
        the device) after `steps` steps, on the clock; returns whether the target is reached."""
        began = time.perf_counter()
        accuracy = float(accuracy_fn())
        return self.record(steps, accuracy, time.perf_counter() - began)

    def record(self, steps, accuracy, eval_s):
        """Record an evaluation that ended now and took `eval_s` seconds."""
        self.points.append({"steps": int(steps), "epochs": steps / self.steps_per_epoch,
                            "seconds": time.perf_counter() - self._start,
                            "accuracy": float(accuracy), "eval_s": eval_s})
        if self.reached_at is None and accuracy >= self.target:
            self.reached_at = len(self.points) - 1
        return self.reached

    def summary(self):
        """The record fields of kbench compare's time-to-target mode (None where not
        reached): `eval_points` lists every evaluation, the reaching one last when reached."""
        hit = self.points[self.reached_at] if self.reached else None
        return {
            "target_accuracy": self.target,
            "reached": self.reached,
            "time_to_target_s": hit["seconds"] if hit else None,
            "steps_to_target": hit["steps"] if hit else None,
            "epochs_to_target": hit["epochs"] if hit else None,
            "eval_every_steps": self.every,
            "eval_every": "epoch" if self.per_epoch else "steps",
            "eval_points": list(self.points),
            "eval_seconds": sum(p["eval_s"] for p in self.points),
            "best_eval_accuracy": max((p["accuracy"] for p in self.points), default=None),
        }

    def describe(self):
        """One line for the end of a run."""
        return describe(self.summary())


def describe(summary, compile_s=None):
    """A run to a target in one line, from `TargetProbe.summary()`'s fields (which a compare
    record holds too)."""
    points = summary.get("eval_points") or []
    if summary["reached"]:
        return (f"reached test accuracy {summary['target_accuracy']:g} in "
                f"{summary['time_to_target_s']:.1f} s after training began (step "
                f"{summary['steps_to_target']}, epoch {summary['epochs_to_target']:.2f}"
                + (f", compile {compile_s:.1f} s" if compile_s else "")
                + f", {len(points)} evaluation(s))")
    best = summary.get("best_eval_accuracy")
    return (f"did not reach test accuracy {summary['target_accuracy']:g} in {len(points)} "
            f"evaluation(s) over {points[-1]['steps'] if points else 0} steps (best "
            f"{'-' if best is None else format(best, '.4f')})")


def test_accuracy(model, test_ds):
    """Top-1 accuracy of `model` over the whole test split, from one pass of
    predict_on_batch (kbench.evaluation), which leaves the compiled metrics that training
    accumulates alone; Keras' model.evaluate would reset them in the middle of an epoch."""
    from kbench.evaluation import class_ids, predict_all

    logits, labels = predict_all(model, test_ds)
    return float(np.mean(np.argmax(logits, axis=1) == class_ids(labels, logits.shape[1])))


class TargetAccuracy(keras.callbacks.Callback):
    """Evaluates the model on `test_ds` when `probe` says so and stops training once it
    reached its target. kbench.train.Run puts it first among fit's callbacks, and calls
    `evaluate_last_step` once the run's last stage has trained.

    `timers` (kbench.train.StepTimer) close their window before an evaluation and open a
    new one after it, so step times stay training steps only. `prepare(model)` runs on every
    process before each evaluation (data-parallel replicas average their BatchNorm
    statistics, as before fit's own validation). `agree(flag)` turns this process's decision
    into the job's: data-parallel processes must stop at the same step, so once they agreed
    (`stopped`) none evaluates again.
    Evaluations in an epoch happen before a step begins (`on_train_batch_begin`, with no
    per-step sync); Keras checks `stop_training` after a step, so a run that reaches the
    target in the middle of an epoch trains one step more (a step that is not on the
    clock); at an epoch's end it stops at once.
    """

    def __init__(self, probe, test_ds, timers=(), agree=bool, prepare=None):
        super().__init__()
        self.probe = probe
        self.test_ds = test_ds
        self.timers = list(timers)
        self.agree = agree
        self.prepare = prepare
        self.steps = 0  # steps begun (= done, at the next batch's begin) in this run
        self.stopped = False  # the job agreed the target is reached: training is over
        self._validation_began = None  # when fit's own validation of this epoch began

    def on_train_begin(self, logs=None):
        self.probe.start()

    def on_train_batch_begin(self, batch, logs=None):
        if not self.stopped and self.probe.due(self.steps):
            self._evaluate(mid_epoch=True)
        self.steps += 1

    def on_test_begin(self, logs=None):
        self._pause_timers()  # the training steps queued before it are not validation
        self._validation_began = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        began, self._validation_began = self._validation_began, None
        if self.stopped or not self.probe.due(self.steps, epoch_end=True):
            return
        if "val_accuracy" in (logs or {}) and began is not None:
            # fit's own validation (--validate-every-epoch) just measured this on the same
            # test split: the same number, already paid for on the clock.
            self._decide(self.probe.record(self.steps, float(logs["val_accuracy"]),
                                           time.perf_counter() - began))
            return
        self._evaluate()

    def evaluate_last_step(self):
        """The run's last step is evaluated too (still on the clock), so a run that misses
        the target ends with its final accuracy; a run that stopped at the target is done."""
        if not self.stopped and self.probe.due_at_end(self.steps):
            self._evaluate()

    def _pause_timers(self):
        for timer in self.timers:
            timer.pause()

    def _evaluate(self, mid_epoch=False):
        from kbench.checkpoint import sync_model_variables

        self._pause_timers()
        if mid_epoch:  # Keras' JAX trainer keeps the training state outside the variables
            sync_model_variables(self.model)
        if self.prepare is not None:
            self.prepare(self.model)
        self._decide(self.probe.evaluate(self.steps,
                                         lambda: test_accuracy(self.model, self.test_ds)))

    def _decide(self, reached):
        if self.agree(reached):
            self.stopped = True
            self.model.stop_training = True
