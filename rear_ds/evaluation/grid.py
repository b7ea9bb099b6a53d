"""A PNG grid of uint8 images (sample previews for the trainer, the demo and ``rear_ds.evaluate``)."""
from __future__ import annotations

import math
import os

import numpy as np


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (n, H, W, 3) -> one uint8 (rows*(H+p)+p, nrow*(W+p)+p, 3) image, row-major, padded."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_grid expects uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if n == 0:
        raise ValueError("save_grid got no images")
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, nrow: int = 8, padding: int = 2) -> str:
    """Write ``images`` (uint8 (n, H, W, 3)) as a PNG grid with ``nrow`` images per row; atomic. Returns path."""
    from PIL import Image

    grid = make_grid(images, nrow, padding)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.png"
    try:
        Image.fromarray(grid).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
