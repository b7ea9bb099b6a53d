"""What the AliTok parity goldens were made with (tests/make_alitok_ar_goldens.py) and what the tests rebuild:
a small model of the alitok family in AliTok's exact sequence layout (17 prefix tokens + 16x16 grid) and
weights drawn from numpy's legacy RandomState, whose stream is fixed forever, so no weights are stored."""
from __future__ import annotations

import numpy as np
import torch

GOLDEN = "tests/golden/alitok_ar_parity.safetensors"
# 32 wide, 2 blocks, 4 heads (head dim 8: 1-D RoPE over 4 pairs, 2-D over 2 + 2), 64 codes, 10 classes;
# dropouts 0 so that the training loss and the AdamW step are deterministic on both sides.
MODEL = dict(family="alitok", hidden_size=32, depth=2, num_heads=4, mlp_dim=256, codebook_size=64, num_classes=10,
             num_tokens=273, prefix_tokens=17, dropout=0.0, attn_dropout=0.0, tok_dropout=0.0, align_proj_dim=64,
             align_z_dim=16, encode_align_layer=0, decode_align_layer=1)
WEIGHT_SEED, DATA_SEED = 0, 1
PREFIX_LEN = 40  # the prefix-logits check: [class, t_0 .. t_39]
CFG = dict(guidance_scale=4.0, guidance_power=1.5, temperature=0.9, seed=0)  # the generate() golden
LR_STEPS = (0, 62_500, 281_250, 500_000)


def model_config():
    from rear_ds.config import ModelConfig

    cfg = ModelConfig(**MODEL)
    cfg.validate()
    return cfg


def weights(shapes: dict) -> dict:
    """Deterministic weights for a {name: shape} layout: N(0, 0.1) in sorted-name order; norm weights 1 + N(0, 0.1)
    (so a wrong norm shows); nothing is zero (the released output head starts at zero; this one must not)."""
    rs = np.random.RandomState(WEIGHT_SEED)
    out = {}
    for name in sorted(shapes):
        w = rs.standard_normal(tuple(shapes[name])) * 0.1
        if "norm" in name:
            w = w + 1.0
        out[name] = torch.from_numpy(w.astype(np.float32))
    return out


def batch(codebook_size: int, num_classes: int, num_tokens: int) -> tuple:
    """(tokens (3, N), labels (3,), drop (3,)): the third row is the null (unconditional) class."""
    rs = np.random.RandomState(DATA_SEED)
    tokens = torch.from_numpy(rs.randint(0, codebook_size, (3, num_tokens)).astype(np.int64))
    labels = torch.tensor([3, 7, 0])
    drop = torch.tensor([False, False, True])
    return tokens, labels, drop


def class_ids(labels: torch.Tensor, drop: torch.Tensor, codebook_size: int, num_classes: int) -> torch.Tensor:
    """Embedding ids written out from the layout (class c -> K + 1 + c, null -> K + 1 + C), not from our code."""
    return torch.where(drop, torch.full_like(labels, codebook_size + 1 + num_classes), labels + codebook_size + 1)
