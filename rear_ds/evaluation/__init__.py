"""Sample bookkeeping and image metrics (FID, Inception Score, precision/recall) for rear_ds.

Modules:
    safe_npz    reading .npz files without ever unpickling (``allow_pickle=False``)
    chunks      the sample-chunk file format written by ``rear_ds.sample`` and gathered by ``rear_ds.evaluate``
    inception   torch-fidelity's InceptionV3 loaded from a local weights file (no download, no pickle code)
    stats       Frechet distance, Inception Score, precision/recall, reference-statistics files
    references  reference image sources: ADM reference batch .npz, folder of images, token-shard set
    fid         ``evaluate_fid`` for in-training evaluation
    ref_stats   ``python -m rear_ds.evaluation.ref_stats``: compute reference statistics once
    grid        ``save_grid``: a PNG grid of uint8 images
    round_trip  token round-trip consistency (decode, re-encode, share of surviving tokens)
"""
