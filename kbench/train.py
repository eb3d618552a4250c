"""The training run: `Run`, the object every recipe's `main` drives in plain sight.

    with Run(config, "cifar_resnet", callbacks) as run:
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)  # Streams
        model = run.model(build_model, given=model)
        run.fit(model, train_ds, test_ds)  # compile with the config's optimizer, then fit
        return run.finish(model)           # evaluate, write results, return the metrics

A Run owns what every recipe shares and none should repeat: the distribution engine
(kbench.distribute) and its scope, seeding and the dtype policy, the checkpoint state that
`--resume` continues (kbench.checkpoint), kbench's callbacks, step timing, and writing the
results atomically. Each `fit` is one stage with its own compile (finetune calls it twice);
epochs are numbered across stages, and `--resume` continues in the stage its checkpoint is from.
Under `--distribute data_parallel` every process runs the same recipe; only the chief writes
files and prints.
"""

import dataclasses
import os
import signal
import sys
import threading
import time
import uuid

import keras

from kbench import backend, caller, checkpoint, fast_path, keras_fixes, target
from kbench.config import TrainConfig, option, resolve_output_dir  # noqa: F401 (re-exported)
from kbench.config import DTYPE_POLICIES, check
from kbench.data.stream import as_stream
from kbench.errors import Interrupted, KbenchError
from kbench.files import (FolderLock, save_model_atomic, variables_kept_local,
                          write_json_atomic)
from kbench.optim import (OPTIMIZERS, SCHEDULES, build_optimizer,  # noqa: F401 (re-exported)
                          learning_rate_schedule)


