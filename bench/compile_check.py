"""Per-block torch.compile check: graph breaks found by torch._dynamo.explain (no compilation needed).

    python -m bench.compile_check [--size tiny]
"""
from __future__ import annotations

import argparse
import json

import torch

from rear_ds.models.generator import ReARGenerator

from .common import size_config


def _explain(fn, *args, **kw) -> dict:
    import torch._dynamo as dynamo

    dynamo.reset()
    ex = dynamo.explain(fn)(*args, **kw)
    reasons = []
    for b in ex.break_reasons:
        where = ""
        if getattr(b, "user_stack", None):
            fr = b.user_stack[-1]
            where = f"{fr.filename.split('/')[-1]}:{fr.lineno}"
        reasons.append({"reason": str(b.reason).splitlines()[0][:300], "where": where})
    return {"graph_count": ex.graph_count, "graph_break_count": ex.graph_break_count,
            "op_count": ex.op_count, "break_reasons": reasons}


def compile_check(size: str = "tiny", whole_model: bool = True) -> dict:
    cfg = size_config(size)
    torch.manual_seed(0)
    model = ReARGenerator(cfg).train()
    B, N, D = 2, cfg.num_tokens, cfg.hidden_size
    x = torch.randn(B, N + 2, D, requires_grad=True)
    cond = torch.randn(B, N + 2, D)
    tokens = torch.randint(0, cfg.codebook_size, (B, N))
    class_ids = model.class_token_ids(torch.zeros(B, dtype=torch.long))
    out = {"size": size, "torch": torch.__version__}
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["block_train_bf16"] = _explain(model.blocks[0], x, cond)
        model.eval()
        cache = model.new_kv_cache(B)
        out["block_kv_cached_eval"] = _explain(lambda a, c: model.blocks[0](a, c, cache, 0), x[:, :2].detach(),
                                               cond[:, :2])
        model.train()
        if whole_model:
            out["whole_forward_train"] = _explain(lambda t, c: model(t, c, encode_align=True, decode_align=True),
                                                  tokens, class_ids)
        out["status"] = "ok"
    except Exception as e:  # dynamo unavailable or failing on this build
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="tiny")
    args = ap.parse_args(argv)
    print(json.dumps(compile_check(args.size), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
