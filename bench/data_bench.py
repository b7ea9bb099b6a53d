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
    from rear_ds.data.bench import bench_reader  # the data engineer's helper

    with tempfile.TemporaryDirectory(prefix="rear_bench_shards_") as root:
        shards = write_shards(root, num_samples)
        sps = bench_reader(shards, micro_batch_size=micro_batch_size, num_workers=num_workers, batches=batches,
                           warmup=warmup)
    return {"samples_per_s": sps, "micro_batch_size": micro_batch_size, "num_workers": num_workers,
            "batches": batches, "num_samples_in_shards": num_samples, "num_tokens": 256,
            "helper": "rear_ds.data.bench.bench_reader"}


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
