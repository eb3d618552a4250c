"""kbench.files: a write that fails part-way leaves the old file whole and no temp file behind.

Every result kbench keeps (metrics.json, results.jsonl, eval.json, model.keras, checkpoints)
goes through these writers, so a crash, a full disk or Ctrl-C while writing never costs the
result an earlier run or step wrote.
"""

import os
import time

import numpy as np
import pytest

from kbench import files
from kbench.bench import records

pytestmark = pytest.mark.backend_independent


def left_in(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt])
def test_a_failed_text_write_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "metrics.json"
    files.write_json_atomic(str(path), {"test_accuracy": 0.9})
    records.write_jsonl_atomic(str(tmp_path / "results.jsonl"), [{"backend": "jax"}])
    before = {name: (tmp_path / name).read_bytes() for name in left_in(tmp_path)}

    def fail(fd):  # the data is written but not yet on disk: the last moment before rename
        raise failure

    expected = failure if isinstance(failure, type) else type(failure)
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(expected):
        files.write_json_atomic(str(path), {"test_accuracy": 0.1})
    with pytest.raises(expected):
        records.write_jsonl_atomic(str(tmp_path / "results.jsonl"), [{"backend": "torch"}])
    assert {name: (tmp_path / name).read_bytes() for name in left_in(tmp_path)} == before
    monkeypatch.undo()
    files.write_json_atomic(str(path), {"test_accuracy": 0.1})  # and the next write lands
    assert path.read_text() == '{\n  "test_accuracy": 0.1\n}\n'
    assert left_in(tmp_path) == ["metrics.json", "results.jsonl"]


def small_model(seed):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, kernel_initializer=keras.initializers.RandomNormal(seed=seed))])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)  # optimizer state to save too
    return model


@pytest.mark.parametrize("writer, name, method", [
    (files.save_model_atomic, "model.keras", "save"),
    (files.save_weights_atomic, "checkpoint-0.weights.h5", "save_weights"),
])
def test_a_failed_model_save_keeps_the_old_file(tmp_path, monkeypatch, writer, name, method):
    path = tmp_path / name
    writer(small_model(0), str(path))
    before = path.read_bytes()
    other = small_model(1)
    save = getattr(type(other), method)

    def half_then_fail(self, target, *args, **kwargs):  # some bytes out, then the disk fills
        with open(target, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(other), method, half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        writer(other, str(path))
    assert path.read_bytes() == before and left_in(tmp_path) == [name]
    monkeypatch.setattr(type(other), method, save)
    writer(other, str(path))  # the next save replaces it whole
    assert path.read_bytes() != before and left_in(tmp_path) == [name]


def test_a_refused_write_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """A full disk or a folder made read-only mid-run: `error: cannot write <the file the
    run was writing> (<reason>)`, exit 2, not a traceback with a temp file's name."""
    import errno

    from kbench.errors import exit_on_error

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    path = tmp_path / "metrics.json"
    with pytest.raises(SystemExit) as stop:
        exit_on_error(files.write_json_atomic, str(path), {"a": 1})
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {path} (No space left on device): free space")
    assert err.count("\n") == 1 and left_in(tmp_path) == []
    # What is not a refused write stays what it was (a bug's traceback)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):
        exit_on_error(files.write_json_atomic, str(path), {"a": 1})


def test_an_allocation_larger_than_the_machine_is_one_line(capsys):
    """`--test-examples 100000000` asks NumPy for terabytes: one line that says what to ask
    for less of, exit 2, not NumPy's traceback."""
    import numpy as np

    from kbench.errors import exit_on_error

    with pytest.raises(SystemExit) as stop:
        exit_on_error(np.zeros, (10**8, 32, 32, 3 * 10**4), np.float64)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (Unable to allocate ") and err.endswith(
        "): ask for less (a smaller batch, or fewer examples)\n")
    assert err.count("\n") == 1


def test_a_weights_file_keras_left_open_is_closed(tmp_path, monkeypatch):
    """Keras' save_weights leaves its HDF5 file open when a write fails; h5py closed it at
    exit, failed again, and the process died of a segmentation fault (a full disk)."""
    import errno

    import h5py

    model = small_model(0)
    held = []

    def open_then_fail(self, target, *args, **kwargs):
        held.append(h5py.File(target, "w"))  # open, as Keras' H5IOStore leaves it
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed)")

    monkeypatch.setattr(type(model), "save_weights", open_then_fail)
    path = tmp_path / "checkpoint-1.weights.h5"
    with pytest.raises(OSError) as error:
        files.save_weights_atomic(model, str(path))
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(path))
    assert not held[0].id.valid and left_in(tmp_path) == []


