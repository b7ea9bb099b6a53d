"""Slurm scripts: shellcheck, dry runs with a faked allocation, and jobs on a REAL single-node Slurm cluster.

The cluster is installed, configured and started by tests/slurm_cluster.sh (Debian packages; needs root)
in a module fixture (one node on localhost; what ran before is put back afterwards: see tests/slurm_helpers.py). Jobs are submitted with the
real `sbatch` from a temporary folder (so the slurm-*.out files land there) with REPO_DIR=<repo>.

Two kinds of end-to-end tests:
  * mechanism tests with small stand-in Python tools (always run): they prove the scripts themselves -
    world size / ranks, signal forwarding, exit code 75 -> `scontrol requeue` -> resume, array ranks,
    afterok ordering of the chain - independently of the training/eval code;
  * the real entry points (rear_ds/train.py, data_prep/tokenize.py, rear_ds/sample.py, rear_ds/evaluate.py)
    with configs/tiny.yaml; each skips with "entry point X not present yet" while X is missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_helpers import (CLUSTER, CPU_JOB, REPO, assert_ok, cannot_install, clean_env, log_steps, logs,
                           make_tiny_inputs, running_cluster, sbatch, tiny_train_args, wait_for, wait_jobs)

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + [CLUSTER]


# --------------------------------------------------------------------------- shellcheck
@pytest.fixture(scope="session")
def shellcheck() -> str:
    if not shutil.which("shellcheck"):
        reason = cannot_install()
        if reason:
            pytest.skip(f"shellcheck missing and cannot be installed: {reason}")
        r = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"installing shellcheck failed:\n{r.stderr}"
    return shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck(shellcheck, script):
    r = subprocess.run([shellcheck, "-x", str(script)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- dry runs, faked allocation
FAKE_SCONTROL = r'''#!/usr/bin/env python3
"""Fake `scontrol show hostnames LIST` for simple lists: gpu[001-004,007],cpu5"""
import re, sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
    m = re.fullmatch(r"(.*)\[(.*)\]", part)
    if not m:
        print(part); continue
    for rng in m.group(2).split(","):
        a, _, b = rng.partition("-")
        for i in range(int(a), int(b or a) + 1):
            print(f"{m.group(1)}{i:0{len(a)}d}")
'''


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  micro_batch_size: 16\n  grad_accum: 2\n")
    ds = tmp_path / "ds.json"
    ds.write_text("{}\n")

    def run(nodes: int, gpus: int, ntasks_per_node: int | None = None, args=(), **env):
        nodelist = "gpu001" if nodes == 1 else f"gpu[001-{nodes:03d}]"
        per_node = gpus if ntasks_per_node is None else ntasks_per_node
        e = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN=1, SLURM_JOB_ID=4242,
                       SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=nodes, SLURM_NTASKS=nodes * per_node,
                       SLURM_NTASKS_PER_NODE=per_node, SLURM_CPUS_PER_TASK=8, SLURM_SUBMIT_DIR=REPO)
        if gpus:
            e["SLURM_GPUS_ON_NODE"] = str(gpus)
        e.update({k: str(v) for k, v in env.items() if v is not None})
        for k in [k for k, v in env.items() if v is None]:  # None: not set
            e.pop(k, None)
        return subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "--config", str(cfg),
                               "--deepspeed_config", str(ds), *args],
                              cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
    return run


@pytest.mark.parametrize("nodes", [1, 2, 4])
def test_train_dry_run_world_size(fake_slurm, nodes):
    r = fake_slurm(nodes, gpus=8, args=["train.max_steps=7"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    world = 8 * nodes
    assert f"world size: {world} ({nodes} nodes x 8 processes per node, gpu)" in out
    assert "master address: gpu001:24242" in out  # first node; port 20000 + job id % 12000
    assert f"per-GPU batch: 16 (grad_accum 2, global batch {16 * 2 * world}, max_steps 7)" in out
    cmd = next(line for line in out.splitlines() if line.startswith("command: "))
    assert f"srun --nodes={nodes} --ntasks={world} --ntasks-per-node=8 --cpus-per-task=8" in cmd
    assert "rear_ds/train.py --deepspeed_config" in cmd
    assert "train.out_dir=runs/slurm-4242" in cmd and cmd.rstrip().endswith("train.max_steps=7")
    assert "dry run: nothing started" in out


def test_train_dry_run_cpu_and_overrides(fake_slurm):
    r = fake_slurm(1, gpus=0, ntasks_per_node=2, args=["--dry-run", "train.out_dir=/tmp/somewhere"])
    assert r.returncode == 0, r.stderr
    assert "world size: 2 (1 nodes x 2 processes per node, cpu)" in r.stdout
    assert "run dir: /tmp/somewhere" in r.stdout and "runs/slurm-4242" not in r.stdout
    r = fake_slurm(2, gpus=0, ntasks_per_node=2, RUN_DIR="/scratch/run 7")  # a space stays one argument
    assert "world size: 4" in r.stdout and "train.out_dir=/scratch/run\\ 7" in r.stdout, r.stdout
    # SLURM_* that contradict: 3 tasks on 2 nodes (no --ntasks-per-node) has no equal share per node
    r = fake_slurm(2, gpus=0, SLURM_NTASKS=3, SLURM_NTASKS_PER_NODE=None)
    assert r.returncode == 2 and "SLURM_NTASKS=3 tasks on 2 nodes is no equal number per node" in r.stderr, r.stderr


def test_train_dry_run_rejects_tasks_gpus_mismatch(fake_slurm):
    r = fake_slurm(2, gpus=8, ntasks_per_node=4)
    assert r.returncode == 2
    assert "--ntasks-per-node=4 but 8 GPUs per node" in r.stderr


def test_train_missing_config_fails_fast(fake_slurm, tmp_path):
    r = subprocess.run(["bash", str(REPO / "slurm" / "train.sh"), "--config", "configs/nope.yaml"],
                       env=clean_env(DRY_RUN=1), capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "config configs/nope.yaml not found" in r.stderr


def test_submit_chain_dry_run(tmp_path):
    r = subprocess.run(["bash", str(REPO / "slurm/submit_chain.sh"),
                        "tokenize:", "--input", "imgs", "--out", "shards",
                        "train:", "--config", "configs/tiny.yaml", "train.out_dir=runs/t",
                        "sample:", "--config", "configs/tiny.yaml", "--out-dir", "runs/t/samples",
                        "evaluate:", "--reference", "ref.npz"],
                       cwd=REPO, env=clean_env(DRY_RUN=1, PARTITION="p1", ACCOUNT="a1"),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["tokenize", "finalize", "train", "sample",
                                                                  "evaluate"]
    cmds = [line for line in r.stderr.splitlines() if line.startswith("dry run: sbatch")]
    assert len(cmds) == 5 and all("--partition=p1 --account=a1" in c for c in cmds)
    assert f"--array=0-7 {REPO}/slurm/tokenize.sh" in cmds[0]
    assert "--dependency=afterok:DRY_tokenize" in cmds[1] and "STAGE=finalize" in cmds[1]
    assert "--dependency=afterok:DRY_finalize" in cmds[2] and "train.out_dir=runs/t" in cmds[2]
    assert "--checkpoint runs/t/checkpoints/latest" in cmds[3]
    assert "--samples runs/t/samples" in cmds[4] and "afterok:DRY_sample" in cmds[4]


# --------------------------------------------------------------------------- the real cluster
@pytest.fixture(scope="module")
def slurm_cluster():
    reason = cannot_install()
    if reason:
        pytest.skip(reason)
    with running_cluster(nodes=0):
        yield


def test_stepped_array_ranks_and_requeue_without_controller(slurm_cluster, tmp_path):
    """--array=0-6:2 gives ranks 0..3 of 4 (not ids 0..6); a requeue the controller refuses (the real one; here: a
    job id it does not know. An unreachable controller fails the same call, after scontrol's own retries of 10-60 s)
    is tried REQUEUE_TRIES times, then exits 75 saying what to do, not 1."""
    array = dict(SLURM_ARRAY_TASK_ID=4, SLURM_ARRAY_TASK_MIN=0, SLURM_ARRAY_TASK_STEP=2, SLURM_ARRAY_TASK_COUNT=4)
    for script in ("sample.sh", "tokenize.sh"):
        r = subprocess.run(["bash", str(REPO / "slurm" / script), "--x", "a b"], cwd=REPO, capture_output=True,
                           text=True, env=clean_env(DRY_RUN=1, SLURM_JOB_ID=7, **array))
        assert r.returncode == 0 and r.stdout.rstrip().endswith("--x a\\ b --rank 2 --world-size 4"), r.stdout
    r = subprocess.run(["bash", "-c", "source slurm/common.sh; rear_requeue 'checkpoint written'"], cwd=REPO,
                       capture_output=True, text=True, env=clean_env(SLURM_JOB_ID=999999, REQUEUE_RETRY_S=0,
                                                                     REQUEUE_TRIES=2))
    assert r.returncode == 75, (r.returncode, r.stderr)
    assert "checkpoint written: requeueing job 999999" in r.stderr and "scontrol requeue 999999 failed 2 times" in \
        r.stderr and "resubmit" in r.stderr and r.stderr.count("Invalid job id") == 2, r.stderr


# A stand-in for rear_ds/train.py that follows the CONTRACTS.md CLI and exit codes: checkpoint + exit 75 on
# SIGUSR1/SIGTERM, resume from <out_dir>/checkpoints/latest, one JSON line per step in log.jsonl.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
kv = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
assert "--deepspeed_config" in sys.argv and "--config" in sys.argv, sys.argv
out, max_steps = kv["train.out_dir"], int(kv["train.max_steps"])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(s))
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
latest = os.path.join(out, "checkpoints", "latest")
os.makedirs(os.path.dirname(latest), exist_ok=True)
step = int(open(latest).read()) if os.path.exists(latest) else 0
print(f"fake-train rank {rank}/{world} local {os.environ['LOCAL_RANK']} "
      f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} resume step {step}", flush=True)
while step < max_steps:
    time.sleep(float(os.environ.get("FAKE_STEP_S", "0.3")))
    step += 1
    if rank == 0:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    if stop or step == max_steps:
        if rank == 0:
            with open(latest + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(latest + ".tmp", latest)
        if stop:
            if rank == 0:
                with open(os.path.join(out, "log.jsonl"), "a") as f:
                    f.write(json.dumps({"event": "stop", "step": step}) + "\n")
            print(f"fake-train rank {rank}: signal {stop[0]} at step {step}, checkpoint written", flush=True)
            if rank == 0 and os.environ.get("FAKE_ABORT_AFTER_STOP"):
                os.abort()  # a real SIGABRT in the teardown, after the checkpoint and the "stop" event
            sys.exit(75)
print(f"fake-train rank {rank}: done at step {step}", flush=True)
'''


@pytest.fixture
def fake_train(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  micro_batch_size: 4\n")
    ds = tmp_path / "ds.json"
    ds.write_text("{}\n")
    return ["--config", cfg, "--deepspeed_config", ds], clean_env(REPO_DIR=REPO, TRAIN_SCRIPT=script)


def test_train_two_tasks_stub(slurm_cluster, tmp_path, fake_train):
    """Two tasks train to the end. Beside it (no second requeue wait: MAX_REQUEUES=0), a job that gets the time-limit
    warning while it starts up (a real SIGUSR1 to the batch shell, sent from PRE_RUN): it starts no training and
    exits 75 (the requeue it would ask for is the one test_train_preemption_stub proves)."""
    args, env = fake_train
    run, early = tmp_path / "run", tmp_path / "early"
    jid = sbatch([*CPU_JOB, "--ntasks-per-node=2", REPO / "slurm/train.sh", *args, "train.max_steps=4",
                  f"train.out_dir={run}"], tmp_path, env)
    eid = sbatch([*CPU_JOB, "--ntasks-per-node=1", "--job-name=early", REPO / "slurm/train.sh", *args,
                  "train.max_steps=4", f"train.out_dir={early}"], tmp_path,
                 {**env, "PRE_RUN": "kill -USR1 $$", "MAX_REQUEUES": "0"})
    recs = wait_jobs(jid, eid, timeout=120)
    assert_ok(recs[:1], tmp_path)
    out = (tmp_path / f"slurm-rear-train-{jid}.out").read_text()
    assert "world size: 2 (1 nodes x 2 processes per node, cpu)" in out
    assert "fake-train rank 0/2 local 0" in out and "fake-train rank 1/2 local 1" in out
    assert log_steps(run) == [1, 2, 3, 4] and (run / "checkpoints/latest").read_text() == "4"
    assert recs[1]["ExitCode"] == "75:0", recs[1]
    err = (tmp_path / f"slurm-early-{eid}.err").read_text()
    assert "SIGUSR1 before training started (the last checkpoint stands), but this job was already requeued 0 " \
        "times (MAX_REQUEUES)" in err, err
    assert "fake-train" not in (tmp_path / f"slurm-early-{eid}.out").read_text() and not early.exists()


@pytest.mark.parametrize("how", ["usr1", "usr1-abort", "requeue"])
def test_train_preemption_stub(slurm_cluster, tmp_path, fake_train, how):
    """Warning signal (scancel --signal=USR1 --batch) -> checkpoint, exit 75, self-requeue; or an external
    `scontrol requeue` (SIGTERM). Either way the same job id runs again and resumes from the checkpoint.
    usr1-abort: rank 0 aborts (SIGABRT, srun reports 134) after its checkpoint and the run log's "stop" event,
    as a teardown abort would: the script trusts the event and requeues all the same (issue 19 item 4)."""
    args, env = fake_train
    run = tmp_path / "run"
    abort = {"FAKE_ABORT_AFTER_STOP": "1"} if how == "usr1-abort" else {}
    jid = sbatch([*CPU_JOB, "--ntasks-per-node=2", REPO / "slurm/train.sh", *args, "train.max_steps=25"],
                 tmp_path, {**env, "RUN_DIR": str(run), **abort})
    wait_for(lambda: (run / "log.jsonl").exists() and len(log_steps(run)) >= 3, 90, "3 training steps")
    if how.startswith("usr1"):
        subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    else:
        subprocess.run(["scontrol", "requeue", jid], check=True)
    recs = wait_jobs(jid, timeout=180)
    assert_ok(recs, tmp_path)
    assert int(recs[0]["Restarts"]) == 1
    out = (tmp_path / f"slurm-rear-train-{jid}.out").read_text()  # the same file, appended
    assert f"job {jid}  restart 0" in out and f"job {jid}  restart 1" in out
    resumed = [int(m) for m in re.findall(r"fake-train rank 0/2 .* resume step (\d+)", out)]
    assert resumed[0] == 0 and resumed[1] >= 3, out
    steps = log_steps(run)
    assert steps == list(range(1, 26)), steps  # resumed exactly where it stopped, same final step
    err = (tmp_path / f"slurm-rear-train-{jid}.err").read_text()
    if how.startswith("usr1"):
        assert "requeueing job" in err
        if how == "usr1-abort":
            assert "exit 134 after the run log's final 'stop' event (checkpoint written): treated as 75" in err, err
    else:
        assert "SIGTERM" in err and "requeueing job" not in err


STUB_TOOL = r'''
import json, os, sys, time
tool, task, restart = sys.argv[0].split("/")[-1], os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
with open(os.environ["STUB_RECORD"], "a") as f:
    f.write(json.dumps({"tool": tool, "argv": sys.argv[1:], "t": time.time(), "job": os.environ.get("SLURM_JOB_ID"),
                        "task": task, "restart": restart}) + "\n")
if os.environ.get("STUB_HOLD") == f"{tool}:{task}" and restart == "0":  # wait to be stopped (no signal handler)
    open(os.environ["STUB_RECORD"] + ".held", "w").close()
    time.sleep(300)
time.sleep(0.5)
'''


def test_chain_stub_tools(slurm_cluster, tmp_path):
    """slurm/submit_chain.sh tokenize (array of 2 + finalize) -> sample (array of 2) -> evaluate, run for
    real with stand-in tools that record their arguments: ranks, order (afterok) and wiring. Sample task 1 gets the
    time-limit warning (SIGUSR1 to its batch shell) while it works: the shell stops the tool (SIGTERM), requeues that
    task alone, its rerun completes, and evaluate still starts after both."""
    fake = tmp_path / "repo"
    for rel in ("data_prep/tokenize.py", "rear_ds/sample.py", "rear_ds/evaluate.py"):
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(STUB_TOOL)
    (fake / "slurm").symlink_to(REPO / "slurm")
    record = tmp_path / "record.jsonl"
    env = clean_env(STUB_RECORD=record, TOKENIZE_TASKS=2, SAMPLE_TASKS=2, SBATCH_EXTRA=" ".join(CPU_JOB),
                    STUB_HOLD="sample.py:1")
    env.pop("REPO_DIR", None)  # submit_chain.sh derives it from its own path: the fake repo
    env.pop("PYTHONPATH", None)  # a checkout on it would shadow the fake repo's rear_ds (python -m rear_ds.sample)
    r = subprocess.run(["bash", str(fake / "slurm/submit_chain.sh"), "tokenize:", "--out", "shards",
                        "sample:", "--out-dir", "samples", "--num-samples", "8",
                        "evaluate:", "--out", "eval"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines())
    assert list(ids) == ["tokenize", "finalize", "sample", "evaluate"]
    wait_for(lambda: Path(f"{record}.held").exists(), 180, "sample task 1 to start")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{ids['sample']}_1"], check=True)
    jobs = wait_jobs(*ids.values(), timeout=180)
    assert_ok(jobs, tmp_path)
    assert sorted((j["ArrayTaskId"], j["Restarts"]) for j in jobs if j.get("ArrayJobId") == ids["sample"]) == [
        ("0", "0"), ("1", "1")]
    err = (tmp_path / f"slurm-rear-sample-{ids['sample']}_1.err").read_text()
    assert "SIGUSR1" in err and "(exit 143): treated as 75" in err, err
    assert f"exit 75 after SIGUSR1: requeueing job {ids['sample']}_1" in err, err  # the task alone
    recs = [json.loads(line) for line in record.read_text().splitlines()]
    by = lambda tool, pred=lambda a: True: [x for x in recs if x["tool"] == tool and pred(x["argv"])]  # noqa: E731
    ranks = by("tokenize.py", lambda a: "--rank" in a)
    fin = by("tokenize.py", lambda a: "--finalize" in a)
    samples, evals = by("sample.py"), by("evaluate.py")
    assert sorted(x["argv"][-3] for x in ranks) == ["0", "1"] and all(x["argv"][-1] == "2" for x in ranks)
    assert len(fin) == 1 and fin[0]["argv"] == ["--out", "shards", "--finalize", "--world-size", "2"]
    assert sorted((x["argv"][-3], x["restart"]) for x in samples) == [("0", "0"), ("1", "0"), ("1", "1")]
    assert evals[0]["argv"] == ["--out", "eval", "--samples", "samples"]
    # afterok: every stage started after the previous one ended (each stub runs >= 0.5 s)
    assert fin[0]["t"] > max(x["t"] for x in ranks) + 0.4
    assert min(x["t"] for x in samples) > fin[0]["t"] + 0.4
    assert evals[0]["t"] > max(x["t"] for x in samples) + 0.4


# --------------------------------------------------------------------------- real entry points
def need(*rel_paths: str):
    for rel in rel_paths:
        if not (REPO / rel).exists():
            pytest.skip(f"entry point {rel} not present yet")


@pytest.fixture(scope="module")
def tokenize_array(slurm_cluster, tmp_path_factory):
    """The tokenize array (2 tasks) and its finalize job through slurm/tokenize.sh; their token shards for
    configs/tiny.yaml are the training data of the tests below."""
    need("data_prep/tokenize.py", "configs/tiny.yaml")
    root = tmp_path_factory.mktemp("tiny_data")
    images, weights, out = make_tiny_inputs(root)
    env = clean_env(REPO_DIR=REPO, TOKENIZE_TASKS=2, SBATCH_EXTRA=" ".join(CPU_JOB))
    r = subprocess.run(["bash", str(REPO / "slurm/tokenize.sh"), "--input", images, "--out", out, "--config",
                        "configs/tiny.yaml", "--tokenizer-weights", weights, "--views", "center", "--workers", "0",
                        "--images-per-shard", "8", "--device", "cpu"],
                       cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines())
    return root, out, ids, wait_jobs(*ids.values(), timeout=600)


def test_tokenize_array_and_finalize(tokenize_array):
    root, out, ids, recs = tokenize_array
    assert list(ids) == ["tokenize", "finalize"]
    assert_ok(recs, root)
    assert len([r for r in recs if r.get("ArrayJobId") == ids["tokenize"]]) == 2
    assert sorted(Path(out).glob("shard-*.tar")), "no shards written"
    assert json.loads((Path(out) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_shards(tokenize_array):
    root, out, _, recs = tokenize_array
    assert_ok(recs, root)
    return out


@pytest.fixture
def train_entry():
    """Listed before tiny_shards so a missing trainer skips before any data is made."""
    need("rear_ds/train.py", "configs/tiny.yaml", "ds_configs/zero2_bf16.json")


def test_train_real_preemption(slurm_cluster, tmp_path, train_entry, tiny_shards):
    need("rear_ds/train.py", "configs/tiny.yaml", "ds_configs/zero2_bf16.json")
    run = tmp_path / "run"
    max_steps = 40
    jid = sbatch([*CPU_JOB, "--ntasks-per-node=2", REPO / "slurm/train.sh",
                  *tiny_train_args(run, tiny_shards, max_steps)], tmp_path)
    wait_for(lambda: (run / "log.jsonl").exists() and len(log_steps(run)) >= 2, 600, "2 logged training steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    recs = wait_jobs(jid, timeout=900)
    assert_ok(recs, tmp_path)
    assert int(recs[0]["Restarts"]) >= 1, logs(tmp_path)
    steps = log_steps(run)
    assert steps[-1] == max_steps
    assert steps.count(1) == 1, f"the requeued job started over instead of resuming: {steps}"
    assert "requeueing job" in (tmp_path / f"slurm-rear-train-{jid}.err").read_text()


def test_sample_array_then_evaluate(slurm_cluster, tmp_path, train_entry, request):
    """train (2 tasks) -> sample array (2 tasks) -> evaluate through submit_chain.sh, with Inception weights and a
    reference folder made here (random weights in torch-fidelity's format: nothing is downloaded)."""
    need("rear_ds/sample.py", "rear_ds/evaluate.py")
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from test_evaluate import make_inception_weights

    inception = os.environ.get("REAR_TEST_INCEPTION_WEIGHTS") or make_inception_weights(str(tmp_path / "incep.pth"))
    ref = tmp_path / "reference"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    run = tmp_path / "run"
    env = clean_env(REPO_DIR=REPO, SAMPLE_TASKS=2, SBATCH_EXTRA=" ".join(CPU_JOB),
                     TRAIN_SBATCH="--ntasks-per-node=2")
    tiny_shards = request.getfixturevalue("tiny_shards")
    tok_weights = str(Path(tiny_shards).parent / "toy_vq.safetensors")
    r = subprocess.run(["bash", str(REPO / "slurm/submit_chain.sh"),
                        "train:", *tiny_train_args(run, tiny_shards, 5),
                        "sample:", "--config", "configs/tiny.yaml", "--tokenizer-weights", tok_weights,
                        "--out-dir", tmp_path / "samples", "--num-samples", "10", "--chunk-size", "5",
                        "evaluate:", "--reference", ref, "--inception-weights", inception, "--is-splits", "2",
                        "--out", tmp_path / "eval"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines())
    assert list(ids) == ["train", "sample", "evaluate"]
    assert_ok(wait_jobs(*ids.values(), timeout=1200), tmp_path)
    # the training job: two tasks on one node, to its last step, with its final checkpoint and resolved config
    assert "world size: 2 (1 nodes x 2 processes per node, cpu)" in (
        tmp_path / f"slurm-rear-train-{ids['train']}.out").read_text()
    assert log_steps(run)[-1] == 5
    assert (run / "checkpoints" / "latest").exists() and (run / "config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "samples").glob("chunk_*.npz")) == ["chunk_000000.npz",
                                                                                  "chunk_000001.npz"]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["accounting"]["samples_counted"] == 10
    assert np.isfinite(results["metrics"]["fid"]) and results["metrics"]["fid"] > 0
    assert (tmp_path / "eval" / "samples_adm.npz").exists()
