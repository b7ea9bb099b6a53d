"""Inception features of sample chunks: made by the sampling array tasks, merged by ``rear_ds.evaluate``.

Scoring 50k samples is mostly Inception forwards. When the sampler has the Inception weights
(``--inception-weights`` or $REAR_INCEPTION_WEIGHTS), each worker also computes the features of the chunks it
writes and stores them beside them; ``rear_ds.evaluate`` then only concatenates them in index order, so its
serial part is a merge (and reading the images once, for ``samples_adm.npz`` and the checks below).

``<samples>/inception/chunk_{k:06d}.npz`` (``np.savez``, read with ``allow_pickle=False``):

    pool           float32 (n, 2048)  pool_3 features ("2048"): FID, precision/recall
    logits         float32 (n, 1008)  "logits_unbiased": Inception Score (needs every sample's logits, in order)
    indices        int64 (n,)         the chunk's global indices
    fingerprint    str ()             the sampling run's fingerprint (manifest.json)
    images_sha256  str ()             sha256 of the chunk's image bytes: features of other images never pass
    extractor      str ()             JSON: :meth:`InceptionFeatures.identity` (weights sha256, torch-fidelity
                                      version, layers) plus the device and batch size that made them

Both arrays are the network's own float32 outputs, exactly what the evaluator computes itself, and both sides
compute a chunk the same way (:func:`compute`, batches starting at the chunk's first image), so merged metrics
equal those of one pass (bit for bit on the same device and batch size; other devices differ by float
rounding). Features whose images, run, weights or torch-fidelity version differ are recomputed and named,
never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from rear_ds.evaluation.safe_npz import NpzError, load_npz, write_npz_atomic

FEATURES_DIR = "inception"
KEYS = ("pool", "logits", "indices", "fingerprint", "images_sha256", "extractor")


def features_path(samples_dir: str, chunk_file: str) -> str:
    """Where the features of ``chunk_file`` (a chunk's path or name) live."""
    return os.path.join(samples_dir, FEATURES_DIR, os.path.basename(chunk_file))


def images_sha256(images: np.ndarray) -> str:
    h = hashlib.sha256(repr((images.dtype.str, images.shape)).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def compute(extractor, images: np.ndarray) -> tuple:
    """(pool float32 (n, 2048), logits float32 (n, 1008)) of one chunk's uint8 images: the one way both the
    sampler and the evaluator compute a chunk's features."""
    pool, logits = extractor(images)
    return pool.astype(np.float32), logits.astype(np.float32)  # float32 network outputs: the casts are exact


def write(path: str, pool: np.ndarray, logits: np.ndarray, indices: np.ndarray, fingerprint: str,
          images_digest: str, extractor) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    info = dict(extractor.identity(), device=str(extractor.device), batch_size=extractor.batch_size)
    write_npz_atomic(path, pool=pool, logits=logits, indices=np.asarray(indices, np.int64),
                     fingerprint=np.array(fingerprint), images_sha256=np.array(images_digest),
                     extractor=np.array(json.dumps(info, sort_keys=True)))


def read(path: str, indices: np.ndarray, fingerprint: str, images_digest: str, identity: dict) -> tuple:
    """((pool, logits), "") when ``path`` holds the features of exactly these images, made by this extractor;
    else (None, why not)."""
    if not os.path.exists(path):
        return None, "absent"
    try:
        d = load_npz(path, "chunk features", keys=KEYS)
        made_by = json.loads(str(d["extractor"]))
        if not isinstance(made_by, dict):
            raise ValueError(f"key 'extractor' holds {str(d['extractor'])[:40]!r}, not a JSON object")
    except (NpzError, ValueError) as e:
        return None, f"unreadable ({e})"
    n = len(indices)
    if str(d["fingerprint"]) != fingerprint:
        return None, f"made for another sampling run (fingerprint {str(d['fingerprint'])[:12]} != {fingerprint[:12]})"
    if not np.array_equal(d["indices"], indices):
        return None, "made for other sample indices"
    if str(d["images_sha256"]) != images_digest:
        return None, "made from other images (images_sha256 differs: the chunk was regenerated since)"
    other = {k: (made_by.get(k), v) for k, v in identity.items() if made_by.get(k) != v}
    if other:
        return None, "made by another Inception: " + ", ".join(f"{k} {a} != {b}" for k, (a, b) in sorted(other.items()))
    if d["pool"].shape != (n, 2048) or d["logits"].shape != (n, 1008) or d["pool"].dtype != np.float32 \
            or d["logits"].dtype != np.float32:
        return None, f"arrays of shape {d['pool'].shape} {d['pool'].dtype} / {d['logits'].shape} {d['logits'].dtype}"
    return (d["pool"], d["logits"]), ""
