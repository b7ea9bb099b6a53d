"""The sample-chunk files written by ``rear_ds.sample`` and gathered by ``rear_ds.evaluate``.

Sample ``i`` (global index, 0 <= i < N) has class ``i % C``: the class list is [0..C-1] repeated N / C
times, as in the reference sampler, so every class gets exactly N / C samples. The indices are cut into
fixed chunks of ``chunk_size``; chunk ``k`` holds indices ``[k * chunk_size, min(N, (k + 1) * chunk_size))``
and is stored as ``chunk_{k:06d}.npz`` (written with ``np.savez``, read with ``allow_pickle=False``):

    images       uint8  (n, H, W, 3)   decoded samples, HWC, values truncated from [0, 1] * 255
    labels       int64  (n,)           class of each sample (= indices % C)
    indices      int64  (n,)           global sample indices, ascending and contiguous
    fingerprint  str    ()             hash of the run settings (checkpoint sha256, sampling settings, N,
                                       chunk size, seed): chunks of different runs are never mixed
    tokens       int32  (n, N)         the generated token ids the images were decoded from (for the
                                       token round-trip diagnostic); absent in chunks from before it existed

A chunk file appears atomically (:func:`rear_ds.evaluation.safe_npz.write_npz_atomic`), so a killed sampler
leaves either a complete chunk or none (plus, at worst, a ``chunk_*.npz.tmp/`` folder that is ignored and taken
over by the next writer of that chunk).
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rear_ds.evaluation.safe_npz import NpzError, array_header, load_npz, write_npz_atomic

CHUNK_RE = re.compile(r"^chunk_(\d{6,})\.npz$")
CHUNK_KEYS = ("images", "labels", "indices", "fingerprint")
_SHOW = 20  # items listed per kind of problem in error messages


class IncompleteSamplesError(RuntimeError):
    """The chunks in a samples folder do not cover 0..N-1 exactly once."""


def chunk_name(k: int) -> str:
    return f"chunk_{k:06d}.npz"


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return (num_samples + chunk_size - 1) // chunk_size


def chunk_range(k: int, chunk_size: int, num_samples: int) -> tuple:
    """(start, stop) global indices of chunk ``k``."""
    return k * chunk_size, min(num_samples, (k + 1) * chunk_size)


def chunks_for_worker(total_chunks: int, worker: int, num_workers: int) -> list:
    """Round-robin assignment: worker w takes chunks w, w + W, w + 2W, ..."""
    return list(range(worker, total_chunks, num_workers))


def labels_for(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """The documented class order: sample i has class i % C."""
    return np.asarray(indices, dtype=np.int64) % num_classes


def write_chunk(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, fingerprint: str,
                tokens: Optional[np.ndarray] = None) -> None:
    """Write one chunk atomically: temp file in the same folder, fsync, rename."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"chunk {path!r}: images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    n = images.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if labels.shape != (n,) or indices.shape != (n,):
        raise ValueError(f"chunk {path!r}: labels {labels.shape} / indices {indices.shape} must be ({n},)")
    arrays = {"images": images, "labels": labels, "indices": indices, "fingerprint": np.array(fingerprint)}
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens, dtype=np.int32).reshape(n, -1)
    write_npz_atomic(path, **arrays)


@dataclass
class ChunkInfo:
    """What :func:`inspect_chunk` learned from a chunk file (images are not read)."""

    path: str
    indices: Optional[np.ndarray] = None
    image_shape: Optional[tuple] = None  # (H, W, 3)
    fingerprint: str = ""
    problem: str = ""  # "" = internally consistent


def inspect_chunk(path: str, num_classes: int) -> ChunkInfo:
    """Read a chunk's indices, labels and headers (not its images) and check its internal consistency."""
    info = ChunkInfo(path)
    try:
        meta = load_npz(path, "sample chunk", keys=("labels", "indices", "fingerprint"))
        with zipfile.ZipFile(path) as zf:
            shape, dtype, held = array_header(zf, "images")
    except (NpzError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        info.problem = f"unreadable: {e}"
        return info
    idx, lab = meta["indices"], meta["labels"]
    info.fingerprint = str(meta["fingerprint"])
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        info.problem = f"'indices' must be a 1-D integer array, got {idx.dtype} {idx.shape}"
    elif lab.shape != idx.shape:
        info.problem = f"'labels' has shape {lab.shape}, 'indices' {idx.shape}"
    elif dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] != idx.shape[0]:
        info.problem = f"'images' must be uint8 ({idx.shape[0]}, H, W, 3), got {dtype} {shape}"
    elif int(np.prod(shape, dtype=object)) > held:
        info.problem = f"'images' claims shape {shape} ({int(np.prod(shape, dtype=object))} bytes), holds {held}"
    elif idx.size and not np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        info.problem = "'indices' are not ascending and contiguous"
    elif not np.array_equal(lab, labels_for(idx, num_classes)):
        info.problem = f"'labels' are not indices % {num_classes} (the documented class order)"
    if not info.problem:
        info.indices = idx.astype(np.int64)
        info.image_shape = tuple(shape[1:])
    return info


