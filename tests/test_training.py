"""rear_ds/train.py under the real launchers: `deepspeed --num_gpus 2` (and torchrun) with two CPU processes
(gloo), the tiny model, a tiny JSONL dataset. Launches are expensive on a 2-core machine, so each launch
backs several claims; module-scoped fixtures run them once.

Launches: reference ZeRO-2 (40 steps) | SIGKILL -> partial checkpoint -> SIGTERM (exit 75) -> finish chain |
ZeRO-2 2 -> 1 process universal resume | ZeRO-2 + activation checkpointing | ZeRO-2 bf16_autocast + fp32 |
ZeRO-1 under torchrun |
ZeRO-3 + every_k checkpointing + disk-full fault. Config errors run in-process (they fail before any launch).
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import time

import pytest
import torch

import train_helpers as th  # tests/ is on sys.path (pytest rootdir-relative import)

pytestmark = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")

STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.write_jsonl(str(tmp_path_factory.mktemp("data") / "data.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """Uninterrupted ZeRO-2 run: the loss curve every other run is compared with."""
    out = str(tmp_path_factory.mktemp("ref"))
    cmd = th.command("zero2_bf16.json", th.base_overrides(out, data, STEPS, "train.sample_every=40"))
    res = th.run(cmd)
    assert res.returncode == 0, res.output[-5000:]
    # DeepSpeed's CPU all-reduce buffers (66 MiB each in /dev/shm) must not outlive a finished run.
    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "leaked DeepSpeed shm buffers"
    return out


def _falls(curve: dict) -> bool:
    steps = sorted(curve)
    first = sum(curve[s]["loss"] for s in steps[:3]) / 3
    last = sum(curve[s]["loss"] for s in steps[-3:]) / 3
    return last < first - 0.2


# ---------------------------------------------------------------------------------------------------
# Fail fast on bad configuration (in-process: main() returns before any process group / model / data)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,expect", [
    ("batch", "train_batch_size=999"),
    ("unknown", "train.max_stepz"),
    ("nodata", "data.jsonl="),
    ("notok", "tokenizer.weights="),
    ("precision", "train.precision='fp32'"),
])
def test_bad_config_fails_fast(case, expect, tmp_path, data, monkeypatch, caplog):
    from rear_ds import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    ds = "zero2_bf16.json"
    over = th.base_overrides(str(tmp_path / "run"), data, 3)
    if case == "batch":
        cfg = json.load(open(os.path.join(th.ROOT, "ds_configs", ds)))
        cfg["train_batch_size"] = 999
        ds = str(tmp_path / "bad.json")
        json.dump(cfg, open(ds, "w"))
    elif case == "unknown":
        over.append("train.max_stepz=3")
    elif case == "nodata":
        over.append(f"data.jsonl={tmp_path}/missing.jsonl")
    elif case == "notok":
        over.append(f"tokenizer.weights={tmp_path}/missing.safetensors")
    elif case == "precision":
        over.append("train.precision=fp32")
    ds_path = ds if os.path.isabs(ds) else os.path.join(th.ROOT, "ds_configs", ds)
    import logging
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's capture handler
    caplog.set_level(logging.ERROR, logger="rear_ds")
    rc = train.main(["--deepspeed_config", ds_path, "--config", os.path.join(th.ROOT, "configs/tiny.yaml"),
                     *over])
    assert rc == 1
    assert expect in caplog.text, caplog.text
    assert not os.path.exists(tmp_path / "run"), "nothing may be created before the config is valid"
    if case == "batch":
        assert "8 x train.grad_accum=1 x data-parallel size 1 = 8" in caplog.text


def test_ds_config_auto_fill(tiny_cfg):
    from rear_ds.config import ConfigError
    from rear_ds.training import ds_config as dsc

    for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16", "zero3_offload_bf16"):
        ds = dsc.resolve(dsc.load_json(os.path.join(th.ROOT, "ds_configs", name + ".json")), tiny_cfg, 4)
        assert ds["train_batch_size"] == 8 * 4 and ds["gradient_clipping"] == 1.0
    tiny_cfg.train.precision = "fp16"
    ds = dsc.resolve(dsc.load_json(os.path.join(th.ROOT, "ds_configs/zero2_fp16.json")), tiny_cfg, 2)
    assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    with pytest.raises(ConfigError, match="optim.lr"):
        dsc.resolve({"fp16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 0.5}}},
                    tiny_cfg, 1)
    # precision modes: the autocast config needs train.precision=bf16_autocast, one mode at a time, bf16 only
    autocast = dsc.load_json(os.path.join(th.ROOT, "ds_configs/zero2_bf16_autocast.json"))
    with pytest.raises(ConfigError, match="train.precision='fp16'.*'bf16_autocast'"):
        dsc.resolve(autocast, tiny_cfg, 2)
    tiny_cfg.train.precision = "bf16_autocast"
    assert dsc.resolve(autocast, tiny_cfg, 2)["torch_autocast"]["lower_precision_safe_modules"] == []
    bare = dict(autocast, torch_autocast={"enabled": True, "dtype": "bf16"})  # fp32 reduction unless told
    assert dsc.resolve(bare, tiny_cfg, 2)["torch_autocast"]["lower_precision_safe_modules"] == []
    with pytest.raises(ConfigError, match="enables bf16 and torch_autocast"):
        dsc.resolve(dict(autocast, bf16={"enabled": True}), tiny_cfg, 2)
    with pytest.raises(ConfigError, match="torch_autocast.dtype='float16'"):
        dsc.resolve(dict(autocast, torch_autocast={"enabled": True, "dtype": "float16"}), tiny_cfg, 2)


def test_global_batch_is_pinned_across_process_counts():
    """The recipe YAMLs pin 2048 samples per optimizer step: grad_accum follows the process count."""
    from rear_ds.config import ConfigError, load_config
    from rear_ds.training import ds_config as dsc

    for world, accum in ((8, 2), (16, 1), (4, 4), (1, 16)):
        cfg = load_config(os.path.join(th.ROOT, "configs/rear_l.yaml"))
        note = dsc.pin_global_batch(cfg, world)
        assert cfg.train.grad_accum == accum and (note is None) == (accum == 1), (world, note)
        ds = dsc.resolve(dsc.load_json(os.path.join(th.ROOT, "ds_configs/zero2_bf16.json")), cfg, world)
        assert ds["train_batch_size"] == 2048 and ds["gradient_accumulation_steps"] == accum
    cfg = load_config(os.path.join(th.ROOT, "configs/rear_l.yaml"))
    with pytest.raises(ConfigError, match="global_batch=2048 is not a multiple of .*128 x 32 processes = 4096"):
        dsc.pin_global_batch(cfg, 32)
    with pytest.raises(ConfigError, match=r"train.global_batch=100 must be 0 .* train.micro_batch_size=128"):
        load_config(os.path.join(th.ROOT, "configs/rear_l.yaml"), ["train.global_batch=100"])
    # few processes -> many bf16-accumulated micro-batches: a warning points to fp32 accumulation
    cfg = load_config(os.path.join(th.ROOT, "configs/rear_l.yaml"))
    dsc.pin_global_batch(cfg, 1)
    ds = dsc.resolve(dsc.load_json(os.path.join(th.ROOT, "ds_configs/zero2_bf16.json")), cfg, 1)
    assert "accumulates 16 micro-batches' gradients in bf16" in " ".join(dsc.precision_warnings(ds, cfg))
    cfg.train.precision = "bf16_autocast"
    ds = dsc.resolve(dsc.load_json(os.path.join(th.ROOT, "ds_configs/zero2_bf16_autocast.json")), cfg, 1)
    assert dsc.precision_warnings(ds, cfg) == []
    cfg = load_config(os.path.join(th.ROOT, "configs/rear_l.yaml"), ["train.global_batch=0", "train.grad_accum=3"])
    assert dsc.pin_global_batch(cfg, 8) is None and cfg.train.grad_accum == 3  # not pinned: as given


def test_a_failed_conversion_never_poisons_the_next_attempt(tmp_path, monkeypatch):
    """Issue 19 item 3. Ranks other than 0 wait for rank 0's COMPLETE or FAILED marker on the file system (not in a
    timed collective). A FAILED marker left by an earlier attempt, which a waiting rank may read before rank 0
    removes it (or see longer through an NFS cache), is not this attempt's: only this attempt's stops it. The
    failure is real: ds_to_universal on a checkpoint folder without DeepSpeed's files."""
    import threading

    from rear_ds.training import checkpoint as ckpt

    tag = tmp_path / "step_00000020"
    tag.mkdir()
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": 20, "world_size": 2, "zero_stage": 2}))
    attempts = iter(["first", "second", "second"])
    monkeypatch.setattr(ckpt.dist, "broadcast_object_list", lambda lst, src: lst.__setitem__(0, next(attempts)))
    monkeypatch.setattr(ckpt.dist, "barrier", lambda: None)
    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    with pytest.raises(RuntimeError, match="ds_to_universal failed on"):  # attempt 1, rank 0: the real failure
        ckpt.ensure_universal(str(tmp_path), "step_00000020")
    failed = tmp_path / "step_00000020_universal.FAILED"
    assert failed.exists()
    # attempt 2, rank 1, before rank 0 got to remove the old marker: keeps waiting, then loads rank 0's result
    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 1)
    real_sleep = time.sleep
    monkeypatch.setattr(ckpt.time, "sleep", lambda s: real_sleep(0.01))
    dst = tmp_path / "step_00000020_universal"
    dst.mkdir()
    timer = threading.Timer(0.5, lambda: ckpt.write_text_atomic(str(dst / ckpt.COMPLETE), json.dumps({"step": 20})))
    timer.start()
    assert ckpt.ensure_universal(str(tmp_path), "step_00000020") == "step_00000020_universal"
    # this attempt's own failure does stop the waiting ranks
    shutil.rmtree(dst)
    failed.write_text(json.dumps({"attempt": "second", "error": "boom"}))
    with pytest.raises(RuntimeError, match="rank 0 could not convert .*step_00000020_universal.FAILED"):
        ckpt.ensure_universal(str(tmp_path), "step_00000020")
    ckpt.clean_partial(str(tmp_path))  # a new start tries again: the marker goes
    assert not failed.exists() and tag.exists()


