"""Helpers for tests/test_slurm.py and tests/test_multinode.py: the test cluster, submitting and waiting for jobs,
tiny inputs. One Slurm cluster per machine (tests/slurm_cluster.sh): each module starts the mode it needs
(one node on localhost, or nodes in network namespaces) and puts back what ran before."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm_cluster.sh"
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=60"]  # test cluster: no GPUs, 4 CPUs; time > 600 s warning
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def clean_env(**extra) -> dict:
    """The test's environment without Slurm or launcher variables (the suite may itself run inside a job,
    and in-process DeepSpeed tests leave MASTER_PORT and friends behind)."""
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in launcher}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cannot_install() -> str:
    """'' if this machine can run the cluster script, else the reason to skip."""
    if os.geteuid() != 0:
        return "the Slurm cluster tests need root (apt-get, /etc/slurm, daemons)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "apt-get is not available to install Slurm"
    return ""


def cluster_mode() -> str | None:
    """The running cluster's mode ("nodes=0" for the single node, "nodes=N"), None when none is usable."""
    r = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    m = re.search(r"^mode: nodes=(\d+)", r.stdout, re.M)
    return f"nodes={m.group(1) if m else 0}"


def _start(nodes: int) -> None:
    r = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(nodes)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        pytest.fail(f"tests/slurm_cluster.sh start --nodes {nodes} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


@contextlib.contextmanager
def running_cluster(nodes: int = 0):
    """The cluster in this mode (0: one node on localhost) for the block; afterwards what ran before: nothing
    (stopped, namespaces deleted), or the other mode again."""
    before = cluster_mode()
    t0 = time.time()
    _start(nodes)
    print(f"slurm cluster (nodes={nodes}) ready in {time.time() - t0:.1f}s")
    try:
        yield
    finally:
        if before is None:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=300)
        elif before != f"nodes={nodes}":
            _start(int(before.split("=")[1]))


def sbatch(args, cwd, env=None) -> str:
    r = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or clean_env(REPO_DIR=REPO),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch {args} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict]:
    """`scontrol show job -o` as dicts: one per job, or per array task."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    recs = []
    for line in r.stdout.splitlines():
        recs.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return recs


def wait_jobs(*job_ids: str, timeout: float = 300) -> list[dict]:
    """Wait until every job (and array task) is in a final state; returns their records."""
    deadline = time.time() + timeout
    while True:
        recs = [rec for j in job_ids for rec in job_records(j)]
        if recs and all(rec.get("JobState") in TERMINAL for rec in recs) and not any(
                rec.get("ArrayTaskId", "").find("[") >= 0 for rec in recs):  # pending array remainder
            return recs
        if time.time() > deadline:
            subprocess.run(["scancel", *job_ids])
            pytest.fail(f"jobs {job_ids} not finished after {timeout}s: "
                        + "; ".join(f"{r.get('JobId')} {r.get('JobState')} {r.get('Reason')}" for r in recs))
        time.sleep(0.3)


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def logs(folder: Path, pattern="slurm-*") -> str:
    return "\n".join(f"==== {p.name}\n{p.read_text()}" for p in sorted(folder.glob(pattern)))


def assert_ok(recs, folder):
    bad = [r for r in recs if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
    assert not bad, f"{[(r.get('JobId'), r.get('JobState'), r.get('ExitCode')) for r in bad]}\n{logs(folder)}"


def log_records(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def log_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in log_records(run_dir) if "step" in r and "loss" in r]  # metric lines, not events


def make_tiny_inputs(root: Path):
    """An ImageNet-style folder (3 classes x 8 random 40x40 PNGs) and random toy tokenizer weights."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from rear_ds.config import load_config
    from rear_ds.models.tokenizers import build_tokenizer
    from rear_ds.models.weights import save_safetensors

    rng = np.random.default_rng(0)
    images = root / "images"
    for c in range(3):
        (images / f"n0000{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"n0000{c}/{i}.png")
    cfg = load_config(str(REPO / "configs/tiny.yaml"))
    tok = build_tokenizer(cfg.tokenizer, load_weights=False)
    weights = root / "toy_vq.safetensors"
    save_safetensors({k: v.contiguous() for k, v in tok.state_dict().items()}, str(weights))
    return str(images), str(weights), str(root / "shards")


def tiny_train_args(run: Path, shards: str, max_steps: int, ckpt_every: int = 5):
    return ["--config", "configs/tiny.yaml", "--deepspeed_config", "ds_configs/zero2_bf16.json",
            f"train.out_dir={run}", f"train.max_steps={max_steps}", f"data.shards={shards}", "train.log_every=1",
            f"tokenizer.weights={Path(shards).parent / 'toy_vq.safetensors'}",  # made with the shards
            f"train.ckpt_every={ckpt_every}", "train.precision=bf16", "data.num_workers=0", "wandb.enabled=false"]
