"""kbench.sync_watch: the syncs a torch step makes on a CUDA GPU, counted from PyTorch's sync
debug mode over the warm-up steps of Keras runs (StepTimer) and of the torch twin
(native_common.timed_training). This machine has no GPU: the tests stand in for the debug mode
(its warning, emitted where a step would sync; its switch, recorded) and check what is counted,
over which steps, and that other warnings still reach the program."""

import warnings

import numpy as np
import pytest

from tests.conftest import BACKEND

SYNC = "called a synchronizing CUDA operation"  # PyTorch's warning, word for word


@pytest.mark.backend_independent
def test_the_watch_counts_the_debug_modes_warnings_and_passes_others_on():
    from kbench.sync_watch import SyncWatch

    modes = []
    watch = SyncWatch(set_mode=modes.append)
    with pytest.warns(UserWarning, match="something else") as seen:
        watch.start()
        for _ in range(3):
            warnings.warn(SYNC)
        warnings.warn("something else")
        watch.stop(steps=2)
    assert [str(w.message) for w in seen] == ["something else"]  # the syncs taken out
    assert modes == ["warn", "default"] and not watch.watching
    assert watch.syncs_per_step == 1.5
    assert len(watch.sites) == 1 and watch.sites[0].endswith("(1.5/step)")
    assert "test_sync_watch.py:" in watch.sites[0]  # the line that made them
    # Another thread's syncs (Keras' asynchronous callbacks) stop that thread only: listed
    # apart, not counted; the debug mode the program had is put back.
    import threading

    modes.clear()
    watch = SyncWatch(set_mode=modes.append, get_mode=lambda: "error")
    watch.start()
    warnings.warn(SYNC)
    other = threading.Thread(target=lambda: [warnings.warn(SYNC) for _ in range(4)])
    other.start()
    other.join()
    watch.stop(steps=1)
    assert watch.syncs_per_step == 1 and modes == ["warn", "error"]
    assert watch.sites[-1] == "other threads (4/step, not counted)"
    idle = SyncWatch(set_mode=modes.append)
    idle.stop(steps=2)  # never started: nothing
    assert idle.syncs_per_step is None and idle.sites == []


@pytest.fixture
def pretend_cuda(monkeypatch):
    """sync_watch's CUDA check says yes and its debug-mode switch does nothing."""
    from kbench import sync_watch

    monkeypatch.setattr(sync_watch, "available", lambda: True)
    modes = []
    real_init = sync_watch.SyncWatch.__init__
    monkeypatch.setattr(sync_watch.SyncWatch, "__init__",
                        lambda self, set_mode=None: real_init(self, set_mode=modes.append))
    return modes


@pytest.mark.backend_independent
def test_the_torch_twin_counts_its_warm_up_steps_only(pretend_cuda):
    from kbench.bench import native_common

    class Stream:
        class dataset:  # noqa: N801 (a stand-in for a tf.data pipeline)
            @staticmethod
            def as_numpy_iterator():
                while True:
                    yield np.zeros((2, 4), "float32"), np.zeros((2, 2), "float32")

    class Loss:  # reading a loss off the device is a sync too: after the warm-up, unwatched
        def __float__(self):
            warnings.warn(SYNC)
            return 0.0

    def step(index, images, labels):  # step i syncs i times
        for _ in range(index):
            warnings.warn(SYNC)
        return Loss()

    native_common.timed_training(Stream(), step, steps=5, warmup_steps=3, watch_syncs=True)
    assert native_common.syncs()["syncs_per_step"] == (1 + 2 + 3) / 3  # steps 1 to 3
    assert pretend_cuda == ["warn", "default"]
    native_common.timed_training(Stream(), step, steps=5, warmup_steps=3)  # not asked
    assert native_common.syncs() == {}


@pytest.mark.skipif(BACKEND != "torch", reason="StepTimer watches torch runs only")
def test_a_keras_run_counts_its_warm_up_steps_only(pretend_cuda):
    """A callback after StepTimer syncs in each step: counted over the warm-up steps only
    (not the first step, which compiles, nor the timed ones)."""
    import keras

    from kbench import train

    class Syncs(keras.callbacks.Callback):  # the n-th step syncs n times
        calls = 0

        def on_train_batch_begin(self, batch, logs=None):
            Syncs.calls += 1
            for _ in range(Syncs.calls):
                warnings.warn(SYNC)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    timer = train.StepTimer(batch_size=4, sync_every=2, warmup_steps=3)
    x, y = np.ones((40, 3), "float32"), np.zeros((40, 2), "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[timer, Syncs()])
    assert timer.syncs_per_step == (2 + 3 + 4) / 3 and timer.sync_sites  # steps 2 to 4
    assert pretend_cuda == ["warn", "default"]
    assert timer.steps_timed == 10 - 1 - 3