def test_prune_keeps_what_latest_names(tmp_path):
    """Issue 19 item 8: after resuming from an older `latest` (moved back by hand, or a crash between COMPLETE and
    `latest`), prune keeps `latest`'s checkpoint and the ones before it, never the newest by number alone; the
    newer ones (an abandoned trajectory) go. Deleting happens in the background (renamed away first)."""
    from rear_ds.training import checkpoint as ckpt

    def layout(latest):
        shutil.rmtree(tmp_path, ignore_errors=True)
        for step in (5, 8, 10, 15):
            d = tmp_path / ckpt.tag_for(step)
            d.mkdir(parents=True)
            (d / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 2}))
        (tmp_path / "step_00000010_universal").mkdir()
        (tmp_path / ckpt.LATEST).write_text(ckpt.tag_for(latest) + "\n")

    for latest, keep_last, kept in ((8, 1, [8]), (8, 2, [5, 8]), (15, 2, [10, 15])):
        layout(latest)
        ckpt.prune(str(tmp_path), keep_last)
        ckpt.wait_for_deletions()
        want = [ckpt.tag_for(k) for k in kept] + [ckpt.LATEST] + ["step_00000010_universal"] * (10 in kept)
        assert sorted(os.listdir(tmp_path)) == sorted(want), latest


