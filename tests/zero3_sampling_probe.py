"""Run under `deepspeed --num_gpus 2` by tests/test_eval_hook.py (not a test module itself).

Under ZeRO-3, in-training sampling (sample grids, in-training FID) gathers the parameters once into a plain
replica (rear_ds.training.build.sampling_model) instead of once per token. This probe builds the tiny model
inside zero.Init and a DeepSpeed engine exactly as train.py does, gives it non-trivial weights, and samples the
same classes both ways: through the replica, and through the partitioned model (REPLICA_MEMORY_FRACTION = 0
forces that fallback). Each rank writes its findings to $REAR_PROBE_OUT/rank<r>.json.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402


def main() -> None:
    import deepspeed

    from rear_ds.config import load_config
    from rear_ds.sampling import generate
    from rear_ds.training import build, launch_env, optim
    from rear_ds.training import ds_config as dsc

    env = launch_env.detect()
    device = launch_env.init_distributed(env, 120)
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["train.allow_random_tokenizer=true"])
    ds = dsc.resolve(dsc.load_json(os.path.join(ROOT, "ds_configs", "zero3_bf16.json")), cfg, env.world_size)
    torch.manual_seed(0)
    model = build.build_model(cfg, ds, 3)
    optimizer, _ = optim.build_optimizer(model, cfg.optim, device, False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    gen = torch.Generator().manual_seed(1)
    for p in engine.module.parameters():  # the zero-initialised adaLN/head layers would make every class alike
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if env.rank == 0:
                p.data.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    engine.train()
    labels = torch.tensor([0, 1, 2, 3, 4, 5], device=device)
    indices = torch.arange(len(labels), device=device)
    out = {"rank": env.rank}
    for way, fraction in (("replica", build.REPLICA_MEMORY_FRACTION), ("partitioned", 0.0)):
        build.REPLICA_MEMORY_FRACTION = fraction
        t0 = time.perf_counter()
        with build.sampling_model(engine.module, cfg, 3) as m:
            out[f"{way}_is_plain"] = not any(hasattr(p, "ds_id") for p in m.parameters())
            out[f"{way}_eval_mode"] = not m.training
            tokens = generate(m, labels, indices, cfg.sampling.seed, cfg.sampling)
        out[f"{way}_s"] = time.perf_counter() - t0
        out[way] = tokens.tolist()
        out[f"{way}_train_mode_after"] = engine.module.training
    with open(os.path.join(os.environ["REAR_PROBE_OUT"], f"rank{env.rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    from rear_ds.training import launch_env

    launch_env.run_and_exit(main)
