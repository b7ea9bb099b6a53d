"""Print a config's parameter counts, FLOPs and training-state memory per process for each ZeRO stage:
``python -m rear_ds.model_info configs/rear_l.yaml --world-size 8``.

Counts come from building the model on the meta device (no memory is used), so even the 7B config
answers in a second. FLOPs follow the family's flops_per_sample (rear_ds.models).
"""
from __future__ import annotations

import json

from rear_ds import cli
from rear_ds.config import load_config
from rear_ds.models import count_parameters, flops_per_sample


def state_bytes_per_param(precision: str, stage: int, world_size: int) -> dict:
    """Persistent training-state bytes per parameter on each of ``world_size`` data-parallel processes.

    bf16 mode: bf16 weights and gradients, fp32 master weights + two fp32 Adam moments in the optimizer.
    bf16_autocast: fp32 weights and gradients; the optimizer holds the two moments, plus (ZeRO >= 1) its own fp32
    partition of the weights. ZeRO-1 shards the optimizer, ZeRO-2 also the gradients, ZeRO-3 also the weights;
    ZeRO-1's gradients are counted whole (it holds them until the reduction at the accumulation boundary).
    These are the bytes bench/zero_memory.py measures on real DeepSpeed engines (BENCHMARKS.md, 2 processes,
    every stage within 2%); activations, communication buckets and the allocator's slack come on top."""
    if precision not in ("bf16", "bf16_autocast") or stage not in (0, 1, 2, 3) or world_size < 1:
        raise ValueError(f"state_bytes_per_param({precision!r}, {stage}, {world_size})")
    w, g = (2, 2) if precision == "bf16" else (4, 4)
    o = 12 if (precision == "bf16" or stage >= 1) else 8
    n = world_size
    return {"weights": w / n if stage >= 3 else w, "grads": g / n if stage >= 2 else g,
            "optimizer": o / n if stage >= 1 else o}


def state_gib_per_process(params: int, world_size: int) -> dict:
    """{precision: {"zero<k>": GiB}} of persistent state per process, for every ZeRO stage."""
    return {prec: {f"zero{k}": params * sum(state_bytes_per_param(prec, k, world_size).values()) / 2 ** 30
                   for k in range(4)} for prec in ("bf16", "bf16_autocast")}


def model_info(cfg, world_size: int = 8) -> dict:
    m = cfg.model
    infer = count_parameters(m, include_align=False)
    train = count_parameters(m, include_align=True)
    fwd = flops_per_sample(m, include_align=False, training=False)
    step = flops_per_sample(m, include_align=True, training=True)
    return {
        "family": m.family, "hidden_size": m.hidden_size, "depth": m.depth, "num_heads": m.num_heads, "mlp_dim": m.mlp_dim,
        "seq_len": m.seq_len, "decode_align_layer": m.decode_align_layer,
        "params_inference": infer, "params_training": train,
        "flops_per_token_forward": fwd / m.seq_len,
        "flops_per_sample_forward": fwd,
        "flops_per_sample_training": step,
        # Mixed-precision Adam: fp32 master + 2 moments + bf16 weights and grads = 16 bytes per parameter.
        "train_state_gib_unsharded": train * 16 / 2 ** 30,
        "world_size": world_size,
        "state_gib_per_process": state_gib_per_process(train, world_size),
    }


def main(argv=None) -> None:
    ap = cli.parser(__doc__, "python -m rear_ds.model_info", "rear-model-info")
    ap.add_argument("config", help="YAML config, e.g. configs/rear_l.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=12")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--world-size", type=int, default=8, help="data-parallel processes for the memory table")
    args = ap.parse_args(argv)
    if args.world_size < 1:
        ap.error(f"--world-size {args.world_size}: expected a positive number of processes")
    info = model_info(load_config(args.config, args.overrides), args.world_size)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"config                      {args.config}")
    print(f"family                      {info['family']}")
    print(f"shape                       D={info['hidden_size']} depth={info['depth']} heads={info['num_heads']} "
          f"mlp={info['mlp_dim']} L={info['seq_len']}")
    print(f"parameters (inference)      {info['params_inference'] / 1e6:,.1f}M ({info['params_inference']:,})")
    print(f"parameters (training)       {info['params_training'] / 1e6:,.1f}M ({info['params_training']:,}, "
          "+ the two align heads)")
    print(f"FLOPs per token (forward)   {info['flops_per_token_forward'] / 1e9:,.3f} G")
    print(f"FLOPs per sample (forward)  {info['flops_per_sample_forward'] / 1e9:,.1f} G")
    print(f"FLOPs per training sample   {info['flops_per_sample_training'] / 1e9:,.1f} G  (fwd + bwd, reAR loss)")
    print(f"bf16 Adam state, unsharded  {info['train_state_gib_unsharded']:,.1f} GiB")
    print(f"training state per process with {info['world_size']} processes, GiB (weights + grads + optimizer; "
          "activations extra):")
    print("  precision        ZeRO-0    ZeRO-1    ZeRO-2    ZeRO-3")
    for prec, row in info["state_gib_per_process"].items():
        print(f"  {prec:14s}" + "".join(f"{row[f'zero{k}']:10,.1f}" for k in range(4)))


if __name__ == "__main__":
    main()
