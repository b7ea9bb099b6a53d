"""Several Slurm nodes on one machine: training, sampling and tokenization across nodes through the real templates
(slurm/*.sh), and the faults a multi-node job meets.

tests/slurm_cluster.sh start --nodes 2 runs slurmctld in the root namespace and one slurmd per node, each in its own
network namespace on a bridge (node1 = 10.77.0.11, node2 = 10.77.0.12) and its own UTS namespace (hostname nodeK).
The nodes share the file system (as a cluster's shared file system; also /dev/shm and the process table) but not
the network: a process on node2 reaches node1 only over the bridge, so a rendezvous on localhost could not work. The module skips only where this machine
cannot create the namespaces (the reason is printed), and stops the cluster afterwards (or puts back the mode that
ran before).

Few jobs of the tiny model, each checked many ways (the suite's 30-minute budget):
  * the tokenize array, one task per node, one input failing with a real EIO: that task exits 75, requeues itself
    and the rerun completes; the shards equal a one-process run's, byte for byte;
  * a 1-node job of two processes (the reference) beside a 2-node job of one process per node, the same global
    batch, which goes through a SIGKILL of node2's process (every rank exits with an error, requeued by hand,
    resumed from the last complete checkpoint) and a preemption (SIGUSR1: one checkpoint, exit 75, self-requeue):
    its losses equal the reference's, bit for bit;
  * a job of 2 nodes x 2 processes (--nodes=1-2) with node2 taken down mid-run: Slurm requeues it, slurm/train.sh
    lowers its task count, and it runs on node1 alone, continuing with 2 processes through the universal checkpoint;
  * the sample array, one task per node, from the reference run's checkpoint: the chunks equal one process's.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from slurm_helpers import (CPU_JOB, REPO, assert_ok, cannot_install, clean_env, job_records, log_records, logs,
                           make_tiny_inputs, running_cluster, sbatch, tiny_train_args, wait_for, wait_jobs)

STEPS, CKPT_EVERY, TIMEOUT_S = 30, 4, 20  # TIMEOUT_S: train.collective_timeout_s of the 2-node job


def cannot_make_namespaces() -> str:
    """'' if this machine can run the namespace cluster, else why not."""
    reason = cannot_install()
    if reason:
        return reason
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"'{tool}' is not installed (iproute2 / util-linux)"
    probe, bridge = f"rnprobe{os.getpid()}", f"rbp{os.getpid() % 100000}"
    try:
        for cmd, what in ((["ip", "netns", "add", probe], "a network namespace"),
                          (["ip", "link", "add", bridge, "type", "bridge"], "a bridge"),
                          (["unshare", "--uts", "--mount", "true"], "UTS and mount namespaces")):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                return f"this machine cannot create {what} ({' '.join(cmd)}: {r.stderr.strip()})"
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


@pytest.fixture(scope="module")
def cluster():
    reason = cannot_make_namespaces()
    if reason:
        warnings.warn(f"multi-node Slurm tests skipped: {reason}")
        pytest.skip(reason)
    with running_cluster(nodes=2):
        yield


def first_nodes(folder: Path, pattern: str) -> list:
    """The node each job/array task of these log files started on first (the scripts log 'on <host>')."""
    return sorted(re.search(r" on (node\d+)", p.read_text()).group(1) for p in sorted(folder.glob(pattern)))


def shard_bytes(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*.tar"))}


# --------------------------------------------------------------------------- tokenization across nodes
@pytest.fixture(scope="module")
def tokenized(cluster, tmp_path_factory):
    """The tokenize array (2 tasks, --exclusive: one per node) and its finalize job, through slurm/tokenize.sh.
    One image is a link to /proc/self/mem, whose offset 0 is unmapped: reading it fails with a real EIO until the
    test puts the image back, after the task that met it has asked for its requeue."""
    root = tmp_path_factory.mktemp("multinode_data")
    images, weights, out = make_tiny_inputs(root)
    flaky = Path(images) / "n00001" / "3.png"
    real = flaky.read_bytes()
    flaky.unlink()
    flaky.symlink_to("/proc/self/mem")
    args = ["--input", images, "--out", out, "--config", "configs/tiny.yaml", "--tokenizer-weights", weights,
            "--views", "center", "--workers", "0", "--images-per-shard", "4", "--device", "cpu"]
    env = clean_env(REPO_DIR=REPO, TOKENIZE_TASKS=2, TOKENIZE_SBATCH="--exclusive", SBATCH_EXTRA=" ".join(CPU_JOB))
    r = subprocess.run(["bash", str(REPO / "slurm/tokenize.sh"), *args], cwd=root, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split() for line in r.stdout.splitlines())
    # Slurm holds a requeued job for cred_expire (10 s here) before it runs again: the fault passes meanwhile.
    wait_for(lambda: "requeueing job" in logs(root, "slurm-rear-tokenize-*.err"), 300, "a task to requeue itself")
    flaky.unlink()
    flaky.write_bytes(real)
    recs = wait_jobs(*ids.values(), timeout=300)
    return {"root": root, "out": out, "ids": ids, "recs": recs, "args": args, "weights": weights}


def test_tokenize_array_across_nodes_requeues_on_eio(tokenized, capsys):
    from rear_ds.data.tokenize_job import main as tokenize_main

    root, ids, recs = tokenized["root"], tokenized["ids"], tokenized["recs"]
    assert_ok(recs, root)
    tasks = [r for r in recs if r.get("ArrayJobId") == ids["tokenize"]]
    assert len(tasks) == 2
    assert first_nodes(root, "slurm-rear-tokenize-*_*.err") == ["node1", "node2"], logs(root)
    requeued = [t for t in tasks if int(t["Restarts"]) >= 1]
    assert len(requeued) == 1, [(t["JobId"], t["Restarts"]) for t in tasks]
    task = f"{ids['tokenize']}_{requeued[0]['ArrayTaskId']}"
    err = (root / f"slurm-rear-tokenize-{task}.err").read_text()
    assert "errno EIO" in err and "was not committed" in err, err
    assert f"exit 75: requeueing job {task}" in err, err  # the task alone, not the whole array
    # the same shards as one process on one node, byte for byte
    one = root / "one_process"
    assert tokenize_main([*tokenized["args"][:3], str(one), *tokenized["args"][4:], "--rank", "0",
                          "--world-size", "1"]) == 0
    capsys.readouterr()
    across = shard_bytes(tokenized["out"])
    assert len(across) == 6 and across == shard_bytes(one)
    manifest = json.loads((Path(tokenized["out"]) / "manifest.json").read_text())
    assert manifest["accounting"]["images_written"] == 24 and manifest["accounting"]["images_skipped"] == 0


# --------------------------------------------------------------------------- training across nodes, with faults
def starts(run: Path) -> list:
    """The run log split at each launch's 'start' event: [(start record, [its metric records]), ...]."""
    out = []
    for rec in log_records(run) if (run / "log.jsonl").exists() else []:
        if rec.get("event") == "start":
            out.append((rec, []))
        elif "loss" in rec and out:
            out[-1][1].append(rec)
    return out


