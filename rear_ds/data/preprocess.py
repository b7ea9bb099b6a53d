"""Image preprocessing, exactly as the reference pre-tokenization (method spec 7.3).

The reference loads images with torchvision's ImageFolder loader (``Image.open(f).convert("RGB")``),
applies the ADM center crop of guided-diffusion, then either encodes the crop and its horizontal
flip, or (``--ten_crop``) ADM-crops to ``int(size * 1.1)`` and applies ``TenCrop(size)``.
Everything here works on PIL images and returns uint8 HWC arrays; :func:`to_float_batch` turns
them into the [0, 1] float tensors the tokenizer expects (what ``ToTensor`` does).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFile

# Truncated files must fail loudly (and be listed as skipped), never be half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The formats ImageNet-style data comes in. Everything else is refused before a decoder runs: PIL would
# otherwise pick a plugin by content, whatever the name (an EPS file named .JPEG runs Ghostscript).
# TIFF stays: Pillow decodes it itself, and it is the lossless format that holds CMYK scans.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# The ADM crop scales the short side to the crop size, so a 1 x W image becomes size x (size * W): a
# 200-byte 1 x 40,000 PNG would need 25 GB at 256. Longer/shorter side above this ratio is skipped
# (the upscaled image stays under size^2 * 50 pixels: 9.8 MB at 256).
MAX_ASPECT_RATIO = 50

VIEW_MODES = {
    "center": ["center"],
    "center+flip": ["center", "center_flip"],
    # torchvision TenCrop order: five_crop(img) + five_crop(hflip(img))
    "ten-crop": ["tl", "tr", "bl", "br", "center",
                 "flip_tl", "flip_tr", "flip_bl", "flip_br", "flip_center"],
}
TEN_CROP_RATIO = 1.1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way the reference loader does (``convert("RGB")``).

    L, CMYK, P, RGBA, LA, YCbCr ... go through PIL's converter; alpha is dropped (not composited),
    as in the reference. 16-bit and float grayscale ("I;16", "I", "F") have no direct RGB
    conversion in PIL, so they are scaled to 8 bits first.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "F" else max(float(arr.max()), 1e-12)
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    return img.convert("RGB")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion ``center_crop_arr``), bit-exact; uint8 HWC array.

    While the short side is >= 2*size, halve with BOX; then resize so the short side is ``size``
    (BICUBIC, sizes rounded); then crop the centre (offsets floored). An image more than
    ``MAX_ASPECT_RATIO`` times longer than wide (or the reverse) raises ValueError before any resize.
    """
    w, h = img.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"too elongated: {w}x{h} (aspect ratio above {MAX_ASPECT_RATIO}; the ADM crop would "
                         f"upscale it to about {size}x{size * max(w, h) // max(min(w, h), 1)} pixels)")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def _five_crop(arr: np.ndarray, size: int) -> list:
    """torchvision five_crop on an HWC array: tl, tr, bl, br, center (center offsets rounded)."""
    h, w = arr.shape[:2]
    ct, cl = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (ct, cl)]
    return [arr[t: t + size, l: l + size] for t, l in corners]


def make_views(img: Image.Image, size: int, mode: str = "center+flip") -> np.ndarray:
    """RGB PIL image -> (V, size, size, 3) uint8 array, one entry per view of ``VIEW_MODES[mode]``."""
    if mode not in VIEW_MODES:
        raise ValueError(f"views={mode!r}: expected one of {sorted(VIEW_MODES)}")
    img = to_rgb(img)
    if mode == "ten-crop":
        arr = center_crop_arr(img, int(size * TEN_CROP_RATIO))
        out = _five_crop(arr, size) + _five_crop(arr[:, ::-1], size)
    else:
        arr = center_crop_arr(img, size)
        out = [arr] if mode == "center" else [arr, arr[:, ::-1]]
    return np.ascontiguousarray(np.stack(out))


def to_float_batch(views: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1] (same arithmetic as ToTensor)."""
    t = torch.from_numpy(np.ascontiguousarray(views)).permute(0, 3, 1, 2)
    return t.float().div(255)


def load_image(data: bytes, min_size: int = 0) -> Image.Image:
    """Decode image bytes fully (so truncation is detected here); raise ValueError for bad input.

    Only ``IMAGE_FORMATS`` are tried, whatever the content claims to be."""
    import io

    if len(data) == 0:
        raise ValueError("zero-byte file")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        img.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise ValueError(f"{kind} image: {e}") from None
    if min_size and min(img.size) < min_size:
        raise ValueError(f"too small: {img.size[0]}x{img.size[1]} < --min-size {min_size}")
    return img
