"""In-training FID: a small number of samples against precomputed reference statistics.

The trainer calls ``evaluate_fid(samples_uint8, ref_stats_path, inception_weights)`` every K steps and logs
the number like its other metrics. The Inception network is built once per (weights, device) and kept.
The reference file is a ``ref_stats`` .npz or an ADM reference batch (its stored mu/sigma are used).
FID from a few thousand samples is biased upwards relative to 50k: compare runs at the same N only.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from rear_ds.evaluation.inception import InceptionFeatures, resolve_inception_weights
from rear_ds.evaluation.stats import fid_from_features, fid_stats, load_ref_stats


@functools.lru_cache(maxsize=2)
def _extractor(weights_path: str, device: str, batch_size: int) -> InceptionFeatures:
    return InceptionFeatures(weights_path, device=device, batch_size=batch_size)


@functools.lru_cache(maxsize=4)
def _ref_stats(path: str) -> tuple:
    ref = load_ref_stats(path, with_images=False)
    if ref["mu"] is not None:
        return ref["mu"], ref["sigma"]
    if ref["features"] is not None:
        return fid_stats(ref["features"])
    raise ValueError(f"reference statistics {path!r} hold no mu/sigma and no features; make them with "
                     f"`python -m rear_ds.evaluation.ref_stats`")


def evaluate_fid(samples_uint8: np.ndarray, ref_stats_path: str, inception_weights: Optional[str] = None,
                 device: Optional[str] = None, batch_size: int = 50) -> float:
    """FID of uint8 (n, H, W, 3) samples (n >= 2) against the mu/sigma stored in ``ref_stats_path``."""
    return fid_of_features(pool_features(samples_uint8, inception_weights, device, batch_size), ref_stats_path)


def pool_features(samples_uint8: np.ndarray, inception_weights: Optional[str] = None, device: Optional[str] = None,
                  batch_size: int = 50) -> np.ndarray:
    """Inception pool features (n, 2048) of uint8 (n, H, W, 3) samples: the part of FID that can be split."""
    import torch

    weights = resolve_inception_weights(inception_weights)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _extractor(weights, str(dev), batch_size)(samples_uint8)[0]


def fid_of_features(features: np.ndarray, ref_stats_path: str) -> float:
    mu_ref, sigma_ref = _ref_stats(ref_stats_path)
    return fid_from_features(features, mu_ref, sigma_ref)
