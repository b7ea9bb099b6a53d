"""Preemption: SIGTERM (Slurm's kill, or --signal with a time margin) and SIGUSR1 (Slurm's usual warning
signal) only set a flag; the loop sees it at the next step boundary, saves a checkpoint and exits with
EXIT_PREEMPTED, which the Slurm script requeues. Ranks agree on the flag with an all-reduce, so a signal
that reaches only one process still stops every process at the same step."""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("rear_ds")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"

_received: list = []


def _handler(signum, frame):  # noqa: ARG001
    if not _received:
        log.warning("received %s: will checkpoint at the next step boundary and exit %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)
    _received.append(signum)


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def stop_requested() -> bool:
    """True on every rank if any rank received a stop signal (a collective: call on all ranks)."""
    t = torch.tensor([1 if _received else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