class Run:
    """One training run of recipe `recipe` with `config` (a TrainConfig); a context manager
    that starts the distribution engine on entry and shuts it down on exit.

    `callbacks` are the caller's Keras callbacks, given to every `fit`.
    """

    def __init__(self, config, recipe, callbacks=()):
        caller.check_config(config, recipe)  # what main(...) was handed, before anything
        config = check(config)  # main(Config(...)) is checked as flags are
        self.config = resolve_output_dir(config, recipe)
        self.recipe = recipe
        self.callbacks = caller.callback_list(callbacks)
        self.dist = None  # kbench.distribute.Distribution, from __enter__ on
        self.state = None  # checkpoint.RunState, when the run has an output dir
        self.timer = StepTimer(self.config.batch_size)  # the last stage's step times
        self.history = {}  # metric -> value per epoch this process trained, every stage
        self.test_ds = None  # what `finish` evaluates on: the last test stream seen
        self._data_specs = {}  # "training"/"test" -> the element spec run.datasets saw
        self.target = None  # kbench.target.TargetProbe with --target-accuracy, from `fit` on
        self._stages = 0  # `fit` calls so far: the next stage's index
        self._epochs_trained = 0
        self._resume_stage = None  # the stage the checkpoint is from, when resuming
        # With --resume, config.json is rewritten only once this run trains (its checkpoint
        # restored): a resume that fails, or finds nothing to train, leaves the run's own.
        self._config_unwritten = False
        self._finished_before = False  # resuming a run whose metrics.json followed its checkpoint
        # Data a caller passed to main() (datasets=...): config.dataset then names what was
        # not used, and the results say so (kbench evaluate asks for --dataset).
        self.data_given = False
        self._lock = None  # the chief's FolderLock on the output dir, while the run lives
        self._stop_signal = None  # "SIGTERM" / "SIGINT" once one asked the run to stop
        self._signal_handlers = {}  # the handlers ours replaced, restored on exit
        self._training = False  # inside model.fit, where a stop waits for the step's end

    # ----------------------------------------------------------------------- lifetime

    def __enter__(self):
        from kbench import distribute

        config = self.config
        if config.simulate_devices:  # before anything starts the backend's runtime
            distribute.simulate_devices(config.simulate_devices)
        self.dist = distribute.setup(config.distribute, config.simulate_devices,
                                     config.batch_size)
        self._fast_path_before = fast_path.enabled()  # the run's setting ends with it
        try:
            self._lock_output_dir()
            setup_run(config)
            fast_path.set_enabled(getattr(config, "fast_path", "on") == "on")
            self._catch_stop_signals()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._signal_handlers.items():
            signal.signal(signum, handler)
        self._signal_handlers = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.dist.shutdown()
        fast_path.set_enabled(getattr(self, "_fast_path_before", False))
        return False

    def _entered(self):
        if self.dist is None:
            raise KbenchError("a Run works inside a with statement: `with Run(config, recipe) "
                              "as run:`")

    def _lock_output_dir(self):
        """One run per output folder: the chief locks it (kbench.files.FolderLock); every
        process of a data-parallel job learns whether it could, so none goes on alone."""
        refused = None
        if self.is_chief and self.config.output_dir:
            try:
                self._lock = FolderLock(self.config.output_dir).acquire()
            except KbenchError as exc:
                refused = exc
        if self.dist.any_process(refused is not None):
            raise refused or KbenchError(f"{self.config.output_dir} is in use by another run "
                                         "(the chief process was refused its lock)")

    def _catch_stop_signals(self):
        """SIGTERM (a preempted machine) and SIGINT (Ctrl-C) ask the run to stop. In training
        it finishes the step in progress, checkpoints (with an output dir; kbench.checkpoint's
        StepCheckpoint) and raises Interrupted; outside training (loading data, the final
        evaluation), and at a second signal, it raises Interrupted at once. Python takes
        signals in the main thread only: a run started in another thread keeps the default
        handling."""
        if threading.current_thread() is not threading.main_thread():
            return

        def ask_to_stop(signum, frame):
            name = signal.Signals(signum).name
            if self._stop_signal is not None or not self._training:
                self._stop_signal = name
                raise Interrupted(name, "outside a training step" if not self._training
                                  else "at a second signal, without a checkpoint",
                                  self._resume_hint())
            self._stop_signal = name
            if self.is_chief:
                print(f"{name}: stopping after the step in progress, once it is "
                      "checkpointed", file=sys.stderr, flush=True)

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signal_handlers[signum] = signal.signal(signum, ask_to_stop)

    def _stop_requested(self):
        """The signal that asked the run to stop, agreed on by every process of a
        data-parallel job (one collective per step when there are several): "SIGTERM" when
        only another process got one; None to go on."""
        if self.dist.num_processes > 1 and self.dist.any_process(self._stop_signal):
            self._stop_signal = self._stop_signal or "SIGTERM"
        return self._stop_signal

    @property
    def is_chief(self):
        """Whether this process writes files and prints (always, without distribution)."""
        return self.dist.is_chief

    @property
    def process_config(self):
        """The config this process trains with: the chief's as given; every other
        data-parallel process silent and writing nothing (one writer per run)."""
        if self.is_chief:
            return self.config
        return dataclasses.replace(self.config, output_dir=None, verbose=0, tensorboard=False)

    # ----------------------------------------------------------------------- verbs

    def datasets(self, build, given=None):
        """The (train, test) Streams: `given` (a caller's pair of Streams or tf.data
        pipelines) or `build(config)`, which under data-parallel training with several
        feeding processes (torch DDP) is called as `build(config, shard=(index, count))`."""
        self._entered()
        self.data_given = given is not None
        if self.config.resume and self.config.output_dir:
            # What can be checked before the data loads (or downloads): that there is a
            # checkpoint, of this recipe and dataset, with these settings. The model is
            # checked once built (Run.model). Every process agrees, or the others would wait
            # for the one that stopped.
            refused = None
            try:
                checkpoint.state_to_resume(self.config.output_dir, self.recipe, None,
                                           self.config.dataset)
                check_resumed_settings(self.config)
            except KbenchError as exc:
                refused = exc
            if self.dist.any_process(refused is not None):
                raise refused or KbenchError(f"another process of this job cannot resume from "
                                             f"{self.config.output_dir}: see its error")
        if given is not None:
            train_ds, test_ds = caller.data_pair(given)
        else:
            shard = self.dist.data_shard()
            train_ds, test_ds = caller.data_pair(
                build(self.config, shard=shard) if shard != (0, 1) else build(self.config),
                f"{getattr(build, '__name__', 'the datasets builder')}(config)")
        caller.check_pipeline(train_ds, "training")
        caller.check_pipeline(test_ds, "test")
        # Before the distribution wraps them: what run.model checks a handed-over model or
        # handed-over data against
        self._data_specs = {"training": caller.element_spec(train_ds),
                            "test": caller.element_spec(test_ds)}
        train_ds = as_stream(train_ds, self.config.steps_per_epoch, training=True)
        test_ds = as_stream(test_ds, training=False)
        train_ds, self.test_ds = self.dist.distribute_datasets(train_ds, test_ds)
        return train_ds, self.test_ds

    def model(self, build, given=None):
        """`given`, or `build(config)` inside the distribution's scope (where TF strategies
        create variables); then the run's checkpoint state: a fresh one, or with --resume
        the one in the output dir, checked against this model."""
        self._entered()
        if given is not None:
            model = caller.check_model(given)
            if self.is_chief:
                caller.note_recompiled(model, self.config)
        else:
            with self.dist.scope():
                model = caller.check_model(
                    build(self.config),
                    f"{getattr(build, '__name__', 'the model builder')}(config)")
        # Before start_or_resume forgets an earlier run's checkpoint: what main was handed
        # cannot train. (Data a recipe builds and model it builds pair by construction, and a
        # recipe may still map its streams before run.fit, which checks them again.)
        caller.check_logits_output(model)
        if given is not None or self.data_given:
            caller.check_data_fits_model(model, self._data_specs)
        self.dist.check_model(model)  # a model built before the distribution was set up
        self.state = start_or_resume(self.config, self.recipe, model.name,
                                     write=self.is_chief, data_given=self.data_given)
        stale = None
        if self.config.resume and self.is_chief:
            self._config_unwritten = True
            done = checkpoint.finished_epochs(self.config.output_dir)
            self._finished_before = done is not None
            if done is not None and self.state.epochs_done < done:  # --no-epoch-checkpoints
                stale = KbenchError(
                    f"the checkpoint in {self.config.output_dir} is from epoch "
                    f"{self.state.epochs_done}, older than its finished run's {done} epochs "
                    "(epoch checkpoints were off): nothing to resume; run without --resume "
                    "to start afresh")
        if self.config.resume and self.dist.any_process(stale is not None):  # all agree
            raise stale or KbenchError("the chief process found nothing to resume")
        if self.state is not None and self.state.batches_done:  # epoch or step checkpoint
            self._resume_stage = self.state.stage
        return model

    def fit(self, model, train_ds, test_ds, epochs=None, lr=None):
        """One stage: compile `model` with the config's optimizer and loss (peak rate `lr`,
        schedule over `epochs`; default the config's), then train it for `epochs` epochs
        after those of earlier stages, evaluating on `test_ds` after each epoch when
        --validate-every-epoch. Returns Keras' History, or None when the stage has nothing
        to train (0 epochs, or finished before the checkpoint being resumed)."""
        self._entered()
        if self.config.output_dir and self.state is None:
            raise KbenchError("run.fit needs the run's checkpoint state: call "
                              "run.model(build, given=model) first")
        stage, self._stages = self._stages, self._stages + 1
        settings = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
        config = dataclasses.replace(self.process_config, **settings)
        train_ds = as_stream(train_ds, self.config.steps_per_epoch, training=True)
        self.test_ds = test_ds = as_stream(test_ds, training=False)
        resuming = stage == self._resume_stage
        if not config.epochs or (self._resume_stage is not None and stage < self._resume_stage):
            return None
        if self.target is not None and self._target_callback.stopped:
            return None  # an earlier stage reached --target-accuracy: the run is done
        caller.check_logits_output(model)  # a model that did not come through run.model
        caller.check_data_fits_model(model, {"training": caller.element_spec(train_ds),
                                             "test": caller.element_spec(test_ds)})
        state = self.state
        with self.dist.scope():  # TF strategies create the optimizer's variables in here
            compile_model(model, config, train_ds.steps_per_epoch)
            if resuming:  # the checkpoint holds this stage's optimizer
                checkpoint.restore(model, state, self.config.output_dir)
                if self.is_chief:
                    where = (f"{state.batches_in_epoch} batches into epoch {state.epochs_done}"
                             if state.batches_in_epoch else
                             f"after epoch {state.epochs_done - 1}")
                    print(f"resuming {self.recipe} from {self.config.output_dir} {where} "
                          f"({state.batches_done} batches)")
            elif state is not None:
                state.begin_stage(stage)
        self.dist.prepare(model)
        first = state.stage_first_epoch if state is not None else self._epochs_trained
        start = state.epochs_done if state is not None else first
        end = start if state is not None and state.stopped_early else first + config.epochs
        self.timer = StepTimer(config.batch_size)
        histories = []
        try:
            if resuming and state.batches_in_epoch and start < end:  # finish its epoch
                check_epoch_length(state, train_ds.steps_per_epoch)
                histories.append(self._fit_epochs(
                    model, config, train_ds, test_ds, start, start + 1,
                    first_batch=state.batches_in_epoch, metric_states=state.metric_states,
                    total_epochs=end))
                start += 1
            if start < end and not (state is not None and state.stopped_early):
                histories.append(self._fit_epochs(model, config, train_ds, test_ds, start, end))
        except Interrupted as stop:
            raise Interrupted(stop.signal_name, stop.where, self._resume_hint()) from None
        return _joined(histories)

    def _fit_epochs(self, model, config, train_ds, test_ds, start, end, first_batch=0,
                    metric_states=(), total_epochs=None):
        """model.fit over epochs [start, end) of the stage; the first of them from its batch
        `first_batch` on (the rest of an epoch a step checkpoint interrupted). The progress
        bar counts epochs of `total_epochs` when it is given (the stage's end)."""
        self._write_config()
        state = self.state
        if state is not None:
            train_ds = train_ds.starting_at(state.stage_batches_done)
        steps = train_ds.steps_per_epoch
        interrupt = checkpoint.StepCheckpoint(
            config.output_dir, state, steps, every=config.checkpoint_every,
            stop_requested=self._stop_requested, first_batch=first_batch,
            distribution=self.dist)
        resumed_sums = [checkpoint.ResumedEpochSums(metric_states)] if metric_states else []
        # Timers first (compare's worker passes one): the work other callbacks do at a
        # window's edge (collectives, checkpoints) is not the training steps' time.
        timers = [c for c in self.callbacks if isinstance(c, StepTimer)]
        others = [c for c in self.callbacks if not isinstance(c, StepTimer)]
        # Before the timers: an evaluation pauses them, so it is not in the step times.
        evaluations = self._target_callbacks(config, test_ds, steps, [self.timer, *timers])
        clock = InputClock()  # the timers' input wait (None under tensorflow: see InputClock)
        for timer in [self.timer, *timers]:
            timer.input_clock = clock
        self._training = True
        try:
            history = model.fit(
                clock.watch(train_ds.dataset),
                initial_epoch=start,
                epochs=end,
                steps_per_epoch=steps - first_batch,  # first_batch > 0 only for one epoch
                validation_data=test_ds.dataset if config.validate_every_epoch else None,
                callbacks=[*evaluations, self.timer, *timers, *self.dist.callbacks(), *others,
                           *run_callbacks(config, steps, state, self.dist.num_processes),
                           *resumed_sums, interrupt,
                           *EpochProgress.when_needed(config.verbose, end, total_epochs)],
                shuffle=False,  # tf.data shuffles; Keras would only warn that it cannot
                verbose=config.verbose,
            )
        finally:
            self._training = False
        self._epochs_trained += len(history.epoch)
        for key, values in history.history.items():
            self.history.setdefault(key, []).extend(values)
        return history

    def _target_callbacks(self, config, test_ds, steps_per_epoch, timers):
        """[kbench.target.TargetAccuracy] with --target-accuracy, else []. One probe for the
        whole run: its clock and step count go on across stages."""
        if getattr(config, "target_accuracy", None) is None:
            return []
        if self.target is None:
            if self.dist.num_processes > 1 and backend.name() == "jax":
                raise KbenchError("--target-accuracy evaluates with model.predict, which "
                                  "cannot gather arrays across JAX processes; run it in one "
                                  "process")
            self.target = target.TargetProbe(config.target_accuracy, config.eval_every_steps,
                                             steps_per_epoch)
            self._target_callback = target.TargetAccuracy(
                self.target, test_ds, timers,
                # Data-parallel processes stop together, at the chief's decision.
                agree=lambda reached: self.dist.any_process(reached and self.is_chief),
                prepare=self.dist.sync_non_trainable)
        self._target_callback.test_ds, self._target_callback.timers = test_ds, timers
        return [self._target_callback]

    def _resume_hint(self):
        state = self.state
        if not self.config.output_dir:
            return "nothing is checkpointed without an --output-dir"
        if state is None:  # before the checkpoint state was read: nothing new is lost
            return "run the same command again"
        if not state.batches_done:
            return "nothing was checkpointed yet; run the same command again"
        if not self.is_chief:
            # The chief writes the checkpoint, maybe still now, maybe on another host: what
            # this process found on disk would say nothing (it said "none was written").
            return (f"the chief process (0) says whether it checkpointed to "
                    f"{self.config.output_dir}")
        # What is on disk, not in memory: a second signal can stop the checkpoint's write,
        # and with --no-epoch-checkpoints an epoch's end writes none.
        try:
            saved = checkpoint.load_state(self.config.output_dir)
        except KbenchError:
            saved = None
        if saved is None or not saved.batches_done or saved.run_id != state.run_id:
            return (f"no checkpoint of this run was written in {self.config.output_dir}; "
                    "run the same command again")
        return (f"checkpoint in {self.config.output_dir}; continue with the same command "
                "and --resume")

    def _write_config(self):
        if self._config_unwritten:
            write_config(self.config, self.recipe, self.data_given)
            self._config_unwritten = False

    def finish(self, model, test_ds=None, **extra):
        """Evaluate on the test split (`test_ds`, default the last one fit saw), write
        metrics.json, eval.json and model.keras (chief only, atomically), print the summary
        line, and return the metrics dict. `extra` items are added to metrics.json."""
        test_ds = as_stream(test_ds, training=False) if test_ds is not None else self.test_ds
        if test_ds is None:
            raise KbenchError("Run.finish needs the test data: call run.datasets first")
        config = self.process_config
        if self._resume_stage is not None and self._resume_stage >= self._stages:
            # Every stage was skipped as done before the checkpoint's: nothing trained, and
            # "raise --epochs" would not help. A recipe edited since, or an edited checkpoint.
            raise KbenchError(
                f"the checkpoint in {config.output_dir} is from training stage "
                f"{self._resume_stage + 1}, but {self.recipe} now trains in {self._stages} "
                "stage(s) (was the recipe or the checkpoint edited?): run without --resume to "
                "start afresh")
        refused = self._config_unwritten and self._finished_before
        if config.resume and self.dist.any_process(refused):  # every process stops
            if not refused:
                raise KbenchError("the chief process found nothing to resume")
            how = ("it stopped early, so more --epochs train nothing" if
                   self.state.stopped_early else "raise --epochs to train on")
            raise KbenchError(
                f"nothing to resume in {config.output_dir}: its run had finished "
                f"({self.state.epochs_done} epochs) and its results are kept; {how}, or run "
                "without --resume to start afresh")
        self._write_config()  # a resume that only finishes a run stopped after its training
        if self.target is not None:  # before the final evaluation, which is off the clock
            self._target_callback.evaluate_last_step()
        test_metrics = final_evaluation(model, test_ds, config, self.dist,
                                        data_given=self.data_given, recipe=self.recipe)
        if self.target is not None:
            extra = {"time_to_target": self.target.summary(), **extra}
            if self.is_chief:
                print(self.target.describe())
        if self.data_given:
            extra = {"data_given": True, **extra}
        return write_results(config, model, self.history, self.timer, test_metrics,
                             extra={**extra, **self.dist.describe()}, recipe=self.recipe,
                             state=self.state, announce=self.is_chief)


