"""How much of the machine other work took while a run ran: `kbench compare` records it per
run (`other_cpu_share`) and flags rows past OTHER_LOAD_FLAG under its table.

A timing taken while other processes compete for the CPU measures the competition too: on
our 2-core machine, with other jobs holding the load average near 2.5, Keras-torch and plain
PyTorch (whose OpenMP threads spin for cores they do not get) ran 15-30x slower than alone,
and nothing in the results said so. The share is the machine's busy CPU time over the run
(user, nice, system, irq, softirq, and steal: time a hypervisor gave another machine), less
this process's and its reaped children's (the run itself), over the run's wall time times
the number of CPUs this process may run on (its affinity: a container's cpuset, not the
host's every core), counted on those CPUs alone. It covers the whole run (start-up
included), not only its timed steps.
"""

import os
import resource
import time

# A row whose run shared the machine with other work past this share is flagged: a quarter
# of a 2-core machine is half a core, enough to slow a run measurably.
OTHER_LOAD_FLAG = 0.25


def _own_cpu_s():
    """CPU seconds of this process and of its children it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _cpus():
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _busy_cpu_s(cpus):
    """Busy CPU seconds so far on `cpus`, from /proc/stat's `cpuN` lines by their number
    (an offline CPU is left out of it, so a position in the list is not a CPU's number);
    None where there is no /proc/stat or it lacks one of them."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
    busy = {int(fields[0][3:]): sum(int(v) for i, v in enumerate(fields[1:9], start=1)
                                    if i not in (4, 5))
            for fields in lines}
    if any(cpu not in busy for cpu in cpus):
        return None
    return sum(busy[cpu] for cpu in cpus) / tick


class OtherLoad:
    """Start before a run's process, `share()` after it has been waited for."""

    def __init__(self):
        self._cpus = _cpus()
        self._wall, self._busy = time.monotonic(), _busy_cpu_s(self._cpus)
        self._own = _own_cpu_s()

    def share(self):
        """Other work's share of this process's CPUs' time since start (0..1), or None."""
        busy, wall = _busy_cpu_s(self._cpus), time.monotonic() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return None
        other = (busy - self._busy) - (_own_cpu_s() - self._own)
        return min(1.0, max(0.0, other / (wall * len(self._cpus))))