SAVE_PROBE = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from rear_ds.training import launch_env
env = launch_env.detect()
device = launch_env.init_distributed(env, 120)
import deepspeed
from rear_ds.config import load_config
from rear_ds.training import build, checkpoint as ckpt, ds_config as dsc, optim
cfg = load_config("configs/tiny.yaml", ["train.allow_random_tokenizer=true"])
ds_cfg = dsc.resolve(dsc.load_json("ds_configs/zero2_bf16.json"), cfg, 1)
model = build.build_model(cfg, ds_cfg, 2)
opt, _ = optim.build_optimizer(model, cfg.optim, device, False)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
events, real_fsync, real_replace = [], os.fsync, os.replace  # observed, not changed
os.fsync = lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
os.replace = lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1]
ck = sys.argv[1]
os.makedirs(ck)
save = lambda step: ckpt.save(engine, ck, step, {"step": step}, {"world_size": 1, "zero_stage": 2}, '{"run": 1}', 10)
out = {"first": save(5), "events": list(events)}
# a complete checkpoint of a later step from an earlier run, ahead of `latest` (e.g. moved back by hand)
import shutil
shutil.copytree(os.path.join(ck, "step_00000005"), os.path.join(ck, "step_00000010"))
out["old_mtime"] = os.stat(os.path.join(ck, "step_00000010", "COMPLETE")).st_mtime_ns
out["second"] = save(10)
out["new_mtime"] = os.stat(os.path.join(ck, "step_00000010", "COMPLETE")).st_mtime_ns
out["latest"] = open(os.path.join(ck, "latest")).read().strip()
ckpt.wait_for_deletions()
out["listing"] = sorted(os.listdir(ck))
print("PROBE", json.dumps(out))
launch_env.exit_process(0)
"""


def test_save_commits_durably_and_replaces_an_earlier_runs_folder(tmp_path):
    """Issue 19 item 8, with a real DeepSpeed engine in one process: rear_config.json is on disk (fsynced) before
    COMPLETE names the checkpoint; a complete folder of the same step left by an earlier run is replaced and
    `latest` moves to this run's (save() used to return early, leaving `latest` behind)."""
    import subprocess
    import sys

    from rear_ds.demo import free_port

    res = subprocess.run([sys.executable, "-c", SAVE_PROBE, str(tmp_path / "ck")], cwd=th.ROOT, capture_output=True,
                         text=True, timeout=300, env=th.env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    line = next((x for x in res.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[6:])
    assert out["first"] and out["second"]
    ev = out["events"]
    tag = str(tmp_path / "ck" / "step_00000005")
    synced = [i for i, (kind, p) in enumerate(ev) if kind == "fsync" and p.startswith(os.path.join(tag, "rear_config"))]
    complete = [i for i, (kind, p) in enumerate(ev) if kind == "replace" and p == os.path.join(tag, "COMPLETE")]
    assert synced and complete and synced[0] < complete[0], ev
    assert out["latest"] == "step_00000010" and out["new_mtime"] > out["old_mtime"]
    assert out["listing"] == ["latest", "step_00000005", "step_00000010", "zero_to_fp32.py", "zero_to_torch.py"]


def test_weight_decay_groups_and_schedule(tiny_model):
    from rear_ds.training import optim

    groups = optim.param_groups(tiny_model, 0.03)
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert "cls_token" in decay and "blocks.0.adaLN_modulation.1.weight" in decay and "lm_head.weight" in decay
    assert "adaln_before_head.adaLN_modulation.1.weight" not in decay  # "ln" in the name
    assert not any("bias" in n or "norm" in n or "embed" in n for n in decay)
    assert optim.lr_lambda(0, 5, 40, 1e-3, 1e-4) == 0 and optim.lr_lambda(5, 5, 40, 1e-3, 1e-4) == 1.0
    assert math.isclose(optim.lr_lambda(40, 5, 40, 1e-3, 1e-4) * 1e-3, 1e-4)


def test_optimizer_state_is_placed_after_resume(tiny_model):
    """place_optimizer_state finds the torch optimizer inside wrappers and puts `step` where fused AdamW wants
    it (float32, on the parameter's device), as DeepSpeed's universal loader does not."""
    from types import SimpleNamespace

    from rear_ds.config import OptimConfig
    from rear_ds.training import optim

    opt, name = optim.build_optimizer(tiny_model, OptimConfig(), torch.device("cpu"), offload=False)
    assert name == "torch.optim.AdamW(fused)" and opt.defaults["fused"]
    for p in tiny_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    p0 = next(iter(tiny_model.parameters()))
    opt.state[p0]["step"] = torch.tensor(7.0, dtype=torch.float64)  # as a loader might leave it
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))  # DeepSpeed-style nesting
    assert optim.inner_optimizer(wrapped) is opt
    assert optim.place_optimizer_state(wrapped) == 1
    assert opt.state[p0]["step"].dtype == torch.float32 and opt.state[p0]["step"].item() == 7.0
    opt.step()  # the fused kernel accepts it
    assert optim.place_optimizer_state(wrapped) == 0


