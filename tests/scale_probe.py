"""Run under `deepspeed --num_gpus 2` by tests/test_scale.py (not a test module itself).

Phase 1: build each multi-billion config (argv: --build NAME:MAX_GB ...) inside deepspeed.zero.Init exactly as
train.py does (rear_ds.training.build.build_model) and report, per rank, the parameter numel held locally
(the ZeRO-3 partition) vs the model's, whether any parameter is held whole, and the peak RSS. Configs whose
bf16 partitions would not fit (2 bytes x params + 1 GB per process > MAX_GB, or > available memory - 1.5 GB)
are skipped with the reason (a shared machine's other users need their memory too). Phase 2 (argv: --train JSON): run rear_ds.train.main in this same process group
for each (ds_config, overrides) pair in the JSON list, one after the other: one launch for everything.
Results: one JSON line per event, prefixed "SCALE ", on stdout.
"""
import gc
import json
import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402
import torch  # noqa: E402


def report(**kw):
    print("SCALE " + json.dumps(kw), flush=True)
    if os.environ.get("REAR_SCALE_EVENTS"):
        with open(os.environ["REAR_SCALE_EVENTS"], "a") as f:
            f.write(json.dumps(kw) + "\n")


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise), so the next phase starts low."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def build_phase(specs: list, env) -> None:
    import torch.distributed as dist

    from rear_ds.config import load_config
    from rear_ds.models import count_parameters
    from rear_ds.training import build
    from rear_ds.training import ds_config as dsc

    for spec in specs:
        name, max_gb = spec.split(":")
        cfg = load_config(os.path.join(ROOT, "configs", name + ".yaml"))
        total = count_parameters(cfg.model, include_align=True)
        # bf16 partitions of all ranks + ~1 GB per process (torch, DeepSpeed, transient full layers)
        need_gb = (2 * total + 1e9 * env.world_size) / 1e9
        avail_gb = psutil.virtual_memory().available / 1e9
        ok = torch.tensor([1 if need_gb <= float(max_gb) and need_gb <= avail_gb - 1.5 else 0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank agrees (zero.Init is collective)
        if not ok.item():
            report(config=name, rank=env.rank, skipped=f"needs about {need_gb:.1f} GB on all ranks together (bf16 "
                   f"partitions + 1 GB per process); limit {max_gb} GB, {avail_gb:.1f} GB available now (- 1.5 GB)")
            continue
        ds = dsc.resolve(dsc.load_json(os.path.join(ROOT, "ds_configs", "zero3_bf16.json")), cfg, env.world_size)
        rss_before = psutil.Process().memory_info().rss / 2 ** 30
        model = build.build_model(cfg, ds, 3)
        params = list(model.parameters())
        local = sum(p.ds_tensor.numel() for p in params)
        full = sum(p.ds_numel for p in params)
        whole = [n for n, p in model.named_parameters() if p.numel() != 0]  # gathered = held whole
        dtype = ",".join(sorted({str(p.ds_tensor.dtype) for p in params}))
        local_gb = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params) / 2 ** 30
        report(config=name, rank=env.rank, world=env.world_size, total_params=full, expected_params=total,
               local_numel=local, local_gb=local_gb, held_whole=whole[:5], dtype=dtype, rss_before_gb=rss_before,
               rss_after_gb=psutil.Process().memory_info().rss / 2 ** 30, peak_rss_gb=peak_rss_gb(),
               full_model_bf16_gb=2 * full / 2 ** 30)
        del model, params
        release_memory()
        dist.barrier()


def main():
    from rear_ds.training import launch_env

    env = launch_env.detect()
    args = sys.argv[1:]
    builds = args[args.index("--build") + 1].split(",") if "--build" in args else []
    runs = json.loads(args[args.index("--train") + 1]) if "--train" in args else []
    launch_env.init_distributed(env, 300)
    from rear_ds import train

    # the builds first: their memory goes back to the OS when they are deleted; a DeepSpeed engine's does not
    # (so a training run is best last in a launch)
    build_phase(builds, env)
    for ds_json, overrides in runs:
        if "fp16" in ds_json:
            from deepspeed.accelerator import get_accelerator

            acc = get_accelerator()
            if acc.device_name() == "cpu" and not acc.is_fp16_supported():
                # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels (AVX512-FP16/AMX);
                # torch's own CPU fp16 ops work (slowly), which is all this smoke run of the fp16 path needs.
                acc.is_fp16_supported = lambda: True
                report(note="CPU without oneDNN fp16: DeepSpeed's fp16 check bypassed for the fp16 run")
        rc = train.main(["--deepspeed_config", os.path.join(ROOT, "ds_configs", ds_json), "--config",
                         os.path.join(ROOT, "configs", overrides[0]), *overrides[1:]])
        report(run=ds_json, rank=env.rank, rc=rc, peak_rss_gb=peak_rss_gb())
        release_memory()
        if rc != 0:
            sys.exit(rc)


if __name__ == "__main__":
    from rear_ds.training import launch_env

    launch_env.run_and_exit(main)