def _joined(histories):
    """One Keras History for a stage fit in parts (the rest of an interrupted epoch, then
    whole epochs); None for none."""
    if not histories:
        return None
    joined = histories[-1]
    for earlier in reversed(histories[:-1]):
        joined.epoch = earlier.epoch + joined.epoch
        for key, values in earlier.history.items():
            joined.history[key] = values + joined.history.get(key, [])
    return joined


def check_epoch_length(state, steps_per_epoch):
    """A step checkpoint continues only with the epoch length it was written with: the data
    stream's position and the rest of the epoch follow from it."""
    if state.steps_per_epoch != steps_per_epoch:
        raise KbenchError(f"the checkpoint stopped {state.batches_in_epoch} batches into an "
                          f"epoch of {state.steps_per_epoch} batches; this run's epochs have "
                          f"{steps_per_epoch}: resume with the same --batch-size, "
                          "--steps-per-epoch and data")


def train_and_evaluate(config, recipe, build_model, build_datasets, model=None, datasets=None,
                       callbacks=()):
    """A whole single-stage run, for recipes written before `Run`: the four verbs in order."""
    with Run(config, recipe, callbacks) as run:
        train_ds, test_ds = run.datasets(build_datasets, given=datasets)
        model = run.model(build_model, given=model)
        run.fit(model, train_ds, test_ds)
        return run.finish(model)


