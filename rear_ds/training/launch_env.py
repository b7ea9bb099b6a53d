"""Training's launch: the rendezvous for the rank, local rank and world size :mod:`rear_ds.launch` reads.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Under ``srun`` (no launcher, one task per process) only SLURM_* variables exist: we translate them so
that ``torch.distributed`` can rendezvous over TCP with no ssh between nodes. The master address is
the first host of SLURM_JOB_NODELIST (``scontrol show hostnames``, or our own parser when scontrol
is not on PATH); the port is derived from the job id so that two jobs on one node do not collide.
On GPUs the processes of each node then agree on who drives which visible GPU (:func:`assign_gpu`), which
works for every Slurm GPU binding. Every script that starts a process group ends through :func:`exit_process`.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Optional

from rear_ds.launch import LaunchError, parse, slurm_tasks_on_this_node  # noqa: F401  (LaunchError: raised from here too)


@dataclass
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "deepspeed/torchrun", "slurm" or "single"


def expand_nodelist(nodelist: str) -> list:
    """``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]`` (no scontrol)."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in nodelist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, parts):
        hosts += _expand_brackets(part)
    return hosts


def _expand_brackets(name: str) -> list:
    """``"rack[1-2]-n[01-02]"`` -> rack1-n01, rack1-n02, rack2-n01, rack2-n02 (Slurm's order)."""
    m = re.match(r"([^\[]*)\[([^\]]+)\](.*)", name)
    if not m:
        return [name]
    prefix, ranges, rest = m.groups()
    items = []
    for r in ranges.split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            items += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            items.append(r)
    return [prefix + item + tail for item in items for tail in _expand_brackets(rest)]


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass  # scontrol missing or failing: parse the list ourselves
    return expand_nodelist(nodelist)[0]


def detect() -> LaunchEnv:
    """This process's rank, local rank and world size (:func:`rear_ds.launch.parse`, array tasks ignored); under
    plain srun, export the variables torch.distributed needs. A CPU run (DS_ACCELERATOR=cpu) gets no GPU
    (:func:`hide_gpus_from_cpu_runs`)."""
    hide_gpus_from_cpu_runs()
    env = os.environ
    launch = parse(env, array=False)
    if launch.launcher == "slurm":
        # rank 0 runs on the first node of this job step (a step may use fewer nodes than the job)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env.setdefault("MASTER_ADDR", first_host(nodes or "127.0.0.1"))
        # below Linux's ephemeral range (32768-60999), so an outgoing connection cannot hold the port
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 12000))
        # LOCAL_SIZE: DeepSpeed's CPU accelerator takes it for the device count (ZeRO-3's and ZeRO++'s node groups)
        env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.procs), LOCAL_RANK=str(launch.local_rank),
                   LOCAL_SIZE=str(slurm_tasks_on_this_node(env)))
    elif launch.launcher == "single":
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29512")
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return LaunchEnv(launch.rank, launch.local_rank, launch.procs, launch.launcher)


