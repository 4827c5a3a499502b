"""Data-parallel training across processes: ranks, their launcher, and the collectives.

A job with ``nproc`` N runs N rank processes started the way ``torchrun`` starts them:
each gets ``MASTER_ADDR`` / ``MASTER_PORT`` (a free loopback port), ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` and joins the group with
``init_process_group("env://")`` (gloo on CPU, NCCL on CUDA). Because the variables are
torchrun's own, ``torchrun --nnodes ... --rdzv-endpoint ... -m trainer`` runs the same
training across machines. torch is imported where used: the launcher needs none.

Every optimizer step's micro-batches are the single-process ones, each split across the
ranks (rank r takes examples r, r+N, ...); gradients are summed with ``all_reduce`` and
the loss is normalised by the step's learned tokens over all ranks, so N ranks compute
the gradient one process would. This is done by hand rather than with
``DistributedDataParallel``: DDP averages gradients over ranks, which is not the
token-weighted mean when ranks hold different token counts, and it needs every rank to
run a forward pass, which a rank whose share of a short last micro-batch is empty has not.

Rank 0 alone decides to stop (cancel, lease lost) and tells the others between steps,
and it alone writes checkpoints, events, metrics and the artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# torchrun's variables (torch.distributed.run): a process started with them is a rank.
TORCHRUN_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)
# How long the other ranks may outlive one that exited with an error before they are
# killed: long enough for rank 0 to notice (a gloo peer closing is seen in milliseconds)
# and write its own terminal state.
PEER_EXIT_GRACE_S = 15.0

T = TypeVar("T")


class PeerStopped(Exception):
    """Raised on ranks other than 0 when rank 0 stopped the run (an error, lost lease)."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in the group; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """The ranks torchrun (or :func:`launch`) described in the environment."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, int(env.get("LOCAL_RANK", str(rank))))

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every world_size-th from its rank."""
        return list(items[self.rank :: self.world_size])


def init_group(ranks: Ranks, device: str) -> str:
    """Joins the process group (gloo on CPU, NCCL on CUDA); returns this rank's device
    (``cuda:LOCAL_RANK`` when training on CUDA)."""
    import torch
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{ranks.local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    logger.info("rank %d/%d joined (%s on %s)", ranks.rank, ranks.world_size, backend, device)
    return device


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: Sequence[float], device: str) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def from_rank0(value: int, device: str) -> int:
    """Rank 0's ``value`` on every rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def sum_gradients(params: Iterable[torch.Tensor], bucket_numel: int = 1 << 24) -> None:
    """Replaces each parameter's gradient by its sum over ranks, a missing one counting
    as zero; flattened in buckets so a full fine-tune is not one collective per tensor."""
    import torch
    import torch.distributed as dist

    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()
        size = 0

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p.grad)
        size += p.numel()
        if size >= bucket_numel:
            flush()
    flush()


def copy_from_rank0(params: Iterable[torch.Tensor]) -> None:
    """Every rank starts from rank 0's trainable weights."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def gather_named(
    local: dict[str, torch.Tensor], ranks: Ranks, device: str
) -> dict[str, torch.Tensor]:
    """Every rank's ``local`` tensors (same names and shapes on each) on every rank,
    rank r's under ``rank<r>.<name>`` and rank 0's under their own names."""
    import torch
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for name in sorted(local):
        t = local[name].to(device)
        parts = [torch.empty_like(t) for _ in range(ranks.world_size)]
        dist.all_gather(parts, t)
        for r, part in enumerate(parts):
            out[name if r == 0 else f"rank{r}.{name}"] = part.cpu()
    return out


def of_rank(named: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The tensors :func:`gather_named` stored for ``rank`` (empty if it stored none)."""
    if rank == 0:
        return {k: v for k, v in named.items() if not k.startswith("rank")}
    prefix = f"rank{rank}."
    return {k[len(prefix) :]: v for k, v in named.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(
    base: Mapping[str, str], rank: int, nproc: int, port: int, threads: int
) -> dict[str, str]:
    """The environment of one local rank, as torchrun would set it."""
    env = {k: v for k, v in base.items() if k not in TORCHRUN_ENV}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
    )
    return env


def launch(
    argv: Sequence[str],
    nproc: int,
    threads: int,
    on_failure: Callable[[str], None] | None = None,
    poll_s: float = 0.2,
    grace_s: float = PEER_EXIT_GRACE_S,
) -> int:
    """Runs ``python *argv`` as ``nproc`` ranks and returns rank 0's exit code.

    The ranks stay in this process's group, so a signal to the group (the worker's
    cancel or kill) reaches all of them; they exit on their own if this process dies.
    When rank 0 exits the others get ``grace_s`` to finish and are then killed. When another rank fails first, rank 0 gets the same grace to notice and
    report; if it does not, all are killed, ``on_failure`` is told why, and the result
    is 1.
    """
    port = free_port()
    per_rank = max(1, threads // nproc)
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(os.environ, r, nproc, port, per_rank),
            stdin=subprocess.DEVNULL,
        )
        for r in range(nproc)
    ]
    logger.info(
        "started %d ranks (pids %s, %d threads each, port %d)",
        nproc,
        ", ".join(str(p.pid) for p in procs),
        per_rank,
        port,
    )

    failed: tuple[int, int] | None = None
    failed_at = 0.0
    try:
        while True:
            code0 = procs[0].poll()
            if code0 is not None:
                _stop(procs[1:], grace_s)
                return code0
            if failed is None:
                for r, p in enumerate(procs[1:], start=1):
                    code = p.poll()
                    if code is not None and code != 0:
                        failed, failed_at = (r, code), time.monotonic()
                        logger.error("rank %d exited with code %d", r, code)
                        break
            elif time.monotonic() - failed_at > grace_s:
                _stop(procs, 0.0)
                why = f"rank {failed[0]} of {nproc} exited with code {failed[1]}"
                if on_failure is not None:
                    on_failure(why)
                return 1
            time.sleep(poll_s)
    finally:
        _stop(procs, 0.0)


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.kill()
            p.wait()