def test_leftover_rank_under_srun_is_refused(monkeypatch):
    """RANK=0 WORLD_SIZE=1 exported in a batch script, then `srun -n 4 python train.py`: every task would train
    alone on the same out_dir. The launch is refused, naming the variables; a launcher's values pass."""
    from rear_ds.training import launch_env

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(launch_env.LaunchError, match=r"RANK=0 WORLD_SIZE=1 .* srun task 2 of a 4-task step"):
        launch_env.detect()
    monkeypatch.setenv("WORLD_SIZE", "8")  # e.g. the deepspeed launcher in each of 4 tasks, 2 GPUs each
    monkeypatch.setenv("RANK", "5")
    assert launch_env.detect() == launch_env.LaunchEnv(5, 0, 8, "deepspeed/torchrun")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")  # outside an srun step nothing is compared
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert launch_env.detect().world_size == 1


def test_every_gpu_binding_gets_one_gpu_per_process():
    """Issue 19 item 6: the CUDA device of each process for what Slurm's GPU bindings make each task see (8 tasks
    on a 2-socket node with 8 GPUs); --gpu-bind=closest used to fail local ranks 4-7 ("local rank 5 but only 4
    GPUs are visible"). The GPU lists go through a real TCPStore, as at start-up."""
    import threading

    import torch.distributed as dist

    from rear_ds.demo import free_port
    from rear_ds.training.launch_env import LaunchError, assign_gpu, exchange_gpus

    socket0, socket1 = ["0", "1", "2", "3"], ["4", "5", "6", "7"]
    bindings = {
        "none (all visible: deepspeed, torchrun, plain srun)": {r: [str(i) for i in range(8)] for r in range(8)},
        "--gpus-per-task=1 / single:1": {r: [str(r)] for r in range(8)},
        "closest, block distribution": {r: socket0 if r < 4 else socket1 for r in range(8)},
        "closest, cyclic distribution": {r: socket0 if r % 2 == 0 else socket1 for r in range(8)},
    }
    for name, visible in bindings.items():
        port = free_port()
        server = dist.TCPStore("127.0.0.1", port, 9, True, wait_for_workers=False)
        got = {}

        def task(r):
            store = dist.TCPStore("127.0.0.1", port, 9, False)
            got[r] = exchange_gpus(store, r, 8, visible[r], "node1")

        threads = [threading.Thread(target=task, args=(r,)) for r in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        physical = [visible[r][got[r]] for r in range(8)]
        assert sorted(physical) == [str(i) for i in range(8)], (name, physical)  # one GPU each, none shared
        assert all(got[r] == assign_gpu(r, visible) for r in range(8)), name
        del server
    assert [assign_gpu(r, bindings["closest, block distribution"]) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(LaunchError, match=r"no GPU left for local rank 4: it sees \['0', '1', '2', '3'\]"):
        assign_gpu(4, {r: socket0 for r in range(5)})  # more processes than GPUs


def test_nodelist_parser():
    from rear_ds.training.launch_env import expand_nodelist

    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("a1") == ["a1"]
    assert expand_nodelist("rack[1-2]-n[01-02],x") == ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "x"]


# ---------------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------------


def test_reference_run_trains_logs_samples_and_exports(reference):
    """ZeRO-2 bf16: loss falls; log.jsonl has every metric; a sample grid PNG; export -> load_generator -> sampler."""
    from rear_ds.config import config_from_dict
    from rear_ds.models import load_generator
    from rear_ds.sampling import generate
    from safetensors import safe_open

    curve = th.losses(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert _falls(curve)
    rec = curve[10]
    for key in ("ce", "enc_align", "dec_align", "token_acc", "rho", "lr", "grad_norm", "samples_per_s",
                "tokens_per_s", "tflops", "step_time_s", "data_wait_frac", "peak_mem_gb", "samples_seen",
                "epochs"):
        assert rec[key] is not None, key
    assert rec["mfu"] is None  # the CPU has no peak in the table
    assert rec["samples_seen"] == 10 * 16
    start = json.loads(open(os.path.join(reference, "log.jsonl")).readline())
    assert start["layernorm_impl"] and start["optimizer_impl"] == "torch.optim.AdamW(fused)"
    assert glob.glob(os.path.join(reference, "samples", "*.png"))
    assert os.path.isfile(os.path.join(reference, "config.yaml"))

    out = os.path.join(reference, "export.safetensors")
    res = th.run(["python", "-m", "rear_ds.export", reference, out, "--dtype", "bf16"])
    assert res.returncode == 0, res.output[-3000:]
    meta = safe_open(out, "pt").metadata()
    cfg = config_from_dict(json.loads(meta["rear_config"]))
    model = load_generator(out, cfg.model)
    tokens = generate(model, torch.tensor([0, 1]), torch.tensor([0, 1]), 0, cfg.sampling)
    assert tokens.shape == (2, cfg.model.num_tokens)
    # bf16 export of fp32 master weights: compare with the fp32 export
    out32 = os.path.join(reference, "export32.safetensors")
    assert th.run(["python", "-m", "rear_ds.export", os.path.join(reference, "checkpoints"), out32]).returncode == 0
    m32 = load_generator(out32, cfg.model)
    for (n, a), (_, b) in zip(model.state_dict().items(), m32.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-2), n


def test_kill_partial_sigterm_resume_equals_uninterrupted(reference, data, tmp_path):
    """SIGKILL mid-run -> resume from the last complete checkpoint; a partial checkpoint is cleaned and never
    used; SIGTERM to ONE rank -> every rank checkpoints and the job exits 75; the final loss curve equals the
    uninterrupted run step by step (same seed/config/process count = same curve)."""
    out = str(tmp_path / "run")
    cmd = th.command("zero2_bf16.json", th.base_overrides(out, data, STEPS, "wandb.enabled=true"))
    # 1. SIGKILL rank 1 after step 12: the launcher tears the job down, exit != 0
    p = th.run_until(cmd, out, 12, signal.SIGKILL, WANDB_MODE="offline")
    assert p.signal_sent and p.returncode != 0, p.output[-3000:]
    # the killed rank's CPU all-reduce buffer (66 MiB of RAM) outlives it: nothing in that process could unlink it
    # (unless another CPU run starting on this machine meanwhile already removed it, as it should)
    killed_port = cmd[cmd.index("--master_port") + 1]
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{killed_port}_1")
    # ... while another run's buffer, still held by a living process, must survive the next start
    import subprocess
    import sys

    busy = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_0"
    holder = subprocess.Popen([sys.executable, "-c", f"import time; f = open({busy!r}, 'w'); "
                               "print('open', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    wandb_id = open(os.path.join(out, "wandb_id")).read().strip()
    ck = os.path.join(out, "checkpoints")
    latest = open(os.path.join(ck, "latest")).read().strip()
    # 2. a checkpoint whose writing was interrupted: the files are there but no COMPLETE marker
    partial = os.path.join(ck, "step_00000099")
    shutil.copytree(os.path.join(ck, latest), partial)
    os.remove(os.path.join(partial, "COMPLETE"))
    # 3. relaunch, SIGTERM to rank 1 after step 22 -> checkpoint + exit 75
    p = th.run_until(cmd, out, 22, signal.SIGTERM, WANDB_MODE="offline")
    assert p.returncode == 75, p.output[-5000:]
    assert f"resumed from {os.path.join(ck, latest)}" in p.output
    assert "removing partial checkpoint" in p.output and not os.path.exists(partial)
    # the start removed the killed run's buffers (its processes are gone), not the one a living process holds
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{killed_port}_*")
    assert os.path.exists(busy) and (not left or f"_{killed_port}_1" in p.output), p.output[-3000:]
    holder.kill()
    holder.wait()
    os.unlink(busy)
    stopped = max(th.losses(out))
    assert 22 <= stopped < STEPS
    assert open(os.path.join(ck, "latest")).read().strip() == f"step_{stopped:08d}"
    # 4. relaunch to the end
    res = th.run(cmd, WANDB_MODE="offline")
    assert res.returncode == 0, res.output[-5000:]
    assert open(os.path.join(out, "wandb_id")).read().strip() == wandb_id  # the same W&B run continues
    ref, got = th.losses(reference), th.losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
        assert got[s]["lr"] == ref[s]["lr"] and got[s]["rho"] == ref[s]["rho"]


def test_universal_resume_on_fewer_processes(reference, data, tmp_path):
    """A ZeRO-2 checkpoint from 2 processes resumes on 1 via ds_to_universal; step, lr and rho continue."""
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    ck = os.path.join(out, "checkpoints")
    for t in os.listdir(ck):  # go back to step 20
        if t.startswith("step_") and int(t[5:13]) > 20:
            shutil.rmtree(os.path.join(ck, t))
    open(os.path.join(ck, "latest"), "w").write("step_00000020\n")
    os.remove(os.path.join(out, "log.jsonl"))
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 24), nproc=1))
    assert res.returncode == 0, res.output[-5000:]
    assert "universal checkpoint: 2 -> 1 processes" in res.output
    assert "the data order continues at sample 320 of its global order" in res.output  # 20 steps x 16
    ref, got = th.losses(reference), th.losses(out)
    assert sorted(got) == [21, 22, 23, 24]
    for s in got:
        assert math.isclose(got[s]["lr"], ref[s]["lr"], rel_tol=1e-9) and got[s]["rho"] == ref[s]["rho"]
        assert got[s]["samples_seen"] == 20 * 16 + (s - 20) * 8
        assert abs(got[s]["loss"] - ref[s]["loss"]) < 0.5  # same weights, other batches
    assert os.path.isfile(os.path.join(ck, "step_00000020_universal", "COMPLETE"))
    assert os.path.isfile(os.path.join(ck, "step_00000024", "COMPLETE"))
    # The next requeue on the same process count continues those new streams exactly (their seed is the
    # one they were started from, not train.seed) ...
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 26), nproc=1))
    assert res.returncode == 0, res.output[-5000:]
    assert "step 24" in res.output and "restart from seed" not in res.output
    # ... also with more DataLoader workers (the epoch order does not depend on them); a changed layout of the
    # resampled order (its streams are per worker) warns and starts fresh streams, not a crash.
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 27) + ["data.num_workers=2"], nproc=1))
    assert res.returncode == 0, res.output[-5000:]
    assert "restart from seed" not in res.output and sorted(th.losses(out))[-1] == 27
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 28) + ["data.order=resampled"], nproc=1))
    assert res.returncode == 0, res.output[-5000:]
    assert "the layout changed: order: saved 'epoch', now 'resampled'" in res.output, res.output[-5000:]
    assert "data order restarts from seed" in res.output and sorted(th.losses(out))[-1] == 28


