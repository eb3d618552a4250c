"""User-facing errors: bad input is reported as one line that says what to do, not a traceback."""

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import threading


class KbenchError(ValueError):
    """A problem with what the user asked for (unknown name, missing data, bad size...).

    Entry points (recipes, the `kbench` command) print it as one line and exit with status 2.
    """


def first_line(exc, limit=200):
    """An exception's message cut to its first non-empty line of at most `limit` characters
    (tarfile, Keras and h5py put lists and arguments on the lines below), or its type's name."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[0].rstrip(":") if lines else type(exc).__name__  # tarfile: "...:\n- method gz"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def reason(exc, limit=200):
    """`TypeName: first line` of an exception, for the parenthesis of a one-line KbenchError."""
    line = first_line(exc, limit)
    return line if line == type(exc).__name__ else f"{type(exc).__name__}: {line}"


class Interrupted(Exception):
    """A run stopped on a signal (SIGTERM: a preempted machine; SIGINT: Ctrl-C) once it had
    checkpointed. `status` is the exit status a shell gives that signal (143 / 130); the
    message says where training stopped and how to continue."""

    STATUS = {"SIGTERM": 143, "SIGINT": 130}

    def __init__(self, signal_name, where, hint=""):
        self.signal_name, self.where, self.hint = signal_name, where, hint
        self.status = self.STATUS.get(signal_name, 1)
        super().__init__(f"stopped by {signal_name} {where}" + (f": {hint}" if hint else ""))


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `timeout`, `kill`) raised as Ctrl-C is, so the same
    clean-up runs: a command that starts workers in their own process groups stops them
    and keeps what finished, where Python's default action would end it at once and leave
    them running. Exit status 143, as a shell gives SIGTERM."""

    status = 143


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block (main thread only), SIGTERM raises Terminated; so does SIGHUP (a
    closed terminal, a dropped ssh session), which would otherwise end the process at once
    and leave the workers it started in their own process groups running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    # a launcher that asked for a signal to be ignored (nohup: SIGHUP) keeps it so
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    caught = [signum for signum, handler in previous.items() if handler is not signal.SIG_IGN]

    def stop(signum, frame):
        # a second signal must not cut short the clean-up the first one started
        for each in caught:
            signal.signal(each, signal.SIG_IGN)
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    for signum in caught:
        signal.signal(signum, stop)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default
        for signum in caught:
            signal.signal(signum, signal.SIG_DFL if previous[signum] is None else previous[signum])


def run_child(command, grace_s=30.0, sigint_reach_s=30.0, timeout=None, **popen_kwargs):
    """subprocess.run(command).returncode for a child that stops cleanly on a signal (a
    `kbench compare`, which stops its workers' process groups and keeps what finished).

    A child still running after `timeout` seconds is stopped as a SIGTERM stops it (SIGTERM,
    then grace_s before SIGKILL), and subprocess.TimeoutExpired is raised once it has ended
    (a stop during that grace is raised at once: the child has its SIGTERM already).

    Ctrl-C reaches the child with the terminal's whole process group, so the child is let
    stop by itself for up to sigint_reach_s (a Ctrl-C'd compare kills its worker, then
    renders its table); a SIGTERM sent to this process alone (Terminated) does not reach it,
    so it is passed on at once, as is a SIGINT the child has not acted on in time. The child
    then gets grace_s before SIGKILL. A second stop meanwhile passes SIGTERM on (a SIGKILL
    would leave the child's workers running) and ends the wait. The stop is re-raised; a
    child that a signal stopped by itself (exit 130 / 143) stops this process too.
    (subprocess.run would SIGKILL the child within a quarter second, before it could stop
    the workers it started in groups of their own.)"""
    proc = subprocess.Popen(command, **popen_kwargs)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _terminate(proc)
        if not _exits_within(proc, grace_s):  # a stop meanwhile ends the wait, as below
            proc.kill()
            proc.wait()
        raise
    except KeyboardInterrupt as stop:
        termed = isinstance(stop, Terminated)
        try:
            if termed or not _exits_within(proc, sigint_reach_s):
                _terminate(proc)
                termed = True
            if not _exits_within(proc, grace_s):
                proc.kill()
                proc.wait()
        except KeyboardInterrupt:  # Terminated too: stop waiting; the child stops itself
            if not termed:
                _terminate(proc)
        raise
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    if code in (Terminated.status, -signal.SIGTERM):
        raise Terminated("stopped by SIGTERM")
    return code


