"""Throughput and mixing helpers for the benchmark suite and the reader's tests (numbers, not pass/fail)."""
from __future__ import annotations

import time

import numpy as np
import torch

from rear_ds.config import DataConfig, ModelConfig
from .reader import build_train_loader
from .shards import load_manifest


def bench_reader(shards_dir: str, micro_batch_size: int = 256, num_workers: int = 2, batches: int = 50,
                 warmup: int = 5, seed: int = 0, order: str = "epoch") -> float:
    """Samples/s of the training reader on a finalized shard folder (rank 0 of 1)."""
    m = load_manifest(shards_dir)
    model_cfg = ModelConfig(codebook_size=m["codebook_size"], num_tokens=m["num_tokens"])
    loader = build_train_loader(DataConfig(shards=shards_dir, num_workers=num_workers, order=order), model_cfg,
                                0, 1, seed, micro_batch_size)
    for _ in range(warmup):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return batches * micro_batch_size / dt


def mixing_stats(loader, pass_batches: int, population: int, workers: int = 1, accum: int = 2) -> dict:
    """How well the stream mixes, next to what independent uniform batches would give (B^2 / population
    shared samples for two batches of B drawn from ``population`` samples):

    * ``step_shared``: samples shared by the ``accum`` micro-batches of one optimizer step (mean over pairs);
    * ``pass_shared``: samples shared by batch j of one pass and batch j of the next (a pass is
      ``pass_batches`` micro-batches of the rank; with several DataLoader workers also a pass of one worker,
      ``pass_batches x workers`` apart: the larger of the two means).
    A sample is known by its tokens."""
    lags = sorted({pass_batches, pass_batches * workers})
    n = lags[-1] + pass_batches
    rows = [next(loader)[0] for _ in range(n)]
    b = rows[0].shape[0]
    sets = [{r.numpy().tobytes() for r in t} for t in rows]
    step = [len(sets[s + i] & sets[s + j]) for s in range(0, n - accum + 1, accum)
            for i in range(accum) for j in range(i + 1, accum)]
    between = max(np.mean([len(sets[j] & sets[j + lag]) for j in range(n - lag)]) for lag in lags)
    return {"step_shared": float(np.mean(step)), "pass_shared": float(between), "random_shared": b * b / population,
            "micro_batch": b, "population": population, "pass_batches": pass_batches, "workers": workers,
            "accum": accum}


@torch.no_grad()
def bench_tokenizer(tokenizer, image_size: int = 256, batch_size: int = 8, iters: int = 3,
                    device: str = "cpu") -> float:
    """Images/s of ``tokenizer.encode`` (fp32, as the tokenize job runs it) on random images of its
    resolution (encode only, no decoding)."""
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    tokenizer.encode(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        tokenizer.encode(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return iters * batch_size / (time.perf_counter() - t0)
