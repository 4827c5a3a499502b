"""Which CPU cores a worker computes on, and with how many threads.

Two workers on one machine that each take every core thrash each other (OpenMP threads
of both processes fighting over the same cores: issue 14 measured 16 streams 3.5 s on one
worker, 9.9-46.5 s over two co-located ones). ``llmcluster up`` therefore gives each of
its workers its own cores (:func:`split_cores`), the worker pins itself to them
(``--cpus``, ``os.sched_setaffinity``) and runs as many compute threads as it has cores
(``--threads``). Applied before torch is imported, so every thread torch starts obeys it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity mask)."""
    return sorted(os.sched_getaffinity(0))


def split_cores(cpus: Sequence[int], parts: int) -> list[list[int]]:
    """``cpus`` divided into ``parts`` contiguous groups as even as possible; with fewer
    cores than parts, the groups share cores round-robin (one core each)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    cpus = list(cpus)
    if len(cpus) < parts:
        return [[cpus[i % len(cpus)]] for i in range(parts)]
    size, extra = divmod(len(cpus), parts)
    groups, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        groups.append(cpus[start:end])
        start = end
    return groups


def format_cpus(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class CorePlacement:
    """Where the worker computes: its cores and its compute threads."""

    cpus: tuple[int, ...]
    threads: int


def serving_threads(threads: int) -> int:
    """The engine's compute threads: ``--threads``, or one per core this process may use."""
    return threads or len(allowed_cpus())


def place(cpus: Sequence[int], threads: int) -> CorePlacement:
    """Pins this process to ``cpus`` (empty: keep the current mask) and sets the compute
    threads (0: one per allowed core) through OMP_NUM_THREADS / MKL_NUM_THREADS, which
    torch reads when it starts; warns when the threads exceed the cores. Call it before
    torch is imported."""
    if cpus:
        unknown = sorted(set(cpus) - set(range(os.cpu_count() or 1)))
        if unknown:
            raise ValueError(f"cpus {unknown} do not exist (this machine has {os.cpu_count()})")
        os.sched_setaffinity(0, set(cpus))
    allowed = allowed_cpus()
    threads = serving_threads(threads)
    if threads > len(allowed):
        logger.warning(
            "%d compute threads on %d allowed core(s) (%s): threads will contend for cores; "
            "use --threads %d",
            threads,
            len(allowed),
            format_cpus(allowed),
            len(allowed),
        )
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    return CorePlacement(tuple(allowed), threads)


class ComputeLock:
    """A lock over one machine's cores, shared by the workers ``llmcluster up`` starts
    there (``--compute-lock PATH``, an exclusive ``flock``): each engine step holds it, so
    co-located workers take turns with every core instead of running twice the threads
    there are cores (every OpenMP barrier then waits for a descheduled thread). An idle
    worker never takes it, so a lone busy worker runs as fast as it would alone."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Opened once (created if missing); the lock belongs to this open file.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> ComputeLock:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


_omp_pause: Any = None  # libgomp's omp_pause_resource_all, once looked up (False: none)


def release_openmp_workers() -> bool:
    """Ends the calling thread's OpenMP worker threads (libgomp's
    ``omp_pause_resource_all``, soft); its next parallel region starts them again.
    False where torch's OpenMP is not libgomp (nothing done).

    Why: libgomp counts the workers of every thread's pool, and once they outnumber the
    cores each pool spins only briefly before sleeping, so every parallel region of the
    engine pays a futex wake-up. Measured on the 2-core VM: the int4 decode step of the
    default model 16 ms on the thread that loaded the model, 27 ms on an engine thread
    while the loader's pool lived. So the thread that loads a model releases its pool
    before the engine starts, and an engine releases its own when it goes idle."""
    global _omp_pause
    if _omp_pause is None:
        _omp_pause = _find_omp_pause() or False
    if _omp_pause is False:
        return False
    return int(_omp_pause(1)) == 0  # omp_pause_soft; -1 inside a parallel region


def _find_omp_pause() -> Any:
    import ctypes

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all  # the copy already loaded
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None
