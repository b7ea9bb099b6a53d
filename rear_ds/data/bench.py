"""Throughput helpers for the benchmark suite (numbers, not pass/fail)."""
from __future__ import annotations

import time

import torch

from rear_ds.config import DataConfig, ModelConfig
from .reader import build_train_loader
from .shards import load_manifest


def bench_reader(shards_dir: str, micro_batch_size: int = 256, num_workers: int = 2, batches: int = 50,
                 warmup: int = 5, seed: int = 0) -> float:
    """Samples/s of the training reader on a finalized shard folder (rank 0 of 1)."""
    m = load_manifest(shards_dir)
    model_cfg = ModelConfig(codebook_size=m["codebook_size"], num_tokens=m["num_tokens"])
    loader = build_train_loader(DataConfig(shards=shards_dir, num_workers=num_workers), model_cfg, 0, 1, seed,
                                micro_batch_size)
    for _ in range(warmup):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    dt = time.perf_counter() - t0
    loader.close()
    return batches * micro_batch_size / dt


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
