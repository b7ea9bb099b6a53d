"""In-training evaluation: FID of a few generated images every ``train.eval_every`` steps.

It reuses the evaluation path of ``python -m rear_ds.evaluate`` (rear_ds.evaluation.fid.evaluate_fid, the
same Inception features and the same reference statistics file) so the number means the same thing; only N
is smaller, which biases FID upwards, so compare runs at the same ``train.eval_num_samples``.

Every rank generates an equal share (same number of forward calls, as ZeRO-3's parameter gathers require),
decodes it and computes its Inception features; rank 0 gathers the features and returns the FID; the other
ranks return None.
Sample indices and classes follow ``rear_ds.sample`` (sample i has class i % C), so the images are the
ones the full sampler would draw for the first N indices.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def _share(num_samples: int, rank: int, world: int) -> range:
    """Indices of this rank; every rank gets the same count (the last ranks pad with repeats, dropped later)."""
    per_rank = math.ceil(num_samples / world)
    return range(rank * per_rank, (rank + 1) * per_rank)


@torch.no_grad()
def generate_images(model, tokenizer, cfg, indices: range, zero_stage: int) -> np.ndarray:
    """uint8 (n, H, W, 3) images for the given global sample indices (all ranks must call this together)."""
    from rear_ds.evaluation.references import to_uint8_hwc
    from rear_ds.sampling import generate
    from rear_ds.training.build import compute_device, sampling_model

    device = compute_device(model, zero_stage)
    C = cfg.model.num_classes
    idx = torch.tensor(list(indices), dtype=torch.long)
    labels = idx % C
    rng = torch.get_rng_state()  # evaluation must not shift the training RNG stream
    out = []
    try:
        with sampling_model(model, cfg, zero_stage) as m:
            for start in range(0, len(idx), cfg.sampling.batch_size):
                sl = slice(start, start + cfg.sampling.batch_size)
                tokens = generate(m, labels[sl].to(device), idx[sl], cfg.sampling.seed, cfg.sampling)
                images = tokenizer.decode(tokens.to(next(tokenizer.parameters()).device))
                out.append(to_uint8_hwc(images))  # as the reference: clamp, x255, truncate
    finally:
        torch.set_rng_state(rng)
    return np.concatenate(out)


def in_training_fid(model, tokenizer, cfg, rank: int, world: int, zero_stage: int) -> Optional[float]:
    """FID of ``train.eval_num_samples`` samples against ``train.eval_ref_stats``; the value on rank 0, else None.
    Every rank also computes the Inception features of its own share: rank 0 then only merges 2048-d features,
    so the other ranks do not wait for it in their next collective (whose timeout that wait would count against)."""
    from rear_ds.evaluation.fid import fid_of_features, pool_features

    t = cfg.train
    share = _share(t.eval_num_samples, rank, world)
    rng = torch.get_rng_state()  # neither sampling nor Inception may shift the training RNG stream
    try:
        images = generate_images(model, tokenizer, cfg, share, zero_stage)
        images = images[: max(0, t.eval_num_samples - share.start)]  # the padding past N is not scored
        features = pool_features(images, t.eval_inception_weights or None) if len(images) else np.zeros((0, 2048))
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world if rank == 0 else None
            dist.gather_object(features, gathered, dst=0)
            if rank != 0:
                return None
            features = np.concatenate(gathered)
        return fid_of_features(features, t.eval_ref_stats)
    finally:
        torch.set_rng_state(rng)
