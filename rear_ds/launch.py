"""Where am I? The one reading of the launch environment, for training, sampling and tokenization.

A process has two coordinates:

* **process within its task** (``rank`` of ``procs``, ``local_rank`` on its node):
    1. ``RANK`` / ``WORLD_SIZE`` (``LOCAL_RANK``, default 0): a launcher (deepspeed, torchrun) started it;
    2. else ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` (``SLURM_LOCALID``), but only inside an srun step, i.e. when
       srun set ``SLURM_STEP_NUM_TASKS``. A batch script (``sbatch --ntasks=4 script.sh`` without srun) also sees
       SLURM_PROCID=0 and SLURM_NTASKS=4, yet Slurm runs it once: there it is the only process;
    3. else one process.
* **array task** (``task`` of ``tasks``): ``--task-id/--num-tasks`` (or the tools' ``--rank/--world-size``
  aliases), else ``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN`` (divided by ``SLURM_ARRAY_TASK_STEP``) of
  ``SLURM_ARRAY_TASK_COUNT``, else task 0 of 1. Training ignores array tasks.

Sampling and tokenization number their workers ``task * procs + rank`` of ``tasks * procs``; training uses the
process coordinates (:mod:`rear_ds.training.launch_env` adds the rendezvous). Contradictions (a rank outside its
count, one half of a pair, a value that is not an integer, a WORLD_SIZE smaller than the srun step that runs it)
raise :class:`LaunchError` naming the variables and values: guessing would split work wrongly or silently run
several copies of the same work.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional


class LaunchError(RuntimeError):
    """The launch environment or the task flags contradict themselves."""


@dataclass(frozen=True)
class Launch:
    rank: int  # process within the task, 0 .. procs-1
    procs: int
    local_rank: int  # process on this node
    task: int  # array task, 0 .. tasks-1
    tasks: int
    launcher: str  # "deepspeed/torchrun", "slurm" (srun step) or "single"
    source: str  # human-readable: where the numbers came from

    @property
    def worker(self) -> int:
        return self.task * self.procs + self.rank

    @property
    def workers(self) -> int:
        return self.tasks * self.procs


def _int(env: Mapping, name: str, default: Optional[int] = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _pair(env: Mapping, a: str, b: str) -> bool:
    """Whether both of two variables that only make sense together are set; one alone is an error."""
    if (a in env) != (b in env):
        have, lack = (a, b) if a in env else (b, a)
        raise LaunchError(f"{have}={env[have]!r} is set but {lack} is not: set both or neither")
    return a in env


def _check(index: int, count: int, what: str) -> None:
    if count < 1 or not 0 <= index < count:
        raise LaunchError(f"{what}: {index} is outside 0..{count - 1}")


def _processes(env: Mapping) -> tuple:
    """(rank, procs, local_rank, launcher, source) of this process within its task."""
    step = env.get("SLURM_STEP_NUM_TASKS")
    if _pair(env, "RANK", "WORLD_SIZE"):
        rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0)
        if step is not None and world < _int(env, "SLURM_STEP_NUM_TASKS"):
            # A launcher inside each srun task starts at least one process per task, so a smaller world can
            # only be a leftover export: trusting it would start independent runs on the same output.
            raise LaunchError(
                f"RANK={rank} WORLD_SIZE={world} in the environment of srun task {env.get('SLURM_PROCID', '?')} "
                f"of a {step}-task step (SLURM_STEP_NUM_TASKS): WORLD_SIZE cannot be smaller than the number of "
                "srun tasks, so these are left over from an earlier export. Unset RANK, WORLD_SIZE and LOCAL_RANK "
                "(rear_ds derives them from SLURM_PROCID / SLURM_STEP_NUM_TASKS under plain srun), or start a "
                "launcher (deepspeed, torchrun) in each task.")
        _check(rank, world, f"RANK={rank} WORLD_SIZE={world}")
        return rank, world, local, "deepspeed/torchrun", f"RANK={rank}/WORLD_SIZE={world}"
    if step is not None:  # a task of an srun step: srun sets SLURM_STEP_NUM_TASKS, sbatch does not
        if "SLURM_PROCID" not in env:
            raise LaunchError(f"SLURM_STEP_NUM_TASKS={step!r} is set but SLURM_PROCID is not: set both or neither")
        rank, procs = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        _check(rank, procs, f"SLURM_PROCID={rank} SLURM_STEP_NUM_TASKS={procs}")
        source = f"srun task SLURM_PROCID={rank} of SLURM_STEP_NUM_TASKS={procs}"
        return rank, procs, _int(env, "SLURM_LOCALID", 0), "slurm", source
    source = "one process"
    if _int(env, "SLURM_NTASKS", 1) > 1:
        source += (f" (SLURM_NTASKS={env['SLURM_NTASKS']} outside an srun step, SLURM_STEP_NUM_TASKS unset: the "
                   "batch script runs once; start one process per task with srun)")
    return 0, 1, 0, "single", source


def _array(env: Mapping, task_id: Optional[int], num_tasks: Optional[int]) -> tuple:
    """(task, tasks, source) of this array task."""
    if task_id is not None or num_tasks is not None:
        if task_id is None or num_tasks is None:
            raise LaunchError(f"--task-id ({task_id}) and --num-tasks ({num_tasks}) must be given together "
                              "(aliases --rank/--world-size)")
        _check(task_id, num_tasks, f"task id {task_id} of --num-tasks {num_tasks}")
        return task_id, num_tasks, f"task {task_id} of {num_tasks} (flags)"
    if not _pair(env, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        return 0, 1, ""
    first, stride = _int(env, "SLURM_ARRAY_TASK_MIN", 0), _int(env, "SLURM_ARRAY_TASK_STEP", 1)
    offset, count = _int(env, "SLURM_ARRAY_TASK_ID") - first, _int(env, "SLURM_ARRAY_TASK_COUNT")
    where = (f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} SLURM_ARRAY_TASK_MIN={first} "
             f"SLURM_ARRAY_TASK_STEP={stride} SLURM_ARRAY_TASK_COUNT={count}")
    if stride < 1 or offset % stride or not 0 <= offset // stride < count:
        raise LaunchError(f"{where}: the task is not one of {count} evenly spaced ids from the minimum; use an "
                          "evenly spaced --array range (not a list such as --array=1,5,9), or pass "
                          "--task-id/--num-tasks")
    task = offset // stride
    return task, count, f"array task {task} of {count} ({where})"


def tasks_on_node(spec: str, node: int) -> int:
    """Slurm's tasks-per-node list (``"2(x3),1"``: 2 tasks on each of nodes 0-2, 1 on node 3) at ``node``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"tasks per node {spec!r} (SLURM_STEP_TASKS_PER_NODE): cannot read {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} is outside the {len(counts)} nodes of tasks per node {spec!r}")
    return counts[node]


