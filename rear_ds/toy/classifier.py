"""A small CNN classifier for the toy classes, used to measure class consistency of generated images.

Class consistency = the share of images that the classifier assigns to the class they were meant to
show. It is trained on the real toy training images only (never on generated ones), at the tokenizer
resolution, with light blur / noise / colour augmentation so that tokenizer artefacts alone do not
flip its decision. Reported for: the trained generator, real held-out images (the ceiling) and an
untrained generator (should be near chance, 1 / number of classes).

Cached like the tokenizer: ``<out_dir>/classifier.safetensors`` + ``classifier.json`` (cache key,
held-out accuracy); reused when the key matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rear_ds.data.shards import write_json_atomic
from rear_ds.models.weights import load_strict, read_state_dict, save_safetensors
from rear_ds.toy.dataset import load_split, read_manifest

CODE_VERSION = 1
WEIGHTS_NAME = "classifier.safetensors"
REPORT_NAME = "classifier.json"


@dataclass
class ClassifierTrainConfig:
    image_size: int = 32
    width: int = 16
    epochs: int = 2
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class ToyClassifier(nn.Module):
    """conv-BN-ReLU x 2 per stage, 3 stages with 2x pooling, global average pool, linear."""

    def __init__(self, num_classes: int = 10, width: int = 24):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(stage(3, width), nn.MaxPool2d(2), stage(width, 2 * width), nn.MaxPool2d(2),
                                      stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 4 * width) pooled features (what the head sees)."""
        return self.features(x * 2 - 1).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, num_classes) logits."""
        return self.head(self.embed(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip, brightness jitter, a 3x3 blur on half the batch and pixel noise (tokenizer-like artefacts)."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 2)
    blur = torch.rand(b, generator=gen) < 0.5
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = torch.where(blur[:, None, None, None], xb, x)
    x = x + 0.03 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _to_float(images) -> torch.Tensor:
    """uint8 (n, H, W, 3) array / tensor, or float (n, 3, H, W) in [0, 1] -> float (n, 3, H, W)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 255.0
    return images.float()


@torch.no_grad()
def predict(model: nn.Module, images, batch: int = 256) -> torch.Tensor:
    """Predicted class indices (n,) for uint8 HWC or float CHW images."""
    model.eval()
    x = _to_float(images)
    return torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])


@torch.no_grad()
def embed(model: nn.Module, images, batch: int = 256) -> np.ndarray:
    """Pooled features (n, 4 * width) in float64 for uint8 HWC or float CHW images."""
    model.eval()
    x = _to_float(images)
    return torch.cat([model.embed(x[i:i + batch]) for i in range(0, len(x), batch)]).double().numpy()


def feature_frechet(model: nn.Module, images, reference) -> float:
    """Frechet distance between two image sets in this classifier's feature space: the toy stand-in for
    FID (the same formula on 64-d features of a 10-class toy CNN; NOT comparable to any FID)."""
    from rear_ds.evaluation.stats import fid_stats, frechet_distance

    return frechet_distance(*fid_stats(embed(model, images)), *fid_stats(embed(model, reference)))


def class_consistency(model: nn.Module, images, labels) -> dict:
    """{"consistency": share assigned to the requested class, "per_class": {c: share}, "n": count}."""
    pred = predict(model, images)
    labels = torch.as_tensor(labels)
    hit = (pred == labels).float()
    per = {int(c): round(float(hit[labels == c].mean()), 4) for c in labels.unique()}
    return {"consistency": round(float(hit.mean()), 4), "per_class": per, "n": int(len(labels))}


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                     cfg: ClassifierTrainConfig, progress: bool = True) -> ToyClassifier:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ToyClassifier(num_classes, cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = len(train_x) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="toy classifier", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(_augment(train_x[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def load_classifier(path: str) -> ToyClassifier:
    """The cached classifier (eval mode); its shape comes from the report JSON beside the weights."""
    with open(os.path.join(os.path.dirname(path), REPORT_NAME)) as f:
        rep = json.load(f)
    model = ToyClassifier(rep["num_classes"], rep["train"]["width"])
    load_strict(model, read_state_dict(path), what=f"toy classifier {path!r}")
    return model.eval().requires_grad_(False)


def ensure_classifier(data_root: str, out_dir: str, cfg: ClassifierTrainConfig = None,
                      progress: bool = True) -> tuple:
    """Train (or reuse) the classifier for the toy dataset at ``data_root``. Returns (path, report)."""
    cfg = cfg or ClassifierTrainConfig()
    man = read_manifest(data_root)
    if not man:
        raise FileNotFoundError(f"no toy dataset at {data_root!r}")
    key = hashlib.sha256(json.dumps({"cfg": asdict(cfg), "data": man["pixels_sha256"], "v": CODE_VERSION},
                                    sort_keys=True).encode()).hexdigest()
    path = os.path.join(out_dir, WEIGHTS_NAME)
    rep_path = os.path.join(out_dir, REPORT_NAME)
    if os.path.isfile(rep_path) and os.path.isfile(path):
        with open(rep_path) as f:
            rep = json.load(f)
        if rep.get("cache_key") == key:  # (weights path from here: the folder may have been moved)
            return path, dict(rep, reused=True, weights=os.path.abspath(path))
    t0 = time.time()
    tx, ty = load_split(data_root, "train", cfg.image_size)
    vx, vy = load_split(data_root, "val", cfg.image_size)
    model = train_classifier(_to_float(tx), torch.from_numpy(ty), man["num_classes"], cfg, progress)
    val = class_consistency(model, vx, vy)
    save_safetensors(model.state_dict(), path)
    rep = {"cache_key": key, "weights": os.path.abspath(path), "num_classes": man["num_classes"],
           "train": asdict(cfg), "val_accuracy": val["consistency"], "val_per_class": val["per_class"],
           "train_seconds": round(time.time() - t0, 1)}
    write_json_atomic(rep_path, rep, sort_keys=False)
    return path, dict(rep, reused=False)
