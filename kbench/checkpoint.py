"""What a run leaves in its output dir after every finished epoch, and how `--resume` picks it up.

After epoch e the `EpochRecorder` callback writes, in this order:

1. `best.keras` when the monitored metric improved (the best model so far);
2. `checkpoint-<e>.weights.h5`: the model's weights *and* the optimizer's state (slots, step
   counter, loss scale), which is also the schedule's position, since every schedule is a
   function of the step counter;
3. `checkpoint.json`: the run's progress (epochs done, history rows, best value, early-stopping
   counter) naming that weights file; older weights files are removed only after it;
4. `history.csv`, rebuilt from the rows in the state.

`StepCheckpoint` writes the same checkpoint in the middle of an epoch: every
`--checkpoint-every` steps, and when the run is asked to stop (SIGTERM, as clouds preempt, or
SIGINT): then it finishes the step it is in, writes `checkpoint-<e>-<k>.weights.h5` (k batches
into epoch e) with the epoch's metric sums so far, and raises `Interrupted`. `--resume`
finishes that epoch from batch k (the epoch's logs as if never interrupted) and goes on.

Each file is written to a temp name and renamed, so a `kill -9` at any moment leaves either the
previous epoch's checkpoint or this one's, never a torn one. history.csv is rebuilt from the
checkpoint's rows, so a resumed run logs every epoch exactly once. The training data needs no
saved state: kbench's training stream is a pure function of (seed, step), and a resumed run
restarts it at the step the checkpoint reached.
"""

import csv
import dataclasses
import glob
import io
import json
import math
import os
import re

import keras
import numpy as np

from kbench.errors import Interrupted, KbenchError, first_line
from kbench.files import save_weights_atomic, write_json_atomic, write_text_atomic

STATE_FILE = "checkpoint.json"
HISTORY_FILE = "history.csv"
BEST_FILE = "best.keras"