# --------------------------------------------------------------------------- setup + compile


def setup_run(config):
    """Seed everything and set the dtype policy before any model is built.

    Seeds Python, NumPy, the backend and TensorFlow (which runs every tf.data pipeline)."""
    if config.dtype_policy not in DTYPE_POLICIES:
        raise KbenchError(f"unknown dtype policy {config.dtype_policy!r}; "
                          f"use one of: {', '.join(DTYPE_POLICIES)}")
    backend.set_seed(config.seed)
    keras.config.set_dtype_policy(config.dtype_policy)
    apply_execution_settings(config)
    warn_of_slow_policy(config.dtype_policy)


def warn_of_slow_policy(policy):
    """One line (per process) when the run asks for a policy we measured to be unusably slow
    where it runs: TensorFlow's float16 convolution gradients on a CPU (one 3x3 convolution's
    forward and backward 1113 ms in float16 against 7.0 in float32; docs/compare.md). The run
    goes on as asked: it is the user's choice."""
    if (policy == "mixed_float16" and keras.backend.backend() == "tensorflow"
            and not backend.tensorflow_sees_gpu()):
        print("note: mixed_float16 under tensorflow on a CPU: its float16 convolution "
              "gradients ran over 100x slower than float32's here; on a CPU use "
              "mixed_bfloat16 or float32", file=sys.stderr)


