"""Training machinery for ``rear_ds/train.py``: one small module per idea.

launch_env   rendezvous from rear_ds.launch's numbers, GPU choice, process-group init with a timeout, clean exits
ds_config    the DeepSpeed JSON: "auto" values filled from the YAML, batch and precision checks
optim        AdamW with the reference weight-decay groups, warmup + cosine LambdaLR
checkpoint   complete-or-ignored checkpoints, RNG/data state, resume (also universal), keep-last-k
signals      SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, exit 75
metrics      console, log.jsonl, W&B (offline unless configured), throughput / MFU, progress and ETA
preflight    config checks that must fail before any model is built or data is read
"""