def visible_gpus() -> list:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs; all of the node's when
    it is unset). Processes of one job step on one node name a GPU the same way, so their lists compare."""
    import torch

    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return [g.strip() for g in cvd.split(",") if g.strip()][:torch.cuda.device_count()]


def assign_gpu(local_rank: int, visible: dict) -> int:
    """This process's CUDA device index among the GPUs it sees.

    ``visible``: local rank -> the GPUs that process sees, for this node's processes up to this one. Going
    through them in local-rank order, each takes the first GPU of its list that no earlier one took. That is
    the local rank when every process sees all GPUs (deepspeed, torchrun, plain srun), 0 when each sees only
    its own (srun --gpus-per-task=1, --gpu-bind=single:1), and one GPU each when groups of processes share a
    subset, in any task order (--gpu-bind=closest: 8 tasks, each seeing the 4 GPUs of its socket)."""
    taken: set = set()
    for r in range(local_rank + 1):
        free = [g for g in visible[r] if g not in taken]
        if not free:
            raise LaunchError(
                f"no GPU left for local rank {r}: it sees {visible[r]} (CUDA_VISIBLE_DEVICES) and the processes "
                f"with lower local ranks on this node took {sorted(taken)}. Start at most one process per GPU, "
                "or bind one GPU per task (srun --gpus-per-task=1)")
        taken.add(free[0])
    return visible[local_rank].index(free[0])


def exchange_gpus(store, local_rank: int, world_size: int, mine: list, host: str) -> int:
    """:func:`assign_gpu` with the GPU lists (``mine``: :func:`visible_gpus`) of the processes on ``host``,
    exchanged through the rendezvous store: a device must be chosen before the process group opens its NCCL
    communicator on it."""
    import json

    key = f"rear_gpus/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"  # torchrun's store outlives a restart
    store.set(f"{key}{host}/{local_rank}", json.dumps(mine))
    if store.add(f"{key}arrived", 1) == world_size:  # a barrier on the store
        store.set(f"{key}all", "1")
    store.wait([f"{key}all"])
    visible = {r: json.loads(store.get(f"{key}{host}/{r}")) for r in range(local_rank)}
    return assign_gpu(local_rank, {**visible, local_rank: mine})


def hide_gpus_from_cpu_runs() -> None:
    """A run on the CPU accelerator (DS_ACCELERATOR=cpu) on a GPU node must not touch CUDA: no context on a GPU
    per process (the CUDA RNG state, pinned DataLoader memory), no MFU against the GPU's peak. Hiding the GPUs
    before anything initialises CUDA does it for this process and every helper it starts."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def init_distributed(launch: LaunchEnv, timeout_s: int):
    """Start the process group: nccl on GPUs, gloo on the CPU. A dead or hung peer fails a collective
    after ``timeout_s`` instead of blocking forever. Returns the torch device of this process.

    The rendezvous store comes first: on GPUs the processes of a node agree through it on who drives which GPU
    (:func:`exchange_gpus`) before the process group exists."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from torch.distributed import distributed_c10d as c10d

    if dist.is_initialized():  # e.g. tests/scale_probe.py runs several trainings in one process group
        return torch.device(get_accelerator().current_device_name())
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed makes its own groups (data-parallel, ZeRO) with dist.new_group(), which takes torch's module-wide
    # default (30 min gloo, 10 min nccl), not the world group's: make that default ours too.
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=timeout))
    store.set_timeout(timeout)
    if get_accelerator().device_name() == "cuda":
        import socket

        index = exchange_gpus(store, launch.local_rank, launch.world_size, visible_gpus(), socket.gethostname())
        # DeepSpeed (the engine, zero.Init) reads the device from $LOCAL_RANK: make it agree
        os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device(get_accelerator().device_name()), "gloo"
        at_exit(lambda code: remove_shm_buffers(launch.rank))
        if launch.local_rank == 0:
            remove_orphaned_shm_buffers()
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout,
                            device_id=device if backend == "nccl" and launch.world_size > 1 else None)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    return device


def gather_problems(problem: Optional[str]) -> list:
    """Every rank's problem (None = fine) on every rank, as "rank r: problem": one collective, so all ranks
    take the same branch afterwards."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, problem)
    return [f"rank {r}: {p}" for r, p in enumerate(out) if p]


_at_exit: list = []


def at_exit(fn) -> None:
    """Run ``fn(exit_code)`` in :func:`exit_process` (the last registered first): Python's atexit handlers do
    not run there. For what must happen however the process ends: finish the W&B run, unlink the CPU
    all-reduce buffer, finish deleting old checkpoints."""
    _at_exit.append(fn)


