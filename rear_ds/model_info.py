"""Print a config's parameter counts and FLOPs: ``python -m rear_ds.model_info configs/rear_l.yaml``.

Counts come from building the model on the meta device (no memory is used), so even the 7B config
answers in a second. FLOPs follow rear_ds.models.generator.flops_per_sample.
"""
from __future__ import annotations

import argparse
import json

from rear_ds.config import load_config
from rear_ds.models.generator import count_parameters, flops_per_sample


def model_info(cfg) -> dict:
    m = cfg.model
    infer = count_parameters(m, include_align=False)
    train = count_parameters(m, include_align=True)
    fwd = flops_per_sample(m, include_align=False, training=False)
    step = flops_per_sample(m, include_align=True, training=True)
    return {
        "hidden_size": m.hidden_size, "depth": m.depth, "num_heads": m.num_heads, "mlp_dim": m.mlp_dim,
        "seq_len": m.seq_len, "decode_align_layer": m.decode_align_layer,
        "params_inference": infer, "params_training": train,
        "flops_per_token_forward": fwd / m.seq_len,
        "flops_per_sample_forward": fwd,
        "flops_per_sample_training": step,
        # Mixed-precision Adam: fp32 master + 2 moments + bf16 weights and grads = 16 bytes per parameter.
        "train_state_gib_unsharded": train * 16 / 2 ** 30,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. configs/rear_l.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=12")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    info = model_info(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"config                      {args.config}")
    print(f"shape                       D={info['hidden_size']} depth={info['depth']} heads={info['num_heads']} "
          f"mlp={info['mlp_dim']} L={info['seq_len']}")
    print(f"parameters (inference)      {info['params_inference'] / 1e6:,.1f}M")
    print(f"parameters (training)       {info['params_training'] / 1e6:,.1f}M  (+ the two align heads)")
    print(f"FLOPs per token (forward)   {info['flops_per_token_forward'] / 1e9:,.3f} G")
    print(f"FLOPs per sample (forward)  {info['flops_per_sample_forward'] / 1e9:,.1f} G")
    print(f"FLOPs per training sample   {info['flops_per_sample_training'] / 1e9:,.1f} G  (fwd + bwd, reAR loss)")
    print(f"bf16 Adam state, unsharded  {info['train_state_gib_unsharded']:,.1f} GiB (divide by the ZeRO-3 world size)")


if __name__ == "__main__":
    main()
