"""Files a run writes, written atomically: a temp file in the same folder, then a rename, so
readers (and a run resumed after a crash) see the old file or the new one, never half of one."""

import contextlib
import json
import os
import tempfile
import time

# kbench's temp files, and only kbench's: the folder lock clears the ones a killed write left
TEMP_PREFIX = ".kbench-tmp-"


def write_text_atomic(path, text):
    """Write text via a temp file in the same folder + rename: readers see old or new, never
    half."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path, payload):
    """Write bytes via a temp file in the same folder + rename (fsynced first)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:  # making the temp file is a write too: a read-only folder is refused here
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX,
                                   suffix=os.path.basename(path))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_if_there(tmp)
        raise write_error(exc, path) from None
    except BaseException:
        _remove_if_there(tmp)
        raise


def _remove_if_there(tmp):
    if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


@contextlib.contextmanager
def variables_kept_local():
    """While this process alone writes a model or weights file, the variables Keras makes on
    the way (saving builds a throwaway optimizer to learn which attributes to skip; a float32
    copy of a mixed-precision model) stay on its own devices. Under JAX's DataParallel over
    several processes, a new variable is otherwise placed on the global mesh, a collective
    that the processes that do not save never join: gloo aborted them all ("collective
    mismatch") at the chief's first best.keras or checkpoint."""
    import keras

    distribution = keras.distribution.distribution()  # None but under JAX's data parallel
    if distribution is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def save_model_atomic(model, path):
    with variables_kept_local():
        _save_model_atomic(model, path)


def _save_model_atomic(model, path):
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=".keras")
        os.close(fd)
        model.save(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_if_there(tmp)
        raise write_error(exc, path) from None
    except BaseException:
        _remove_if_there(tmp)
        raise


def save_weights_atomic(model, path):
    """model.save_weights (which holds the optimizer's state too) via a temp file + rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, TEMP_PREFIX + os.path.basename(path))  # keeps .weights.h5
    try:
        with variables_kept_local():
            model.save_weights(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _close_h5_files(tmp)
        raise write_error(exc, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _close_h5_files(path):
    """Close what h5py still holds open of `path`. Keras' save_weights leaves its HDF5 file
    open when a write fails (a full disk); h5py then closed it while Python shut down, failed
    to flush it again, and the process died of a segmentation fault. Emptied first, the file
    has room for the few metadata bytes its close writes, and closes."""
    import h5py

    name = os.path.abspath(path).encode()
    for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            if os.path.abspath(file_id.name) == name:
                os.truncate(path, 0)
                h5py.File(file_id).close()  # closes every object open in it, as File.close
        except (OSError, ValueError, RuntimeError):
            pass


def write_error(exc, path):
    """An OSError of a refused write, said of the file the caller was writing (the temp
    file's name and h5py's several lines of detail mean nothing to the user); any other
    error as it was."""
    from kbench.errors import WRITE_ERRNOS, WriteRefused

    if exc.errno in WRITE_ERRNOS:
        return WriteRefused(exc.errno, os.strerror(exc.errno), path)
    return exc


def writable_folder(path, flag, given=None):
    """Make `path` a folder this process can write into (creating it and its parents), or
    raise KbenchError naming `flag`, the option that gave it (`given`: its value, where
    `path` is the folder it names a file in): before any work is spent."""
    import tempfile

    from kbench.errors import KbenchError

    top = _first_missing(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        # Where the path runs into a file, the system's reason varies ("File exists", "Not a
        # directory"): name the file.
        in_the_way = existing_part(path)
        if os.path.islink(in_the_way) and not os.path.exists(in_the_way):
            why = f"{in_the_way} is a link to nothing"
        elif not os.path.isdir(in_the_way):
            why = f"{in_the_way} is a file, not a folder"
        else:
            why = exc.strerror or exc
        raise KbenchError(f"{flag} {given or path}: cannot write there ({why}); "
                          f"pass another {flag}") from None
    if top is not None:
        MADE_FOLDERS.append((os.path.abspath(path), top))
    return path


# (folder, the outermost folder made with it) for each folder writable_folder made in this
# process: a run refused on bad input takes back those it left empty (kbench.errors'
# exit_on_error calls remove_folders_left_empty), rather than leave a folder that holds only
# its lock file behind each mistyped command.
MADE_FOLDERS = []


def existing_part(path):
    """The longest part of `path` (itself included) that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _first_missing(path):
    """The outermost folder of `path` (itself included) that does not exist yet, or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.lexists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def remove_folders_left_empty(since=0):
    """Remove the folders writable_folder made (since MADE_FOLDERS held `since` of them) that
    hold nothing but a lock file no process holds, and the folders made with them that are
    left empty; anything a run wrote keeps its folder."""
    while len(MADE_FOLDERS) > since:
        folder, top = MADE_FOLDERS.pop()
        while _remove_if_left_empty(folder) and folder != top:
            folder = os.path.dirname(folder)


def _is_file_at(open_file, path):
    """Whether `open_file` is still the file at `path` (not unlinked or replaced since)."""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(open_file.fileno())
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _remove_if_left_empty(folder):
    import fcntl

    try:
        entries = os.listdir(folder)
        if not set(entries) <= {FolderLock.NAME}:
            return False
        # Unlinked while locked here, so a run that holds it keeps its folder; a run that
        # opened it just before finds its lock on a file no longer there and takes the new
        # one (FolderLock.acquire).
        if entries:
            with open(os.path.join(folder, FolderLock.NAME), "a") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(os.path.join(folder, FolderLock.NAME))
        os.rmdir(folder)
    except OSError:  # held by another run, written meanwhile, not ours to remove: kept
        return False
    return True


def new_results_folder(path, results, what):
    """writable_folder(path, "--output"), refused (one KbenchError line) when it already holds
    `results`, a tool's own results file (compare's results.jsonl, gpu-check's
    gpu-check.jsonl, ...): a second run would replace the first one's. `what`: whose."""
    from kbench.errors import KbenchError

    if os.path.exists(os.path.join(path, results)):
        raise KbenchError(f"--output {path} already holds {what} {results}; give this one "
                          "another folder (or move those results away first)")
    return writable_folder(path, "--output")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A temp file older than this was left by a killed write: kbench's writes take seconds.
