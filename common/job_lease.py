"""Job leases: which worker owns a fine-tuning job on a job store shared by many workers.

A job's lease lives in the job's folder as ``lease.<epoch>`` files; the highest epoch
is the current lease. Each file holds JSON: the owner's ``worker_id``, its
``incarnation`` (one per worker process), the ``epoch``, ``lease_s`` and the time of
the last renewal.

* **Claim** (:func:`try_claim`): write a uniquely named temp file, then ``os.link`` it
  to ``lease.<epoch>``. ``link`` fails with ``FileExistsError`` when the name exists,
  atomically, also on NFS (the classic lock-file recipe), so of two workers claiming
  one epoch exactly one wins.
* **Renewal** (:class:`LeaseKeeper`): the owner rewrites its own ``lease.<epoch>`` (temp
  file + ``os.replace``, never half a file) every ``lease_s / 3`` from a thread.
* **Expiry** (:class:`LeaseObserver`): judged by each observer on its own monotonic
  clock: a lease whose content has not changed for ``lease_s`` seconds of the
  observer's time is expired. Wall clocks of different hosts are never compared, so
  clock skew cannot expire a live lease. A released lease (the owner finished or shut
  down cleanly) is expired at once.
* **Loss**: an owner that finds a higher epoch written by someone else has lost the
  job (someone judged its lease expired and took over) and must stop writing to it.
* **Fencing** (:class:`LeaseFence`): the training process gets its lease epoch and
  checks it before every write; a process whose epoch is no longer current stops.
  This narrows, not closes, the window of a paused owner (a check and the write
  after it are not one atomic step): leases assume an owner that stalls for less than
  ``lease_s`` between a check and its write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LEASE_PREFIX = "lease."
_LEASE_NAME = re.compile(r"lease\.(\d+)")


class LeaseLost(Exception):
    """This process's lease epoch is no longer the job's current one."""


@dataclass(frozen=True)
class Lease:
    """One ``lease.<epoch>`` file as read (``raw`` is its content, which observers compare)."""

    epoch: int
    worker_id: str
    incarnation: str
    lease_s: float
    renewed_unix_ms: int
    released: bool = False
    raw: bytes = b""

    def held_by(self, worker_id: str, incarnation: str) -> bool:
        return self.worker_id == worker_id and self.incarnation == incarnation


def lease_path(job_dir: Path, epoch: int) -> Path:
    return job_dir / f"{LEASE_PREFIX}{epoch}"


def current_epoch(job_dir: Path) -> int:
    """The highest lease epoch in ``job_dir`` (0 = the job has never been claimed)."""
    try:
        names = os.listdir(job_dir)
    except FileNotFoundError:
        return 0
    epochs = [int(m.group(1)) for n in names if (m := _LEASE_NAME.fullmatch(n))]
    return max(epochs, default=0)


def read_current(job_dir: Path, fallback_lease_s: float = 15.0) -> Lease | None:
    """The job's current lease (highest epoch), or None when it has none. OSError (the
    store did not answer) propagates: no verdict on a lease that could not be read."""
    epoch = current_epoch(job_dir)
    if not epoch:
        return None
    raw = lease_path(job_dir, epoch).read_bytes()
    try:
        data = json.loads(raw)
        return Lease(
            epoch=epoch,
            worker_id=str(data["worker_id"]),
            incarnation=str(data["incarnation"]),
            lease_s=float(data["lease_s"]),
            renewed_unix_ms=int(data["renewed_unix_ms"]),
            released=bool(data.get("released", False)),
            raw=raw,
        )
    except (ValueError, KeyError, TypeError) as exc:
        # Files are written whole (link / replace of a complete temp file), so this is
        # damage, not a write in progress. Judged like any lease, by whether its content
        # changes (a live holder rewrites it whole), with the observer's own lease_s.
        logger.warning("damaged lease %s: %s", lease_path(job_dir, epoch), exc)
        return Lease(epoch, "", "", fallback_lease_s, 0, raw=raw)


def _content(
    epoch: int, worker_id: str, incarnation: str, lease_s: float, released: bool = False
) -> bytes:
    return json.dumps(
        {
            "epoch": epoch,
            "worker_id": worker_id,
            "incarnation": incarnation,
            "lease_s": lease_s,
            "renewed_unix_ms": int(time.time() * 1000),
            # Renewals must change the content even within one millisecond: observers
            # judge liveness by change.
            "nonce": uuid.uuid4().hex,
            "released": released,
        }
    ).encode()


def _write_temp(job_dir: Path, content: bytes) -> Path:
    tmp = job_dir / f".lease.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def try_claim(
    job_dir: Path, epoch: int, worker_id: str, incarnation: str, lease_s: float
) -> Lease | None:
    """Claims ``lease.<epoch>``; None when another claim of that epoch won."""
    content = _content(epoch, worker_id, incarnation, lease_s)
    tmp = _write_temp(job_dir, content)
    try:
        os.link(tmp, lease_path(job_dir, epoch))
    except FileExistsError:
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return Lease(epoch, worker_id, incarnation, lease_s, int(time.time() * 1000), raw=content)


def renew(lease: Lease, job_dir: Path, released: bool = False) -> Lease:
    """Rewrites the owner's lease file; raises LeaseLost when a higher epoch exists.

    A claim of a higher epoch between the check and the replace is harmless: it is a
    different file, and the next renewal finds it."""
    newest = current_epoch(job_dir)
    if newest != lease.epoch:
        raise LeaseLost(f"{job_dir.name}: epoch {newest} replaced this worker's {lease.epoch}")
    content = _content(lease.epoch, lease.worker_id, lease.incarnation, lease.lease_s, released)
    tmp = _write_temp(job_dir, content)
    try:
        os.replace(tmp, lease_path(job_dir, lease.epoch))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Lease(
        lease.epoch,
        lease.worker_id,
        lease.incarnation,
        lease.lease_s,
        int(time.time() * 1000),
        released=released,
        raw=content,
    )


class LeaseObserver:
    """Judges other owners' leases expired on this process's own monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # key -> (content last seen, when it was first seen with that content)
        self._seen: dict[str, tuple[bytes, float]] = {}

    def expired(self, key: str, lease: Lease) -> bool:
        """True when ``lease`` is released, or its content has not changed for its
        ``lease_s`` since this observer first saw that content."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != lease.raw:
            self._seen[key] = (lease.raw, now)
            seen = self._seen[key]
        return lease.released or now - seen[1] >= lease.lease_s

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class LeaseKeeper:
    """Renews the leases this worker holds every ``lease_s / 3`` from a thread.

    A lease found taken (a higher epoch) or not renewed for ``lease_s`` of this
    process's time (storage errors) is lost: it leaves the keeper and its key is
    reported by :meth:`take_lost`, for the job manager to stop the job's trainer."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._lock = threading.Lock()  # guards _held and _lost (thread and event loop)
        # Held across one lease file write, so a release never races a renewal that
        # would overwrite the released lease with a live one.
        self._io_lock = threading.Lock()
        self._held: dict[str, tuple[Path, Lease, float]] = {}  # key -> (dir, lease, renewed)
        self._lost: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="job-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def hold(self, key: str, job_dir: Path, lease: Lease) -> None:
        with self._lock:
            self._held[key] = (job_dir, lease, time.monotonic())

    def epoch(self, key: str) -> int:
        """The epoch held for ``key`` (0 = not held)."""
        with self._lock:
            held = self._held.get(key)
        return held[1].epoch if held else 0

    def release(self, key: str) -> None:
        """Stops renewing and marks the lease released, so others may take it at once."""
        with self._io_lock:
            with self._lock:
                held = self._held.pop(key, None)
            if held is None:
                return
            job_dir, lease, _ = held
            try:
                renew(lease, job_dir, released=True)
            except (LeaseLost, OSError) as exc:
                logger.info("lease of %s not released: %s", key, exc)

    def drop(self, key: str) -> None:
        """Stops renewing without writing (the lease is lost already)."""
        with self._lock:
            self._held.pop(key, None)

    def take_lost(self) -> list[str]:
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def renew_all(self) -> None:
        """One renewal round (the thread's body; tests call it directly)."""
        with self._lock:
            keys = list(self._held)
        for key in keys:
            with self._io_lock:
                reason = self._renew_one(key)
            if reason:
                logger.warning("lease of %s lost: %s", key, reason)

    def _renew_one(self, key: str) -> str:
        """Renews one held lease (under the IO lock); the reason it is lost, or ""."""
        with self._lock:
            held = self._held.get(key)
        if held is None:
            return ""  # released meanwhile
        job_dir, lease, renewed = held
        try:
            new = renew(lease, job_dir)
        except LeaseLost as exc:
            reason = str(exc)
        except OSError as exc:
            if time.monotonic() - renewed < self.lease_s:
                logger.warning("lease of %s not renewed (retrying): %s", key, exc)
                return ""
            reason = f"not renewed for {self.lease_s:g} s: {exc}"
        else:
            with self._lock:
                self._held[key] = (job_dir, new, time.monotonic())
            return ""
        with self._lock:
            self._held.pop(key, None)
            self._lost.append(key)
        return reason

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew_all()
            except Exception:  # the keeper must outlive any one job's trouble
                logger.exception("lease renewal round failed")


class LeaseFence:
    """Held by the training process: :meth:`check` raises LeaseLost once the job's
    current lease epoch is no longer the one the process was started under."""

    def __init__(self, job_dir: Path, epoch: int) -> None:
        self.job_dir = job_dir
        self.epoch = epoch

    def check(self) -> None:
        current = current_epoch(self.job_dir)
        if current != self.epoch:
            raise LeaseLost(
                f"job lease epoch is {current}, this process was started under {self.epoch}"
            )
