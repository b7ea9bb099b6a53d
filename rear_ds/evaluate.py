"""Score a samples folder: ``python -m rear_ds.evaluate``.

    python -m rear_ds.evaluate --samples samples/L_g10 --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /models/weights-inception-2015-12-05-6726825d.pth --out eval/L_g10

1. Gathers the chunk files written by ``rear_ds.sample`` and checks that every index 0..N-1 is present
   exactly once (N, chunk size and run fingerprint from the folder's manifest.json); otherwise it stops
   with an error listing the missing chunk files / indices, the duplicates and the invalid files.
2. Writes the ADM evaluator's input ``<out>/samples_adm.npz`` (``arr_0``: uint8 (N, H, W, 3), index
   order), streamed chunk by chunk, so ``python evaluator.py VIRTUAL_imagenet256_labeled.npz
   samples_adm.npz`` (guided-diffusion, TF) can produce the numbers papers report.
3. Computes, with torch-fidelity's InceptionV3 (local weights only): FID (pool_3 "2048"), Inception Score
   ("logits_unbiased", 10 splits), precision and recall (k = 3, pool_3 features). A chunk whose features the
   sampler stored (:mod:`rear_ds.evaluation.chunk_features`) is not run through Inception again when they were
   made from its images by the same weights; other stored features are recomputed and named.
   Reference: an ADM reference batch .npz (its stored mu/sigma for FID, its arr_0 images for P/R), a
   ``ref_stats`` .npz, a folder of images, or a token-shard set decoded with the tokenizer (--config).
4. Writes ``<out>/results.json`` (checkpoint, sampling settings, N, reference, evaluator, metrics,
   accounting) and ``<out>/samples_grid.png``; with ``--wandb-run RUN_DIR`` also logs the metrics to that
   training run's W&B run (``eval/*`` against ``train/step``; offline unless an API key is configured).

torch-fidelity's Inception is a port of the TF graph ADM uses, but its numbers are not bit-identical to the
ADM evaluator's; against ADM's stored mu/sigma the FID mixes the two. Report ADM-evaluator numbers for
comparisons with papers.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make rear_ds importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import contextlib
import json
import time
import zipfile
from typing import Optional

import numpy as np

from rear_ds import cli
from rear_ds.data.shards import write_json_atomic
from rear_ds.evaluation.safe_npz import naming_os_errors
from rear_ds.tmpfile import ClaimedTmp, TmpBusyError

ADM_NPZ = "samples_adm.npz"
RESULTS = "results.json"
GRID = "samples_grid.png"


class AdmNpzWriter:
    """Stream uint8 images into an .npz holding one array ``arr_0`` of known shape, atomically.

    The temporary file has one locked name (:mod:`rear_ds.tmpfile`): a preempted run's 9.8 GB leftover is
    taken over by the requeued run, and a second evaluation writing the same folder is refused."""

    def __init__(self, path: str, shape: tuple):
        self.path, self.shape = path, tuple(int(s) for s in shape)
        self.claim = ClaimedTmp(path, wait=False)
        self.written = 0
        self._zip = zipfile.ZipFile(self.claim.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._f = self._zip.open("arr_0.npy", mode="w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, images: np.ndarray) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != self.shape[1:] or self.written + images.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: got images {images.shape} after {self.written}, expected "
                             f"{self.shape} in all")
        with naming_os_errors(self.path):  # a full disk: 9.8 GB at 50k x 256^2
            self._f.write(images.tobytes())
        self.written += images.shape[0]

    def close(self) -> None:
        with naming_os_errors(self.path):
            self._f.close()
            self._zip.close()
        if self.written != self.shape[0]:
            self.claim.release()
            raise ValueError(f"{self.path}: only {self.written} of {self.shape[0]} images were written")
        self.claim.commit()

    def abort(self) -> None:
        """Discard the file. Closing it fails again after a full disk: that error would hide the first one."""
        for close in (self._f.close, self._zip.close):
            with contextlib.suppress(OSError, ValueError):
                close()
        self.claim.release()


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "python -m rear_ds.evaluate", "rear-evaluate")
    p.add_argument("--samples", required=True, help="folder written by `python -m rear_ds.sample`")
    p.add_argument("--reference", required=True,
                   help="ADM reference batch .npz, ref_stats .npz, folder of images, or token-shard folder")
    p.add_argument("--out", required=True, help="output folder (results.json, samples_grid.png, samples_adm.npz)")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or $REAR_INCEPTION_WEIGHTS)")
    p.add_argument("--config", default=None, help="config whose tokenizer decodes a token-shard reference")
    p.add_argument("--tokenizer-weights", default=None, help="overrides tokenizer.weights of --config")
    p.add_argument("--reference-size", type=cli.positive_int, default=None,
                   help="centre-crop/resize folder images to this size (default: the samples' size)")
    p.add_argument("--reference-limit", type=cli.non_negative_int, default=0,
                   help="use at most this many reference images (0 = all)")
    p.add_argument("--no-adm-npz", action="store_true", help="do not write samples_adm.npz")
    p.add_argument("--no-prc", action="store_true", help="skip precision/recall")
    p.add_argument("--is-splits", type=cli.positive_int, default=10, help="Inception Score splits")
    p.add_argument("--prc-k", type=cli.positive_int, default=3, help="precision/recall neighbourhood size k")
    p.add_argument("--grid-size", type=cli.positive_int, default=64, help="samples in the PNG grid")
    p.add_argument("--batch-size", type=cli.positive_int, default=50, help="Inception batch size")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--wandb-run", default=None, metavar="RUN_DIR",
                   help="also log the metrics (eval/*, against train/step) to the W&B run of this training run folder "
                   "(train.out_dir): its run id, project and mode; offline unless an API key is configured, "
                   "WANDB_MODE=offline|disabled honoured. Run it when the training is not writing to that run")
    return p


def checkpoint_step(weights_file: str) -> Optional[int]:
    """The training step an exported checkpoint was taken at (its "step" metadata), None when unknown."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights_file, "pt") as f:
            return int((f.metadata() or {}).get("step", ""))
    except (OSError, ValueError, SafetensorError):  # released weights, a .bin, a file moved since sampling
        return None


