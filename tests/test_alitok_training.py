"""The alitok family through the whole pipeline under the real launcher (`deepspeed --num_gpus 2`, two CPU
processes, gloo), with configs/tiny_alitok.yaml and the reAR regularizers on:

  tokens (JSONL) -> train (ZeRO-3 + zero.Init, bf16, every-2nd-block activation checkpointing, a sample grid
  from the ZeRO-3 replica) -> checkpoints -> SIGKILL + relaunch = the uninterrupted losses, step for step ->
  export -> load_generator -> rear_ds.sample -> rear_ds.evaluate;
  plus one ZeRO-2 bf16_autocast run with every block checkpointed (fp32 weights in the checkpoint).

Three launches. The tokenizer is the tiny AliTok one (4 prefix tokens + a 4x4 grid) with random weights: its
codebook gives the alignment targets and it decodes the samples.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import train_helpers as th

pytestmark = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher")

CONFIG = "tiny_alitok.yaml"
STEPS = 12


def overrides(out: str, data: str, *extra: str) -> list:
    return th.base_overrides(out, data, STEPS, "train.ckpt_every=4", "train.activation_checkpointing=every_k",
                             "train.checkpoint_every_k=2", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return th.write_jsonl(str(tmp_path_factory.mktemp("alitok_data") / "data.jsonl"), num_tokens=20, k=64)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """Uninterrupted ZeRO-3 run (model built inside zero.Init) with a sample grid at the last step."""
    out = str(tmp_path_factory.mktemp("alitok_ref"))
    res = th.run(th.command("zero3_bf16.json", overrides(out, data, f"train.sample_every={STEPS}"), config=CONFIG))
    assert res.returncode == 0, res.output[-5000:]
    return out


def test_zero3_run_trains_the_family_with_the_regularizers(reference):
    from rear_ds.config import load_config
    from rear_ds.models import flops_per_sample

    curve = th.losses(reference)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first = sum(curve[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(curve[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.2
    assert curve[1]["ce"] == pytest.approx(np.log(64), abs=1e-3)  # the zero-initialised output head
    for key in ("enc_align", "dec_align"):  # both terms are on and fall (toward -1)
        vals = [curve[s][key] for s in sorted(curve)]
        assert vals[0] != 0 and sum(vals[-3:]) / 3 < sum(vals[:3]) / 3 - 0.02, (key, vals)
    # noisy context: rho falls from 1 to 0 at the derived anneal end, 0.75 x optim.total_steps (40) = 30
    assert all(curve[s]["rho"] == pytest.approx(1 - (s - 1) / 30) for s in curve)
    assert sum(curve[s]["noise_frac"] for s in curve) > 0
    start = json.loads(open(os.path.join(reference, "log.jsonl")).readline())
    cfg = load_config(os.path.join(th.ROOT, "configs", CONFIG))
    assert start["zero_stage"] == 3 and start["flops_per_sample"] == flops_per_sample(cfg.model)
    assert start["layernorm_impl"] == "rear_ds.models.alitok_ar.RMSNorm"
    assert glob.glob(os.path.join(reference, "samples", "*.png"))


def test_kill_and_resume_equal_the_uninterrupted_run_then_export_sample_evaluate(reference, data, tmp_path):
    from safetensors import safe_open

    from rear_ds.config import config_from_dict
    from rear_ds.models import load_generator
    from rear_ds.models.alitok_ar import AliTokGenerator

    out = str(tmp_path / "run")
    cmd = th.command("zero3_bf16.json", overrides(out, data, "wandb.enabled=true"), config=CONFIG)
    p = th.run_until(cmd, out, 6, signal.SIGKILL, WANDB_MODE="offline")
    assert p.signal_sent and p.returncode != 0, p.output[-3000:]
    assert open(os.path.join(out, "checkpoints", "latest")).read().strip() == "step_00000004"
    res = th.run(cmd, WANDB_MODE="offline")
    assert res.returncode == 0, res.output[-5000:]
    assert "resumed from" in res.output and "step_00000004" in res.output
    ref, got = th.losses(reference), th.losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        for key in ("loss", "ce", "enc_align", "dec_align", "lr", "rho"):
            assert got[s][key] == ref[s][key], (s, key, got[s][key], ref[s][key])

    # export (fp32 master weights gathered from the ZeRO-3 partitions) -> load_generator
    exported = str(tmp_path / "alitok.safetensors")
    r = th.run(["python", "-m", "rear_ds.export", out, exported])
    assert r.returncode == 0, r.output[-3000:]
    with safe_open(exported, "pt") as f:
        cfg = config_from_dict(json.loads(f.metadata()["rear_config"]))
        names = set(f.keys())
    assert cfg.model.family == "alitok" and "output.weight" in names and not any("align" in n for n in names)
    model = load_generator(exported, cfg.model)
    assert isinstance(model, AliTokGenerator)

    # sample (KV cache, CFG) with a toy tokenizer file, then evaluate against a folder of reference images
    from rear_ds.models.tokenizers import build_tokenizer
    from rear_ds.models.weights import save_safetensors
    from test_evaluate import make_inception_weights

    tok = str(tmp_path / "tok.safetensors")
    torch.manual_seed(0)
    save_safetensors(build_tokenizer(cfg.tokenizer, load_weights=False).state_dict(), tok)
    samples = str(tmp_path / "samples")
    r = th.run(["python", "-m", "rear_ds.sample", "--checkpoint", exported, "--out-dir", samples, "--num-samples",
                "20", "--chunk-size", "10", "--batch-size", "10", "--no-progress", f"tokenizer.weights={tok}"])
    assert r.returncode == 0, r.output[-3000:]
    manifest = json.load(open(os.path.join(samples, "manifest.json")))
    assert manifest["config"]["model"]["family"] == "alitok" and manifest["sampling"]["kv_cache"] is True
    from PIL import Image

    ref_dir = tmp_path / "ref_images"
    ref_dir.mkdir()
    rng = np.random.RandomState(0)
    for i in range(20):
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref_dir / f"{i:03d}.png")
    inception = make_inception_weights(str(tmp_path / "weights-inception-test.pth"))
    ev = str(tmp_path / "eval")
    r = th.run(["python", "-m", "rear_ds.evaluate", "--samples", samples, "--reference", str(ref_dir),
                "--inception-weights", inception, "--out", ev, "--batch-size", "10"])
    assert r.returncode == 0, r.output[-3000:]
    results = json.load(open(os.path.join(ev, "results.json")))
    assert np.isfinite(results["metrics"]["fid"]) and results["accounting"]["samples_scored"] == 20


def test_bf16_autocast_and_full_activation_checkpointing(reference, data, tmp_path):
    """AliTok's own recipe mode (fp32 weights, bf16 autocast) under ZeRO-2 with every block checkpointed: it
    trains, keeps fp32 weights, and its first loss is the ZeRO-3 bf16 run's up to bf16 rounding."""
    out = str(tmp_path / "autocast")
    over = th.base_overrides(out, data, 4, "train.precision=bf16_autocast", "train.activation_checkpointing=all")
    res = th.run(th.command("zero2_bf16_autocast.json", over, config=CONFIG))
    assert res.returncode == 0, res.output[-5000:]
    got, ref = th.losses(out), th.losses(reference)
    assert sorted(got) == [1, 2, 3, 4] and abs(got[1]["loss"] - ref[1]["loss"]) < 0.05
    tag = open(os.path.join(out, "checkpoints", "latest")).read().strip()
    sd = torch.load(glob.glob(os.path.join(out, "checkpoints", tag, "*model_states.pt"))[0], map_location="cpu",
                    weights_only=False)["module"]
    assert {v.dtype for v in sd.values()} == {torch.float32}
    assert "blocks.0.attn.q_norm.weight" in sd and "encode_align_mlp.0.weight" in sd
