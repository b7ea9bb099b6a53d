"""Per-process parameter / gradient / optimizer-state bytes under ZeRO stages 0-3, from real DeepSpeed engines.

Launch (2 processes; on a CPU-only machine DeepSpeed's CPU accelerator with gloo is used):

    deepspeed --num_gpus 2 bench/zero_memory.py --size tiny --out /tmp/zero.json

Every rank builds the generator (under deepspeed.zero.Init for stage 3), wraps it with deepspeed.initialize,
runs two training steps of the full reAR loss and then sums the bytes of the distinct tensor storages it
really holds, by category:
  params     the module's parameters (ZeRO-3: each param's ds_tensor partition, or the whole tensor when
             it is persistent: below stage3_param_persistence_threshold)
  grads      gradients: .grad of the module params and of the optimizer's (fp32 master) params, and the
             gradient buffers the ZeRO optimizer keeps (any tensor attribute whose name contains "grad")
  optimizer  fp32 master weights (when distinct from the module params) + AdamW exp_avg / exp_avg_sq
             (wrapper attributes named *fp32* / *master*, e.g. ZeRO-3's fp32_partitioned_groups_flat, count here)
  other      any other tensor buffer reachable from the ZeRO optimizer object
Transient buffers that exist only inside backward/step (reduce buckets, ZeRO-3 prefetch/gather buffers) are not
in these snapshots; on a GPU, torch.cuda.max_memory_allocated is recorded as well to show the true peak.
Snapshots are taken after backward (before step) and after step; each category reports its maximum.
Rank 0 writes the JSON (all ranks' numbers), so the per-process figures can be compared between stages.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rear_ds.data.shards import write_json_atomic  # noqa: E402
from rear_ds.training.optim import inner_optimizer, param_groups  # noqa: E402


def _ptr(t):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


class Ledger:
    def __init__(self):
        self.seen: dict = {}  # storage ptr -> category
        self.bytes: dict = {"params": 0, "grads": 0, "optimizer": 0, "other": 0}
        self.where: dict = {}  # (category, where) -> bytes, for the record

    def add(self, t, cat: str, where: str = ""):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        ptr, nb = _ptr(t)
        if nb == 0 or ptr in self.seen:
            return
        self.seen[ptr] = cat
        self.bytes[cat] += nb
        key = f"{cat}:{where}"
        self.where[key] = self.where.get(key, 0) + nb


def _walk(obj, ledger: Ledger, name: str, depth: int, visited: set):
    if depth > 4 or id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        low = name.lower()
        cat = "grads" if "grad" in low else "optimizer" if ("fp32" in low or "master" in low) else "other"
        ledger.add(obj, cat, f"optimizer wrapper .{name}")
        if obj.grad is not None:
            ledger.add(obj.grad, "grads", f"optimizer wrapper .{name}.grad")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, ledger, f"{name}.{k}", depth + 1, visited)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, ledger, name, depth + 1, visited)


def snapshot(engine) -> dict:
    model = engine.module
    L = Ledger()
    for p in model.parameters():  # parameters first: ZeRO-1/2's flat bf16 buffer backs them
        if hasattr(p, "ds_tensor"):
            L.add(p.ds_tensor, "params", "ZeRO-3 partition (ds_tensor)")
            if p.data.numel():  # persistent (not partitioned) or currently gathered
                L.add(p.data, "params", "ZeRO-3 persistent/gathered param")
        else:
            L.add(p.data, "params", "module param")
    for p in model.parameters():
        if p.grad is not None:
            L.add(p.grad, "grads", "module param .grad")
    wrapper = engine.optimizer
    inner = inner_optimizer(wrapper)
    for g in inner.param_groups:
        for p in g["params"]:
            L.add(p.data, "optimizer", "master param")  # fp32 master (counted as params if shared)
            if p.grad is not None:
                L.add(p.grad, "grads", "master param .grad")
    for st in inner.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                L.add(v, "optimizer", f"AdamW state {k}")
    if wrapper is not inner:
        visited: set = set()
        for k, v in vars(wrapper).items():
            if k in ("optimizer", "module", "model"):
                continue
            _walk(v, L, k, 0, visited)
    return {**L.bytes, "where": dict(L.where)}


def ds_config(stage: int, precision: str, micro_batch: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_bucket_size": 5e7, "stage3_prefetch_bucket_size": 5e7,
                              "stage3_param_persistence_threshold": 1e5},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":  # DeepSpeed bf16 mode: bf16 weights, fp32 master weights in the optimizer
        cfg["bf16"] = {"enabled": True}
    elif precision == "bf16_autocast":  # fp32 weights, autocast forward (ds_configs/zero2_bf16_autocast.json)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    elif precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected bf16, bf16_autocast or fp32")
    return cfg


def run_stage(stage: int, precision: str, model_cfg, micro_batch: int, steps: int = 3) -> dict:
    import deepspeed
    from rear_ds.config import ObjectiveConfig, OptimConfig
    from rear_ds.models import build_generator
    from rear_ds.objective import ReARObjective

    ds = ds_config(stage, precision, micro_batch)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = build_generator(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.03), lr=1e-4, betas=(0.9, 0.96))  # the trainer's groups
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    dev = engine.device
    obj = ReARObjective(ObjectiveConfig().resolve(OptimConfig().total_steps), model_cfg)
    g = torch.Generator().manual_seed(engine.global_rank)
    tokens = torch.randint(0, model_cfg.codebook_size, (micro_batch, model_cfg.num_tokens), generator=g).to(dev)
    labels = torch.randint(0, model_cfg.num_classes, (micro_batch,), generator=g).to(dev)
    codebook = torch.randn(model_cfg.codebook_size, model_cfg.align_z_dim, generator=g).to(dev)
    snaps, times = [], []
    for s in range(steps):
        t0 = time.perf_counter()
        loss, _ = obj(engine, tokens, labels, codebook, step=s)
        engine.backward(loss)
        if s == steps - 1:
            snaps.append(snapshot(engine))
        engine.step()
        if s == steps - 1:
            snaps.append(snapshot(engine))
        times.append(time.perf_counter() - t0)
    per_cat = {k: max(sn[k] for sn in snaps) for k in snaps[0] if k != "where"}
    per_cat["params_grads_optimizer"] = per_cat["params"] + per_cat["grads"] + per_cat["optimizer"]
    out = {"stage": stage, "precision": precision, "rank": engine.global_rank, "bytes": per_cat,
           "cuda_max_memory_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "snapshots": {"after_backward": snaps[0], "after_step": snaps[1]},
           "optimizer_wrapper": type(engine.optimizer).__name__,
           "step_time_s": times[1:], "loss_last": float(loss.detach().float())}
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, model, opt
    gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = ap.parse_args(argv)

    import deepspeed
    import torch.distributed as dist
    from bench.common import size_config
    from rear_ds.models import count_parameters

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    import atexit

    from rear_ds.training.launch_env import remove_shm_buffers

    atexit.register(remove_shm_buffers, rank)  # DeepSpeed leaves its 66 MiB CPU all-reduce buffer in /dev/shm
    cfg = size_config(args.size)
    results = []
    for precision in args.precisions.split(","):
        for stage in [int(s) for s in args.stages.split(",")]:
            r = run_stage(stage, precision, cfg, args.micro_batch)
            gathered = [None] * world
            dist.all_gather_object(gathered, r)
            results.append({"stage": stage, "precision": precision, "ranks": gathered})
            if rank == 0:
                b = gathered[0]["bytes"]
                print(f"[zero_memory] {precision} ZeRO-{stage}: params {b['params']/2**20:.2f} MiB, grads "
                      f"{b['grads']/2**20:.2f} MiB, optimizer {b['optimizer']/2**20:.2f} MiB, other "
                      f"{b['other']/2**20:.2f} MiB (rank 0)", flush=True)
    if rank == 0:
        summary = {}
        for precision in args.precisions.split(","):
            rows = {r["stage"]: r for r in results if r["precision"] == precision}
            base = max(x["bytes"]["params_grads_optimizer"] for x in rows[0]["ranks"]) if 0 in rows else None
            summary[precision] = {}
            for st, r in rows.items():
                worst = max(x["bytes"]["params_grads_optimizer"] for x in r["ranks"])
                summary[precision][f"zero{st}"] = {"params_grads_optimizer_bytes_max_rank": worst,
                                                   "ratio_vs_zero0": worst / base if base else None}
        doc = {"world_size": world, "size": args.size, "micro_batch": args.micro_batch,
               "param_count": count_parameters(cfg, include_align=True),
               "accelerator": deepspeed.get_accelerator().device_name(),
               "summary": summary, "results": results}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json_atomic(args.out, doc, sort_keys=False)
    dist.barrier()
    return 0


if __name__ == "__main__":
    from rear_ds.training import launch_env

    launch_env.run_and_exit(main)  # no interpreter finalization after the last collective (see exit_process)