def input_errors() -> tuple:
    """The errors that mean bad input or a missing file: one line and exit 1 (a traceback means a bug)."""
    from rear_ds.config import ConfigError
    from rear_ds.data.sources import TransientReadError
    from rear_ds.evaluation.chunks import IncompleteSamplesError
    from rear_ds.evaluation.inception import InceptionWeightsError
    from rear_ds.evaluation.safe_npz import NpzError
    from rear_ds.models.weights import WeightsError
    from rear_ds.sample import SampleError

    return (IncompleteSamplesError, InceptionWeightsError, NpzError, SampleError, ConfigError, WeightsError,
            OSError, ValueError, TmpBusyError, TransientReadError)  # OSError: a missing file, a full disk


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        evaluate(args)
        return 0
    except input_errors() as e:
        print(f"rear_ds.evaluate: error: {e}", file=sys.stderr)
        return 1


def evaluate(args) -> dict:
    from rear_ds.evaluation import chunk_features
    from rear_ds.evaluation.chunks import gather_chunks
    from rear_ds.evaluation.grid import save_grid
    from rear_ds.evaluation.inception import InceptionFeatures, resolve_inception_weights
    from rear_ds.evaluation.ref_stats import reference_statistics
    from rear_ds.evaluation.references import open_reference
    from rear_ds.evaluation.safe_npz import load_npz
    from rear_ds.evaluation.stats import fid_from_features, inception_score, precision_recall
    from rear_ds.sample import read_manifest
    from rear_ds.training.metrics import log_to_wandb_run, wandb_run_of

    t_start = time.time()
    resolve_inception_weights(args.inception_weights)  # fail before any heavy work
    wandb_init = wandb_run_of(args.wandb_run) if args.wandb_run else None
    manifest = read_manifest(args.samples)
    N, cs, C = manifest["num_samples"], manifest["chunk_size"], manifest["num_classes"]
    if args.is_splits > N or (args.prc_k >= N and not args.no_prc):  # before the Inception work, not after it
        raise ValueError(f"--is-splits {args.is_splits} / --prc-k {args.prc_k} need more samples than the "
                         f"{N} of {args.samples}")
    gathered = gather_chunks(args.samples, N, cs, C, fingerprint=manifest["fingerprint"])
    for bad in gathered.accounting["invalid_chunk_files"]:
        print(f"rear_ds.evaluate: warning: ignoring invalid chunk file {bad} (its indices are held by valid chunks)",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)

    extractor = InceptionFeatures(args.inception_weights, device=args.device, batch_size=args.batch_size)
    # the reference is opened first: a wrong --reference fails before the long pass over the samples
    tok_cfg = None
    if args.config:
        from rear_ds.config import load_config

        ov = [f"tokenizer.weights={args.tokenizer_weights}"] if args.tokenizer_weights else []
        tok_cfg = load_config(args.config, ov).tokenizer
    elif "config" in manifest:  # the sampler's own tokenizer decodes a shard reference by default
        from rear_ds.config import config_from_dict

        tok_cfg = config_from_dict(manifest["config"]).tokenizer
        if args.tokenizer_weights:
            tok_cfg.weights = args.tokenizer_weights
    size = args.reference_size if args.reference_size is not None else gathered.image_shape[0]
    ref = open_reference(args.reference, image_size=size, tokenizer_cfg=tok_cfg, limit=args.reference_limit,
                         device=str(extractor.device), with_images=not args.no_prc)
    adm = None if args.no_adm_npz else AdmNpzWriter(os.path.join(args.out, ADM_NPZ), (N,) + gathered.image_shape)
    pools, logits, grid, counted = [], [], [], 0
    feats = {"chunks_features_from_sampler": 0, "chunks_features_computed": 0, "features_recomputed": []}
    identity = extractor.identity()
    class_counts = np.zeros(C, dtype=np.int64)
    try:
        with cli.progress(N, "inception (samples)") as bar:
            for path in gathered.files:  # index order; a chunk's features are the sampler's when they fit
                data = load_npz(path, "sample chunk", keys=("images", "labels", "indices"))
                images = data["images"]
                if adm is not None:
                    adm.write(images)
                if len(grid) < args.grid_size:
                    grid.extend(images[:args.grid_size - len(grid)])
                stored, why = chunk_features.read(chunk_features.features_path(args.samples, path), data["indices"],
                                                  manifest["fingerprint"], chunk_features.images_sha256(images),
                                                  identity)
                if stored is not None:
                    feats["chunks_features_from_sampler"] += 1
                else:
                    stored = chunk_features.compute(extractor, images)
                    feats["chunks_features_computed"] += 1
                    if why != "absent":
                        feats["features_recomputed"].append(f"{os.path.basename(path)}: {why}")
                        print(f"rear_ds.evaluate: recomputing the Inception features of {os.path.basename(path)}: "
                              f"the stored ones were {why}", file=sys.stderr)
                pools.append(stored[0])
                logits.append(stored[1])
                counted += images.shape[0]
                np.add.at(class_counts, data["labels"], 1)
                bar.update(images.shape[0])
        if adm is not None:
            adm.close()
    except BaseException:
        if adm is not None:
            adm.abort()
        raise
    pools, logits = np.concatenate(pools), np.concatenate(logits)

    ref_stats = reference_statistics(ref, extractor, need_features=not args.no_prc, batch_size=args.batch_size,
                                     progress=True)

    metrics = {"fid": fid_from_features(pools, ref_stats["mu"], ref_stats["sigma"])}
    metrics["inception_score_mean"], metrics["inception_score_std"] = inception_score(logits, args.is_splits)
    notes = []
    if args.no_prc:
        notes.append("precision/recall skipped (--no-prc)")
    elif ref_stats["features"] is None:
        notes.append("precision/recall skipped: the reference has no images or features")
    else:
        metrics["precision"], metrics["recall"] = precision_recall(pools, ref_stats["features"], args.prc_k)
    if ref.kind == "adm_npz" and ref.mu is not None:
        notes.append("FID uses the reference's stored mu/sigma (ADM TF Inception) with torch-fidelity sample "
                     "features; for numbers comparable to papers run the ADM evaluator on samples_adm.npz")
    if N < 50_000:
        notes.append(f"N = {N} < 50,000: FID is biased upwards compared with the standard 50k protocol")

    results = {
        "format": "rear_ds.eval_results/v1",
        "metrics": metrics,
        "checkpoint": manifest["checkpoint"],
        "tokenizer": manifest.get("tokenizer"),
        "sampling": manifest["sampling"],
        "seed": manifest["seed"],
        "num_samples": N,
        "num_classes": C,
        "class_order": manifest.get("class_order"),
        "samples_dir": os.path.abspath(args.samples),
        "samples_fingerprint": manifest["fingerprint"],
        "reference": dict(ref.describe(), num_images=ref_stats["num_images"], fid_statistics=ref_stats["fid_source"],
                          prc_features=ref_stats["features_source"]),
        "evaluator": dict(extractor.describe(), is_splits=args.is_splits, prc_neighborhood=args.prc_k,
                          fid_formula=("|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) via symmetric eigendecompositions "
                                     "(same value as torch_fidelity fid_statistics_to_metric)")),
        "accounting": dict(gathered.accounting, **feats, samples_scored=int(counted),
                           per_class_min=int(class_counts.min()), per_class_max=int(class_counts.max()),
                           reference_images=ref_stats["num_images"], reference_images_skipped=len(ref.skipped)),
        "outputs": {"adm_npz": None if adm is None else os.path.abspath(adm.path),
                    "grid": os.path.abspath(os.path.join(args.out, GRID))},
        "notes": notes,
        "wandb": {k: wandb_init[k] for k in ("id", "project", "mode")} if wandb_init else None,
        "seconds": round(time.time() - t_start, 2),
    }
    save_grid(np.stack(grid), results["outputs"]["grid"], nrow=8)
    write_json_atomic(os.path.join(args.out, RESULTS), results, sort_keys=False)
    print(json.dumps(metrics, indent=1))
    if wandb_init:
        where = log_to_wandb_run(wandb_init, dict(metrics, num_samples=N),
                                 checkpoint_step(manifest["checkpoint"]["weights_file"]), "eval")
        print(f"rear_ds.evaluate: logged to {where}", file=sys.stderr)
    return results


if __name__ == "__main__":
    sys.exit(main())
