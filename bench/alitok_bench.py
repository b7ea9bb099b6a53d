"""reAR-AliTok rows: rear_ds's alitok family against the OFFICIAL AliTok AR code (training step and KV-cache
sampling, same shape, batch and weights, one process), and its activation-checkpoint memory.

The official code comes from a local checkout (bench/official_alitok.py: $ALITOK_REPO); without
one the rows that need it are recorded as skipped with the reason.
"""
from __future__ import annotations

import dataclasses

import torch

from rear_ds.config import ModelConfig, ObjectiveConfig, OptimConfig, SamplingConfig
from rear_ds.models import build_generator
from rear_ds.sampling import generate

from .common import release
from .official_alitok import build_official, repo_path, why_missing
from .train_step import StepRunner, interleave, ratios


def bench_step_vs_official(size: str, cfg: ModelConfig, batch: int, device: torch.device, warmup: int = 1,
                           rounds: int = 4, repo=None, precision: str = "bf16") -> dict:
    """Interleaved rounds of: ours with the plain AliTok loss (regularizers off: the official's loss), ours with
    reAR on, the official model + ARLoss; all fp32 weights under bf16 autocast (AliTok's recipe), the same
    weights, batch, clipping and AdamW hyper-parameters. Forward + loss + backward alone too."""
    if repo_path(repo) is None:
        return {"size": size, "skipped": why_missing(repo)}
    plain = ObjectiveConfig(noisy_context=False, encode_align=False, decode_align=False).resolve(
        OptimConfig().total_steps)
    runners = {"alitok": StepRunner("rear", cfg, batch, device, precision, objective=plain),
               "alitok_rear": StepRunner("rear", cfg, batch, device, precision),
               "official": StepRunner("official", cfg, batch, device, precision, official_repo=repo)}
    runners["official"].model.load_state_dict(runners["alitok"].model.inference_state_dict(), strict=True)
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    tasks = {n: r.step for n, r in runners.items()}
    tasks.update(alitok_fwd_bwd=runners["alitok"].forward_backward,
                 official_fwd_bwd=runners["official"].forward_backward)
    times = interleave(tasks, device, rounds)
    out = {"size": size, "batch": batch, "precision": f"{precision} autocast, fp32 weights", "rounds": rounds,
           "params": sum(p.numel() for p in runners["official"].model.parameters()),
           "optimizers": {n: r.opt_name for n, r in runners.items()},
           "step_s": {n: [round(t, 6) for t in v] for n, v in times.items()},
           "alitok_over_official": ratios(times, "alitok", "official"),
           "alitok_rear_over_official": ratios(times, "alitok_rear", "official"),
           "fwd_bwd_alitok_over_official": ratios(times, "alitok_fwd_bwd", "official_fwd_bwd")}
    del runners
    release(device)
    return out


def bench_sampling_vs_official(size: str, cfg: ModelConfig, batch: int, device: torch.device, rounds: int = 2,
                               repo=None, guidance=(16.0, 1.8)) -> dict:
    """KV-cache sampling with CFG (doubled batch), fp32: rear_ds.sampling.generate vs the official generate(),
    the same weights, batch and guidance, interleaved rounds."""
    if repo_path(repo) is None:
        return {"size": size, "skipped": why_missing(repo)}
    torch.manual_seed(0)
    ours = build_generator(cfg, with_align_heads=False).to(device).eval()
    with torch.no_grad():  # a zero output head would make every step uniform; give it weights
        ours.output.weight.normal_(0, 0.02)
    official = build_official(cfg, repo)[0].to(device).eval()
    official.load_state_dict(ours.inference_state_dict(), strict=True)
    labels = (torch.arange(batch) % cfg.num_classes).to(device)
    scfg = dataclasses.replace(SamplingConfig(), guidance_scale=guidance[0], guidance_power=guidance[1],
                               kv_cache=True, precision="fp32")
    tasks = {"alitok": lambda: generate(ours, labels, torch.arange(batch), 0, scfg),
             "official": lambda: official.generate(labels.clone(), guidance_scale=guidance[0], randomize_temperature=1.0,
                                                   guidance_scale_pow=guidance[1], kv_cache=True)}
    for t in tasks.values():  # warm-up
        t()
    times = interleave(tasks, device, rounds)
    out = {"size": size, "batch": batch, "num_tokens": cfg.num_tokens, "guidance": list(guidance),
           "precision": "fp32", "rounds": rounds, "step_s": {n: [round(t, 4) for t in v] for n, v in times.items()},
           "images_per_s": {n: batch / sorted(v)[len(v) // 2] for n, v in times.items()},
           "alitok_over_official": ratios(times, "alitok", "official")}
    del ours, official
    release(device)
    return out