def slurm_tasks_on_this_node(env: Mapping) -> int:
    """Processes of this srun step on this node. SLURM_NTASKS_PER_NODE alone would be wrong for
    ``srun --ntasks=3`` on 2 nodes (2 + 1), where it is unset: the step's per-node list is read instead."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or env.get(
        "SLURM_NTASKS_PER_NODE", "1")
    return tasks_on_node(spec, _int(env, "SLURM_NODEID", 0))


def parse(env: Optional[Mapping] = None, task_id: Optional[int] = None, num_tasks: Optional[int] = None,
          array: bool = True) -> Launch:
    """This process's :class:`Launch` from ``env`` (default ``os.environ``; never modified) and the task flags.
    ``array=False`` ignores array tasks (training: an array job of trainings is several independent runs)."""
    env = os.environ if env is None else env
    rank, procs, local, launcher, source = _processes(env)
    if local < 0 or local > rank:
        raise LaunchError(f"local rank {local} (LOCAL_RANK / SLURM_LOCALID) is outside 0..{rank} (the process "
                          f"rank, {source})")
    task, tasks, array_source = _array(env, task_id, num_tasks) if array else (0, 1, "")
    return Launch(rank, procs, local, task, tasks, launcher, ", ".join(filter(None, (source, array_source))))


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a process that opens no process group (sampling, tokenization): its local rank among the
    ``visible`` GPUs it sees (CUDA_VISIBLE_DEVICES, set by Slurm's binding), modulo their number. That is the
    local rank when every process sees all GPUs, 0 under ``srun --gpus-per-task=1``, and one GPU each when
    block-distributed tasks see their socket's GPUs. Training agrees on devices through its rendezvous instead
    (:func:`rear_ds.training.launch_env.assign_gpu`), which also covers bindings this rule cannot."""
    if visible < 1:
        raise LaunchError(f"local rank {local_rank} sees no GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return local_rank % visible


def local_device(launch: Launch, requested: Optional[str] = None) -> str:
    """``requested`` if given, else ``cuda:N`` (:func:`cuda_index`) when CUDA is available, else ``cpu``."""
    if requested and requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return f"cuda:{cuda_index(launch.local_rank, torch.cuda.device_count())}"
    return "cpu"