STALE_TEMP_S = 600


def _remove_temp_files(folder):
    """Delete kbench's temp files (TEMP_PREFIX) that writes killed part-way left in the
    folder (a model.keras-sized one each time). With the folder's lock held no run writes
    here, but `kbench evaluate` may (eval.json beside the model, without the lock): only
    files untouched for STALE_TEMP_S go. Other programs' files and folders are left alone."""
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                    os.remove(entry.path)
            except OSError:
                pass


class FolderLock:
    """An exclusive lock on a run's output folder for the life of this process's run, so two
    runs never write into one folder. It is an OS lock (flock) on `<folder>/.kbench.lock`:
    the kernel drops it when the process dies, even by kill -9, so a crash never leaves a
    stale lock behind. The file names the holder (pid, host) for the refusal message."""

    NAME = ".kbench.lock"

    def __init__(self, folder, flag="--output-dir"):
        self.folder = folder
        self.flag = flag  # the option that names the folder, for the refusal message
        self._file = None

    def acquire(self):
        import fcntl
        import socket

        from kbench.errors import KbenchError

        path = os.path.join(self.folder, self.NAME)
        for _ in range(10):
            writable_folder(self.folder, self.flag)
            try:
                lock_file = open(path, "a+")
            except FileNotFoundError:  # the folder was just taken back (a refused run's)
                continue
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "another process"
                lock_file.close()
                raise KbenchError(f"{self.folder} is in use by another run ({holder}); wait "
                                  f"for it to end, or give this run another {self.flag}") from None
            except OSError as exc:  # a filesystem without flock (some NFS / FUSE mounts)
                lock_file.close()
                print(f"note: cannot lock {self.folder} ({exc.strerror}): a second run into "
                      "it would not be refused", flush=True)
                return self
            if _is_file_at(lock_file, path):
                break
            # A refused run unlinked this lock file (remove_folders_left_empty) between our
            # open and our flock: the lock is on a file no other run can find. Take the one
            # that is there now.
            lock_file.close()
        else:
            raise KbenchError(f"{self.folder} keeps being removed while this run takes it: "
                              f"give this run another {self.flag}")
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        self._file = lock_file
        _remove_temp_files(self.folder)
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
