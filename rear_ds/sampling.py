"""Class-conditional sampling with classifier-free guidance (method spec section 6).

N raster steps. Each step runs the conditional and the unconditional (null-class) halves of a doubled
batch and mixes their raw logits with the power-cosine guidance schedule

    s_k = (1 - cos(pi * (k / N) ** power)) / 2,    w_k = 1 + (scale - 1) * s_k
    logits = l_uncond + w_k * (l_cond - l_uncond)

then divides by the temperature and draws one token. The draw uses inverse-CDF sampling with N uniforms
drawn up front from a generator seeded by (seed, global sample index), so sample i is the same image
whatever the batch size or the number of processes that share the work.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from rear_ds.config import SamplingConfig


def cfg_weight(step: int, num_tokens: int, scale: float, power: float) -> float:
    """Guidance weight at raster step ``step`` (0-based): 1 at step 0, rising towards ``scale``."""
    s = (1.0 - math.cos(math.pi * (step / num_tokens) ** power)) / 2.0
    return 1.0 + (scale - 1.0) * s


def sample_uniforms(seed: int, indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) float64 uniforms; row b depends only on (seed, indices[b])."""
    rows = []
    for idx in indices.tolist():
        state = np.random.SeedSequence([int(seed), int(idx)]).generate_state(2, dtype=np.uint64)
        g = torch.Generator().manual_seed(int(state[0] % (2 ** 63)))
        rows.append(torch.rand(num_tokens, generator=g, dtype=torch.float64))
    return torch.stack(rows)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Optional top-k / nucleus filtering (both off by default, as in the reference)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from softmax(logits) with uniforms u (B,)."""
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model, labels: torch.Tensor, indices: torch.Tensor, seed: int, cfg: SamplingConfig) -> torch.Tensor:
    """Sample (B, N) token ids for class indices ``labels`` and global sample ``indices``.

    The model is put in eval mode (dropout off, no perturbation). fp32 by default; cfg.precision "bf16"
    runs the transformer under bf16 autocast. cfg.kv_cache False recomputes the whole prefix each step
    (the reference sampler's behaviour), True uses the preallocated KV cache; both give the same logits.
    """
    was_training = model.training
    model.eval()
    device = model.device
    N = model.cfg.num_tokens
    B = labels.shape[0]
    use_cfg = cfg.guidance_scale != 0  # as the reference: scale 0 means no unconditional branch
    class_ids = model.class_token_ids(labels.to(device))
    if use_cfg:
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, model.cfg.null_class_id)])
    uniforms = sample_uniforms(seed, indices, N).to(device)  # once: no host-to-device copy per token
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    cache = model.new_kv_cache(class_ids.shape[0]) if cfg.kv_cache else None
    try:
        with autocast:
            for k in range(N):
                if cache is not None:
                    prev = None if k == 0 else tokens[:, k - 1:k].repeat(2 if use_cfg else 1, 1)
                    logits = model.forward_cached(class_ids, cache, prev)
                else:
                    prefix = tokens[:, :k].repeat(2 if use_cfg else 1, 1)
                    logits = model(prefix, class_ids)[0][:, k]
                logits = logits.float()
                if use_cfg:
                    cond, uncond = logits[:B], logits[B:]
                    logits = uncond + cfg_weight(k, N, cfg.guidance_scale, cfg.guidance_power) * (cond - uncond)
                # temperature first, so that top-k / top-p select from the distribution actually sampled
                logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
                tokens[:, k] = draw(logits, uniforms[:, k])
    finally:
        model.train(was_training)
    return tokens
