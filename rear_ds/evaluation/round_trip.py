"""Token round-trip consistency: the reAR paper's diagnostic of generator-tokenizer inconsistency.

Decode the generated tokens to an image (as saved: uint8, truncated), encode that image again, and count
the share of token positions whose id survives. Tokens an AR model generates are often not what the
tokenizer would produce for the decoded image; reAR's regularizers aim to reduce that gap. The same number
for real images (encode -> decode -> encode) is the ceiling a generator can reach with this tokenizer.
"""
from __future__ import annotations

import numpy as np
import torch


def _encode_uint8(tokenizer, images: np.ndarray, batch: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, N) int64 token ids (flattened in the tokenizer's order)."""
    device = next(tokenizer.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).to(device)
        out.append(tokenizer.encode(x.permute(0, 3, 1, 2).float() / 255.0).reshape(len(x), -1).cpu().numpy())
    return np.concatenate(out)


def _decode_uint8(tokenizer, tokens: np.ndarray, batch: int) -> np.ndarray:
    """(n, N) token ids -> uint8 (n, H, W, 3), truncated as rear_ds.sample saves them."""
    from rear_ds.evaluation.references import to_uint8_hwc

    device = next(tokenizer.parameters()).device
    return np.concatenate([to_uint8_hwc(tokenizer.decode(torch.as_tensor(tokens[i:i + batch], device=device).long()))
                           for i in range(0, len(tokens), batch)])


def summarize(survived: np.ndarray) -> dict:
    """(n, N) bool -> the share of surviving positions overall, its per-sample spread and the count."""
    per_sample = survived.mean(1)
    return {"consistency": round(float(survived.mean()), 4), "per_sample_std": round(float(per_sample.std()), 4),
            "all_survive": round(float((per_sample == 1).mean()), 4), "n": int(len(survived))}


@torch.no_grad()
def round_trip(tokenizer, tokens: np.ndarray, images: np.ndarray, batch: int = 256) -> dict:
    """Generated ``tokens`` (n, N) (or (n, h, w)) and the uint8 ``images`` (n, H, W, 3) decoded from them."""
    tokens = np.asarray(tokens).reshape(len(tokens), -1)
    if len(images) != len(tokens):
        raise ValueError(f"round trip: {len(tokens)} token rows but {len(images)} images")
    again = _encode_uint8(tokenizer, images, batch)
    if again.shape != tokens.shape:
        raise ValueError(f"round trip: the tokenizer gives {again.shape[1]} tokens per image, the samples "
                         f"hold {tokens.shape[1]} (another tokenizer?)")
    return summarize(again == tokens)


@torch.no_grad()
def real_round_trip(tokenizer, images: np.ndarray, batch: int = 256) -> dict:
    """The ceiling: real uint8 images -> tokens -> decoded uint8 image -> tokens again."""
    tokens = _encode_uint8(tokenizer, images, batch)
    return round_trip(tokenizer, tokens, _decode_uint8(tokenizer, tokens, batch), batch)
