"""Compute reference statistics once: ``python -m rear_ds.evaluation.ref_stats``.

    python -m rear_ds.evaluation.ref_stats --reference /data/imagenet_val_256/ \\
        --inception-weights /models/weights-inception-2015-12-05-6726825d.pth --out refs/val256.npz

The output .npz holds mu, sigma (FID), features (precision/recall, unless --no-features) and a JSON
``meta`` naming the source and the evaluator (see :mod:`rear_ds.evaluation.stats`). Pass it as
``--reference`` to ``rear_ds.evaluate`` or as ``ref_stats_path`` to ``evaluate_fid``.
"""
from __future__ import annotations

import sys

import numpy as np

from rear_ds import cli
from rear_ds.evaluation.inception import InceptionFeatures
from rear_ds.evaluation.references import Reference, open_reference
from rear_ds.evaluation.stats import fid_stats, save_ref_stats


def reference_statistics(ref: Reference, extractor: InceptionFeatures, need_features: bool = True,
                         batch_size: int = 50, progress: bool = False) -> dict:
    """FID statistics and (optionally) pool features of a reference, using stored ones when present.

    Returns {"mu", "sigma", "features", "fid_source", "features_source", "num_images"}.
    """
    out = {"mu": ref.mu, "sigma": ref.sigma, "features": ref.features, "num_images": None,
           "fid_source": "stored mu/sigma" if ref.mu is not None else None,
           "features_source": "stored features" if ref.features is not None else None}
    if ref.features is not None:
        out["num_images"] = int(ref.features.shape[0])
    need_compute = (out["mu"] is None and out["features"] is None) or (need_features and out["features"] is None)
    if need_compute and ref.has_images:
        feats = []
        # Known up front for stored images and image folders; a token-shard set is counted as it is decoded.
        total = len(ref.images) if ref.images is not None else len(ref.files) if ref.kind == "image_folder" else None
        if ref.limit:
            total = min(total, ref.limit) if total is not None else ref.limit
        with cli.progress(total, "inception (reference)", disable=not progress) as bar:
            for batch in ref.iter_images(batch_size):
                feats.append(extractor(batch)[0].astype(np.float32))
                bar.update(batch.shape[0])
        if not feats:
            raise ValueError(f"reference {ref.path!r} yielded no images")
        out["features"] = np.concatenate(feats)
        out["features_source"] = "computed from reference images"
        out["num_images"] = int(out["features"].shape[0])
    if out["mu"] is None:
        if out["features"] is None:
            raise ValueError(f"reference {ref.path!r} has no mu/sigma, no features and no images")
        out["mu"], out["sigma"] = fid_stats(out["features"])
        out["fid_source"] = f"computed from {out['features_source']}"
    return out


def main(argv=None) -> int:
    from rear_ds.evaluate import input_errors  # the same bad-input errors as rear_ds.evaluate: one line, exit 1

    p = cli.parser(__doc__, "python -m rear_ds.evaluation.ref_stats")
    p.add_argument("--reference", required=True, help="folder of images, token-shard folder/.tar, or .npz")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (or $REAR_INCEPTION_WEIGHTS)")
    p.add_argument("--config", default=None, help="config YAML whose tokenizer decodes a token-shard reference")
    p.add_argument("--tokenizer-weights", default=None, help="overrides tokenizer.weights of --config")
    p.add_argument("--reference-size", type=cli.non_negative_int, default=0,
                   help="centre-crop/resize folder images to this square size (ADM preprocessing); 0 = as is")
    p.add_argument("--limit", type=cli.non_negative_int, default=0,
                   help="use at most this many reference images (0 = all)")
    p.add_argument("--no-features", action="store_true", help="store mu/sigma only (no precision/recall later)")
    p.add_argument("--batch-size", type=cli.positive_int, default=50, help="Inception batch size")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    try:
        return run(args)
    except input_errors() as e:
        print(f"rear_ds.evaluation.ref_stats: error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    tok_cfg = None
    if args.config:
        from rear_ds.config import load_config

        overrides = [f"tokenizer.weights={args.tokenizer_weights}"] if args.tokenizer_weights else []
        tok_cfg = load_config(args.config, overrides).tokenizer
    extractor = InceptionFeatures(args.inception_weights, device=args.device, batch_size=args.batch_size)
    ref = open_reference(args.reference, image_size=args.reference_size, tokenizer_cfg=tok_cfg,
                         limit=args.limit, device=str(extractor.device))
    stats = reference_statistics(ref, extractor, need_features=not args.no_features,
                                 batch_size=args.batch_size, progress=True)
    meta = {"source": ref.describe(), "num_images": stats["num_images"], "fid_source": stats["fid_source"],
            "evaluator": extractor.describe()}
    save_ref_stats(args.out, stats["mu"], stats["sigma"],
                   None if args.no_features else stats["features"], meta)
    print(f"wrote {args.out}: {stats['num_images']} reference images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
