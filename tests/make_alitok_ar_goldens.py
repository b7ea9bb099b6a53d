"""Make tests/golden/alitok_ar_parity.safetensors by running the OFFICIAL AliTok AR code (run once, by hand).

    git clone https://github.com/ali-vilab/alitok /tmp/alitok && git -C /tmp/alitok checkout 093e957
    python tests/make_alitok_ar_goldens.py --alitok /tmp/alitok

The checkout must stay OUTSIDE this project (the repository has no license; its code is never copied here). The
model shape, weights and batch come from tests/alitok_parity.py (weights from a fixed numpy stream, so only the
outputs are stored). Everything runs in fp32 on the CPU with one thread:
  logits_full    official forward of [class, t_0..t_272] for 2 classes + the null class, positions 0..272
  logits_prefix  the same for [class, t_0..t_39]
  cfg_probs      generate(): the softmax each step samples from (CFG-combined, temperature applied), and
  cfg_tokens     the tokens it drew (kv_cache=True, torch.manual_seed(seed))
  loss           training loss (ARLoss) in train mode, dropouts 0
  delta.<name>   one step of the official AdamW (its weight-decay groups, lr 4e-4) after clipping to norm 1.0
metadata: lr (the LR at tests/alitok_parity.LR_STEPS under AliTok-B's schedule: 4e-4, 62.5k warmup, 500k steps),
no_decay (the names in the official no-decay group), the commit, the config.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

import alitok_parity as P  # noqa: E402
from bench.official_alitok import OFFICIAL_COMMIT, import_official, official_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alitok", default=None, help="checkout of ali-vilab/alitok at 093e957 (default: $ALITOK_REPO)")
    ap.add_argument("--out", default=os.path.join(ROOT, P.GOLDEN))
    args = ap.parse_args(argv)
    off = import_official(args.alitok, train_utils=True)
    head = subprocess.run(["git", "-C", off.root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip() or "unknown (not a git checkout)"
    if not commit.startswith(OFFICIAL_COMMIT):
        print(f"warning: {off.root} is at {commit}, the goldens are defined for {OFFICIAL_COMMIT}", file=sys.stderr)
    torch.set_num_threads(1)
    from rear_ds.config import OptimConfig
    from rear_ds.models.weights import save_safetensors

    mcfg = P.model_config()
    cfg = official_config(mcfg, OptimConfig(total_steps=500_000), guidance=(P.CFG["guidance_scale"], P.CFG["guidance_power"]))
    model = off.ar.ARModel(cfg)
    model.load_state_dict(P.weights({k: v.shape for k, v in model.state_dict().items()}), strict=True)
    K, C, N = mcfg.codebook_size, mcfg.num_classes, mcfg.num_tokens
    tokens, labels, drop = P.batch(K, C, N)
    ids = P.class_ids(labels, drop, K, C)
    out = {"tokens": tokens, "class_ids": ids}

    model.eval()
    with torch.no_grad():
        out["logits_full"] = model(tokens, ids)[:, :N].contiguous()
        out["logits_prefix"] = model(tokens[:, :P.PREFIX_LEN], ids).contiguous()

        probs = []
        multinomial = torch.multinomial

        def recording_multinomial(p, *a, **kw):  # generate() samples each step from these probabilities
            probs.append(p.detach().clone())
            return multinomial(p, *a, **kw)

        torch.multinomial = recording_multinomial
        try:
            torch.manual_seed(P.CFG["seed"])
            drawn = model.generate(labels[:2].clone(), guidance_scale=P.CFG["guidance_scale"],
                                   randomize_temperature=P.CFG["temperature"],
                                   guidance_scale_pow=P.CFG["guidance_power"], kv_cache=True)
        finally:
            torch.multinomial = multinomial
        out["cfg_probs"] = torch.stack(probs)  # (N, 2, K)
        out["cfg_tokens"] = drawn.long()

    model.train()  # dropouts are 0 in this config
    logits, lab = model(tokens, ids, return_labels=True)
    loss = off.losses.ARLoss(cfg)(logits, lab)[0]
    out["loss"] = loss.detach().reshape(1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # accelerate's clip_grad_norm_ (max_grad_norm 1.0)
    log = logging.getLogger("golden")
    opt = off.train_utils.create_optimizer(cfg, log, model, None)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.step()
    for k, v in model.named_parameters():
        out[f"delta.{k}"] = (v.detach() - before[k]).contiguous()
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])

    sched_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.params.learning_rate)
    sched, _ = off.train_utils.create_lr_scheduler(cfg, log, SimpleNamespace(num_processes=1), sched_opt)
    lr = {str(s): sched.lr_lambdas[0](s) * cfg.optimizer.params.learning_rate for s in P.LR_STEPS}

    meta = {"official_commit": commit, "made_by": "tests/make_alitok_ar_goldens.py", "model": json.dumps(P.MODEL),
            "cfg": json.dumps(P.CFG), "lr": json.dumps(lr), "no_decay": json.dumps(no_decay),
            "torch": torch.__version__}
    save_safetensors(out, args.out, metadata=meta)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1024:.0f} KiB, {len(out)} tensors); loss {loss.item():.6f}; lr {lr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
