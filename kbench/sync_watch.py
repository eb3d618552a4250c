"""Counting the host's implicit waits for a CUDA GPU over a stretch of training steps.

On a GPU the host queues work and goes on; an operation that needs a result on the host (a
blocking copy to or from the device, `.item()`, `bool()` of a device tensor, `nonzero`) makes
it wait until the GPU has run everything queued, and it cannot queue ahead meanwhile. PyTorch's
sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`) warns at each one PyTorch makes
("called a synchronizing CUDA operation", at every call, from the Python line that made it; an
explicit `torch.cuda.synchronize()` is not one, nor a wait inside the CUDA driver, such as
staging a copy from pageable memory).

kbench's timers (kbench.train.StepTimer for Keras runs, kbench.bench.native_common for the
torch twin) watch the warm-up steps of a torch run on CUDA, never the timed ones (a warning
costs host time), and record `syncs_per_step` and, for the places they came from,
`sync_sites` (the Python lines that called the operation, the most frequent first). Only the
training thread's syncs count: Keras runs some callbacks' end-of-step work on a thread pool
(their syncs stop that thread, not the one queueing the steps); those are listed apart in
`sync_sites` as "other threads".
"""

import collections
import threading
import warnings

SYNC_MESSAGE = "called a synchronizing CUDA operation"


def available():
    """Whether there is a CUDA device for torch to watch (torch imported by the run)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


class SyncWatch:
    """start() ... stop(steps): PyTorch's synchronizing operations in between, counted from
    its sync debug mode's warnings, which are taken out of what the program shows (every
    other warning goes on as before: its filters, its once-per-place display). `set_mode` /
    `get_mode` set and read the debug mode: torch.cuda.set_sync_debug_mode /
    get_sync_debug_mode unless given (the tests give stand-ins)."""

    def __init__(self, set_mode=None, get_mode=None):
        self._set_mode, self._get_mode = set_mode, get_mode
        self._catch = self._before = None
        self._counts = None
        self.syncs_per_step = None
        self.sites = []

    def start(self):
        if self._set_mode is None:
            import torch

            self._set_mode = torch.cuda.set_sync_debug_mode
            self._get_mode = torch.cuda.get_sync_debug_mode
        thread = threading.get_ident()
        counts = self._counts = {"here": collections.Counter(), "elsewhere": 0}
        # (filters and showwarning are saved here and restored at stop, with nothing else)
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=SYNC_MESSAGE)

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE not in str(message):
                return shown(message, category, filename, lineno, file, line)
            if threading.get_ident() == thread:
                counts["here"][f"{filename}:{lineno}"] += 1
            else:
                counts["elsewhere"] += 1

        warnings.showwarning = showwarning
        self._before = self._get_mode() if self._get_mode is not None else "default"
        self._set_mode("warn")

    @property
    def watching(self):
        return self._catch is not None

    def stop(self, steps):
        """Stop watching; `steps`: how many steps ran since start (None: nothing counted)."""
        if self._catch is None:
            return
        try:
            self._set_mode(self._before)
        finally:
            self._catch.__exit__(None, None, None)
            self._catch = None
        here, elsewhere = self._counts["here"], self._counts["elsewhere"]
        if steps:
            self.syncs_per_step = sum(here.values()) / steps
            self.sites = [f"{site} ({count / steps:g}/step)"
                          for site, count in here.most_common(5)]
            if elsewhere:
                self.sites.append(f"other threads ({elsewhere / steps:g}/step, not counted)")
