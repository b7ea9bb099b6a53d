"""The toy judges of generated samples, shared by ``rear_ds.demo`` and ``rear_ds.ablate``.

* class consistency: the toy classifier's share of samples shown the requested class (chance 1 / C);
* token round-trip consistency: decode -> re-encode, share of surviving token positions (the reAR paper's
  diagnostic); real held-out images give the ceiling;
* a Frechet distance in the toy classifier's 64-d feature space against the real held-out images: the toy
  stand-in for FID, NOT an FID (no Inception network; not comparable with any published number).
"""
from __future__ import annotations

import numpy as np

from rear_ds.evaluation.round_trip import real_round_trip, round_trip
from rear_ds.toy.classifier import class_consistency, feature_frechet, load_classifier
from rear_ds.toy.dataset import load_split

FRECHET_NOTE = "Frechet distance in the toy classifier's feature space (NOT FID; lower = closer to real held-out)"


class ToyScorer:
    """Loads the classifier, the tokenizer and the real held-out images once; scores sample sets."""

    def __init__(self, classifier_weights: str, tokenizer_cfg, data_root: str):
        from rear_ds.models.tokenizers import build_tokenizer

        self.classifier = load_classifier(classifier_weights)
        self.tokenizer = build_tokenizer(tokenizer_cfg, load_weights=True).eval()
        self.data_root, self.size = data_root, tokenizer_cfg.image_size
        self.real_x, self.real_y = load_split(data_root, "val", self.size)

    def score(self, images: np.ndarray, labels: np.ndarray, tokens: np.ndarray, frechet: bool = False) -> dict:
        out = {"class_consistency": class_consistency(self.classifier, images, labels),
               "round_trip": round_trip(self.tokenizer, tokens, images)}
        if frechet:
            out["feature_frechet"] = round(feature_frechet(self.classifier, images, self.real_x), 4)
        return out

    def real(self, frechet_n: int = 0) -> dict:
        """The same numbers for real held-out images: the ceilings. With ``frechet_n``, the Frechet distance of
        ``frechet_n`` class-balanced real training images to the held-out ones (the floor at that sample size)."""
        out = {"class_consistency": class_consistency(self.classifier, self.real_x, self.real_y),
               "round_trip": real_round_trip(self.tokenizer, self.real_x)}
        if frechet_n:
            tx, ty = load_split(self.data_root, "train", self.size)
            classes = np.unique(ty)
            per = frechet_n // len(classes)
            pick = np.concatenate([np.flatnonzero(ty == c)[:per] for c in classes])
            out["feature_frechet"] = round(feature_frechet(self.classifier, tx[pick], self.real_x), 4)
        return out