def exit_process(code: int) -> "NoReturn":
    """End this process with ``code`` now: the :func:`at_exit` work, flush the logs and stdio, ``os._exit``.
    Every script that starts a process group ends through here, after its last collective.

    Interpreter finalization is skipped on purpose: DeepSpeed keeps its engine and communication groups alive,
    so gloo's threads (and rank 0's TCP store) still run when Python tears the modules down, and destroying the
    backends under running threads aborts the process ("terminate called without an active exception",
    SIGABRT) after the work is done; under NCCL that teardown can hang instead. Either turns exit 0 or 75
    (requeue me) into a failure. Nothing is lost: the run's files are closed (and fsynced where it matters)
    before this point or by the at_exit work."""
    import logging
    import sys

    for fn in reversed(_at_exit):
        try:
            fn(code)
        except Exception as e:  # exiting with the right code matters more
            logging.getLogger("rear_ds").warning("at exit: %s: %s", type(e).__name__, e)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_and_exit(main) -> "NoReturn":
    """The ``__main__`` of every script that starts a process group: ``main()``'s return value (or SystemExit's
    code; 1 and the traceback after an uncaught exception) through :func:`exit_process`."""
    import traceback

    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code or 0)


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def remove_shm_buffers(rank: int) -> list:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    66 MiB in /dev/shm). DeepSpeed never removes it, so every CPU launch would leak RAM until reboot. Unlinking
    only drops the name: peers that mapped it keep their mapping. Returns the paths removed."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    removed = []
    if not addr or not port:
        return removed
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getuid()}_{addr}_{port}_{rank}")
    try:
        os.unlink(path)
        removed.append(path)
    except OSError:  # never created (no shm op on this backend) or already gone
        pass
    return removed


def remove_orphaned_shm_buffers() -> list:
    """Unlink this user's DeepSpeed CPU all-reduce buffers that no living process holds: those of runs whose
    processes were killed (SIGKILL skips every cleanup). DeepSpeed's C++ keeps the buffer's file descriptors
    open and its pages mapped in the creator and in every peer for their whole life, so a buffer in no
    process's ``/proc/<pid>/fd`` or ``/proc/<pid>/maps`` has no process left, and one that another run on this
    node uses is never touched. Called at the start of a CPU run, once per node. Returns the paths removed."""
    mine = f"{SHM_PREFIX}{os.getuid()}_"
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(mine)]
    except OSError:
        return []
    held = _shm_files_in_use() if names else set()
    removed = []
    for name in names:
        path = os.path.join(SHM_DIR, name)
        if path not in held:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    if removed:
        import logging

        logging.getLogger("rear_ds").warning(
            "removed %d DeepSpeed CPU all-reduce buffer(s) of runs whose processes are gone from %s: %s",
            len(removed), SHM_DIR, ", ".join(os.path.basename(p) for p in removed))
    return removed


def _shm_files_in_use() -> set:
    """Paths under /dev/shm that some process this user may inspect has open or mapped."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    held.add(os.readlink(f"/proc/{pid}/fd/{fd}").split(" (deleted)")[0])
                except OSError:
                    continue
            with open(f"/proc/{pid}/maps") as f:
                held.update(line[line.index(SHM_DIR + "/"):].rstrip("\n").split(" (deleted)")[0]
                            for line in f if SHM_DIR + "/" in line)
        except OSError:  # gone meanwhile, or another user's
            continue
    return {p for p in held if p.startswith(SHM_DIR + "/")}


# --------------------------------------------------------------------------------------
# Who stopped? Per-rank heartbeats, read when a collective fails or times out
# --------------------------------------------------------------------------------------


class Heartbeat:
    """Each rank records ``{rank, pid, host, step, time}`` in ``<out_dir>/heartbeat/rank_<r>.json`` after every
    optimizer step. When a collective times out or a peer's connection drops, :func:`describe_peers` reads them
    to name the rank that is dead or stuck.

    The file is opened once and rewritten in place with one fixed-size ``pwrite`` per step: no file creation or
    rename per step, which on a shared filesystem (Lustre, NFS) would be a metadata operation per rank per step.
    The fixed size (JSON padded with spaces, which JSON ignores) means no shorter record leaves a tail behind.
    An fdatasync every SYNC_EVERY_S seconds pushes the record to an NFS server, so that readers on other hosts
    see it within that time rather than at the kernel's next writeback."""

    RECORD_BYTES = 512
    SYNC_EVERY_S = 5.0

    def __init__(self, out_dir: str, rank: int):
        import json
        import socket

        self._json, self.host, self.rank = json, socket.gethostname(), rank
        self.dir = os.path.join(out_dir, "heartbeat")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"rank_{rank}.json")
        # Truncated at start: a previous run's record must not pass for this run's.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._synced_at = 0.0
        self.last_beat: float = 0.0  # time.monotonic() of the last beat; 0 = none yet

    def beat(self, step: int) -> None:
        import time

        now = time.time()
        self.last_beat = time.monotonic()
        rec = self._json.dumps({"rank": self.rank, "pid": os.getpid(), "host": self.host, "step": step,
                                "time": now}).encode()
        try:
            os.pwrite(self._fd, rec.ljust(self.RECORD_BYTES), 0)
            if now - self._synced_at >= self.SYNC_EVERY_S:
                os.fdatasync(self._fd)
                self._synced_at = now
        except OSError:
            pass  # diagnostics only: never fail training over it


