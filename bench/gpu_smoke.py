"""The trainer on a GPU under the real launcher: short `deepspeed --num_gpus 1 rear_ds/train.py` runs of
configs/tiny.yaml and configs/tiny_alitok.yaml on made-up class-dependent tokens (bench/gpu.sh runs this before the benchmark).

    python -m bench.gpu_smoke --out DIR      # writes DIR/gpu_smoke.json; exit 1 if a run failed

Runs (each must exit 0 and log finite losses that fall):
- ZeRO-2 bf16 with per-block torch.compile, 10 steps, then a second launch that resumes from the step-10
  checkpoint and goes on to step 20 (the restored fused-AdamW state must live on the GPU);
- ZeRO-2 bf16_autocast, 12 steps;
- ZeRO-3 bf16 with activation checkpointing, 12 steps;
- the AliTok family (tiny_alitok) under ZeRO-2 bf16 with per-block torch.compile, 12 steps.
Nothing here needs a GPU: on a CPU the same runs go through DeepSpeed's CPU accelerator (compile is then
ignored with a warning, as the trainer documents).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

from rear_ds.config import load_config
from rear_ds.data.shards import write_json_atomic
from rear_ds.demo import free_port
from rear_ds.training.metrics import read_run_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = [  # name, config, DeepSpeed JSON, overrides, steps then (optionally) steps after a resume
    ("zero2_bf16_compile", "tiny.yaml", "zero2_bf16.json", ["train.compile=true"], 10, 20),
    ("zero2_bf16_autocast", "tiny.yaml", "zero2_bf16_autocast.json", ["train.precision=bf16_autocast"], 12, None),
    ("zero3_bf16_ckpt", "tiny.yaml", "zero3_bf16.json", ["train.activation_checkpointing=all"], 12, None),
    # the second generator family (RoPE, RMSNorm in fp32, token dropout) under per-block compile
    ("alitok_zero2_bf16_compile", "tiny_alitok.yaml", "zero2_bf16.json", ["train.compile=true"], 12, None),
]


def write_tokens(path: str, n: int = 1024, num_classes: int = 10, num_tokens: int = 16, k: int = 64) -> str:
    """A JSONL of tokens that depend on the class, so the loss falls within a few steps (also the tests' data)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            c = rng.randrange(num_classes)
            f.write(json.dumps({"class_id": c, "tokens": [(c * 6 + j + rng.randrange(2)) % k
                                                          for j in range(num_tokens)]}) + "\n")
    return path


def launch(config: str, ds_json: str, overrides: list, timeout: int) -> tuple:
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), os.path.join(REPO, "rear_ds", "train.py"),
           "--deepspeed_config", os.path.join(REPO, "ds_configs", ds_json),
           "--config", os.path.join(REPO, "configs", config), *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, output = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    return rc, output if isinstance(output, str) else output.decode(errors="replace"), time.time() - t0, cmd


def one_run(name: str, config: str, ds_json: str, extra: list, steps: int, resume_to, work: str,
            timeout: int) -> dict:
    out_dir = os.path.join(work, name)
    num_tokens = load_config(os.path.join(REPO, "configs", config)).model.num_tokens
    data = write_tokens(os.path.join(work, f"tokens_{num_tokens}.jsonl"), num_tokens=num_tokens)
    base = [f"train.out_dir={out_dir}", f"data.jsonl={data}", "data.num_workers=0", "train.allow_random_tokenizer=true",
            "train.log_every=1", "train.ckpt_every=10", "train.keep_last=3", "train.sample_every=0", *extra]
    res = {"name": name, "config": config, "ds_config": ds_json, "overrides": extra, "launches": []}
    plan = [steps] + ([resume_to] if resume_to else [])
    for max_steps in plan:
        rc, output, wall, cmd = launch(config, ds_json, base + [f"train.max_steps={max_steps}"], timeout)
        res["launches"].append({"max_steps": max_steps, "rc": rc, "wall_s": round(wall, 1),
                                "command": " ".join(cmd), "output_tail": output[-2500:] if rc != 0 else ""})
        if rc != 0:
            break
    recs, events = read_run_log(out_dir)
    starts = [e for e in events if e["event"] == "start"]
    losses = [recs[s]["loss"] for s in sorted(recs)]
    last = recs[max(recs)] if recs else {}
    res.update({
        "steps_logged": sorted(recs), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "start_steps": [s.get("start_step") for s in starts], "device": starts[0].get("device") if starts else None,
        "optimizer_impl": starts[0].get("optimizer_impl") if starts else None,
        "samples_per_s": last.get("samples_per_s"), "mfu": last.get("mfu"), "peak_mem_gb": last.get("peak_mem_gb"),
    })
    ok = all(l["rc"] == 0 for l in res["launches"]) and len(losses) >= 2
    ok = ok and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    ok = ok and max(recs, default=0) == plan[-1]
    ok = ok and res["start_steps"] == [0] + plan[:-1]  # the second launch resumed where the first stopped
    res["ok"] = bool(ok)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_smoke.json")
    ap.add_argument("--work", default="/tmp/rear_gpu_smoke", help="scratch folder for the runs (emptied first)")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per launch")
    ap.add_argument("--runs", default="", help=f"comma list of runs (default all: {','.join(r[0] for r in RUNS)})")
    args = ap.parse_args(argv)
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(wanted) - {r[0] for r in RUNS})
    if unknown:
        ap.error(f"--runs: unknown {unknown}; expected names from {[r[0] for r in RUNS]}")
    if shutil.which("deepspeed") is None:
        print("gpu_smoke: the deepspeed launcher is not on PATH", file=sys.stderr)
        return 1
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name, config, ds_json, extra, steps, resume_to in RUNS:
        if wanted and name not in wanted:
            continue
        print(f"gpu_smoke: {name} ...", file=sys.stderr, flush=True)
        r = one_run(name, config, ds_json, extra, steps, resume_to, args.work, args.timeout)
        results.append(r)
        print(f"gpu_smoke: {name}: ok={r['ok']} loss {r['first_loss']} -> {r['last_loss']} "
              f"steps {r['steps_logged'][-1:] } walls {[l['wall_s'] for l in r['launches']]}", file=sys.stderr,
              flush=True)
        write_json_atomic(os.path.join(args.out, "gpu_smoke.json"), {"runs": results}, sort_keys=False)
    for r in results:
        if not r["ok"]:
            for l in r["launches"]:
                if l["output_tail"]:
                    print(f"--- {r['name']} (max_steps {l['max_steps']}, rc {l['rc']}):\n{l['output_tail']}",
                          file=sys.stderr)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
