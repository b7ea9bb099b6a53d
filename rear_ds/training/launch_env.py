"""Where am I? Rank, local rank and world size under the deepspeed launcher, torchrun or srun.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
Under ``srun`` (no launcher, one task per process) only SLURM_* variables exist: we translate them so
that ``torch.distributed`` can rendezvous over TCP with no ssh between nodes. The master address is
the first host of SLURM_JOB_NODELIST (``scontrol show hostnames``, or our own parser when scontrol
is not on PATH); the port is derived from the job id so that two jobs on one node do not collide.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import subprocess
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The launch environment contradicts itself (e.g. leftover RANK/WORLD_SIZE under srun)."""


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
    """Read the launcher's variables; under plain srun, export the ones torch.distributed needs."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        step_tasks = env.get("SLURM_STEP_NUM_TASKS", "")
        if step_tasks.isdigit() and int(env["WORLD_SIZE"]) < int(step_tasks):
            # A launcher inside each srun task starts at least one process per task, so a smaller world can
            # only be a leftover export: trusting it would start independent runs on the same out_dir.
            raise LaunchError(
                f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} in the environment of srun task "
                f"{env.get('SLURM_PROCID', '?')} of a {step_tasks}-task step (SLURM_STEP_NUM_TASKS): WORLD_SIZE "
                "cannot be smaller than the number of srun tasks, so these are left over from an earlier export. "
                "Unset RANK, WORLD_SIZE and LOCAL_RANK (rear_ds derives them from SLURM_PROCID / SLURM_NTASKS "
                "under plain srun), or start a launcher (deepspeed, torchrun) in each task.")
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                         "deepspeed/torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        # rank 0 runs on the first node of this job step (a step may use fewer nodes than the job)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        env.setdefault("MASTER_ADDR", first_host(nodes or "127.0.0.1"))
        # below Linux's ephemeral range (32768-60999), so an outgoing connection cannot hold the port
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 12000))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_SIZE=env.get(
            "SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        return LaunchEnv(rank, local, world, "slurm")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29512")
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return LaunchEnv(0, 0, 1, "single")


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this process among the ``visible`` ones. Under ``srun --gpus-per-task=1`` or
    ``--gpu-bind=single:1`` each task sees only its own GPU (as device 0), whatever its local rank."""
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise LaunchError(f"local rank {local_rank} but only {visible} GPUs are visible to this process "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start one process "
                      "per visible GPU, or bind one GPU per task (srun --gpus-per-task=1)")


def init_distributed(launch: LaunchEnv, timeout_s: int):
    """Start the process group: nccl on GPUs, gloo on the CPU. A dead or hung peer fails a collective
    after ``timeout_s`` instead of blocking forever. Returns the torch device of this process."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cuda":
        index = cuda_device_index(launch.local_rank, torch.cuda.device_count())
        # DeepSpeed (init_distributed, the engine, zero.Init) reads the device from $LOCAL_RANK: make it agree
        os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device(acc.device_name())
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed makes its own groups (data-parallel, ZeRO) with dist.new_group(), which takes torch's module-wide
    # default (30 min gloo, 10 min nccl), not the world group's: make that default ours too.
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    if device.type == "cpu":
        atexit.register(remove_shm_buffers, launch.rank)
    return device


def shutdown() -> None:
    """Tear the process group down before the interpreter exits. Left to interpreter shutdown, NCCL can hang
    (turning exit code 75, requeue me, into a kill) and gloo can abort the process ("terminate called without
    an active exception", exit -6) after the work is done. Every script that starts a group calls this last,
    in a ``finally``; not inside train.main(), which tests/scale_probe.py calls several times in one group."""
    import logging

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken group (the error path): exiting matters more
            logging.getLogger("rear_ds").warning("destroy_process_group failed: %s", e)


SHM_DIR = "/dev/shm"


def remove_shm_buffers(rank: int) -> list:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    66 MiB in /dev/shm). DeepSpeed never removes it, so every CPU launch would leak RAM until reboot. Unlinking
    only drops the name: peers that mapped it keep their mapping. Returns the paths removed."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    removed = []
    if not addr or not port:
        return removed
    path = os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
    try:
        os.unlink(path)
        removed.append(path)
    except OSError:  # never created (no shm op on this backend) or already gone
        pass
    return removed


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
        state, order = "alive", 2
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