def _back_to(reference: str, out: str, step: int, drop_later: bool) -> str:
    """A copy of the reference run whose `latest` names step ``step`` (later checkpoints kept or dropped) and
    whose log is empty; returns its checkpoints folder."""
    shutil.copytree(reference, out)
    ck = os.path.join(out, "checkpoints")
    for t in os.listdir(ck):
        if drop_later and t.startswith("step_") and int(t[5:13]) > step:
            shutil.rmtree(os.path.join(ck, t))
    open(os.path.join(ck, "latest"), "w").write(f"step_{step:08d}\n")
    os.remove(os.path.join(out, "log.jsonl"))
    return ck


def test_zero_stage_change_goes_through_the_universal_checkpoint(reference, data, tmp_path):
    """Issue 19 item 7: a ZeRO-2 checkpoint resumed under ZeRO-3 on the same two processes (it used to go to an
    exact load of files that do not exist), then back to ZeRO-2: both through the universal checkpoint, whose
    files DeepSpeed 0.19 names and shapes after the source's stage (rear_ds adds the other stage's view)."""
    out = str(tmp_path / "run")
    ck = _back_to(reference, out, 20, drop_later=True)
    res = th.run(th.command("zero3_bf16.json", th.base_overrides(out, data, 22)))
    assert res.returncode == 0, res.output[-5000:]
    assert "ZeRO stage changed (2 -> 3): resuming through a universal checkpoint" in res.output
    assert "restart from seed" not in res.output  # ZeRO-2 checkpoints hold every rank's state: data order goes on
    ref, got = th.losses(reference), th.losses(out)
    assert sorted(got) == [21, 22]
    assert abs(got[21]["loss"] - ref[21]["loss"]) < 1e-3, (got[21]["loss"], ref[21]["loss"])  # same weights, batch
    assert abs(got[22]["loss"] - ref[22]["loss"]) < 0.05 and got[22]["lr"] == ref[22]["lr"]
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 24)))
    assert res.returncode == 0, res.output[-5000:]
    assert "ZeRO stage changed (3 -> 2): resuming through a universal checkpoint" in res.output
    assert f"resumed from {os.path.join(ck, 'step_00000022_universal')}: step 22" in res.output
    got = th.losses(out)
    assert sorted(got) == [21, 22, 23, 24] and all(abs(got[s]["loss"] - ref[s]["loss"]) < 0.5 for s in (23, 24))


