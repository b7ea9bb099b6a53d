"""The one sample-grid writer: uint8 images -> a PNG grid (torchvision's ``save_image``), written atomically.

Used for the trainer's ``samples/step_*.png``, the demo's class grids and ``rear_ds.evaluate``'s
``samples_grid.png``. Images arrive as uint8 (decoder outputs are truncated to uint8 first, as the reference
sampler does), so the grid shows exactly the pixels that are scored.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from einops import rearrange


def save_grid(images: np.ndarray, path: str, nrow: int = 8, padding: int = 2) -> str:
    """Write uint8 ``images`` (n, H, W, 3) as one PNG, ``nrow`` images per row, white padding. Returns path."""
    from torchvision.utils import save_image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_grid expects uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("save_grid got no images")
    # k / 255 comes back as k exactly: save_image stores floor(x * 255 + 0.5).
    x = rearrange(torch.from_numpy(np.ascontiguousarray(images)), "n h w c -> n c h w").float() / 255
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    try:
        save_image(x, tmp, format="PNG", nrow=nrow, padding=padding, pad_value=1.0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