def launched(run: Path, k: int, steps: int):
    """Has launch k (1-based) logged at least `steps` steps?"""
    s = starts(run)
    return len(s) >= k and len(s[k - 1][1]) >= steps


def tag(step: int) -> str:
    return f"step_{step:08d}"


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def nothing_left_running():
    """No training process of a finished job is left on any node."""
    for ns in ("rn1", "rn2"):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        cmds = []
        for pid in pids:
            try:
                cmds.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:  # gone meanwhile
                pass
        assert not [c for c in cmds if b"train.py" in c], (ns, cmds)


@pytest.fixture(scope="module")
def trained(cluster, tokenized, tmp_path_factory):
    """The reference (1 node x 2 processes) and the 2-node job (1 process per node) side by side; the 2-node job is
    taken through a SIGKILL and a preemption here, the test checks what came of them."""
    tmp = tmp_path_factory.mktemp("multinode_train")
    shards = tokenized["out"]
    ref, run = tmp / "ref", tmp / "run"
    ref_id = sbatch([*CPU_JOB, "--nodes=1", "--ntasks-per-node=2", REPO / "slurm/train.sh",
                     *tiny_train_args(ref, shards, STEPS, CKPT_EVERY)], tmp)
    jid = sbatch([*CPU_JOB, "--nodes=2", "--ntasks-per-node=1", REPO / "slurm/train.sh",
                  *tiny_train_args(run, shards, STEPS, CKPT_EVERY), f"train.collective_timeout_s={TIMEOUT_S}"], tmp)
    facts = {"tmp": tmp, "ref": ref, "run": run, "jid": jid}
    # 1. SIGKILL of the training process on node2, mid-run
    wait_for(lambda: launched(run, 1, CKPT_EVERY + 2), 600, "the 2-node job's first steps")
    facts["beat"] = beat = json.loads((run / "heartbeat" / "rank_1.json").read_text())
    os.kill(beat["pid"], signal.SIGKILL)
    facts["killed"] = wait_jobs(jid, timeout=TIMEOUT_S + 120)[0]
    facts["latest_at_kill"] = latest(run)
    facts["partial_at_kill"] = sorted(p.name for p in (run / "checkpoints").glob("step_*")
                                      if not (p / "COMPLETE").exists())
    subprocess.run(["scontrol", "requeue", jid], check=True)
    # 2. preemption: the time-limit warning (SIGUSR1 to the batch shell, which forwards it to every rank)
    wait_for(lambda: launched(run, 2, 3), 600, "the requeued job's first steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    wait_for(lambda: any(r.get("event") == "finished" for r in log_records(run)), 600, "the job to finish")
    facts["final"] = wait_jobs(jid, timeout=120)[0]
    facts["ref_final"] = wait_jobs(ref_id, timeout=300)
    return facts


def test_train_across_nodes_equals_one_node_through_kill_and_preemption(trained):
    tmp, ref, run, jid = trained["tmp"], trained["ref"], trained["run"], trained["jid"]
    out = (tmp / f"slurm-rear-train-{jid}.out").read_text()
    err = (tmp / f"slurm-rear-train-{jid}.err").read_text()
    assert_ok(trained["ref_final"], tmp)
    ref_loss = {r["step"]: r["loss"] for _, recs in starts(ref) for r in recs}
    assert sorted(ref_loss) == list(range(1, STEPS + 1))
    launches = starts(run)
    assert [s["world_size"] for s, _ in launches] == [2, 2, 2], [s for s, _ in launches]

    # Two nodes, one process each, rendezvous on node1's bridge address (a localhost one could not be reached)
    assert "nodes: 2 (node1 node2)" in out and "world size: 2 (2 nodes x 1 processes per node, cpu)" in out, out
    m = re.search(r"master address: node1:\d+ \((\S+)\)", out)
    assert m and m.group(1) == "10.77.0.11", out
    assert trained["beat"]["host"] == "node2"

    # 1. The kill: every rank exited with an error (the job failed: nothing hung); the script did not requeue
    killed = trained["killed"]
    assert killed["JobState"] == "FAILED" and killed["ExitCode"] != "0:0", killed
    # gloo sees the connection close at once ("closed/reset by peer"); a hung peer would take the collective timeout
    assert re.search(r"ERROR rank 0 \(RuntimeError: .*\): state of the other ranks: rank 1 \(pid \d+ on node2\): on "
                     r"another host, last finished step \d+",
                     out), out
    assert "training step exited with 137" in err, err
    # ... and the requeued job resumed from the last complete checkpoint (a partial one is never loaded)
    start2 = launches[1][0]
    assert trained["latest_at_kill"] not in trained["partial_at_kill"]
    assert start2["resumed_from"] == trained["latest_at_kill"]
    assert start2["start_step"] == int(trained["latest_at_kill"].split("_")[1]) >= CKPT_EVERY
    assert not [p for p in (run / "checkpoints").glob("step_*") if not (p / "COMPLETE").exists()]

    # 2. The preemption: one checkpoint, exit 75, the script requeued the job, which resumed right there
    stops = [r for r in log_records(run) if r.get("event") == "stop"]
    assert len(stops) == 1
    start3 = launches[2][0]
    assert start3["resumed_from"] == tag(stops[0]["step"]) and start3["start_step"] == stops[0]["step"]
    assert "checkpoint written (exit 75 after SIGUSR1): requeueing job" in err, err
    final = trained["final"]
    assert_ok([final], tmp)
    assert int(final["Restarts"]) == 2, final

    # Every logged loss equals the one-node reference's, bit for bit (also the steps logged again after the kill)
    for start, recs in launches:
        assert recs, start
        for r in recs:
            assert r["loss"] == ref_loss[r["step"]], (start["start_step"], r["step"], r["loss"], ref_loss[r["step"]])
    assert [r["step"] for r in launches[-1][1]] == list(range(start3["start_step"] + 1, STEPS + 1))
    nothing_left_running()


def test_node_down_requeues_onto_the_remaining_node(cluster, tokenized, tmp_path):
    """2 nodes x 2 processes (--nodes=1-2); node2 is taken down mid-run: Slurm requeues the job, slurm/train.sh lowers
    its task count (Slurm keeps the last allocation's 4, for which node1 alone would never do), and it runs on node1
    alone with 2 processes, through the universal checkpoint, to the end: nobody steps in."""
    run = tmp_path / "run"
    steps = 12
    jid = sbatch([*CPU_JOB, "--nodes=1-2", "--ntasks-per-node=2", REPO / "slurm/train.sh",
                  *tiny_train_args(run, tokenized["out"], steps, CKPT_EVERY),
                  f"train.collective_timeout_s={TIMEOUT_S}"], tmp_path)
    try:
        wait_for(lambda: launched(run, 1, CKPT_EVERY + 2), 600, "the 2-node job's first steps")
        before = latest(run)
        subprocess.run(["scontrol", "update", "nodename=node2", "state=down", "reason=multinode-test"], check=True)
        wait_for(lambda: any(r.get("event") == "finished" for r in log_records(run)), 600, "the job to finish")
        final = wait_jobs(jid, timeout=120)[0]
    finally:
        subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], capture_output=True)
    out = (tmp_path / f"slurm-rear-train-{jid}.out").read_text()
    err = (tmp_path / f"slurm-rear-train-{jid}.err").read_text()
    assert_ok([final], tmp_path)
    assert int(final["Restarts"]) == 1 and final["NodeList"] == "node1", final
    assert "world size: 4 (2 nodes x 2 processes per node, cpu)" in out, out
    assert "world size: 2 (1 nodes x 2 processes per node, cpu)" in out, out
    launches = starts(run)
    assert [s["world_size"] for s, _ in launches][0] == 4 and launches[-1][0]["world_size"] == 2
    start, recs = launches[-1]
    assert start["start_step"] >= int(before.split("_")[1]) and start["resumed_from"].startswith(
        tag(start["start_step"])), start
    assert "DUE TO NODE FAILURE" in err, err
    assert "requeued: the job asks for 2 tasks (one node's) again" in err, err
    # Slurm's SIGTERM reached every rank, node2's too: one more checkpoint (step 8), then the universal one
    assert "process count changed (4 -> 2): resuming through a universal checkpoint" in out, out
    assert [r["step"] for r in recs] == list(range(start["start_step"] + 1, steps + 1))
    assert all(np.isfinite(r["loss"]) for r in recs)
    nothing_left_running()