def test_rolled_back_latest_last_step_stop_and_slow_deleting(reference, data, tmp_path):
    """Issue 19 items 4 and 8 in one launch. `latest` moved back to step 10 while the checkpoints of steps 15-40
    (an abandoned trajectory) remain: the run repeats steps 11-17 exactly, rewrites step 15 and moves `latest`
    to it (save() used to return early on the existing folder), and deletes 20-40. A SIGTERM whose stop falls
    on the last step finishes normally (exit 0: nothing to requeue). Rank 0's first deletion takes 30 s (a slow
    file system) against a 20 s collective timeout: it runs in the background, nobody waits for it. The exit
    skips interpreter finalization (its handlers abort here, standing for the teardown race)."""
    out = str(tmp_path / "run")
    ck = _back_to(reference, out, 10, drop_later=False)
    cmd = th.command("zero2_bf16.json", th.base_overrides(out, data, 17, "train.keep_last=1",
                                                          "train.collective_timeout_s=20"), script=th.FAULTS)
    res = th.run(cmd, REAR_TEST_SIGNAL_STEP="6", REAR_TEST_FAULT_RANK="1", REAR_TEST_SLOW_DELETE_S="30",
                 REAR_TEST_ABORT_AT_FINALIZE="1")
    assert res.returncode == 0, res.output[-6000:]
    assert f"resumed from {os.path.join(ck, 'step_00000010')}: step 10" in res.output
    assert "FAULT: rank 1 sends itself SIGTERM before step 6" in res.output
    assert "stop signal seen at the last step 17: finishing normally (exit 0)" in res.output
    assert [e["event"] for e in th.read_events(out)][-1] == "finished"
    ref, got = th.losses(reference), th.losses(out)
    assert sorted(got) == list(range(11, 18)) and all(got[s]["loss"] == ref[s]["loss"] for s in got)
    assert f"checkpoint {os.path.join(ck, 'step_00000015')} complete" in res.output  # rewritten, not skipped
    assert f"deleting checkpoint {os.path.join(ck, 'step_00000040')}: it is newer than step_00000015" in res.output
    assert "FAULT: rank 0 deletes" in res.output and "slowly" in res.output
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000017"
    assert sorted(t for t in os.listdir(ck) if t.startswith("step_")) == ["step_00000017"]  # deleted by the exit


