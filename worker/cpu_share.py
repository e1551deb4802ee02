"""The cores of one machine, shared by the replicas that decode on it at the same time.

llama.cpp computes every layer with all its threads in lock-step. Two replicas that decode at
once with a thread on every core each put two threads on every core, and each team then
waits on the other's preemptions: two models decoding 4 streams each on 2 cores gave 35
tokens/s each. With one thread each, on a core of its own, they gave 66 each.

So the replicas of a machine keep a small table in shared memory (/dev/shm): each has a row
(its pid, whether it is decoding, when it last said so). Before a round a replica takes
`its threads // the replicas decoding now` threads (llama_set_n_threads), and when it is
alone again, all of them. Each replica's OpenMP places start at a different core
(`place_offset`), so that when the threads are bound (worker/thread_binding.py) the shares
land on different cores: the first replica from core 0, the second from the middle, and so on.

A replica that dies leaves its row: a row whose pid is gone does not count (and the next
replica takes it), nor one not renewed for `STALE_S`.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from pathlib import Path

ROWS = 64
ROW = struct.Struct("<iid")  # pid, decoding (0/1), when it last said so (time.time())
STALE_S = 60.0  # a decoding row not renewed for this long is a replica that hangs (a round, even a
# long prompt chunk on a slow CPU, renews it; one that died is seen by its pid at once)
REFRESH_S = 0.5  # a decoding replica renews its row at least this often
READ_EVERY_S = 0.2  # how often a decoding replica looks at the others (a round is ~10-50 ms)


def shared_threads(own: int, decoding: int) -> int:
    """Threads for a replica whose own setting is `own` while `decoding` replicas (itself
    included) decode on the machine."""
    return max(1, own // max(1, decoding))


def place_offset(index: int, cpus: int) -> int:
    """The core a replica's first thread goes to: 0, then the middle, then the quarters...
    (the bits of `index` reversed), so that any few replicas start far apart."""
    fraction, weight = 0.0, 0.5
    while index:
        fraction += weight * (index & 1)
        index >>= 1
        weight /= 2
    return int(fraction * cpus) % max(1, cpus)


def rotated_places(cpus: list[int], offset: int) -> str:
    """OMP_PLACES listing `cpus` one to a place, starting at position `offset`."""
    order = cpus[offset:] + cpus[:offset]
    return ",".join(f"{{{c}}}" for c in order)


def board_path() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"homefleet-cpu-share-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class CpuBoard:
    """This process's row in the machine's table. `claim` at load, `decoding` before each
    round, `idle` when nothing decodes, `release` at unload."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or board_path()
        self.pid = os.getpid()
        self.index: int | None = None
        self._map: mmap.mmap | None = None
        self._decoding = False
        self._written = 0.0
        self._read = 0.0
        self._others = 0

    def claim(self) -> int:
        """Take the first free row (or one whose process is gone); returns its index."""
        import fcntl  # POSIX only: elsewhere the replica decodes with every thread, as before

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size < ROWS * ROW.size:
                os.ftruncate(fd, ROWS * ROW.size)
            self._map = mmap.mmap(fd, ROWS * ROW.size)
            for i in range(ROWS):
                pid, _, _ = ROW.unpack_from(self._map, i * ROW.size)
                if pid == 0 or not _alive(pid):
                    ROW.pack_into(self._map, i * ROW.size, self.pid, 0, 0.0)
                    self.index = i
                    return i
            raise RuntimeError(f"more than {ROWS} replicas on this machine share {self.path}")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def decoding(self, now: float | None = None) -> int:
        """Replicas decoding on the machine, this one included: called before each round."""
        now = time.time() if now is None else now
        if self._map is None or self.index is None:
            return 1
        if not self._decoding or now - self._written >= REFRESH_S:
            self._write(True, now)
        if now - self._read >= READ_EVERY_S:
            self._others = self._decoding_others(now)
            self._read = now
        return 1 + self._others

    def idle(self) -> None:
        if self._decoding and self._map is not None:
            self._write(False, time.time())
            self._read = 0.0  # look again as soon as it decodes

    def release(self) -> None:
        if self._map is not None and self.index is not None:
            ROW.pack_into(self._map, self.index * ROW.size, 0, 0, 0.0)
            self._map.close()
        self._map, self.index = None, None

    def _write(self, decoding: bool, now: float) -> None:
        ROW.pack_into(self._map, self.index * ROW.size, self.pid, int(decoding), now)
        self._decoding, self._written = decoding, now

    def _decoding_others(self, now: float) -> int:
        count = 0
        for i in range(ROWS):
            if i == self.index:
                continue
            pid, decoding, said = ROW.unpack_from(self._map, i * ROW.size)
            if pid and decoding and now - said < STALE_S and _alive(pid):
                count += 1
        return count
