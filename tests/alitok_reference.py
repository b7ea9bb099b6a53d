"""Inputs shared by the AliTok parity tests and the script that made their golden tensors
(tests/make_alitok_goldens.py): random weights in the released layout, test images, near-tie margins.

Everything here is a pure function of its seed, so the golden script (run once, next to a checkout of the
official code) and the tests (run anywhere) build the same weights and images without storing them.
"""
from __future__ import annotations

import io
import zlib

import numpy as np
import torch
from PIL import Image

PARITY_SEED = 14  # full-size weights (the released 456-key layout) and the two parity images
TENCROP_SEED = 1414  # the depth-1 weights of the ten-crop check
# The ten-crop check runs the official pretokenization with the released widths but one block per tower (the
# official classes hard-code their widths; the depth is a list). Our config of the same truncated model:
TENCROP_ARCH = {"encoder_depth": 1, "decoder_depth": 1}


def random_state(shapes: dict, seed: int, codebook_scale: float) -> dict:
    """Weights for the keys/shapes of an AliTok state dict, drawn in sorted key order from one generator.

    Scales keep every part doing something measurable in fp32: projections ~ N(0, 1/fan_in) (attention is
    far from uniform), LayerNorm affines around (1, 0), learned tokens and positions ~ N(0, 0.5^2), and
    codebook rows at the scale of the encoder's latents (``codebook_scale``), so ids spread over many codes.
    """
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        name = key.rsplit(".", 1)[-1]
        if key == "quantize.embedding.weight":
            t = t * codebook_scale
        elif ".ln_" in key:
            t = (1.0 + 0.1 * t) if name == "weight" else 0.1 * t
        elif name == "bias":
            t = 0.05 * t
        elif name == "weight":  # Linear / Conv2d: fan_in = every dim but the first
            t = t / float(np.prod(shape[1:])) ** 0.5
        else:  # latent_tokens, positional embeddings, registers
            t = 0.5 * t
        state[key] = t.contiguous()
    return state


def state_checksum(state: dict) -> float:
    """A float64 fingerprint of a state dict (tells a changed weight draw apart from a changed model)."""
    return float(sum(t.double().abs().sum() * (i + 1) for i, (_, t) in enumerate(sorted(state.items()))))


def parity_images(seed: int = PARITY_SEED, n: int = 2, size: int = 256) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1] on the uint8 grid (as ToTensor gives): smooth blobs plus noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = (x + 0.08 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255


def tencrop_images() -> dict:
    """{relative path in an ImageNet-style folder: file bytes}: several sizes (box-halved, resized up and
    down, exact) and modes (RGB, L, P, RGBA, LA, CMYK), written losslessly (PNG / TIFF)."""
    specs = [  # (class, name, mode, width, height)
        ("n00000001", "rgb_large.png", "RGB", 1100, 800),  # short side >= 2 * 281: one BOX halving first
        ("n00000001", "gray_tall.png", "L", 300, 700),
        ("n00000001", "palette_small.png", "P", 120, 90),  # upsampled
        ("n00000002", "rgba_wide.png", "RGBA", 640, 290),  # alpha dropped, not composited
        ("n00000002", "la_exact.png", "LA", 281, 281),
        ("n00000002", "cmyk.tiff", "CMYK", 413, 377),
    ]
    out = {}
    for cls, name, mode, w, h in specs:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        chans = [np.sin(6.28 * (f1 * xx + f2 * yy) + ph) for f1, f2, ph in rng.uniform(0.5, 4.0, (4, 3))]
        arr = np.stack(chans, -1) * 0.45 + 0.5 + rng.normal(0, 0.05, (h, w, 4))
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(arr[..., :3], "RGB")
        if mode == "P":
            img = img.quantize(colors=64, dither=Image.Dither.NONE)
        elif mode in ("RGBA", "LA", "CMYK", "L"):
            img = Image.fromarray(arr, "RGBA").convert(mode) if mode != "CMYK" else img.convert("CMYK")
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if name.endswith(".tiff") else "PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
        out[f"{cls}/{name}"] = buf.getvalue()
    return out


def write_folder(root: str, images: dict) -> None:
    import os

    for rel, data in images.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)


def nearest_gaps(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Per latent (z's leading dims), the gap between the squared distances to the nearest and the second-nearest
    codebook row (float64). Ids of two implementations are comparable where the gap is far above their float
    differences; with 4096 codes a near-tie somewhere among thousands of latents is expected."""
    d = torch.cdist(z.reshape(-1, z.shape[-1]).double(), codebook.double()) ** 2
    two = d.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]).reshape(z.shape[:-1])


def view_hashes(views_u8: np.ndarray) -> list:
    """sha256 of each (H, W, 3) uint8 view."""
    import hashlib

    return [hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for v in views_u8]