@dataclasses.dataclass
class RunState:
    """Progress of a run, as checkpoint.json holds it."""

    recipe: str
    model: str
    dataset: str
    epochs_done: int = 0  # finished epochs: the next epoch to run
    steps_done: int = 0  # optimizer steps taken by then (the schedule's position)
    batches_done: int = 0  # training batches consumed by then (the data stream's position)
    rows: list = dataclasses.field(default_factory=list)  # history.csv, one dict per epoch
    monitor: str | None = None
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0  # epochs since the monitored metric last improved
    stopped_early: bool = False
    weights: str | None = None  # file name of the epoch's weights, beside checkpoint.json
    # Keras' seed-generator states (dropout and other random layers), which save_weights
    # leaves out: restored so a resumed run draws the masks an uninterrupted one would.
    rng_states: list = dataclasses.field(default_factory=list)
    # Recipes that train in stages (finetune) compile a new optimizer for each: the stage that
    # wrote the checkpoint (its optimizer state is in the weights file), and the epoch and
    # batch it started at (each stage's fit reads the training stream from its start).
    stage: int = 0
    stage_first_epoch: int = 0
    stage_first_batch: int = 0
    # A step checkpoint, in the middle of epoch `epochs_done`: the batches of that epoch
    # already trained, and the values of the model's metric variables (the running sums the
    # epoch's logs are made of) after them. 0 and [] for a checkpoint at an epoch's end.
    batches_in_epoch: int = 0
    metric_states: list = dataclasses.field(default_factory=list)
    steps_per_epoch: int = 0  # the epoch length progress was counted in (0: not yet)
    # Names this run (made when it starts afresh; kept by --resume); its metrics.json says
    # it too, which is how finished_epochs knows the results are this run's. None: a
    # checkpoint written before kbench recorded it.
    run_id: str | None = None

    def wrong_field(self):
        """What is wrong with a state read back from disk (None: nothing): each count an
        integer >= 0, each list a list, the rest of its declared type."""
        import typing

        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if kind is int and (type(value) is not int or value < 0):
                return f"{name} is {value!r}, not an integer >= 0"
            if kind is str and not isinstance(value, str):
                return f"{name} is {value!r}, not a name"
            if kind is list and not isinstance(value, list):
                return f"{name} is {value!r}, not a list"
            if kind is bool and not isinstance(value, bool):
                return f"{name} is {value!r}, not true or false"
            if kind == (float | None) and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                return f"{name} is {value!r}, not a number"
            if kind == (int | None) and value is not None and (type(value) is not int
                                                               or value < 0):
                return f"{name} is {value!r}, not an integer >= 0"
            if kind == (str | None) and value is not None and not isinstance(value, str):
                return f"{name} is {value!r}, not a name"
        if not all(isinstance(row, dict) and type(row.get("epoch")) is int for row in self.rows):
            return "rows holds something other than one object per epoch"
        # A run's own file beside checkpoint.json: the next checkpoint deletes it, so a path
        # elsewhere (an edited or foreign file) would delete another run's file.
        if self.weights is not None and not WEIGHTS_NAME.fullmatch(self.weights):
            return f"weights is {self.weights!r}, not a checkpoint-*.weights.h5 file's name"
        # A stage starts where training was when it began: never past where it is now.
        for start, now in (("stage_first_epoch", "epochs_done"),
                           ("stage_first_batch", "batches_done"),
                           ("batches_in_epoch", "batches_done")):
            if getattr(self, start) > getattr(self, now):
                return f"{start} is {getattr(self, start)}, past {now} ({getattr(self, now)})"
        return None

    def begin_stage(self, stage):
        """Start stage `stage` here; its early-stopping count starts afresh."""
        self.stage, self.stage_first_epoch, self.stage_first_batch = (
            stage, self.epochs_done, self.batches_done)
        self.wait, self.stopped_early = 0, False

    @property
    def stage_batches_done(self):
        """Training batches the current stage has consumed: where its stream resumes."""
        return self.batches_done - self.stage_first_batch

    def reached(self, epoch, batches_in_epoch, steps_per_epoch):
        """Record progress to `batches_in_epoch` batches into `epoch` (the stage's epochs all
        have `steps_per_epoch` batches); at an epoch's end, the epoch counts as done."""
        if batches_in_epoch >= steps_per_epoch:
            epoch, batches_in_epoch = epoch + 1, 0
        self.epochs_done, self.batches_in_epoch = epoch, batches_in_epoch
        self.steps_per_epoch = steps_per_epoch
        self.batches_done = (self.stage_first_batch + batches_in_epoch
                             + (epoch - self.stage_first_epoch) * steps_per_epoch)

    @property
    def history(self):
        """{metric: [value per epoch]}, like keras' History.history."""
        keys = [k for k in self.rows[0] if k != "epoch"] if self.rows else []
        return {k: [row.get(k) for row in self.rows] for k in keys}


# The weights files a run writes beside its checkpoint.json: checkpoint-<epoch>.weights.h5,
# or checkpoint-<epoch>-<batches>.weights.h5 for a step checkpoint.
WEIGHTS_NAME = re.compile(r"checkpoint-\d+(?:-\d+)?\.weights\.h5")


