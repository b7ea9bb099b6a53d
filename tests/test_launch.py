"""rear_ds.launch: the one launch-environment parser of training, sampling and tokenization (crafted environments).

The environments are those Slurm and the launchers make: an srun step task (SLURM_STEP_NUM_TASKS is set by srun
only), the batch script itself (`sbatch --ntasks=4 --array=0-7 script.sh` without srun: SLURM_PROCID=0 and
SLURM_NTASKS=4, but one process), deepspeed/torchrun, and array tasks with a start offset and a stride.
"""
import os

import pytest

from rear_ds.launch import Launch, LaunchError, cuda_index, parse

ARRAY = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}


def where(launch: Launch) -> tuple:
    return launch.rank, launch.procs, launch.local_rank, launch.task, launch.tasks, launch.launcher


def test_precedence():
    assert where(parse({})) == (0, 1, 0, 0, 1, "single")
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert where(parse(torchrun)) == (5, 8, 1, 0, 1, "deepspeed/torchrun")
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0", **ARRAY}
    got = parse(srun)
    assert where(got) == (2, 4, 0, 2, 3, "slurm") and (got.worker, got.workers) == (2 * 4 + 2, 12)
    assert "SLURM_PROCID=2 of SLURM_STEP_NUM_TASKS=4" in got.source and "array task 2 of 3" in got.source
    # a launcher inside an srun task wins over srun's numbers (its world covers every task's processes)
    assert where(parse({**srun, **torchrun}))[:3] == (5, 8, 1)
    # srun -E keeps the job's SLURM_NTASKS: the step's own count is SLURM_STEP_NUM_TASKS
    assert parse({**srun, "SLURM_NTASKS": "16"}).procs == 4
    # flags win over the array variables; training ignores array tasks
    assert where(parse(srun, task_id=1, num_tasks=2))[3:5] == (1, 2)
    assert where(parse({**srun, "SLURM_ARRAY_TASK_ID": "99"}, array=False))[3:5] == (0, 1)


def test_batch_script_without_srun_is_one_process():
    """Issue 20 item 10: `sbatch --ntasks=4 --array=0-7` running the tool directly: SLURM_PROCID=0 and
    SLURM_NTASKS=4 are in the environment but only one process runs, so it must do the whole task's share."""
    batch = {"SLURM_JOB_ID": "12", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4",
             "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"}
    got = parse(batch)
    assert where(got) == (0, 1, 0, 3, 8, "single") and (got.worker, got.workers) == (3, 8)
    assert "SLURM_NTASKS=4 outside an srun step" in got.source


def test_array_offset_and_stride():
    offset = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "8", "SLURM_ARRAY_TASK_COUNT": "8"}  # --array=8-15
    assert where(parse(offset))[3:5] == (4, 8)
    strided = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
               "SLURM_ARRAY_TASK_COUNT": "4"}  # --array=0-7:2
    assert where(parse(strided))[3:5] == (3, 4)
    with pytest.raises(LaunchError, match="SLURM_ARRAY_TASK_ID=5 .* not one of 4 evenly spaced ids"):
        parse({**strided, "SLURM_ARRAY_TASK_ID": "5"})
    with pytest.raises(LaunchError, match=r"SLURM_ARRAY_TASK_ID=9 SLURM_ARRAY_TASK_MIN=1 .*\(not a list"):
        parse({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})  # --array=1,5,9


@pytest.mark.parametrize("env, flags, message", [
    ({"RANK": "1"}, {}, "RANK='1' is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, {}, "WORLD_SIZE='2' is set but RANK is not"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, {}, "RANK=4 WORLD_SIZE=4: 4 is outside 0..3"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, {}, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, {}, "RANK=0 WORLD_SIZE=0: 0 is outside 0..-1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2"}, {}, "local rank 2 .* is outside 0..1"),
    ({"RANK": "0", "WORLD_SIZE": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "2"}, {},
     "RANK=0 WORLD_SIZE=1 .* srun task 2 of a 4-task step"),
    ({"SLURM_PROCID": "4", "SLURM_STEP_NUM_TASKS": "4"}, {}, "SLURM_PROCID=4 SLURM_STEP_NUM_TASKS=4: 4 is outside"),
    ({"SLURM_STEP_NUM_TASKS": "4"}, {}, "SLURM_STEP_NUM_TASKS='4' is set but SLURM_PROCID is not"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4x"}, {}, "SLURM_STEP_NUM_TASKS='4x' is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, {}, "SLURM_ARRAY_TASK_ID='3' is set but SLURM_ARRAY_TASK_COUNT is not"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "n"}, {}, "SLURM_ARRAY_TASK_COUNT='n' is not an integer"),
    ({}, {"task_id": 1}, r"--task-id \(1\) and --num-tasks \(None\) must be given together"),
    ({}, {"task_id": 2, "num_tasks": 2}, "task id 2 of --num-tasks 2: 2 is outside 0..1"),
])
def test_contradictions_are_named(env, flags, message):
    with pytest.raises(LaunchError, match=message):
        parse(env, **flags)


def test_cuda_index_maps_through_the_visible_gpus():
    """Issue 20 item 9: `srun --gpus-per-task=1` shows each task one GPU, so every local rank uses cuda:0."""
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # every process sees all GPUs
    assert [cuda_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # one GPU per task
    assert [cuda_index(r, 4) for r in range(4, 8)] == [0, 1, 2, 3]  # block-distributed, its socket's 4 GPUs
    with pytest.raises(LaunchError, match="sees no GPU"):
        cuda_index(0, 0)


def test_local_device(monkeypatch):
    """The device sampling and tokenization open: --device wins; else the mapped GPU; else the CPU."""
    import torch

    from rear_ds.launch import local_device

    third = parse({"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_STEP_NUM_TASKS": "4"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: CUDA_VISIBLE_DEVICES=3
    assert local_device(third) == local_device(third, "auto") == "cuda:0"
    assert local_device(third, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_device(third) == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device(third) == "cpu"


def test_every_entry_point_uses_it(monkeypatch):
    """Sampling, tokenization and training read the same numbers from the same batch-script environment."""
    from rear_ds.data.tokenize_job import JobError, resolve_worker
    from rear_ds.training import launch_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR",
              "SLURM_STEP_NUM_TASKS"):
        monkeypatch.setenv(k, "")  # so that monkeypatch restores what detect() exports
        monkeypatch.delenv(k)
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert (resolve_worker(None, None, batch).worker, resolve_worker(None, None, batch).workers) == (1, 2)
    with pytest.raises(JobError, match="RANK='1' is set but WORLD_SIZE is not"):
        resolve_worker(None, None, {"RANK": "1"})
    for k, v in batch.items():
        monkeypatch.setenv(k, v)
    assert launch_env.detect() == launch_env.LaunchEnv(0, 0, 1, "single")


def test_local_size_is_this_nodes_task_count(monkeypatch):
    """Under plain srun LOCAL_SIZE (DeepSpeed's CPU device count) is the tasks on this node, also when they differ."""
    from rear_ds.training import launch_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    step = {"SLURM_PROCID": "3", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]",
            "SLURM_JOB_ID": "7", "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}
    for k, v in step.items():
        monkeypatch.setenv(k, v)
    assert launch_env.detect() == launch_env.LaunchEnv(3, 0, 4, "slurm")
    assert os.environ["LOCAL_SIZE"] == "1" and os.environ["WORLD_SIZE"] == "4"
    from rear_ds.launch import tasks_on_node

    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    with pytest.raises(launch_env.LaunchError, match="SLURM_NODEID=2 is outside the 2 nodes"):
        tasks_on_node("3,1", 2)
