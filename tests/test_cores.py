"""Co-located workers share the cores: the split ``llmcluster up`` makes, a worker pinned
to its cores (``--cpus``) with one compute thread per core (``--threads``), and the
warning when the threads exceed the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO_ROOT, start_worker
from worker.cores import ComputeLock, format_cpus, split_cores


def test_split_cores_is_even_contiguous_and_shares_when_short() -> None:
    assert split_cores([0, 1], 2) == [[0], [1]]
    assert split_cores([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert split_cores([4, 5, 6, 7], 1) == [[4, 5, 6, 7]]
    assert split_cores([0], 3) == [[0], [0], [0]]
    with pytest.raises(ValueError):
        split_cores([0, 1], 0)
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def _placed(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import os, sys, logging; logging.basicConfig(level=logging.INFO)\n"
        "from worker.cores import place\n"
        f"p = place({args[0]}, {args[1]})\n"
        "import torch\n"
        "print(sorted(os.sched_getaffinity(0)), p.threads, torch.get_num_threads())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_place_pins_and_sets_the_threads_torch_uses() -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    out = _placed(f"[{cpu}]", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"[{cpu}]", "1", "1"]
    assert "contend" not in out.stderr


def test_more_threads_than_cores_warns() -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    out = _placed(f"[{cpu}]", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == [f"[{cpu}]", "3"]  # torch caps it at the machine's cores
    assert "3 compute threads on 1 allowed core(s)" in out.stderr


def test_a_worker_runs_on_the_cores_it_is_given() -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    proc = start_worker("--engine", "null", "--cpus", str(cpu), "--threads", "1")
    try:
        proc.wait_healthy(timeout_s=120)
        status = Path(f"/proc/{proc.popen.pid}/status").read_text()
        allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
        assert allowed.split()[-1] == str(cpu)
        assert f"computes on core(s) {cpu} with 1 thread(s)" in proc.output()
    finally:
        proc.stop()


def test_a_worker_refuses_cores_that_do_not_exist() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llmcluster", "worker", "--cpus", "4096", "--engine", "null"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "4096" in out.stderr and "Traceback" not in out.stderr


def test_the_compute_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    """Co-located workers take turns per step through one flock'd file."""
    path = tmp_path / "cores.lock"
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
    )
    lock = ComputeLock(str(path))
    try:
        with lock:
            held = subprocess.run([sys.executable, "-c", probe], timeout=60)
        free = subprocess.run([sys.executable, "-c", probe], timeout=60)
    finally:
        lock.close()
    assert (held.returncode, free.returncode) == (3, 0)


_POOL_PROBE = """
import os, threading, torch
from worker.cores import release_openmp_workers

def tasks():
    return len(os.listdir("/proc/self/task"))

def work():
    torch.set_num_threads(2)
    a = torch.randn(400_000)
    for _ in range(50):
        a + a  # a parallel region: this thread's OpenMP pool gets its worker
    busy = tasks()
    released = release_openmp_workers()
    print(busy, tasks(), released, release_openmp_workers())
    (a + a).sum()  # the pool comes back for the next parallel region
    print(tasks())

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""


def test_release_openmp_workers_ends_the_calling_threads_pool_and_it_comes_back() -> None:
    # In a child: the test process's own thread settings stay untouched.
    result = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    first, second = result.stdout.split("\n")[:2]
    busy, after, released, again = first.split()
    assert released == "True" and again == "True", result.stdout
    assert int(after) == int(busy) - 1  # the one worker of a 2-thread pool ended
    assert int(second) == int(busy)  # and a later parallel region made it again