# --------------------------------------------------------------------------- sampling across nodes
def test_sample_array_across_nodes(cluster, trained, tokenized, tmp_path):
    """Two array tasks, one per node, fill one samples folder from a DeepSpeed checkpoint (each exports it, taking
    turns on one locked name); the chunks equal those of one process on one node."""
    samples = tmp_path / "samples"
    args = ["--checkpoint", trained["ref"] / "checkpoints" / "latest", "--config", "configs/tiny.yaml",
            "--tokenizer-weights", tokenized["weights"], "--num-samples", 10, "--chunk-size", 5, "--device", "cpu",
            "--no-progress"]
    jid = sbatch([*CPU_JOB, "--array=0-1", "--exclusive", REPO / "slurm/sample.sh", *args, "--out-dir", samples],
                 tmp_path)
    recs = wait_jobs(jid, timeout=300)
    assert_ok(recs, tmp_path)
    assert first_nodes(tmp_path, "slurm-rear-sample-*.err") == ["node1", "node2"], logs(tmp_path)
    assert len({r["BatchHost"] for r in job_records(jid)}) == 2
    one = tmp_path / "one_process"  # a process of its own, as a job's (in the test's process chunk 1 differed)
    r = subprocess.run([sys.executable, "-m", "rear_ds.sample", *map(str, args), "--out-dir", one, "--rank", "0",
                        "--world-size", "1"], cwd=REPO, env=clean_env(OMP_NUM_THREADS=1), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    chunks = sorted(p.name for p in samples.glob("chunk_*.npz"))
    assert chunks == [f"chunk_{k:06d}.npz" for k in range(2)] == sorted(p.name for p in one.glob("chunk_*.npz"))
    for name in chunks:
        a, b = np.load(samples / name), np.load(one / name)
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), (name, key)
    indices = np.concatenate([np.load(samples / n)["indices"] for n in chunks])
    assert sorted(indices.tolist()) == list(range(10))
