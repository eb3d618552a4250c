"""Counting the host's implicit waits for a CUDA GPU over a stretch of training steps.

On a GPU the host queues work and goes on; an operation that needs a result on the host (a
blocking copy to or from the device, `.item()`, `bool()` of a device tensor, `nonzero`) makes
it wait until the GPU has run everything queued, and it cannot queue ahead meanwhile. PyTorch's
sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`) warns at each one PyTorch makes
("called a synchronizing CUDA operation"; an explicit `torch.cuda.synchronize()` is not one,
nor a wait inside the CUDA driver, such as staging a copy from pageable memory).

kbench's timers (kbench.train.StepTimer for Keras runs, kbench.bench.native_common for the
torch twin) watch the warm-up steps of a torch run on CUDA, never the timed ones (a warning
costs host time), and record `syncs_per_step` and, for the places they came from,
`sync_sites` (the Python lines that called the operation, the most frequent first).
"""

import collections
import warnings

SYNC_MESSAGE = "called a synchronizing CUDA operation"


def available():
    """Whether there is a CUDA device for torch to watch (torch imported by the run)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available()


class SyncWatch:
    """start() ... stop(steps): PyTorch's synchronizing operations in between, counted from
    its sync debug mode's warnings (which are taken out of the warnings the program sees; any
    other warning raised meanwhile is passed on at stop). `set_mode` sets the debug mode
    ("warn" / "default"): torch.cuda.set_sync_debug_mode unless given."""

    def __init__(self, set_mode=None):
        self._set_mode = set_mode
        self._catch = self._seen = None
        self.syncs_per_step = None
        self.sites = []

    def start(self):
        if self._set_mode is None:
            import torch

            self._set_mode = torch.cuda.set_sync_debug_mode
        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")
        self._set_mode("warn")

    @property
    def watching(self):
        return self._catch is not None

    def stop(self, steps):
        """Stop watching; `steps`: how many steps ran since start (None: nothing counted)."""
        if self._catch is None:
            return
        try:
            self._set_mode("default")
        finally:
            self._catch.__exit__(None, None, None)
            self._catch, seen, self._seen = None, self._seen, None
        syncs = collections.Counter()
        for caught in seen:
            if SYNC_MESSAGE in str(caught.message):
                syncs[f"{caught.filename}:{caught.lineno}"] += 1
            else:
                warnings.warn_explicit(caught.message, caught.category, caught.filename,
                                       caught.lineno)
        if steps:
            self.syncs_per_step = sum(syncs.values()) / steps
            self.sites = [f"{site} ({count / steps:g}/step)"
                          for site, count in syncs.most_common(5)]
