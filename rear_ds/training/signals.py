"""Preemption: SIGTERM (Slurm's kill, or --signal with a time margin) and SIGUSR1 (Slurm's usual warning
signal) only set a flag; the loop sees it at a step boundary (one step later, see StopFlag), saves a checkpoint
and exits with EXIT_PREEMPTED, which the Slurm script requeues. Ranks agree on the flag with an all-reduce, so a
signal that reaches only one process still stops every process at the same step."""
from __future__ import annotations

import logging
import signal
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger("rear_ds")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"

_received: list = []
_reported = [False]


def _handler(signum, frame):  # noqa: ARG001
    # Only record it: Python runs this between two bytecodes of the main thread, possibly in the middle of a
    # write to the same buffered stdout a log call would use ("reentrant call" RuntimeError). StopFlag.poll
    # says it at the next step.
    _received.append(signum)


def install() -> None:
    """SIGTERM and SIGUSR1 ask for a checkpoint and exit 75. SIGXFSZ is ignored: a file-size limit (ulimit -f)
    then fails the write with EFBIG, handled like a full disk, instead of killing the process."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def report() -> None:
    """Log the first signal received (outside the handler), once."""
    if _received and not _reported[0]:
        _reported[0] = True
        log.warning("received %s: will checkpoint at the next step boundary and exit %d",
                    signal.Signals(_received[0]).name, EXIT_PREEMPTED)


class StopFlag:
    """The ranks' agreement on "stop", one step late so that asking never stalls the GPU.

    A blocking all-reduce + ``.item()`` every step would make the host wait until the GPU has run every kernel
    queued so far, so the next step's kernels could not be queued behind the current ones. Instead, each
    :meth:`poll` queues this step's all-reduce and a non-blocking copy of its result to pinned host memory,
    marked by a CUDA event, and returns the PREVIOUS poll's result: waiting for that event waits only for the
    previous step's work, which the GPU has usually finished. Every rank reads the same reduced value at the
    same poll, so all ranks stop together, one step after the signal (Slurm's margins are minutes; a step is
    seconds). On the CPU (gloo) the all-reduce simply completes inside poll; the one-step delay is the same."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device if self.cuda else torch.device("cpu")
        self._pending = None  # (CUDA event or None, host tensor) of the previous poll

    def poll(self) -> bool:
        """Collective: call on all ranks once per step. True when some rank had a signal at the last poll."""
        report()
        # torch.full: a fill kernel on the GPU, no host-to-device copy (a pageable copy would synchronise)
        flag = torch.full((1,), 1 if _received else 0, dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True).wait()  # NCCL: the stream waits, not the host
        event = None
        if self.cuda:
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flag
        previous, self._pending = self._pending, (event, host)
        if previous is None:
            return False
        if previous[0] is not None:
            previous[0].synchronize()
        return bool(previous[1].item())


def run_helper(cmd: list, **popen_kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a helper the trainer waits on (e.g.
    ds_to_universal), with SIGUSR1 and SIGTERM blocked in the helper. Slurm delivers its warning signal, and on
    scancel/preemption SIGTERM, to every process of the step, and both terminate by default: the helper would
    die half-way, while the signal is meant for the trainer, which checkpoints at its next step boundary (a
    helper that outlives the job is ended by Slurm's SIGKILL after KillWait). The block is inherited through
    exec; in this process it lasts only while the helper is spawned (a signal that arrives then is delivered
    right after)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kw)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