def test_activation_checkpointing_same_loss(reference, data, tmp_path):
    out = str(tmp_path / "run")
    res = th.run(th.command("zero2_bf16.json", th.base_overrides(out, data, 6, "train.activation_checkpointing=all")))
    assert res.returncode == 0, res.output[-5000:]
    ref, got = th.losses(reference), th.losses(out)
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]


def test_bf16_autocast_mode_keeps_fp32_weights(reference, data, tmp_path):
    """train.precision=bf16_autocast (the reference recipe: fp32 weights, autocast forward) with
    ds_configs/zero2_bf16_autocast.json: fp32 weights in the checkpoint where bf16 mode keeps bf16 ones; the
    first loss differs from an fp32 run's (the products really run in bf16) but only by rounding (same model,
    data and draws); it trains and resumes."""
    out = str(tmp_path / "autocast")
    res = th.run(th.command("zero2_bf16_autocast.json",
                            th.base_overrides(out, data, 10, "train.precision=bf16_autocast")))
    assert res.returncode == 0, res.output[-5000:]
    fp32_json = tmp_path / "zero2_fp32.json"
    ds = json.load(open(os.path.join(th.ROOT, "ds_configs/zero2_bf16_autocast.json")))
    del ds["torch_autocast"]
    fp32_json.write_text(json.dumps(ds))
    out32 = str(tmp_path / "fp32")
    res = th.run(th.command(str(fp32_json), th.base_overrides(out32, data, 1, "train.precision=fp32")))
    assert res.returncode == 0, res.output[-5000:]

    def module_dtypes(run_dir):
        tag = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
        sd = torch.load(glob.glob(os.path.join(run_dir, "checkpoints", tag, "*model_states.pt"))[0],
                        map_location="cpu", weights_only=False)["module"]
        return {v.dtype for v in sd.values()}

    assert module_dtypes(out) == {torch.float32}
    assert module_dtypes(reference) == {torch.bfloat16}
    auto, full, bf16 = th.losses(out), th.losses(out32), th.losses(reference)
    assert json.loads(open(os.path.join(out, "log.jsonl")).readline())["precision"] == "bf16_autocast"
    assert auto[1]["loss"] != full[1]["loss"]
    assert abs(auto[1]["loss"] - full[1]["loss"]) < 0.02 and abs(auto[1]["loss"] - bf16[1]["loss"]) < 0.02
    assert sum(auto[s]["loss"] for s in (8, 9, 10)) < sum(auto[s]["loss"] for s in (1, 2, 3))
    # and it resumes (its checkpoints pass the pickle scan and load into the fp32 engine)
    res = th.run(th.command("zero2_bf16_autocast.json",
                            th.base_overrides(out, data, 12, "train.precision=bf16_autocast")))
    assert res.returncode == 0, res.output[-5000:]
    assert "resumed from" in res.output and sorted(th.losses(out)) == list(range(1, 13))