def load_state(output_dir):
    """The run state in output_dir, or None when it holds no checkpoint."""
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        # RunState's own TypeError would name Python's internals.
        fields = dataclasses.fields(RunState)
        unknown = sorted(set(saved) - {f.name for f in fields})
        missing = [f.name for f in fields if f.name not in saved
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if unknown or missing:
            raise ValueError(f"unknown field {unknown[0]!r}" if unknown else
                             f"no {missing[0]} field")
        state = RunState(**saved)
        wrong = state.wrong_field()
        if wrong:
            raise ValueError(wrong)
        return state
    except (OSError, ValueError, TypeError) as exc:
        raise KbenchError(f"{path} is unreadable ({exc}); delete it to start the run afresh") \
            from None


def finished_epochs(output_dir):
    """The epochs of the run in output_dir if it finished, else None. Finished: its
    metrics.json (written last, by Run.finish) names the checkpoint's run (run_id) and got
    at least as far (batches_done). A run stopped after its last checkpoint but before its
    results has not, and --resume completes it, a run resumed with more --epochs included;
    nor has a fresh run started in a folder that holds an earlier run's metrics.json. (Files
    of a run before run_id: finished when metrics.json is the newer, which a copy that does
    not keep times can get wrong.)"""
    metrics_path, state_path = (os.path.join(output_dir, name)
                                for name in ("metrics.json", STATE_FILE))
    try:
        with open(metrics_path) as f:
            metrics = json.load(f)
        with open(state_path) as f:
            state = json.load(f)
        ids = (state.get("run_id"), metrics.get("run_id"))
        if ids != (None, None) and ids[0] != ids[1]:
            return None  # another run's results
        done, trained = metrics.get("batches_done"), state.get("batches_done")
        if ids != (None, None) and type(done) is int and type(trained) is int:
            if done < trained:
                return None  # trained on (--resume with more --epochs) since its results
        elif os.path.getmtime(metrics_path) < os.path.getmtime(state_path):
            return None  # files from before run_id or batches_done: their times decide
        epochs = metrics.get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    return epochs if type(epochs) is int else 0


def unfinished_progress(output_dir):
    """Where the unfinished run in output_dir stopped ("stopped after epoch 2", "5 batches
    into epoch 3"), or None when there is none (no checkpoint, a finished run's, or one that
    cannot be read)."""
    try:
        state = load_state(output_dir)
    except KbenchError:
        return None
    if state is None or not state.batches_done or finished_epochs(output_dir) is not None:
        return None
    # epochs numbered from 0, as the resume line and history.csv number them
    if state.batches_in_epoch:
        batches = "batch" if state.batches_in_epoch == 1 else "batches"
        return f"{state.batches_in_epoch} {batches} into epoch {state.epochs_done}"
    return f"stopped after epoch {state.epochs_done - 1}"


def clear(output_dir):
    """Forget a previous run's progress in output_dir, so a fresh run can never resume into
    it. Its metrics.json and model.keras stay until this run replaces them."""
    for name in (STATE_FILE, HISTORY_FILE, BEST_FILE):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.weights.h5")):
        os.remove(path)


def state_to_resume(output_dir, recipe, model_name, dataset):
    """The checkpoint `--resume` continues from, checked against this run (`model_name`
    None: not yet built, checked later)."""
    state = load_state(output_dir)
    if state is None:
        raise KbenchError(f"nothing to resume in {output_dir}: it holds no {STATE_FILE}; "
                          "run without --resume to start training, or pass the --output-dir "
                          "of the run to continue")
    for what, theirs, ours in (("recipe", state.recipe, recipe), ("model", state.model, model_name),
                               ("dataset", state.dataset, dataset)):
        if ours is not None and theirs != ours:
            raise KbenchError(f"the checkpoint in {output_dir} is from {what} {theirs!r}, this "
                              f"run is {what} {ours!r}: resume with the same settings, or use "
                              "another --output-dir")
    return state


def restore(model, state, output_dir):
    """Load the checkpoint's weights and optimizer state into a compiled model."""
    path = os.path.join(output_dir, state.weights or "")
    if not state.weights or not os.path.exists(path):
        raise KbenchError(f"{output_dir}/{STATE_FILE} names {state.weights!r}, which is "
                          "missing; delete the checkpoint to start afresh")
    model.optimizer.build(model.trainable_variables)  # slots must exist to receive their values
    try:
        model.load_weights(path)
    except Exception as exc:  # noqa: BLE001 - h5py/keras raise many kinds; all mean the same
        raise KbenchError(f"cannot load checkpoint {path} into {model.name}: {first_line(exc)} "
                          "(damaged, or written by a different model or settings?)") from None
    _assign(rng_variables(model), state.rng_states)
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps != state.steps_done:
        raise KbenchError(f"checkpoint {path} holds {steps} optimizer steps, {STATE_FILE} says "
                          f"{state.steps_done}: the checkpoint is inconsistent; start afresh")


def rng_variables(model):
    """The model's seed-generator state variables, in a stable order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _assign(variables, values):
    if len(variables) == len(values):
        for variable, value in zip(variables, values):
            variable.assign(keras.ops.convert_to_tensor(value, dtype=variable.dtype))


def write_checkpoint(model, output_dir, state, weights, metric_states=()):
    """Write `weights` (weights + optimizer) and checkpoint.json naming it, then drop the
    previous weights file and rebuild history.csv: the order that makes a crash at any moment
    leave one whole checkpoint."""
    state.rng_states = [keras.ops.convert_to_numpy(v).tolist() for v in rng_variables(model)]
    state.metric_states = [keras.ops.convert_to_numpy(v).tolist() for v in metric_states]
    save_weights_atomic(model, os.path.join(output_dir, weights))
    previous, state.weights = state.weights, weights
    write_json_atomic(os.path.join(output_dir, STATE_FILE), dataclasses.asdict(state))
    if previous and previous != weights:
        _remove(os.path.join(output_dir, previous))
    write_history_csv(os.path.join(output_dir, HISTORY_FILE), state.rows)


def sync_model_variables(model):
    """Make the model's variables hold the training state. Keras' JAX trainer keeps it outside
    them during an epoch and syncs at the epoch's end; callbacks that read the variables
    mid-epoch ask for a sync, as Keras' own ModelCheckpoint does."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def higher_is_better(model, monitor, mode="auto"):
    """Whether `monitor` improves upwards: `mode` "max" / "min", or "auto", Keras' own rule
    (as EarlyStopping and ModelCheckpoint apply it: a loss goes down, a compiled metric in the
    direction it declares). Asked of Keras itself, once the model's metrics are built."""
    if mode in ("min", "max"):
        return mode == "max"
    probe = keras.callbacks.EarlyStopping(monitor=monitor, mode="auto")
    probe.set_model(model)
    try:
        probe._set_monitor_op()  # Keras' rule, in Keras' words (keras 3.15 MonitorCallback)
    except ValueError:
        raise KbenchError(f"Keras cannot tell whether {monitor!r} should go up or down; "
                          "pass --monitor-mode max or min") from None
    return probe.monitor_op is keras.ops.greater


class EpochRecorder(keras.callbacks.Callback):
    """Checkpoint, history.csv, best model and early stopping, after every finished epoch.

    `save_model(model, path)` writes best.keras (the trainer passes its float32-saving writer).
    `patience` > 0 stops training after that many epochs without improvement of `monitor`.
    With `output_dir` None it writes nothing and only tracks: a data-parallel process other
    than the chief, which must take the same early-stopping decision (its logs are the
    job's, averaged over replicas) or the chief would wait for it forever.
    """

    def __init__(self, output_dir, state, steps_per_epoch, save_model, monitor="val_accuracy",
                 mode="auto", patience=0, keep_best=True, write_checkpoints=True):
        super().__init__()
        self.output_dir = output_dir
        # False (--no-epoch-checkpoints): history.csv and best.keras only, nothing to resume.
        self.write_checkpoints = write_checkpoints
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.save_model = save_model
        self.monitor = monitor
        self.mode = mode
        self._higher_is_better = None  # resolved at the first epoch's end, when metrics exist
        self.patience = patience
        self.keep_best = keep_best
        state.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        state = self.state
        state.rows = [row for row in state.rows if row["epoch"] < epoch] + [{"epoch": epoch, **logs}]
        state.steps_done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        # Batches, not the step counter: a float16 loss-scale optimizer skips steps whose
        # gradients overflow, but their batches were consumed all the same.
        state.reached(epoch, self.steps_per_epoch, self.steps_per_epoch)
        self._track_best(epoch, logs)
        if self.output_dir is not None and self.write_checkpoints:
            self._write_checkpoint(epoch)
        elif self.output_dir is not None:
            write_history_csv(os.path.join(self.output_dir, HISTORY_FILE), state.rows)
        if state.stopped_early:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        # Said here, not at the epoch's end: this callback runs before the progress bar's,
        # whose last line of the epoch would then follow the message on the same line.
        state = self.state
        if state.stopped_early and self.output_dir is not None:
            epochs = "epoch" if self.patience == 1 else "epochs"
            print(f"early stopping: {self.monitor} has not improved for {self.patience} "
                  f"{epochs} (best {state.best:.4f} at epoch {state.best_epoch})")

    def _write_checkpoint(self, epoch):
        write_checkpoint(self.model, self.output_dir, self.state,
                         f"checkpoint-{epoch}.weights.h5")

    def _track_best(self, epoch, logs):
        state = self.state
        if self.monitor not in logs:
            if self.patience:
                raise KbenchError(f"early stopping watches {self.monitor!r}, which training does "
                                  f"not log (it logs: {', '.join(sorted(logs))}); pass --monitor "
                                  "with one of those, or --validate-every-epoch")
            return
        value = logs[self.monitor]
        if self._higher_is_better is None:
            self._higher_is_better = higher_is_better(self.model, self.monitor, self.mode)
        better = (state.best is None or
                  (value > state.best if self._higher_is_better else value < state.best))
        if math.isfinite(value) and better:
            state.best, state.best_epoch, state.wait = value, epoch, 0
            if self.keep_best and self.output_dir is not None:
                self.save_model(self.model, os.path.join(self.output_dir, BEST_FILE))
        else:
            state.wait += 1
            state.stopped_early = bool(self.patience) and state.wait >= self.patience


class StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints in the middle of an epoch: every `every` training batches (0: never), and
    when `stop_requested()` names a signal, after the step in progress (checked before the
    next one starts), followed by `Interrupted`. Goes after EpochRecorder: a stop asked for in
    an epoch's last step or in its validation is taken once that epoch's own checkpoint is
    written.

    `first_batch`: the batches of the first epoch trained before this fit (the resumed part
    of an epoch a step checkpoint interrupted; ResumedEpochSums adds that epoch's metric
    sums back). With
    `output_dir` None (a data-parallel process other than the chief) it writes nothing and
    only stops when asked to.
    """

    def __init__(self, output_dir, state, steps_per_epoch, every=0, stop_requested=None,
                 first_batch=0, distribution=None):
        super().__init__()
        self.distribution = distribution  # kbench.distribute's engine, None: one process
        self.output_dir = output_dir
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.every = every
        self.stop_requested = stop_requested or (lambda: None)
        self._offset = first_batch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    # The checks run before each batch, not after: a callback with `on_train_batch_end` makes
    # Keras sync every step (see kbench.train.StepTimer). Before batch k, k batches are done.
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            return  # nothing trained in this epoch since the last check
        done = self._offset + batch  # batches of this epoch trained so far
        signal_name = self.stop_requested()  # the same answer in every process
        if signal_name or self._periodic(done):
            sync_model_variables(self.model)
            sums = [keras.ops.convert_to_numpy(v) for v in self.model.metrics_variables]
            if self.distribution is not None:
                # Data-parallel processes that keep their own BatchNorm statistics and
                # metric sums (torch DDP): every process takes part in averaging them (the
                # chief's weights file then holds what all will resume from; the epoch's
                # end averages the statistics anyway, and a moving average is linear).
                self.distribution.sync_non_trainable(self.model)
                sums = self.distribution.mean_over_processes(sums)
            # StopOnNaN may run a step behind (asynchronously): never checkpoint a diverged
            # model. The loss mean's running total is NaN from the first bad step on.
            if not all(np.isfinite(np.asarray(s, dtype=np.float64)).all() for s in sums):
                raise KbenchError(f"training diverged: the loss is not finite {self._where(done)}"
                                  f"; {divergence_advice(self.model)}")
            if self.state is not None:  # every process: its Interrupted says where it is
                self._record(done)
            if self.output_dir is not None and self.state is not None:
                self._write(done, sums)
        if signal_name:
            raise Interrupted(signal_name, self._where(done))

    def on_epoch_end(self, epoch, logs=None):
        self._offset = 0
        signal_name = self.stop_requested()
        if signal_name:
            raise Interrupted(signal_name, f"after epoch {epoch}")

    def _periodic(self, done):
        """Whether the run's batch count reached a multiple of `every`."""
        state = self.state
        if not self.every or state is None:
            return False
        run_batches = (state.stage_first_batch + done
                       + (self._epoch - state.stage_first_epoch) * self.steps_per_epoch)
        return run_batches % self.every == 0

    def _record(self, done):
        state = self.state
        state.reached(self._epoch, done, self.steps_per_epoch)
        state.steps_done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _write(self, done, metric_sums):
        state = self.state
        write_checkpoint(self.model, self.output_dir, state,
                         f"checkpoint-{self._epoch}-{done}.weights.h5",
                         metric_states=metric_sums)

    def _where(self, done):
        return f"in epoch {self._epoch} after batch {done} of {self.steps_per_epoch}"


class ResumedEpochSums(keras.callbacks.Callback):
    """For the fit that finishes an epoch a step checkpoint interrupted: after its first step,
    add that epoch's saved metric sums (`metric_states`) to the resumed part's, so the epoch's
    logs average over all its batches, as if never interrupted. (After the first step, not
    before: TensorFlow builds the compiled metrics' variables in it. And in
    `on_train_batch_end`, which costs a sync per step, but only in this one partial epoch: a
    later hook would come after Keras has read the epoch's logs.) kbench compiles a loss mean
    and accuracy, whose variables are running sums (total, count), so adding is exact."""

    def __init__(self, metric_states):
        super().__init__()
        self._metric_states = list(metric_states)

    def on_train_batch_end(self, batch, logs=None):
        if not self._metric_states:
            return
        sync_model_variables(self.model)
        variables = self.model.metrics_variables
        if len(variables) != len(self._metric_states):
            raise KbenchError(f"the step checkpoint holds {len(self._metric_states)} metric "
                              f"values, the model has {len(variables)}: resume with the same "
                              "settings")
        for variable, saved in zip(variables, self._metric_states):
            variable.assign(variable + keras.ops.convert_to_tensor(saved, variable.dtype))
        self._metric_states = []


class StopOnNaN(keras.callbacks.Callback):
    """Fail the run, with a message that says what to try, as soon as the loss is NaN or inf.

    Keras' TerminateOnNaN only stops quietly; here the run ends with exit status 2 and the
    checkpoints of the epochs that finished stay where they are.
    """

    def __init__(self, output_dir=None, async_safe=True):
        super().__init__()
        self.output_dir = output_dir
        self.epoch = 0
        # async_safe: Keras may run this in its callback thread (backends whose callbacks can
        # be dispatched asynchronously): the host queues the next steps meanwhile, and the
        # error reaches fit at its next dispatch, a step or two later. Not with several
        # processes: each would stop at its own step and leave the others in a collective.
        self.async_safe = async_safe

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            # Only where this run has a checkpoint: a fresh run removed any earlier one.
            kept = (f"; its last checkpoint stays in {self.output_dir} (--resume)"
                    if self.output_dir and os.path.isfile(os.path.join(self.output_dir,
                                                                       STATE_FILE)) else "")
            raise KbenchError(f"training diverged: loss is {float(loss)} at epoch {self.epoch}, "
                              f"step {batch}; {divergence_advice(self.model)}{kept}")


def divergence_advice(model):
    """What to try when the loss is no longer finite: float32 only for a mixed-precision run."""
    policy = getattr(getattr(model, "dtype_policy", None), "name", "")
    return "lower --lr, add --clip-norm" + (
        # a resume keeps the dtype policy: float32 takes a fresh run
        ", or train in float32 afresh (--dtype-policy float32)" if policy.startswith("mixed")
        else "")


def write_history_csv(path, rows):
    """history.csv: `epoch`, `loss`, then every other logged metric in name order."""
    keys = {k for row in rows for k in row} - {"epoch", "loss"}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", "loss", *sorted(keys)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
