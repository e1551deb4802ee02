"""Where llama.cpp's CPU threads run: one to a core when they use every core.

llama.cpp computes each layer with all its threads in lock-step (OpenMP barriers), so a
thread that the kernel moves, or parks behind another process's thread, stalls the others.
When a replica's threads cover every core this process may use, there is no better core
to move to, and binding them one to a core (OpenMP's OMP_PROC_BIND) keeps each one's
caches warm: 8 streams of Gemma 3 270M through `homefleet up` on 2 cores went from 167.6
to 173.5 tokens/s (median of 8 interleaved waves each). Replicas that decode at once split
the cores (worker/cpu_share.py): a later replica's places start at another core, so that its
share of threads is bound to cores of its own. With fewer threads than cores the kernel is
left to spread them, as other replicas on the node may need the rest.

libgomp reads its environment once, when llama.cpp's library loads: this must run in the
replica's process before `llama_cpp` is first imported. A user's own OMP_PROC_BIND wins.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

from worker.cpu_share import rotated_places


def usable_cpu_list() -> list[int]:
    """The logical CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    return len(usable_cpu_list())


def should_bind(n_threads: int, cpus: int, environ: MutableMapping[str, str], library_loaded: bool) -> bool:
    if "OMP_PROC_BIND" in environ or library_loaded:
        return False
    return n_threads >= cpus


def bind_threads_if_whole_machine(n_threads: int, environ: MutableMapping[str, str] | None = None,
                                  first_core: int = 0) -> bool:
    """Set OMP_PROC_BIND=true for this process when `n_threads` use every usable core, with
    its places starting at the `first_core`-th usable CPU (worker/cpu_share.py: replicas
    that share the machine start apart). Returns whether llama.cpp's threads will be bound
    (the user's own setting counts)."""
    environ = os.environ if environ is None else environ
    cpus = usable_cpu_list()
    if should_bind(n_threads, len(cpus), environ, "llama_cpp" in sys.modules):
        environ["OMP_PROC_BIND"] = "true"
        if first_core and "OMP_PLACES" not in environ:
            environ["OMP_PLACES"] = rotated_places(cpus, first_core % len(cpus))
        return True
    return environ.get("OMP_PROC_BIND", "false").strip().lower() not in ("false", "")