def _terminate(proc):
    try:
        proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _exits_within(proc, seconds):
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def install_excepthook():
    """Render an uncaught KbenchError as `error: <message>` (e.g. a bad KERAS_BACKEND at import)
    and end a script with exit status 2, as the `kbench` command and the recipes do: Python
    would exit 1 after any uncaught exception, so the hook ends the process itself, once the
    exit handlers have run. An interactive session only gets the line."""
    previous = sys.excepthook
    if getattr(previous, "_kbench", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KbenchError):
            print(f"error: {exc}", file=sys.stderr)
            if not (sys.flags.interactive or hasattr(sys, "ps1")):
                import atexit

                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            return
        previous(exc_type, exc, tb)

    hook._kbench = True
    sys.excepthook = hook


# The errors of a write the machine refused: a full disk or quota, a read-only or
# unwritable folder. Bad input of a kind, said in one line.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# Those that only a write can meet: permission errors come from reads too (an unreadable
# --data-dir), so they are said this way only when kbench's writers raise them (WriteRefused).
WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class WriteRefused(OSError):
    """A write of kbench.files the machine refused (an errno of WRITE_ERRNOS), naming the
    file the caller was writing."""


def write_refused(exc):
    """The one line for a refused write (None for any other exception)."""
    if not (isinstance(exc, WriteRefused)
            or isinstance(exc, OSError) and exc.errno in WRITE_ONLY_ERRNOS):
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return (f"cannot write{where} ({exc.strerror or os.strerror(exc.errno)}): free space or "
            "make the folder writable, then run again (a recipe run continues from its last "
            "checkpoint with --resume); the files written before are kept")


def raised_inside(exc, depth=8):
    """Where `exc` wraps, through one or more of the wrappers below, an exception that
    exit_on_error says in one line (a KbenchError, a stop: Interrupted or Terminated, a
    MemoryError, a refused write), that exception, its message as it was raised; else None.
    The wrappers:
      - torch.compile's: dynamo reraises what is raised while it compiles as its own
        exception (InternalTorchDynamoError, TorchRuntimeError, BackendCompilerFailed, ...;
        the original is its __cause__ or __context__) and appends lines to the original's
        message (DYNAMO_ADDED);
      - Keras' (`traceback_utils.inject_argument_info_in_traceback`): an exception raised in
        a layer call is raised again as a new one of its class (a RuntimeError where the
        class takes more than a message: Interrupted) with the layer's arguments in its
        message, marked `_keras_call_info_injected`, the original as its __context__.
    So a second Ctrl-C during a compile, or during a stock Keras layer call, whose handler
    raises Interrupted, came out as a traceback. Only through those wrappers: an error
    raised while handling one of ours elsewhere is a bug of its own, shown as it is."""
    seen = exc
    for _ in range(depth):
        if not _wraps_others(seen):
            return None
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            return None
        if isinstance(seen, (KbenchError, Interrupted, Terminated, MemoryError)) \
                or write_refused(seen) is not None:
            if seen.args and isinstance(seen.args[0], str):  # its own line, as raised
                said = DYNAMO_ADDED.split(seen.args[0], maxsplit=1)[0].rstrip("\n")
                seen.args = (said,) + seen.args[1:]
            return seen
    return None


def _wraps_others(exc):
    return (type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
            or getattr(exc, "_keras_call_info_injected", False))


# What dynamo appends to the message of an exception raised while it compiled
# (torch._dynamo.exc.augment_exc_message, after a "\n" it always adds): where the trace was,
# and how to learn more.
DYNAMO_ADDED = re.compile(r"\n\n(?=from user code:|Set TORCHDYNAMO_VERBOSE|Last frame execution "
                          r"written|Minifier script written)")


def exit_on_error(fn, *args, **kwargs):
    """Call fn; on KbenchError, a write the machine refused (write_refused) or an allocation
    it could not make (MemoryError), print one line and exit 2, once the output folders fn
    made and left empty are removed. A run stopped by a signal after its checkpoint exits 143
    (SIGTERM) or 130 (SIGINT), Ctrl-C elsewhere 130 (Terminated: 143), without a traceback.
    Those that torch.compile or a Keras layer call raised again as their own are unwrapped
    first (raised_inside)."""
    from kbench import files

    made_before = len(files.MADE_FOLDERS)
    try:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            ours = raised_inside(exc)
            if ours is None:
                raise
            raise ours from None
        del files.MADE_FOLDERS[made_before:]  # kept: the run went through
        return result
    except KbenchError as exc:
        files.remove_folders_left_empty(since=made_before)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        line = write_refused(exc)
        if line is None:
            raise
        files.remove_folders_left_empty(since=made_before)
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as exc:  # NumPy's too, for an array larger than the machine
        files.remove_folders_left_empty(since=made_before)
        print(f"error: out of memory ({first_line(exc)}): ask for less (a smaller batch, "
              "or fewer examples)", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, Terminated) as stop:  # each says where it stopped; its own status
        print(stop, file=sys.stderr)
        sys.exit(stop.status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
