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


def test_ranks_wait_for_the_universal_conversion_on_the_file_system(tmp_path, monkeypatch):
    """Ranks other than 0 wait for rank 0's COMPLETE (or FAILED) marker, not in a timed collective."""
    import threading

    from rear_ds.training import checkpoint as ckpt

    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 1)
    barriers = []
    monkeypatch.setattr(ckpt.dist, "barrier", lambda: barriers.append(1))
    monkeypatch.setattr(ckpt.time, "sleep", lambda s: None)
    dst = tmp_path / "step_00000020_universal"
    (tmp_path / "step_00000020_universal.FAILED").write_text("boom")
    with pytest.raises(RuntimeError, match="rank 0 could not convert .*step_00000020_universal.FAILED"):
        ckpt.ensure_universal(str(tmp_path), "step_00000020")
    os.remove(tmp_path / "step_00000020_universal.FAILED")
    dst.mkdir()
    timer = threading.Timer(0.2, lambda: ckpt._fsync_write(str(dst / ckpt.COMPLETE), json.dumps({"step": 20})))
    timer.start()
    assert ckpt.ensure_universal(str(tmp_path), "step_00000020") == "step_00000020_universal"
    assert barriers == [1]


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


def test_cuda_device_of_a_task():
    """One GPU per task (srun --gpus-per-task=1): device 0 whatever the local rank; all GPUs of the node
    visible: the local rank; more processes than visible GPUs: a clear error."""
    from rear_ds.training.launch_env import LaunchError, cuda_device_index

    assert cuda_device_index(3, 1) == 0 and cuda_device_index(3, 8) == 3 and cuda_device_index(0, 8) == 0
    with pytest.raises(LaunchError, match="local rank 5 but only 4 GPUs are visible"):
        cuda_device_index(5, 4)


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
    """ZeRO-1 under torchrun trains; a disk-full error while writing step 10 on rank 1 is reported clearly, leaves
    `latest` on step 5, and training goes on to later complete checkpoints (its state was not corrupted)."""
    out = str(tmp_path / "run")
    res = th.run(th.command("zero1_bf16.json", th.base_overrides(out, data, 25), launcher="torchrun",
                            script=th.FAULTS), REAR_TEST_ENOSPC_TAG="step_00000010", REAR_TEST_ENOSPC_RANK="1")
    assert res.returncode == 0, res.output[-5000:]
    curve = th.losses(out)
    assert sorted(curve) == list(range(1, 26)) and _falls(curve)
    assert json.loads(open(os.path.join(out, "log.jsonl")).readline())["launcher"] == "deepspeed/torchrun"
    assert "no space left on device" in res.output
    assert "'latest' still names the previous complete checkpoint" in res.output
    ck = os.path.join(out, "checkpoints")
    assert not os.path.exists(os.path.join(ck, "step_00000010"))
    assert os.path.isfile(os.path.join(ck, "step_00000015", "COMPLETE"))
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000025"


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
