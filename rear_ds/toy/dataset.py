"""A procedurally drawn, class-conditional toy image dataset in the ImageNet folder layout.

    <root>/train/<wnid>/<wnid>_<i>.png     (``per_class_train`` images per class)
    <root>/val/<wnid>/<wnid>_val_<i>.png   (``per_class_val`` held-out images per class)
    <root>/classes.json                    [{"wnid", "name"}] in class-index order (= sorted wnid order)
    <root>/dataset.json                    generator parameters + sha256 of every file (the cache key)

Ten classes differ in shape, colour and texture together, so a small classifier separates them easily
and a class-conditional generator has to get all three right. Inside a class, position, size,
rotation, colour shade, texture phase/period and the background vary. Every image is a pure
function of (seed, split, class, index): the same seed gives byte-identical PNGs on any machine.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from rear_ds.data.shards import write_json_atomic

# wnid-like folder names: sorted order == class index (what ImageFolder and data_prep/tokenize.py use).
CLASSES = [
    # (name, shape, rgb colour, texture)
    ("red_disc", "disc", (0.90, 0.15, 0.12), "solid"),
    ("green_square_hstripes", "square", (0.15, 0.80, 0.20), "hstripes"),
    ("blue_triangle", "triangle", (0.15, 0.30, 0.95), "solid"),
    ("yellow_ring", "ring", (0.95, 0.85, 0.10), "solid"),
    ("magenta_plus", "plus", (0.90, 0.15, 0.85), "solid"),
    ("cyan_diamond_checker", "diamond", (0.10, 0.85, 0.90), "checker"),
    ("orange_bar_vstripes", "bar", (1.00, 0.55, 0.05), "vstripes"),
    ("purple_disc_dots", "disc", (0.50, 0.15, 0.70), "dots"),
    ("lime_ellipse_diagonal", "ellipse", (0.65, 0.95, 0.30), "diagonal"),
    ("white_x", "x", (0.95, 0.95, 0.95), "solid"),
]
NUM_CLASSES = len(CLASSES)
WNIDS = [f"n9{c:07d}" for c in range(NUM_CLASSES)]
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap anti-aliasing
_SPLIT_CODE = {"train": 0, "val": 1}
FORMAT_VERSION = 2  # bump when the drawing code changes, so cached datasets are redrawn


@dataclass
class ToyDatasetSpec:
    seed: int = 0
    image_size: int = 64
    per_class_train: int = 300
    per_class_val: int = 50
    format_version: int = FORMAT_VERSION


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in shape coordinates (the shape spans roughly [-1, 1]^2)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if shape == "square":
        return np.maximum(au, av) <= 0.8
    if shape == "bar":
        return (au <= 0.45) & (av <= 1.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "triangle":  # apex up, base at v = 0.75
        return (v <= 0.75) & (v >= -1.0) & (au <= 0.95 * (v + 1.0) / 1.75)
    if shape == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "x":  # a plus rotated by 45 degrees
        s = np.sqrt(0.5)
        ru, rv = s * (u - v), s * (u + v)
        return ((np.abs(ru) <= 0.25) & (np.abs(rv) <= 1.05)) | ((np.abs(rv) <= 0.25) & (np.abs(ru) <= 1.05))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Brightness factor in [0, 1] per pixel (1 = the full class colour); image coordinates in pixels."""
    if texture == "solid":
        return np.ones_like(x)
    if texture == "hstripes":
        return np.where(np.sin(2 * np.pi * y / period + phase) > 0, 1.0, 0.35)
    if texture == "vstripes":
        return np.where(np.sin(2 * np.pi * x / period + phase) > 0, 1.0, 0.35)
    if texture == "diagonal":
        return np.where(np.sin(2 * np.pi * (x + y) / (period * 1.4) + phase) > 0, 1.0, 0.35)
    if texture == "checker":
        off = phase / (2 * np.pi) * period
        return np.where((np.floor((x + off) / period) + np.floor((y + off) / period)) % 2 == 0, 1.0, 0.3)
    if texture == "dots":  # white dots: returned as a negative marker, handled by the caller
        off = phase / (2 * np.pi) * period
        dx = (x + off) % period - period / 2
        dy = (y + off) % period - period / 2
        return np.where(dx * dx + dy * dy <= (0.3 * period) ** 2, -1.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def draw_image(cls: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One (size, size, 3) uint8 image of class ``cls`` with the variation drawn from ``rng``."""
    _, shape, colour, texture = CLASSES[cls]
    S = size * SUPERSAMPLE
    # Background: a flat dark grey with a slight tint (varies per image). Kept simple on purpose: every
    # bit of background detail costs codes of the small tokenizer that the shapes need more.
    bg = rng.uniform(0.08, 0.22) + rng.uniform(-0.02, 0.02, size=3)
    ys, xs = np.mgrid[0:S, 0:S].astype(np.float64) + 0.5
    img = np.broadcast_to(np.clip(bg, 0, 1), (S, S, 3))

    # Placement: the shape's radius is 22-38 % of the image side; the centre keeps it mostly inside.
    radius = rng.uniform(0.22, 0.38) * S
    cx = rng.uniform(radius * 0.85, S - radius * 0.85)
    cy = rng.uniform(radius * 0.85, S - radius * 0.85)
    angle = rng.uniform(-0.3, 0.3)  # radians: small rotations keep e.g. plus and x distinct
    ca, sa = np.cos(angle), np.sin(angle)
    u = (ca * (xs - cx) + sa * (ys - cy)) / radius
    v = (-sa * (xs - cx) + ca * (ys - cy)) / radius
    mask = _shape_mask(shape, u, v)

    shade = np.clip(np.asarray(colour) * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    period = rng.uniform(0.16, 0.24) * S if texture != "dots" else rng.uniform(0.18, 0.26) * S
    tex = _texture(texture, xs, ys, period, rng.uniform(0, 2 * np.pi))
    fg = np.where(tex[..., None] < 0, 0.97, shade[None, None, :] * tex[..., None])
    img = np.where(mask[..., None], fg, img)

    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_rng(seed: int, split: str, cls: int, index: int) -> np.random.Generator:
    """The random stream of one image: depends only on its identity, not on generation order."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], cls, index])


def image_relpath(split: str, cls: int, index: int) -> str:
    wnid = WNIDS[cls]
    tag = "" if split == "train" else f"{split}_"
    return f"{split}/{wnid}/{wnid}_{tag}{index:05d}.png"


# ----------------------------------------------------------------------------------------------
# Writing / reading the folder
# ----------------------------------------------------------------------------------------------


def _counts(spec: ToyDatasetSpec) -> dict:
    return {"train": spec.per_class_train, "val": spec.per_class_val}


def expected_files(spec: ToyDatasetSpec) -> list:
    return [image_relpath(split, c, i) for split, n in _counts(spec).items()
            for c in range(NUM_CLASSES) for i in range(n)]


def read_manifest(root: str) -> dict:
    path = os.path.join(root, "dataset.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def is_complete(root: str, spec: ToyDatasetSpec) -> bool:
    """True when ``root`` holds a finished dataset written with exactly this spec."""
    man = read_manifest(root)
    if man.get("spec") != asdict(spec):
        return False
    return all(os.path.isfile(os.path.join(root, p)) for p in expected_files(spec))


def make_dataset(root: str, spec: ToyDatasetSpec, progress: bool = True) -> tuple:
    """Write the dataset to ``root`` unless an identical one is already there.

    Returns (manifest dict, reused: bool). ``dataset.json`` is written last, so an interrupted run is
    redone from scratch instead of being mistaken for a finished one.
    """
    if is_complete(root, spec):
        return read_manifest(root), True
    man_path = os.path.join(root, "dataset.json")
    if os.path.exists(man_path):
        os.remove(man_path)
    files = expected_files(spec)
    from tqdm import tqdm

    digest = hashlib.sha256()
    bar = tqdm(total=len(files), desc="toy dataset", unit="img", disable=not progress)
    for split, n in _counts(spec).items():
        for c in range(NUM_CLASSES):
            os.makedirs(os.path.join(root, split, WNIDS[c]), exist_ok=True)
            for i in range(n):
                arr = draw_image(c, image_rng(spec.seed, split, c, i), spec.image_size)
                rel = image_relpath(split, c, i)
                # Hash the pixels, not the PNG bytes, so a different zlib cannot change the cache key.
                digest.update(rel.encode())
                digest.update(arr.tobytes())
                Image.fromarray(arr).save(os.path.join(root, rel), format="PNG", compress_level=1)
                bar.update(1)
    bar.close()
    write_json_atomic(os.path.join(root, "classes.json"),
                      [{"wnid": w, "name": CLASSES[i][0]} for i, w in enumerate(WNIDS)], sort_keys=False)
    manifest = {"spec": asdict(spec), "num_classes": NUM_CLASSES, "classes": [c[0] for c in CLASSES],
                "wnids": WNIDS, "counts": _counts(spec), "pixels_sha256": digest.hexdigest()}
    write_json_atomic(man_path, manifest, sort_keys=False)
    return manifest, False


def load_split(root: str, split: str, size: int = 0) -> tuple:
    """All images of one split as (uint8 (n, H, W, 3), int64 labels (n,)), in file order.

    ``size`` > 0 box-downsamples (by an integer factor) to that resolution, the way
    data_prep/tokenize.py's ADM center crop halves images, so the tokenizer and the classifier see
    the same pixels as the token shards.
    """
    man = read_manifest(root)
    if not man:
        raise FileNotFoundError(f"{root!r} holds no toy dataset (no dataset.json): run data_prep/make_toy_dataset.py")
    n = man["counts"][split]
    images, labels = [], []
    for c in range(man["num_classes"]):
        for i in range(n):
            img = Image.open(os.path.join(root, image_relpath(split, c, i)), formats=("PNG",)).convert("RGB")
            images.append(resize_like_tokenize(img, size))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def resize_like_tokenize(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 array at ``size`` (0 = unchanged), halving with BOX like the ADM center crop."""
    if size:
        while min(img.size) >= 2 * size:
            img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
        if img.size != (size, size):
            img = img.resize((size, size), resample=Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
