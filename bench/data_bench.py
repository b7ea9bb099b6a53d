"""Data: the training shard reader's samples/s (on shards written here) and tokenization images/s."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import torch

from rear_ds.config import TokenizerConfig


def write_shards(root: str, num_samples: int, num_tokens: int = 256, codebook_size: int = 1024,
                 num_classes: int = 1000, samples_per_shard: int = 1024) -> str:
    """Random token shards (+ manifest) through the data package's own JSONL -> shard converter."""
    from rear_ds.data.jsonl import convert

    side = int(round(num_tokens ** 0.5))
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    jsonl = os.path.join(root, "tokens.jsonl")
    with open(jsonl, "w") as f:
        for i in range(num_samples):
            f.write(json.dumps({"class_id": int(i % num_classes),
                                "tokens": rng.integers(0, codebook_size, num_tokens).tolist()}) + "\n")
    out = os.path.join(root, "shards")
    convert(jsonl, out, (side, side), codebook_size, samples_per_shard=samples_per_shard)
    return out


def bench_reader_throughput(micro_batch_size: int, num_samples: int, batches: int, num_workers: int,
                            warmup: int = 2) -> dict:
    """Samples/s of the training reader in both data orders, and how well each mixes (rear_ds.data.bench).

    Throughput: shards of 1024 samples, rank 0 of 1, at least two draws of every worker in the resampled order
    (a draw is read before its first batch). Mixing where the old resampled order mixed worst (issue 20 item 2):
    one rank whose share is a single shard much larger than the old 1000-sample buffer, two micro-batches per
    step, two passes."""
    from rear_ds.config import DataConfig, ModelConfig
    from rear_ds.data.bench import bench_reader, mixing_stats  # the data engineer's helpers
    from rear_ds.data.reader import build_train_loader

    out = {"micro_batch_size": micro_batch_size, "num_workers": num_workers, "num_samples_in_shards": num_samples,
           "num_tokens": 256, "helper": "rear_ds.data.bench.bench_reader + mixing_stats", "orders": {}}
    workers = max(1, num_workers)
    with tempfile.TemporaryDirectory(prefix="rear_bench_shards_") as root:
        shards = write_shards(os.path.join(root, "a"), num_samples, samples_per_shard=1024)
        one = write_shards(os.path.join(root, "b"), num_samples, samples_per_shard=num_samples)
        for order in ("epoch", "resampled"):
            n = batches if order == "epoch" else max(batches, -(-2 * workers * min(num_samples, 16384) // micro_batch_size))
            sps = bench_reader(shards, micro_batch_size=micro_batch_size, num_workers=num_workers, batches=n,
                               warmup=warmup, order=order)
            loader = build_train_loader(DataConfig(shards=one, num_workers=num_workers, order=order),
                                        ModelConfig(codebook_size=1024, num_tokens=256), 0, 1, 0, micro_batch_size)
            mix = mixing_stats(loader, num_samples // micro_batch_size, num_samples, workers)
            loader.close()
            out["orders"][order] = {"samples_per_s": sps, "batches": n, "mixing": mix}
    out["samples_per_s"] = out["orders"]["epoch"]["samples_per_s"]  # the default order
    out["batches"] = out["orders"]["epoch"]["batches"]
    return out


def bench_tokenization(full_size: bool, batch: int, iters: int, device: torch.device) -> dict:
    """Images/s of ``tokenizer.encode`` per process, MaskGIT-VQGAN and AliTok at the same batch and resolution
    (random weights: speed only). The top-level keys are MaskGIT-VQGAN's (earlier results), ``rows`` has both."""
    from rear_ds.data.bench import bench_tokenizer
    from rear_ds.data.tokenize_job import tokenizer_config
    from rear_ds.models.tokenizers import build_tokenizer, released_config

    if full_size:  # the released architectures, 256x256
        cfgs = [released_config("maskgit_vqgan"), released_config("alitok")]
    else:  # quick mode: configs/tiny.yaml's toy tokenizer and the tiny AliTok, 32x32
        cfgs = [TokenizerConfig(name="toy_vq", image_size=32, base_channels=32, channel_mult=[1, 1, 2, 2],
                                num_res_blocks=1, codebook_size=64, embed_dim=16),
                tokenizer_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer_alitok_tiny.yaml"))]
    rows = []
    for tcfg in cfgs:
        with torch.device(device):  # random init where it runs (AliTok has 390M parameters)
            tok = build_tokenizer(tcfg, load_weights=False, device=str(device))
        ips = bench_tokenizer(tok, image_size=tcfg.image_size, batch_size=batch, iters=iters, device=str(device))
        rows.append({"images_per_s": ips, "tokenizer": tcfg.name, "image_size": tcfg.image_size,
                     "num_tokens": tok.num_tokens, "params": sum(p.numel() for p in tok.parameters())})
        del tok
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return {**rows[0], "batch": batch, "iters": iters, "weights": "random (throughput only)", "precision": "fp32",
            "rows": rows, "alitok_vs_maskgit_x": rows[1]["images_per_s"] / rows[0]["images_per_s"]}