def test_zero1_under_torchrun_with_disk_full(data, tmp_path):
    """ZeRO-1 under torchrun trains; rank 1's write of step 10 refused by its file-size limit (torch.save raises
    RuntimeError, as for a full disk or a quota) is reported clearly, leaves `latest` on step 5, and training goes
    on to later complete checkpoints (its state was not corrupted). A SIGTERM to a worker then stops the run
    with a checkpoint; the workers exit 75, which torchrun reports as 1 (README: exit codes per launcher)."""
    out = str(tmp_path / "run")
    res = th.run(th.command("zero1_bf16.json", th.base_overrides(out, data, 25), launcher="torchrun",
                            script=th.FAULTS), REAR_TEST_FSIZE_STEP="10", REAR_TEST_FSIZE_RANK="1",
                 REAR_TEST_SIGNAL_STEP="20", REAR_TEST_FAULT_RANK="1")
    assert res.returncode == 1, res.output[-5000:]
    assert "stopped by signal at step 21 after writing the checkpoint; exit 75" in res.output, res.output[-5000:]
    assert [e["event"] for e in th.read_events(out)][-1] == "stop"
    curve = th.losses(out)
    assert sorted(curve) == list(range(1, 22)) and _falls(curve)
    assert json.loads(open(os.path.join(out, "log.jsonl")).readline())["launcher"] == "deepspeed/torchrun"
    assert "rank 1: writing " in res.output and "failed (RuntimeError: " in res.output, res.output[-5000:]
    assert "'latest' still names the previous complete checkpoint" in res.output
    ck = os.path.join(out, "checkpoints")
    assert not os.path.exists(os.path.join(ck, "step_00000010"))
    assert os.path.isfile(os.path.join(ck, "step_00000015", "COMPLETE"))
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000021"


def test_zero3_every_k_trains_and_exports(data, tmp_path):
    """ZeRO-3 (model built inside zero.Init) with every-2nd-block activation checkpointing trains, and its
    partitioned checkpoint exports to a file load_generator reads."""
    out = str(tmp_path / "run")
    over = th.base_overrides(out, data, 25, "train.activation_checkpointing=every_k", "train.checkpoint_every_k=2")
    res = th.run(th.command("zero3_bf16.json", over))
    assert res.returncode == 0, res.output[-5000:]
    curve = th.losses(out)
    assert sorted(curve) == list(range(1, 26)) and _falls(curve)
    exp = os.path.join(str(tmp_path), "z3.safetensors")
    r = th.run(["python", "-m", "rear_ds.export", out, exp])
    assert r.returncode == 0, r.output[-3000:]
    from rear_ds.config import load_config
    from rear_ds.models import load_generator

    load_generator(exp, load_config(os.path.join(th.ROOT, "configs/tiny.yaml")).model)


# ---------------------------------------------------------------------------------------------------
# GPU nodes (skipped without a GPU; run them on a GPU machine)
# ---------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU node")


@gpu
def test_cpu_run_on_a_gpu_node_leaves_cuda_alone(data, tmp_path):
    """Issue 19 item 8: a CPU run (DS_ACCELERATOR=cpu) on a GPU node opens no CUDA context (nvidia-smi never lists
    its processes) and reports no MFU (there is no GPU peak to divide by)."""
    import subprocess

    out = str(tmp_path / "run")
    proc = subprocess.Popen(th.command("zero2_bf16.json", th.base_overrides(out, data, 6)), cwd=th.ROOT,
                            env=th.env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ours, on_gpu = set(), set()
    while proc.poll() is None:
        ours |= set(th.workers(proc.pid).values())
        smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout
        on_gpu |= {int(p) for p in smi.split() if p.strip().isdigit()}
        time.sleep(0.3)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-5000:]
    assert len(ours) == 2 and not ours & on_gpu, (ours, on_gpu)
    curve = th.losses(out)
    assert sorted(curve) == list(range(1, 7)) and all(curve[s]["mfu"] is None for s in curve)
    assert json.loads(open(os.path.join(out, "log.jsonl")).readline())["device"] == "cpu"


@gpu
def test_two_processes_on_one_gpu_are_refused_clearly(data, tmp_path):
    """Issue 19 item 6 on a real GPU: two processes that see the same single GPU get a clear error naming the
    binding, not NCCL's duplicate-GPU failure or two ranks sharing one device."""
    cmd = th.command("zero2_bf16.json", th.base_overrides(str(tmp_path / "run"), data, 2), launcher="torchrun")
    res = th.run(cmd, timeout=300, CUDA_VISIBLE_DEVICES="0")
    assert res.returncode != 0
    assert "no GPU left for local rank 1: it sees ['0'] (CUDA_VISIBLE_DEVICES)" in res.output, res.output[-5000:]
