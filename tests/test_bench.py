"""The benchmark suite runs end to end in --quick mode and writes valid JSON (nothing about speed is asserted)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_SECTIONS = {"train", "memory", "zero", "sampling", "data", "tokenize", "profile", "compile", "alitok"}


def _run(tmp_path, *args, timeout=300):
    out = tmp_path / "bench.json"
    md = tmp_path / "BENCHMARKS.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), "--md", str(md), *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    with open(out) as f:
        doc = json.load(f)  # valid JSON
    return doc, md.read_text()


def _finite_positive(x):
    return isinstance(x, (int, float)) and x == x and x > 0


def test_eager_reference_matches_the_model_and_loss():
    from bench.common import size_config
    from bench.eager_reference import EagerReAR, eager_loss
    from rear_ds.config import ObjectiveConfig
    from rear_ds.models.generator import ReARGenerator
    from rear_ds.objective import ReARObjective

    cfg = size_config("tiny")
    torch.manual_seed(0)
    gen = ReARGenerator(cfg)
    for p in gen.parameters():  # non-zero everywhere (adaLN-Zero starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    eager = EagerReAR(cfg).from_rear(gen)
    gen.eval(), eager.eval()
    tokens = torch.randint(0, cfg.codebook_size, (3, cfg.num_tokens))
    labels = torch.randint(0, cfg.num_classes, (3,))
    codebook = torch.randn(cfg.codebook_size, cfg.align_z_dim)
    noisy = tokens.clone()
    noisy[0, 3] = (noisy[0, 3] + 1) % cfg.codebook_size
    mask, drop = noisy != tokens, torch.tensor([True, False, False])
    ocfg = ObjectiveConfig(anneal_end=187_500)
    ref, _ = ReARObjective(ocfg, cfg)(gen, tokens, labels, codebook, 0, noisy_tokens=noisy, noise_mask=mask, drop=drop)
    got = eager_loss(eager, ocfg, tokens, labels, codebook, 1.0, noisy_tokens=noisy, noise_mask=mask, drop=drop)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_profile_summary_counts_each_gpu_kernel_once():
    """GPU profiles list each kernel twice (its own row, and in the launching operator's device time): only the
    operator rows may be summed. Made-up rows in the shape of torch's FunctionEventAvg."""
    from types import SimpleNamespace as Row

    from torch.autograd import DeviceType

    from bench.profile_step import summarize

    def row(key, dev_us, cpu_us, kind=DeviceType.CPU):
        return Row(key=key, count=2, device_type=kind, self_device_time_total=dev_us, self_cpu_time_total=cpu_us)

    rows = [row("ProfilerStep#1", 0, 5), row("aten::mm", 600, 10), row("aten::bernoulli_", 200, 50),
            row("aten::add", 200, 3), row("sm90_xmma_gemm_bf16", 600, 0, DeviceType.CUDA),
            row("philox_kernel", 200, 0, DeviceType.CUDA)]
    gpu = summarize(rows, on_gpu=True, steps=2)
    assert gpu["metric"] == "self_device_time_total" and [r["op"] for r in gpu["top_ops"]] == [
        "aten::mm", "aten::bernoulli_", "aten::add"]
    assert gpu["families"]["matmul"]["share"] == 0.6 and gpu["families"]["dropout"]["self_ms_per_step"] == 0.1
    cpu = summarize(rows[:4], on_gpu=False, steps=2)
    assert cpu["metric"] == "self_cpu_time_total" and cpu["top_ops"][0]["op"] == "aten::bernoulli_"
    assert abs(sum(f["share"] for f in cpu["families"].values()) - 1.0) < 1e-9


def test_a_failing_row_is_recorded_and_the_section_goes_on():
    from bench.run import RowGuard

    logs, rows = [], []
    guard = RowGuard(torch.device("cpu"), logs.append)
    guard(rows, "row a", lambda: {"a": 1})
    guard(rows, "row b", lambda: 1 / 0)  # e.g. an out-of-memory at one size
    guard(rows, "row c", lambda: {"c": 3})
    assert rows == [{"a": 1}, {"c": 3}]
    assert [e["row"] for e in guard.errors] == ["row b"] and "ZeroDivisionError" in guard.errors[0]["error"]
    assert any("row b FAILED" in m for m in logs)


def test_quick_benchmark_writes_every_section(tmp_path):
    doc, md = _run(tmp_path, "--skip", "zero")
    assert doc["schema"] == "rear_ds.bench/1" and doc["mode"] == "quick"
    m = doc["machine"]
    for key in ("date", "cpu_model", "cpu_cores_visible", "torch", "device", "git_commit"):
        assert key in m
    assert set(doc["sections"]) == EXPECTED_SECTIONS
    for name, sec in doc["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec.get("error"), sec.get("traceback"))
        if sec["status"] == "skipped":
            assert sec["skipped"], name  # a reason is recorded
    S = doc["sections"]
    rows = S["train"]["results"]
    assert {(r["impl"], r["ckpt"]) for r in rows} >= {("rear", "off"), ("rear", "all"), ("eager", "off")}
    for r in rows:
        assert _finite_positive(r["samples_per_s"]) and _finite_positive(r["tokens_per_s"])
        assert _finite_positive(r["achieved_tflops"]) and _finite_positive(r["step_time"]["median_s"])
        assert "mfu" in r and (r["mfu"] is None) == (m["peak_bf16_tflops"] is None)
    inter = S["train"]["interleaved"][0]  # rear / rear ckpt=all / eager in turns: what the step targets use
    assert set(inter["step_s"]) == {"rear", "rear_ckpt_all", "eager", "rear_fwd_bwd", "eager_fwd_bwd"}
    assert all(len(v) == inter["rounds"] >= 1 and all(map(_finite_positive, v)) for v in inter["step_s"].values())
    assert doc["targets"]["vs_eager"]["rear_over_eager_step_time"] == inter["rear_over_eager"]["median"]
    assert doc["targets"]["ckpt_activation_memory"]["time_overhead"] == inter["ckpt_time_overhead"]["median"]
    assert _finite_positive(doc["targets"]["vs_eager"]["fwd_bwd_rear_over_eager"])
    mem = S["memory"]["results"][0]
    assert mem["modes"]["off"]["activation_bytes"] > mem["modes"]["all"]["activation_bytes"] > 0
    for r in S["sampling"]["results"]:
        assert _finite_positive(r["modes"]["kv_cache"]["images_per_s"])
        assert _finite_positive(r["kv_speedup_x"]) and r["same_tokens"] is True
    assert _finite_positive(S["data"]["samples_per_s"])
    assert _finite_positive(S["tokenize"]["images_per_s"])
    assert S["profile"]["top_ops"] and S["profile"]["families"]
    assert S["compile"]["status"] == "ok" and S["compile"]["block_train_bf16"]["graph_count"] >= 1
    assert S["zero"]["status"] == "skipped"
    a = S["alitok"]["results"]  # the official AliTok rows run with $ALITOK_REPO, else say why they did not
    for r in a["step_vs_official"] + a["sampling_vs_official"]:
        assert ("skipped" in r and "ALITOK_REPO" in r["skipped"]) or _finite_positive(r["alitok_over_official"]["median"])
    assert a["memory"][0]["modes"]["off"]["activation_bytes"] > a["memory"][0]["modes"]["all"]["activation_bytes"] > 0
    assert "reAR-AliTok vs the official AliTok code" in md
    for key in ("ckpt_activation_memory", "vs_eager", "kv_cache_speedup", "reader_vs_step", "mfu_l"):
        assert key in doc["targets"], key
    assert "### CPU run" in md or "### GPU run" in md


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_zero_memory_under_the_deepspeed_launcher(tmp_path):
    """One `deepspeed --num_gpus 2` launch (~30-90 s on 2 shared CPU cores): per-rank bytes by category."""
    doc, _ = _run(tmp_path, "--only", "zero", timeout=600)
    z = doc["sections"]["zero"]
    assert z["status"] == "ok", z.get("error")
    assert z["world_size"] == 2
    stages = {r["stage"] for r in z["results"]}
    assert {0, 3} <= stages
    for r in z["results"]:
        assert len(r["ranks"]) == 2
        for rank in r["ranks"]:
            b = rank["bytes"]
            assert b["params"] > 0 and b["optimizer"] > 0 and b["grads"] > 0
            assert b["params_grads_optimizer"] == b["params"] + b["grads"] + b["optimizer"]
    assert z["summary"]["bf16"]["zero3"]["ratio_vs_zero0"] > 0
    assert "zero3_vs_zero0" in doc["targets"]