def chunk_is_complete(path: str, start: int, stop: int, num_classes: int, fingerprint: str,
                      image_shape: Optional[tuple] = None) -> tuple:
    """(True, "") when ``path`` holds exactly indices start..stop-1 of this run; else (False, reason)."""
    if not os.path.exists(path):
        return False, "absent"
    info = inspect_chunk(path, num_classes)
    if info.problem:
        return False, info.problem
    if info.fingerprint != fingerprint:
        return False, f"made by another run (fingerprint {info.fingerprint[:12]} != {fingerprint[:12]})"
    if info.indices.size != stop - start or (info.indices.size and info.indices[0] != start):
        return False, f"holds indices other than {start}..{stop - 1}"
    if image_shape is not None and info.image_shape != tuple(image_shape):
        return False, f"image shape {info.image_shape} != expected {tuple(image_shape)}"
    try:  # finally make sure the image bytes are there (a truncated zip fails here)
        load_npz(path, "sample chunk", keys=("images",))
    except NpzError as e:
        return False, str(e)
    return True, ""


def _ranges(values: list) -> list:
    """[1, 2, 3, 7, 9, 10] -> ["1-3", "7", "9-10"]."""
    out, run = [], []
    for v in values:
        if run and v == run[-1] + 1:
            run.append(v)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
            run = [v]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return out


def _few(items: list) -> str:
    return ", ".join(items[:_SHOW]) + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


@dataclass
class GatherResult:
    """Chunk files ordered by their first index, the image shape, and the accounting for the results JSON."""

    files: list  # paths, concatenation order = global index order 0..N-1
    image_shape: tuple
    accounting: dict = field(default_factory=dict)


def gather_chunks(folder: str, num_samples: int, chunk_size: int, num_classes: int,
                  fingerprint: Optional[str] = None) -> GatherResult:
    """Check that the chunks in ``folder`` hold every index 0..N-1 exactly once; raise otherwise.

    The error lists the missing chunk files and index ranges, the duplicated indices with the files
    holding them, and the files that are unreadable or inconsistent. Such invalid files are not an error
    by themselves when the valid ones hold every index: they are named in ``accounting["invalid_chunk_files"]``.
    """
    if not os.path.isdir(folder):
        raise IncompleteSamplesError(f"samples folder {folder!r} does not exist")
    names = sorted(n for n in os.listdir(folder) if CHUNK_RE.match(n))
    infos = [inspect_chunk(os.path.join(folder, n), num_classes) for n in names]
    bad = [f"{os.path.basename(i.path)} ({i.problem})" for i in infos if i.problem]
    good = [i for i in infos if not i.problem]
    if fingerprint is not None:
        other = [i for i in good if i.fingerprint != fingerprint]
        bad += [f"{os.path.basename(i.path)} (made by another sampling run: fingerprint "
                f"{i.fingerprint[:12]}, manifest {fingerprint[:12]})" for i in other]
        good = [i for i in good if i.fingerprint == fingerprint]
    shapes = sorted({i.image_shape for i in good})
    if len(shapes) > 1:
        first = shapes[0]
        bad += [f"{os.path.basename(i.path)} (image shape {i.image_shape}, others {first})"
                for i in good if i.image_shape != first]
        good = [i for i in good if i.image_shape == first]

    counts = np.zeros(num_samples, dtype=np.int64)
    holders: dict = {}
    out_of_range = []
    for info in good:
        idx = info.indices
        outside = idx[(idx < 0) | (idx >= num_samples)]
        if outside.size:
            out_of_range.append(f"{os.path.basename(info.path)} (indices {_few(_ranges(outside.tolist()))})")
        inside = idx[(idx >= 0) & (idx < num_samples)]
        np.add.at(counts, inside, 1)
        for i in inside.tolist():
            holders.setdefault(i, []).append(os.path.basename(info.path))
    missing = np.flatnonzero(counts == 0).tolist()
    dups = np.flatnonzero(counts > 1).tolist()

    expected_chunks = num_chunks(num_samples, chunk_size)
    accounting = {
        "chunks_expected": expected_chunks,
        "chunk_files_found": len(names),
        "chunks_valid": len(good),
        "chunks_invalid": len(bad),
        "samples_expected": num_samples,
        "samples_counted": int(counts.sum()),
        "samples_unique": int((counts > 0).sum()),
        "samples_missing": len(missing),
        "samples_duplicated": len(dups),
        "samples_out_of_range_files": len(out_of_range),
        "invalid_chunk_files": bad,
    }
    problems = []
    if missing:
        missing_chunks = sorted({i // chunk_size for i in missing})
        files = [f"{chunk_name(k)} ({'present but invalid' if chunk_name(k) in names else 'absent'})"
                 for k in missing_chunks]
        problems.append(f"missing {len(missing)} of {num_samples} samples, from chunk files: {_few(files)}; "
                        f"missing indices: {_few(_ranges(missing))}")
    if dups:
        problems.append(f"{len(dups)} indices are present more than once: "
                        + _few([f"{i} in {' and '.join(holders[i])}" for i in dups]))
    if out_of_range:
        problems.append(f"indices outside 0..{num_samples - 1}: {_few(out_of_range)}")
    if problems and bad:
        problems.append(f"invalid chunk files: {_few(bad)}")
    if problems:
        raise IncompleteSamplesError(
            f"samples folder {folder!r} does not hold indices 0..{num_samples - 1} exactly once "
            f"(chunk size {chunk_size}, {expected_chunks} chunks expected, {len(names)} found):\n  "
            + "\n  ".join(problems)
            + "\nRerun `python -m rear_ds.sample` with the same arguments to (re)generate the missing chunks.")
    good.sort(key=lambda i: int(i.indices[0]) if i.indices.size else -1)
    return GatherResult([i.path for i in good if i.indices.size], shapes[0] if shapes else (0, 0, 3), accounting)