def watch_for_stalls(heartbeat: Heartbeat, out_dir: str, world_size: int, stall_s: float,
                     poll_s: float = 30.0):
    """Start a daemon thread that logs the other ranks' state (describe_peers) once per stall, when this rank
    has finished no step for ``stall_s`` seconds after its first one. Under NCCL a timed-out collective aborts
    the process from torch's watchdog, with no Python exception to report it, so this is said beforehand.
    Returns the thread (it only logs; it never stops training)."""
    import logging
    import threading
    import time

    logger = logging.getLogger("rear_ds")

    def run():
        reported_for = None
        while True:
            time.sleep(poll_s)
            last = heartbeat.last_beat
            if last and time.monotonic() - last > stall_s and reported_for != last:
                reported_for = last
                logger.error("rank %d has finished no step for %.0f s (the collective timeout will end the run; "
                             "under NCCL without a Python error): state of the other ranks: %s", heartbeat.rank,
                             time.monotonic() - last, describe_peers(out_dir, heartbeat.rank, world_size)
                             or "no other rank")

    thread = threading.Thread(target=run, name="rear-stall-watch", daemon=True)
    thread.start()
    return thread


def describe_peers(out_dir: str, rank: int, world_size: int) -> str:
    """One line per other rank from its heartbeat: dead (its pid is gone, same host only) or how long ago it
    last finished a step, with the stuck/dead ones first. Empty when there is nothing to say."""
    import json
    import socket
    import time

    now, host, beats = time.time(), socket.gethostname(), {}
    for r in range(world_size):
        try:
            with open(os.path.join(out_dir, "heartbeat", f"rank_{r}.json")) as f:
                beats[r] = json.load(f)
        except (OSError, ValueError):
            beats[r] = None
    mine = (beats.get(rank) or {}).get("step", -1)
    lines = []
    for r in range(world_size):
        if r == rank:
            continue
        b = beats[r]
        if b is None:
            lines.append((0, f"rank {r}: no heartbeat (it never finished a step)"))
            continue
        # another node's process table is out of reach: its pid says nothing here
        state, order = ("alive", 2) if b.get("host") == host else ("on another host", 2)
        if b.get("host") == host:
            try:
                os.kill(int(b["pid"]), 0)
                with open(f"/proc/{int(b['pid'])}/stat") as f:  # a zombie is dead too (not reaped yet)
                    if f.read().rsplit(")", 1)[-1].split()[0] == "Z":
                        state, order = "DEAD (its process exited)", 0
            except ProcessLookupError:
                state, order = "DEAD (its process is gone)", 0
            except (OSError, IndexError):
                pass
        if order and b["step"] < mine:
            state, order = "STUCK (behind this rank)", 1
        lines.append((order, f"rank {r} (pid {b['pid']} on {b['host']}): {state}, last finished step {b['step']} "
                             f"{now - b['time']:.0f} s ago"))
    return "; ".join(text for _, text in sorted(lines))
