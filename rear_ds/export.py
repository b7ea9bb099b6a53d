"""Export a training checkpoint (any ZeRO stage) to one .safetensors file in the released key layout.

    python -m rear_ds.export CKPT_DIR OUT.safetensors [--dtype fp32|bf16] [--tag TAG] [--with-align-heads]

CKPT_DIR may be the run folder, its ``checkpoints/`` folder (then ``latest`` is used unless --tag), or one
checkpoint folder. Only complete checkpoints (with their COMPLETE marker) are exported. The fp32 master
weights are reconstructed from the ZeRO partitions with DeepSpeed's zero_to_fp32 utilities; the resolved
run config is stored as JSON in the file's metadata under "rear_config", and the file loads with
``rear_ds.models.load_generator``. The training-only alignment heads are dropped by default.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from rear_ds import cli
from rear_ds.models.weights import WeightsError
from rear_ds.training.checkpoint import COMPLETE, LATEST, read_meta


class ExportError(RuntimeError):
    pass


def locate(path: str, tag: str = "") -> tuple:
    """-> (checkpoints folder, tag) for a run folder, a checkpoints folder or one checkpoint folder."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, COMPLETE)) and not tag:  # a checkpoint folder itself
        return os.path.dirname(path), os.path.basename(path)
    if not tag:
        latest = os.path.join(path, LATEST)
        if not os.path.isfile(latest):
            raise ExportError(f"{path!r} is not a checkpoint: no {LATEST} file and no {COMPLETE} marker")
        tag = open(latest).read().strip()
    if not read_meta(os.path.join(path, tag)):
        raise ExportError(f"checkpoint {os.path.join(path, tag)!r} is missing or incomplete "
                          f"(no {COMPLETE} marker); refusing to export it")
    return path, tag


def fp32_state_dict(ckpt_dir: str, tag: str) -> dict:
    """Full fp32 weights. ZeRO 1/2/3: gathered from the partitioned fp32 master copies (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = os.path.join(ckpt_dir, tag)
    # DeepSpeed unpickles its checkpoint files in full: refuse any that would import code (see checkpoint.py).
    from rear_ds.training.checkpoint import verify_no_code

    verify_no_code(folder)
    if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(folder)):
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:  # no ZeRO partitions: the module weights are whole in the model states file
        files = [f for f in os.listdir(folder) if f.startswith("mp_rank_00") and f.endswith("model_states.pt")]
        if not files:
            raise ExportError(f"{folder!r}: no DeepSpeed model states file found")
        state = torch.load(os.path.join(folder, files[0]), map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def export(ckpt: str, out: str, dtype: str = "fp32", tag: str = "", with_align_heads: bool = False) -> dict:
    from rear_ds.config import config_from_dict
    from rear_ds.models import build_generator
    from rear_ds.models.generator import ALIGN_PREFIXES
    from rear_ds.models.weights import check_state_dict, save_safetensors

    ckpt_dir, tag = locate(ckpt, tag)
    with open(os.path.join(ckpt_dir, tag, "rear_config.json")) as f:
        config = json.load(f)
    cfg = config_from_dict(config)
    state = fp32_state_dict(ckpt_dir, tag)
    if not with_align_heads:
        state = {k: v for k, v in state.items() if not k.startswith(ALIGN_PREFIXES)}
    with torch.device("meta"):  # check names and shapes against the architecture before writing
        ref = build_generator(cfg.model, with_align_heads=with_align_heads)
    check_state_dict(ref, state, what=f"checkpoint {os.path.join(ckpt_dir, tag)}")
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: v.to(target).contiguous() for k, v in state.items()}
    meta = read_meta(os.path.join(ckpt_dir, tag)) or {}
    save_safetensors(state, out, metadata={"rear_config": json.dumps(config, sort_keys=True),
                                           "step": str(meta.get("step", "")), "dtype": dtype,
                                           "source": os.path.join(ckpt_dir, tag),
                                           # the checkpoint's commit record (step, time): a re-made tag differs
                                           "source_complete": json.dumps(meta, sort_keys=True)})
    return {"out": out, "tag": tag, "tensors": len(state), "step": meta.get("step")}


def main(argv=None) -> int:
    p = cli.parser(__doc__, "python -m rear_ds.export", "rear-export")
    p.add_argument("ckpt_dir", help="run folder, its checkpoints/ folder, or one checkpoint folder")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the written weights")
    p.add_argument("--tag", default="", help="checkpoint tag (default: the one `latest` names)")
    p.add_argument("--with-align-heads", action="store_true", help="keep the training-only align heads")
    a = p.parse_args(argv)
    try:
        info = export(a.ckpt_dir, a.out, a.dtype, a.tag, a.with_align_heads)
    except (ExportError, OSError, WeightsError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