def apply_execution_settings(config):
    """The run's float32 precision and cudnn.benchmark (kbench.backend), from its config
    (a recipe Config older than these fields runs with their defaults)."""
    return backend.apply_execution_settings(getattr(config, "float32_precision", "tf32"),
                                            getattr(config, "cudnn_benchmark", "on"))


def resolve_jit_compile(setting):
    """--jit-compile as model.compile takes it: 'auto' is left to Keras (XLA under jax, and
    under tensorflow only where a GPU is present: on CPU oneDNN's convolutions ran 2x faster
    than XLA's here; torch eager, since torch.compile made CPU steps slower after a minute of
    compiling), which is what we measured best."""
    if setting == "auto":
        return "auto"
    if setting in ("on", "off"):
        return setting == "on"
    raise KbenchError(f"--jit-compile must be auto, on or off, not {setting!r}")


def compile_model(model, config, steps_per_epoch):
    """model.compile with the config's optimizer and schedule, label-smoothed cross-entropy
    on logits and accuracy. Under mixed_float16 Keras wraps the optimizer in a
    LossScaleOptimizer itself (compile's auto_scale_loss)."""
    model.compile(
        optimizer=build_optimizer(config, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                  label_smoothing=config.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=resolve_jit_compile(config.jit_compile),
    )
    model._kbench_jit_compile = config.jit_compile  # what was asked: save_model_float32
    if backend.name() == "tensorflow":
        keras_fixes.sum_repeated_sparse_rows()  # Adam on an Embedding as under jax and torch
    if backend.name() == "torch" and model.jit_compile:
        keras_fixes.torch_compile_ready(model)  # Keras' steps under torch.compile, unbroken
    return model


# --------------------------------------------------------------------------- callbacks


class InputClock:
    """Seconds the training loop spent waiting for its next batch, for StepTimer's
    `input_wait_fraction`.

    Under jax and torch Keras pulls each batch in Python, from `iter(dataset)` of the tf.data
    pipeline fit was given, between one step and the next: `watch(dataset)` returns the same
    pipeline (one pass-through stage added, `take(-1)`) whose iterator times each `next`.
    That is the wait for tf.data (its prefetch buffer empty: the pipeline is slower than
    training) plus the copy of the batch out of TensorFlow; Keras' conversion to the
    backend's tensors comes after it and is not counted. On an asynchronous device the host
    may wait there while the device still computes queued steps, so on a GPU the figure is
    an upper bound of the time the device starved. Under tensorflow the batch is fetched
    inside the compiled step (`iterator.get_next()` in a tf.function), where no Python clock
    sees it: `watch` leaves the pipeline as it is and the figure is None, as it is when
    Keras re-wraps the pipeline (a data-parallel jax run) and no batch passes the clock.
    """

    def __init__(self):
        self.seconds = 0.0
        self.batches = 0

    def watch(self, dataset):
        if backend.name() == "tensorflow" or not hasattr(dataset, "take"):
            return dataset
        watched = dataset.take(-1)  # a new pipeline object: the caller's stays untouched
        clock, base = self, type(watched)

        def timed_iter(self):
            return _TimedIterator(base.__iter__(self), clock)

        watched.__class__ = type(f"Timed{base.__name__}", (base,), {"__iter__": timed_iter})
        return watched

    @property
    def active(self):
        return self.batches > 0


class _TimedIterator:
    def __init__(self, iterator, clock):
        self._iterator, self._clock = iterator, clock

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self._clock.seconds += time.perf_counter() - start
            self._clock.batches += 1


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar (fit uses this one instead of adding its own), counting epochs of
    the whole run: resuming mid-epoch, fit runs the rest of that epoch alone, and Keras' own
    bar would print `Epoch 3/3` before `Epoch 4/6`."""

    # As Keras' own bar (which fit adds after deciding this): it must not turn off the
    # asynchronous dispatch of batch callbacks.
    async_safe = True

    def __init__(self, total_epochs):
        super().__init__()
        self.total_epochs = total_epochs

    @classmethod
    def when_needed(cls, verbose, end, total_epochs):
        """[EpochProgress] for a fit that ends before the stage does, with a bar to show;
        else [] (Keras' own bar is right)."""
        return [cls(total_epochs)] if verbose and total_epochs and total_epochs != end else []

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


class StepTimer(keras.callbacks.Callback):
    """Training throughput and compile time, measured without slowing training down.

    A clock reading means something only once the device has finished the work queued before
    it, and waiting for the device (a sync) keeps the host from queueing the next step: on an
    H200, Keras-JAX ResNet-20 (batch 1024) took 15.2 ms/step synced after every step and 10.2
    synced every 10 steps (same machine, same call; 2026-11-26, commit `4badb3e`, not
    re-run since). So the timer syncs only at window edges:
      - after each epoch's first step, which waits for the input iterator to start (in the
        run's first epoch it also traces and compiles: `compile_s` is the time to its end),
        or in the first epoch after `1 + warmup_steps` steps;
      - every `sync_every` steps when that is set (1: every step, exact per-step times);
      - where the epoch's training ends, before any validation.
    `windows` holds (steps, seconds) per window, `step_times` each window's seconds per step;
    with an `input_clock` (an InputClock, which Run gives every timer), `input_waits` holds
    the seconds of each window spent waiting for the input pipeline.
    It defines no `on_train_batch_end`: a callback that does makes Keras convert every step's
    logs to Python numbers, a sync per step. (Keras' tensorflow backend does that anyway: its
    callbacks are never dispatched asynchronously. An epoch's last window also holds Keras'
    end-of-epoch work, e.g. jax's state sync.)
    Under torch on a CUDA GPU it counts the steps' own syncs over the warm-up steps
    (kbench.sync_watch): `syncs_per_step` and `sync_sites`, None and [] elsewhere.
    """

    def __init__(self, batch_size, sync_every=None, warmup_steps=0):
        super().__init__()
        self.batch_size = batch_size
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
        self.compile_s = None
        self.windows = []  # (steps, seconds) of the steady state
        self.input_clock = None  # an InputClock: seconds waited for batches so far
        self.input_waits = []  # seconds of each window spent in the input iterator
        self._open = None  # (batch, time, input wait so far) where the current window started
        self._first_batch = None  # the epoch's first batch index (a resumed epoch's is 0 too)
        self._last_batch = None
        self._steps_run = 0
        self._watch, self._watched_from = None, None  # a SyncWatch over the warm-up steps

    def on_train_begin(self, logs=None):
        self._train_begin = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._open = self._first_batch = self._last_batch = None

    def on_train_batch_begin(self, batch, logs=None):
        self._steps_run += 1
        self._last_batch = batch
        if self._first_batch is None:
            self._first_batch = batch
            return
        if self._open is None:
            warming_up = self._steps_run <= 1 + self.warmup_steps
            if warming_up and self.compile_s is not None:
                return  # no sync: nothing to read the clock for
            if not warming_up:
                self._stop_watch(self._steps_run - 1)
            now = self._now()
            if self.compile_s is None:
                self.compile_s = now - self._train_begin
                if warming_up:
                    self._start_watch()
            if not warming_up:
                self._open = (batch, now, self._waited())
        elif self.sync_every and batch - self._open[0] >= self.sync_every:
            self._close(batch)

    def on_test_begin(self, logs=None):
        self._end_of_training()

    def pause(self):
        """Close the open window at the steps run so far: what comes next is not a training
        step (kbench.target evaluates); the next step opens a new window."""
        self._end_of_training()

    def on_epoch_end(self, epoch, logs=None):
        self._end_of_training()

    def on_train_end(self, logs=None):
        self._end_of_training()

    def _start_watch(self):
        from kbench import sync_watch

        if backend.name() == "torch" and sync_watch.available():
            self._watch, self._watched_from = sync_watch.SyncWatch(), self._steps_run
            self._watch.start()

    def _stop_watch(self, steps_done):
        """Stop the warm-up's SyncWatch after `steps_done` steps of the run have finished."""
        if self._watch is not None and self._watch.watching:
            self._watch.stop(steps_done - self._watched_from + 1)

    @property
    def syncs_per_step(self):
        return None if self._watch is None else self._watch.syncs_per_step

    @property
    def sync_sites(self):
        return [] if self._watch is None else self._watch.sites

    def _end_of_training(self):
        self._stop_watch(self._steps_run)
        if self._last_batch is None:
            return  # evaluation outside fit, or the epoch's training already closed
        if self._open is not None:
            self._close(self._last_batch + 1)
        elif self.compile_s is None:  # a run of one-step epochs: the step still compiled
            self.compile_s = self._now() - self._train_begin
        self._open = self._last_batch = None

    def _close(self, batch):
        now = self._now()
        waited = self._waited()
        start_batch, start, start_waited = self._open
        if batch > start_batch:
            self.windows.append((batch - start_batch, now - start))
            self.input_waits.append(waited - start_waited)
        self._open = (batch, now, waited)

    def _waited(self):
        return self.input_clock.seconds if self.input_clock is not None else 0.0

    @property
    def input_wait_fraction(self):
        """The share of the timed windows' time spent waiting for batches (InputClock says
        what it includes); None where no clock saw the batches (under tensorflow)."""
        timed = sum(seconds for _, seconds in self.windows)
        if self.input_clock is None or not self.input_clock.active or not timed:
            return None
        return sum(self.input_waits) / timed

    def _now(self):
        backend.synchronize(self.model)
        return time.perf_counter()

    @property
    def step_times(self):
        """Seconds per step of each window (per step when `sync_every` is 1)."""
        return [seconds / steps for steps, seconds in self.windows]

    @property
    def steps_timed(self):
        return sum(steps for steps, _ in self.windows)

    @property
    def seconds_per_step(self):
        """The steady state's mean: every timed second over every timed step."""
        steps = self.steps_timed
        return sum(seconds for _, seconds in self.windows) / steps if steps else None

    @property
    def examples_per_sec(self):
        mean = self.seconds_per_step
        return self.batch_size / mean if mean else None


def run_callbacks(config, steps_per_epoch, state, processes=1):
    """kbench's per-run callbacks: NaN guard, and with an output dir the epoch recorder
    (checkpoint, history.csv, best.keras, early stopping) and TensorBoard when asked for."""
    found = [checkpoint.StopOnNaN(config.output_dir, async_safe=processes == 1)]
    if state is not None:  # without an output dir (data-parallel non-chief) it only tracks
        found.append(checkpoint.EpochRecorder(
            config.output_dir, state, steps_per_epoch,
            save_model=save_model_float32, monitor=config.monitor,
            mode=getattr(config, "monitor_mode", "auto"), patience=config.early_stopping,
            write_checkpoints=getattr(config, "epoch_checkpoints", True)))
    elif config.early_stopping:
        raise KbenchError("--early-stopping needs an --output-dir to keep its state in")
    # TensorBoard last: it reads the logs the recorder and the distribution's sync settled.
    if config.tensorboard:
        if not config.output_dir:
            raise KbenchError("--tensorboard needs an --output-dir to write its logs to")
        found.append(keras.callbacks.TensorBoard(os.path.join(config.output_dir, "tensorboard"),
                                                 write_graph=False, profile_batch=0))
    return found


def start_or_resume(config, recipe, model_name, write=True, data_given=False):
    """The RunState this run records into: a fresh one (forgetting any previous run's
    checkpoint in the output dir), or with --resume the checkpoint's, checked against this run.
    Also writes config.json, the run's resolved settings, before any training (a resumed
    run: once it trains, Run._write_config). `write=False`
    (a data-parallel process other than the chief) reads but never writes."""
    if not config.output_dir:
        if config.resume:
            raise KbenchError("--resume needs the --output-dir of the run to continue")
        return None
    if config.resume:
        state = checkpoint.state_to_resume(config.output_dir, recipe, model_name,
                                           config.dataset)
        check_resumed_settings(config)
    else:
        state = checkpoint.RunState(recipe=recipe, model=model_name, dataset=config.dataset,
                                    run_id=uuid.uuid4().hex)
    if not write:
        return state
    os.makedirs(config.output_dir, exist_ok=True)
    if not config.resume:  # a resumed run writes it once it trains (Run._write_config)
        unfinished = checkpoint.unfinished_progress(config.output_dir)
        if unfinished:
            print(f"note: starting afresh in {config.output_dir}: the checkpoint of an "
                  f"unfinished run there ({unfinished}) is removed; --resume would have "
                  "continued it", flush=True)
        checkpoint.clear(config.output_dir)
        write_config(config, recipe, data_given)
    return state


# The settings a checkpoint's contents depend on: its optimizer's variables (optimizer; a
# loss-scale optimizer's under mixed_float16), the data stream's position (batch_size).
RESUME_SETTINGS = ("optimizer", "batch_size", "dtype_policy")


def check_resumed_settings(config):
    """A one-line error when --resume asks for other RESUME_SETTINGS than the run's
    config.json holds (Keras would skip the optimizer state it cannot place, and the
    resumed run would be another run)."""
    import json

    try:
        with open(os.path.join(config.output_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # no settings to hold it to (a run from before config.json, or damaged)
    differ = [f"--{key.replace('_', '-')} {saved[key]} (not {getattr(config, key)})"
              for key in RESUME_SETTINGS
              if isinstance(saved, dict) and key in saved and hasattr(config, key)
              and saved[key] != getattr(config, key)]
    if differ:
        raise KbenchError(f"the run in {config.output_dir} was trained with "
                          f"{', '.join(differ)}: resume it with the same settings, or start "
                          "afresh without --resume")


def write_config(config, recipe, data_given=False):
    """config.json: the run's resolved settings (`--config` reads them back); with
    `data_given`, data passed to main() trained it, not config.dataset."""
    write_json_atomic(os.path.join(config.output_dir, "config.json"),
                      {"recipe": recipe, "backend": backend.name(),
                       **({"data_given": True} if data_given else {}),
                       **dataclasses.asdict(config)})


# --------------------------------------------------------------------------- results


def evaluate(model, test_ds, verbose=0):
    """Keras' own evaluation: test loss (the compiled loss, label smoothing included) and
    accuracy."""
    results = model.evaluate(as_stream(test_ds, training=False).dataset, return_dict=True,
                             verbose=verbose)
    return {"test_loss": float(results["loss"]), "test_accuracy": float(results["accuracy"])}


def final_evaluation(model, test_ds, config, dist=None, data_given=False, recipe=None):
    """The end-of-training evaluation every recipe runs, from one pass over the test split:
    eval.json + confusion_matrix.png in the output dir (what `kbench evaluate` writes for a
    saved model), and metrics.json's test figures. `test_loss` stays the training objective
    (label smoothing included, as model.evaluate reports it); eval.json's `loss` is the plain
    cross-entropy. `data_given`: the test split is a caller's (main(datasets=...)), not
    config.dataset's: its classes are numbered, and eval.json says so. eval.json records
    what `kbench evaluate` records (the recipe and the split's settings), but model_path:
    it is the model.keras written beside it after this."""
    from kbench import evaluation
    from kbench.data.registry import class_names

    if dist is not None and dist.num_processes > 1 and backend.name() == "jax":
        # model.predict cannot gather arrays that live on other hosts' devices; Keras'
        # evaluate reduces across them. `kbench evaluate model.keras` writes eval.json later.
        return evaluate(model, test_ds)
    logits, labels = evaluation.predict_all(model, test_ds)
    try:
        names = None if data_given else class_names(config.dataset)
    except KbenchError:  # a dataset the caller brought: classes are numbered
        names = None
    if names is not None and len(names) != logits.shape[1]:
        names = None
    result = evaluation.evaluate_predictions(logits, labels, names)
    if config.output_dir:
        result.update(model=model.name, backend=backend.name(),
                      **({"dataset": None, "data_given": True} if data_given
                         else {"dataset": config.dataset}),
                      recipe=recipe, config=None if data_given else evaluation.split_config(
                          lambda name: getattr(config, name, None), test_ds))
        evaluation.write_evaluation(result, config.output_dir)
    found = {"test_loss": evaluation.smoothed_loss(logits, labels, config.label_smoothing),
             "test_accuracy": result["accuracy"], "test_macro_f1": result["macro_f1"]}
    if "top5_accuracy" in result:
        found["test_top5_accuracy"] = result["top5_accuracy"]
    return found


def save_model_float32(model, path):
    """Save model.keras so that it loads and predicts in float32 whatever policy trained it:
    a mixed-precision model is saved as a float32 copy with the same (float32) weights."""
    # Keras saves the jit_compile it resolved here (True under JAX, False under torch), and
    # load_model compiles with it: a JAX-trained model under torch ran every predict through
    # torch.compile (19.6 s for its first 4 images: docs/recipes.md), a torch-trained one
    # under JAX op by op. Saved as
    # "auto", each backend resolves it as it would its own; only --jit-compile off (say where a
    # compiler fails on the model) is kept as False.
    asked = getattr(model, "_kbench_jit_compile", "auto")  # compile_model's setting
    if any(layer.dtype_policy.name != "float32" for layer in model.layers):
        from kbench.models.saving import float32_copy

        with variables_kept_local():  # the copy's variables: see there
            model = float32_copy(model)
    saved = getattr(model, "_compile_config", None)
    settings = getattr(saved, "config", None)
    if not isinstance(settings, dict) or "jit_compile" not in settings or asked == "off":
        save_model_atomic(model, path)
        return
    resolved, settings["jit_compile"] = settings["jit_compile"], "auto"
    try:
        save_model_atomic(model, path)
    finally:
        settings["jit_compile"] = resolved


def write_results(config, model, history, timer, test_metrics, extra=None, recipe=None,
                  state=None, announce=True):
    """Write metrics.json and model.keras into the output dir (atomically), print the summary
    line (when `announce`), and return the metrics dict. `history` is {metric: values}; with a
    RunState, the epochs and history are the whole run's, resumed sessions included. `extra`
    (e.g. the distribution's description, num_replicas included) is merged in last."""
    if state is not None:
        epochs_done, history = state.epochs_done, state.history
    else:
        epochs_done = len(next(iter(history.values()), []))
    metrics = {
        "backend": backend.name(),
        "recipe": recipe,
        "model": model.name,
        "dataset": config.dataset,
        **test_metrics,
        "epochs": epochs_done,
        "train_examples_per_sec": timer.examples_per_sec,
        "compile_s": timer.compile_s,
        # The steady state's mean, as the examples/s: the timer syncs at window edges only.
        "step_time_ms": 1000 * timer.seconds_per_step if timer.seconds_per_step else None,
        "input_wait_fraction": timer.input_wait_fraction,
        "num_replicas": 1,
        "params": model.count_params(),
        "jit_compile": bool(model.jit_compile),  # what Keras resolved --jit-compile to
        "compiler": backend.keras_compiler(bool(model.jit_compile)),
        "fast_path": fast_path.enabled(),
        "dtype_policy": config.dtype_policy,
        **backend.execution_settings(),  # float32_precision, cudnn_benchmark
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
        "config": dataclasses.asdict(config),
        "versions": backend.versions(),
        "devices": backend.devices(),
        **backend.provenance(),  # kbench_version; git_commit, git_dirty in its checkout
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    if state is not None:
        metrics["best"] = {"monitor": state.monitor, "value": state.best, "epoch": state.best_epoch,
                           "stopped_early": state.stopped_early}
        # finished_epochs: these results are this run's (its checkpoint names it too), as far
        # as the checkpoint got (a run trained on since has not finished)
        metrics["run_id"], metrics["batches_done"] = state.run_id, state.batches_done
    if config.output_dir:
        os.makedirs(config.output_dir, exist_ok=True)
        save_model_float32(model, os.path.join(config.output_dir, "model.keras"))
        write_json_atomic(os.path.join(config.output_dir, "metrics.json"), metrics)
    speed = metrics["train_examples_per_sec"]
    if not announce:
        return metrics
    data = "the data given to main()" if metrics.get("data_given") else config.dataset
    print(f"{metrics['model']} on {data} under {metrics['backend']}: "
          f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}, "
          f"{epochs_done} epochs, "
          + (f"{speed:.1f} train examples/s" if speed else "no steady-state steps timed")
          + f", {metrics['num_replicas']} replica(s)"
          + (f"; results in {config.output_dir}" if config.output_dir else ""))
    return metrics
