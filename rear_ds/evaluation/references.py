"""Reference image sources for FID / precision-recall.

``open_reference(path)`` accepts
  * an ``.npz``: an ADM reference batch (``arr_0`` uint8 images, plus ``mu``/``sigma`` from the ADM TF
    evaluator) or a statistics file written by ``python -m rear_ds.evaluation.ref_stats``;
  * a folder of images (.png/.jpg/.jpeg/.webp/.bmp, searched recursively, each file and folder once, sorted
    by path), decoded and centre-cropped exactly as the tokenizer's inputs (:mod:`rear_ds.data.preprocess`,
    ADM's ``center_crop_arr``) when they are not already ``image_size`` squares; unreadable, too elongated
    or disguised files (and symlink loops) are skipped and listed in ``skipped``;
  * a token-shard set (a folder of ``*.tar`` shards, or one ``.tar``), decoded with the tokenizer.
Nothing is unpickled: .npz via ``allow_pickle=False``, shards via their reader (tar members in memory).
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from rear_ds.evaluation.stats import load_ref_stats

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def to_uint8_hwc(images) -> np.ndarray:
    """Decoder output (B, 3, H, W) float in [0, 1] -> uint8 (B, H, W, 3), truncating like the reference."""
    return (images.clamp(0, 1) * 255).to("cpu").byte().permute(0, 2, 3, 1).contiguous().numpy()


@dataclass
class Reference:
    path: str
    kind: str  # "adm_npz", "stats_npz", "image_folder", "token_shards"
    mu: Optional[np.ndarray] = None  # stored FID statistics, when the file has them
    sigma: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None  # stored pool features (stats files)
    images: Optional[np.ndarray] = None  # in-memory images (ADM arr_0)
    files: list = field(default_factory=list)  # image files or shard files
    skipped: list = field(default_factory=list)  # [{"src", "reason"}]: folder entries not used
    meta: dict = field(default_factory=dict)
    image_size: int = 0
    limit: int = 0  # 0 = all
    tokenizer_cfg: object = None
    device: str = "cpu"

    @property
    def has_images(self) -> bool:
        return self.images is not None or bool(self.files)

    def describe(self) -> dict:
        out = {"path": os.path.abspath(self.path), "kind": self.kind}
        if self.mu is not None:
            out["stored_statistics"] = True
        if self.meta:
            out["meta"] = self.meta
        if self.limit:
            out["limit"] = self.limit
        if self.kind == "image_folder":
            out["num_files"] = len(self.files)
            out["skipped"] = self.skipped
        if self.kind == "token_shards":
            out["num_shards"] = len(self.files)
        return out

    def iter_images(self, batch_size: int = 50) -> Iterator[np.ndarray]:
        """uint8 (n, H, W, 3) batches of the reference images (at most ``limit`` in all)."""
        if self.images is not None:
            imgs = self.images[:self.limit or None]
            for s in range(0, imgs.shape[0], batch_size):
                yield imgs[s:s + batch_size]
        elif self.kind == "image_folder":
            yield from self._iter_folder(batch_size)
        elif self.kind == "token_shards":
            yield from self._iter_shards(batch_size)

    def _iter_folder(self, batch_size: int):
        from rear_ds.data.preprocess import center_crop_arr, load_image, to_rgb
        from rear_ds.data.sources import InputItem, read_bytes

        batch, shape, used = [], None, 0
        for path in self.files:
            if self.limit and used == self.limit:
                break
            try:
                im = to_rgb(load_image(read_bytes(InputItem(path, -1, path))))
                if self.image_size and im.size != (self.image_size, self.image_size):
                    arr = center_crop_arr(im, self.image_size)
                else:
                    arr = np.asarray(im)
            except ValueError as e:  # bad input: listed, the rest is used (a transient read error raises)
                self.skipped.append({"src": os.path.relpath(path, self.path), "reason": str(e)})
                print(f"warning: reference image {path} skipped: {e}", file=sys.stderr)
                continue
            used += 1
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise ValueError(f"reference image {path!r} is {arr.shape[1]}x{arr.shape[0]}, the first was "
                                 f"{shape[1]}x{shape[0]}: pass --reference-size to crop/resize them all")
            batch.append(arr)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def _iter_shards(self, batch_size: int):
        import torch
        from rear_ds.data.shards import iter_shard
        from rear_ds.models.tokenizers import build_tokenizer

        if self.tokenizer_cfg is None:
            raise ValueError(f"token-shard reference {self.path!r} needs the tokenizer: pass --config "
                             f"(its tokenizer section, with tokenizer.weights) ")
        tokenizer = build_tokenizer(self.tokenizer_cfg, load_weights=True, device=self.device)
        shape = tuple(tokenizer.token_shape)
        remaining = self.limit or None
        batch = []

        def flush():
            tokens = torch.from_numpy(np.stack(batch).astype(np.int64)).to(self.device)
            with torch.no_grad():
                return to_uint8_hwc(tokenizer.decode(tokens))

        for shard in self.files:
            for sample in iter_shard(shard):
                if tuple(sample["tokens"].shape) != shape:
                    raise ValueError(f"shard {shard} sample {sample['key']}: tokens of shape {sample['tokens'].shape} "
                                     f"!= the tokenizer's {shape} ({tokenizer.layout}; wrong --config?)")
                batch.append(sample["tokens"])
                if len(batch) == batch_size:
                    yield flush()
                    batch = []
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        break
            if remaining == 0:
                break
        if batch:
            yield flush()


def open_reference(path: str, image_size: int = 0, tokenizer_cfg=None, limit: int = 0,
                   device: str = "cpu", with_images: bool = True) -> Reference:
    """Recognise the kind of reference at ``path`` (see the module docstring)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference {path!r} does not exist (expected an ADM reference .npz, a "
                                f"statistics .npz, a folder of images, or a token-shard folder)")
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        data = load_ref_stats(path, with_images=with_images)
        kind = "adm_npz" if "arr_0" in data["keys"] else "stats_npz"
        if data["mu"] is None and data["images"] is None and data["features"] is None:
            raise ValueError(f"reference {path!r} has neither mu/sigma, features nor arr_0 images "
                             f"(keys: {data['keys']})")
        return Reference(path, kind, mu=data["mu"], sigma=data["sigma"], features=data["features"],
                         images=data["images"], meta=data["meta"], limit=limit)
    if os.path.isfile(path) and path.lower().endswith(".tar"):
        return Reference(path, "token_shards", files=[path], tokenizer_cfg=tokenizer_cfg, limit=limit,
                         device=device)
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
        if shards:
            return Reference(path, "token_shards", files=shards, tokenizer_cfg=tokenizer_cfg, limit=limit,
                             device=device)
        from rear_ds.data.sources import walk_files

        files, problems = walk_files(path, path)
        files = [p for p in files if p.lower().endswith(IMAGE_EXTS)]
        if not files:
            raise ValueError(f"reference folder {path!r} holds no images ({', '.join(IMAGE_EXTS)}) and no "
                             f"*.tar token shards")
        skipped = [{"src": os.path.relpath(p, path), "reason": why} for p, why in problems]
        return Reference(path, "image_folder", files=files, skipped=skipped, image_size=image_size, limit=limit)
    raise ValueError(f"reference {path!r}: expected an .npz file, a .tar shard, or a folder")
