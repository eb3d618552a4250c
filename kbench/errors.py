"""User-facing errors: bad input is reported as one line that says what to do, not a traceback."""

import sys


class KbenchError(ValueError):
    """A problem with what the user asked for (unknown name, missing data, bad size...).

    Entry points (recipes, the `kbench` command) print it as one line and exit with status 2.
    """


def install_excepthook():
    """Render an uncaught KbenchError as `error: <message>` (e.g. a bad KERAS_BACKEND at import)."""
    previous = sys.excepthook
    if getattr(previous, "_kbench", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KbenchError):
            print(f"error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    hook._kbench = True
    sys.excepthook = hook


def exit_on_error(fn, *args, **kwargs):
    """Call fn; on KbenchError print one line and exit 2. Ctrl-C exits 130 without a traceback."""
    try:
        return fn(*args, **kwargs)
    except KbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
