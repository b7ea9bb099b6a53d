"""Helpers for tests/test_training.py: a tiny learnable JSONL dataset, launching the real launchers, and
reading log.jsonl. Kept apart so the tests read as a list of claims."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.gpu_smoke import write_tokens
from rear_ds.demo import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "rear_ds", "train.py")
FAULTS = os.path.join(ROOT, "tests", "train_with_faults.py")


def write_jsonl(path: str, n: int = 512, num_classes: int = 10, num_tokens: int = 16, k: int = 64) -> str:
    """Tokens that depend on the class, so the loss visibly falls within a few dozen steps."""
    return write_tokens(path, n, num_classes, num_tokens, k)


def base_overrides(out_dir: str, data: str, max_steps: int, *extra: str) -> list:
    return [f"train.out_dir={out_dir}", f"data.jsonl={data}", "data.num_workers=0",
            "train.allow_random_tokenizer=true", "train.log_every=1", "train.ckpt_every=5",
            "train.keep_last=10", f"train.max_steps={max_steps}", *extra]


def command(ds_json: str, overrides: list, nproc: int = 2, launcher: str = "deepspeed",
            script: str = TRAIN, config: str = "tiny.yaml") -> list:
    ds = os.path.join(ROOT, "ds_configs", ds_json)
    args = ["--deepspeed_config", ds, "--config", os.path.join(ROOT, "configs", config), *overrides]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    if launcher == "torchrun":
        return ["torchrun", "--nproc_per_node", str(nproc), "--master_port", str(free_port()), script, *args]
    return [sys.executable, script, *args]  # one process, no launcher


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    e.update(extra)
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.pop("LOCAL_RANK", None)
    return e


def run(cmd: list, timeout: int = 400, **env_extra) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    res.output = res.stdout + res.stderr
    return res


def losses(out_dir: str) -> dict:
    """step -> record, the last record per step winning (a resumed run appends to the same log)."""
    from rear_ds.training.metrics import read_run_log

    return read_run_log(out_dir)[0]


def read_events(out_dir: str) -> list:
    """The event records of log.jsonl (start, finished, stop) in order."""
    from rear_ds.training.metrics import read_run_log

    return read_run_log(out_dir)[1]


def workers(launcher_pid: int) -> dict:
    """rank -> pid of the training processes under a launcher."""
    import psutil

    out = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            is_worker = any(a.endswith(("train.py", "train_with_faults.py")) for a in cmd) and not any(
                "launch" in a or a.endswith(("deepspeed", "torchrun")) for a in cmd)
            if is_worker and "RANK" in p.environ():
                out[int(p.environ()["RANK"])] = p.pid
        except psutil.Error:
            pass
    return out


def run_until(cmd: list, out_dir: str, step: int, sig: int, rank: int = 1, timeout: int = 400, **env_extra):
    """Start cmd; once log.jsonl reaches ``step``, send ``sig`` to one rank's process; wait for the end."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.time()
    sent = False
    while proc.poll() is None and time.time() - t0 < timeout:
        if not sent and max(losses(out_dir), default=0) >= step:
            pid = workers(proc.pid).get(rank)
            if pid:
                os.kill(pid, sig)
                sent = True
        time.sleep(0.02)
    try:
        out, _ = proc.communicate(timeout=max(1, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    proc.output = out
    proc.signal_sent = sent
    return proc