def test_taking_a_folder_clears_the_temp_files_a_killed_run_left(tmp_path):
    """A write killed half-way (SIGKILL) leaves its temp file; the next run to lock the
    folder removes it once it is stale. Another program's temp files, folders (an export's
    scratch), a write that may be in progress (kbench evaluate's, which takes no lock) and
    other files stay."""
    stale = time.time() - files.STALE_TEMP_S - 60
    for name in (".kbench-tmp-abc123.keras", ".tmp-another-program", ".kbench-tmp-fresh.json"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 half")
    os.utime(tmp_path / ".kbench-tmp-abc123.keras", (stale, stale))
    os.utime(tmp_path / ".tmp-another-program", (stale, stale))
    (tmp_path / ".kbench-tmp-export-x").mkdir()
    (tmp_path / "metrics.json").write_text("{}")
    lock = files.FolderLock(str(tmp_path)).acquire()
    try:
        assert left_in(tmp_path) == [".kbench-tmp-export-x", ".kbench-tmp-fresh.json",
                                     ".kbench.lock", ".tmp-another-program", "metrics.json"]
        (tmp_path / ".kbench-tmp-being-written.json").write_text("")
        os.utime(tmp_path / ".kbench-tmp-being-written.json", (stale, stale))
        # a run refused the lock touches nothing
        with pytest.raises(Exception, match="in use by another run"):
            files.FolderLock(str(tmp_path)).acquire()
        assert (tmp_path / ".kbench-tmp-being-written.json").exists()
    finally:
        lock.release()


def test_a_refused_read_is_not_called_a_write(tmp_path):
    """Permission errors come from reads too: only kbench's writers' are said as 'cannot
    write'; a full disk is a write's wherever it comes from."""
    import errno

    from kbench.errors import write_refused

    assert write_refused(PermissionError(errno.EACCES, "Permission denied", "/data")) is None
    assert write_refused(OSError(errno.ENOSPC, "No space left on device", "/out/x")) \
        .startswith("cannot write /out/x (No space left on device)")


def test_a_folder_that_refuses_the_temp_file_names_the_file_being_written(tmp_path,
                                                                         monkeypatch):
    import errno
    import tempfile

    from kbench.errors import WriteRefused, write_refused

    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied",
                              os.path.join(kwargs["dir"], ".kbench-tmp-x"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    path = tmp_path / "metrics.json"
    with pytest.raises(WriteRefused) as error:
        files.write_json_atomic(str(path), {"a": 1})
    assert write_refused(error.value) == (
        f"cannot write {path} (Permission denied): free space or make the folder writable, "
        "then run again (a recipe run continues from its last checkpoint with --resume); the "
        "files written before are kept")


def test_a_run_refused_on_bad_input_takes_back_the_folders_it_made_and_left_empty(tmp_path,
                                                                                 capsys):
    """A mistyped command leaves no folder that holds only its lock file (exit_on_error);
    folders that were there before, or that the run wrote into, or that another run holds,
    are kept."""
    from kbench.errors import KbenchError, exit_on_error

    def refused_run(folder, write=None):
        with_lock = files.FolderLock(str(folder)).acquire()
        if write:
            (folder / write).write_text("a result")
        with_lock.release()
        raise KbenchError("bad input")

    (tmp_path / "there").mkdir()
    for folder, write in [(tmp_path / "new" / "a" / "b", None),
                          (tmp_path / "there" / "run", None),
                          (tmp_path / "written", "metrics.json")]:
        with pytest.raises(SystemExit) as stop:
            exit_on_error(refused_run, folder, write)
        assert stop.value.code == 2 and capsys.readouterr().err == "error: bad input\n"
    assert sorted(os.listdir(tmp_path)) == ["there", "written"]
    assert os.listdir(tmp_path / "there") == []
    assert sorted(os.listdir(tmp_path / "written")) == [".kbench.lock", "metrics.json"]

    made_before = len(files.MADE_FOLDERS)
    held = files.FolderLock(str(tmp_path / "held")).acquire()  # a run still in it
    try:
        files.remove_folders_left_empty(since=made_before)
        assert os.listdir(tmp_path / "held") == [".kbench.lock"]
    finally:
        held.release()


def test_a_lock_taken_while_a_refused_run_removes_the_folder_is_on_the_file_there(tmp_path,
                                                                                monkeypatch):
    """A run that opened the lock file just before a refused run unlinked it (and removed the
    folder) must not lock the unlinked file, which a third run could never see: it takes the
    folder and lock file that are there now."""
    import fcntl

    folder = tmp_path / "new"
    made_before = len(files.MADE_FOLDERS)
    files.FolderLock(str(folder)).acquire().release()  # the refused run's: only its lock file
    real_flock, cleaned = fcntl.flock, []

    def flock(lock_file, operation):  # between this run's open and flock: the clean-up
        if not cleaned:
            cleaned.append(True)
            files.remove_folders_left_empty(since=made_before)
            assert not folder.exists()
        return real_flock(lock_file, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = files.FolderLock(str(folder)).acquire()
    try:
        assert cleaned and files._is_file_at(lock._file, str(folder / ".kbench.lock"))
    finally:
        lock.release()


def test_a_folder_path_that_runs_into_a_file_names_the_file(tmp_path):
    from kbench.errors import KbenchError

    (tmp_path / "a-file").write_text("mine")
    # The system says "File exists" for the file itself and "Not a directory" below it.
    for path in (tmp_path / "a-file", tmp_path / "a-file" / "sub", tmp_path / "a-file" / "s" / "t"):
        with pytest.raises(KbenchError) as err:
            files.writable_folder(str(path), "--output-dir")
        assert str(err.value) == (f"--output-dir {path}: cannot write there ({tmp_path / 'a-file'}"
                                  " is a file, not a folder); pass another --output-dir")
    assert (tmp_path / "a-file").read_text() == "mine"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for path in (tmp_path / "dangling", tmp_path / "dangling" / "sub"):
        with pytest.raises(KbenchError, match=rf"\({tmp_path / 'dangling'} is a link to nothing\)"):
            files.writable_folder(str(path), "--output-dir")
