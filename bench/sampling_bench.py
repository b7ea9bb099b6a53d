"""Sampling images/s with and without the KV cache (classifier-free guidance on: doubled batch)."""
from __future__ import annotations

import dataclasses

import torch

from rear_ds.config import ModelConfig, SamplingConfig
from rear_ds.models import build_generator
from rear_ds.sampling import generate

from .common import time_fn


def bench_sampling(size: str, cfg: ModelConfig, batch: int, device: torch.device, warmup: int = 1,
                   repeats: int = 2, precision: str = "fp32", guidance_scale: float = 10.0,
                   recompute: bool = True, recompute_repeats=None) -> dict:
    """recompute_repeats: (warmup, repeats) for the recompute sampler (default: the same as the KV one)."""
    torch.manual_seed(0)
    model = build_generator(cfg, with_align_heads=False).to(device).eval()
    labels = torch.arange(batch) % cfg.num_classes
    indices = torch.arange(batch)
    res = {"size": size, "batch": batch, "num_tokens": cfg.num_tokens, "guidance_scale": guidance_scale,
           "cfg_doubled_batch": 2 * batch if guidance_scale != 0 else batch, "precision": precision, "modes": {}}
    toks = {}
    for kv in ((True, False) if recompute else (True,)):
        scfg = dataclasses.replace(SamplingConfig(), kv_cache=kv, guidance_scale=guidance_scale,
                                   guidance_power=1.75, precision=precision)
        out = {}

        def run():
            out["t"] = generate(model, labels, indices, seed=1, cfg=scfg)

        w, n = (warmup, repeats) if (kv or not recompute_repeats) else tuple(recompute_repeats)
        t = time_fn(run, device, w, n)
        toks[kv] = out["t"].cpu()
        res["modes"]["kv_cache" if kv else "recompute"] = {"time": t, "images_per_s": batch / t["median_s"],
                                                          "tokens_per_s": batch * cfg.num_tokens / t["median_s"]}
    if recompute:
        res["kv_speedup_x"] = (res["modes"]["recompute"]["time"]["median_s"]
                               / res["modes"]["kv_cache"]["time"]["median_s"])
        # With TF32 (GPU) the cached and recomputed logits come from different kernels: a rare near-tie may
        # draw differently, so the share of equal tokens is recorded besides exact equality.
        res["same_tokens"] = bool(torch.equal(toks[True], toks[False]))
        res["token_match_fraction"] = float((toks[True] == toks[False]).float().mean())
    return res
