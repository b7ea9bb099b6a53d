"""The rear_ds benchmark suite: one command, JSON results, a human table in BENCHMARKS.md.

    python -m bench.run                      # full CPU benchmark (~10-15 min on 2 cores)
    python -m bench.run --quick              # CI smoke: tiny sizes, 1 repeat, asserts nothing about speed
    python -m bench.run --gpu                # GPU plan (reAR-S/B/L); see bench/gpu.sh (< 8 min on one H200)
    python -m bench.run --only train,memory  # a subset (train, memory, zero, sampling, data, tokenize, profile, compile,
                                             # alitok)
    ALITOK_REPO=/tmp/alitok python -m bench.run --only alitok   # reAR-AliTok vs the official AliTok code

Results go to --out (default bench/results/<cpu|gpu>_<date>.json). A full (non --quick) run also rewrites its
section of BENCHMARKS.md (--no-md to skip, --md to force it in quick mode). Timing is in-process: warm-up runs,
then several repeats, median reported; CUDA events + synchronize on GPUs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from rear_ds.backends import enable_fast_kernels
from rear_ds.data.shards import write_json_atomic

from .common import REPO, machine_info, pick_device, release, size_config

SECTIONS = ("train", "memory", "zero", "sampling", "data", "tokenize", "profile", "compile", "alitok")
SCHEMA = "rear_ds.bench/1"

# Paper reference (method spec section 11): reAR-L 16.05 min/epoch on 8 x A800 ~ 166 images/s per GPU.
PAPER_L_IMAGES_PER_S_PER_GPU = 166.0


def plan_for(quick: bool, gpu: bool) -> dict:
    """What to run. Sizes are names from bench.common.size_config. ``--gpu --quick`` is the GPU plan with every
    size replaced by tiny ones and one repeat: it exercises the GPU script's code paths on a CPU."""
    if quick and gpu:
        p = plan_for(False, True)
        p.update({"train": [("tiny", 4)], "eager_sizes": ["tiny"], "compile_sizes": ["tiny"], "warmup": 1,
                  "repeats": 1, "interleaved_rounds": 1, "memory": [("tiny", 4)], "sampling": [("tiny", 2), ("tiny_256", 1)],
                  "sampling_repeats": 1, "sampling_recompute_sizes": ["tiny_256"],
                  "zero": plan_for(True, False)["zero"], "reader": plan_for(True, False)["reader"],
                  "tokenize": plan_for(True, False)["tokenize"], "profile": ("tiny", 4, 1),
                  "compile": {"size": "tiny", "whole_model": False}, "alitok": plan_for(True, False)["alitok"]})
        return p
    if quick:
        return {
            "train": [("tiny", 4)], "train_ckpt_modes": ["off", "all"], "eager_sizes": ["tiny"],
            "warmup": 1, "repeats": 1, "interleaved_rounds": 1, "compile_sizes": [],
            "memory": [("tiny", 4)], "zero": {"size": "tiny", "micro_batch": 1, "stages": "0,3", "precisions": "bf16"},
            "sampling": [("tiny", 2), ("tiny_256", 1)], "sampling_repeats": 1,
            "reader": {"micro_batch_size": 16, "num_samples": 256, "batches": 4, "num_workers": 0},
            "tokenize": {"full_size": False, "batch": 2, "iters": 1},
            "profile": ("tiny", 4, 1), "compile": {"size": "tiny", "whole_model": False},
            "alitok": {"step": ("alitok_tiny", 2), "rounds": 1, "sampling": ("alitok_tiny", 2), "sampling_rounds": 1,
                       "memory": [("alitok_tiny", 2)], "zero": None},
        }
    if gpu:
        return {
            "train": [("s", 128), ("b", 128), ("l", 128)], "train_ckpt_modes": ["off", "all"],
            "eager_sizes": ["l"], "warmup": 3, "repeats": 5, "interleaved_rounds": 6, "compile_sizes": ["l"],
            "memory": [("s", 32), ("l", 32)],
            "zero": {"size": "s", "micro_batch": 8, "stages": "0,1,2,3", "precisions": "bf16"},
            "sampling": [("s", 64), ("l", 64)], "sampling_repeats": 2, "sampling_recompute_sizes": ["s"],
            "sampling_recompute_repeats": (0, 1),
            "reader": {"micro_batch_size": 128, "num_samples": 16384, "batches": 60, "num_workers": 4},
            "tokenize": {"full_size": True, "batch": 32, "iters": 5},
            "profile": ("l", 64, 3), "compile": {"size": "tiny", "whole_model": True},
            # the paper's Fig. 5 point: reAR-B-AliTok ~19 img/s with the KV cache at batch 128 on one A800
            "alitok": {"step": ("alitok_b", 128), "rounds": 6, "sampling": ("alitok_b", 128), "sampling_rounds": 2,
                       "memory": [("alitok_b", 32)],
                       "zero": {"size": "alitok_b", "micro_batch": 8, "stages": "0,3", "precisions": "bf16"}},
        }
    return {
        "train": [("tiny", 16), ("s_d4", 4)], "train_ckpt_modes": ["off", "all"], "eager_sizes": ["tiny", "s_d4"],
        "warmup": 1, "repeats": 3, "interleaved_rounds": 6, "compile_sizes": [],
        # activation memory is a forward pass only: the real reAR-S and reAR-L fit at batch 1 on the CPU
        "memory": [("tiny", 16), ("s_d4", 4), ("s", 1), ("l", 1)],
        "zero": {"size": "s_w256", "micro_batch": 1, "stages": "0,1,2,3", "precisions": "bf16,bf16_autocast,fp32"},
        # recompute at 256 tokens is ~N/2 times the work: one timed run after no separate warm-up (each run
        # is itself 256 forward calls)
        "sampling": [("tiny", 8), ("s_w256", 2)], "sampling_repeats": 2, "sampling_recompute_repeats": (0, 1),
        "reader": {"micro_batch_size": 64, "num_samples": 8192, "batches": 40, "num_workers": 2},
        "tokenize": {"full_size": True, "batch": 2, "iters": 2},
        "profile": ("s_d4", 4, 2), "compile": {"size": "tiny", "whole_model": True},
        # AliTok-B's width and 273-token layout at 4 blocks for the races; the real AliTok-B for memory
        "alitok": {"step": ("alitok_b_d4", 4), "rounds": 6, "sampling": ("alitok_b_d4", 4), "sampling_rounds": 2,
                   "memory": [("alitok_b", 1)],
                   "zero": {"size": "alitok_b_d4", "micro_batch": 1, "stages": "0,3", "precisions": "bf16"}},
    }


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


def _over_budget(plan) -> bool:
    return bool(plan.get("deadline")) and time.time() > plan["deadline"]


class RowGuard:
    """Runs one measurement of a section; a failure (an out-of-memory, a compile error) is recorded under
    ``row_errors`` and the section goes on with its other rows, so one bad row does not lose the rest."""

    def __init__(self, dev, log):
        self.dev, self.log, self.errors = dev, log, []

    def __call__(self, rows: list, label: str, fn) -> None:
        self.log(label)
        try:
            rows.append(fn())
        except Exception as e:
            self.errors.append({"row": label, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-3000:]})
            self.log(f"{label} FAILED: {type(e).__name__}: {e}")
            release(self.dev)


def sec_train(plan, dev, log):
    from .train_step import bench_interleaved, bench_train

    rows, interleaved, skipped, run = [], [], [], RowGuard(dev, log)
    for size, batch in plan["train"]:
        if _over_budget(plan):
            skipped.append(f"{size}: time budget exhausted")
            continue
        cfg = size_config(size)
        for mode in plan["train_ckpt_modes"]:
            run(rows, f"train rear {size} B={batch} ckpt={mode}",
                lambda: bench_train("rear", size, cfg, batch, dev, mode, plan["warmup"], plan["repeats"]))
        if size in plan["compile_sizes"] and dev.type == "cuda":
            run(rows, f"train rear {size} B={batch} per-block torch.compile",
                lambda: bench_train("rear", size, cfg, batch, dev, "off", plan["warmup"] + 2, plan["repeats"],
                                    compile_blocks=True))
        if size in plan["eager_sizes"]:
            run(rows, f"train eager {size} B={batch}",
                lambda: bench_train("eager", size, cfg, batch, dev, "off", plan["warmup"], plan["repeats"]))
            run(interleaved, f"train rear / rear ckpt=all / eager {size} B={batch}, "
                f"{plan['interleaved_rounds']} interleaved rounds",
                lambda: bench_interleaved(size, cfg, batch, dev, plan["warmup"], plan["interleaved_rounds"]))
    return {"results": rows, "interleaved": interleaved, "not_run": skipped, "row_errors": run.errors}


def sec_memory(plan, dev, log):
    from .train_step import bench_activation_memory

    rows, run = [], RowGuard(dev, log)
    for size, batch in plan["memory"]:
        run(rows, f"activation memory {size} B={batch}",
            lambda: bench_activation_memory(size, size_config(size), batch, dev))
    return {"results": rows, "row_errors": run.errors}


def sec_zero(plan, dev, log, out_dir, z=None, name="zero_memory.json"):
    """ZeRO memory per process under the real launcher (2 processes); ``z`` defaults to plan["zero"]."""
    z = z or plan["zero"]
    ngpu = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and ngpu < 2:
        return {"skipped": f"ZeRO memory needs 2 processes with one device each; this machine has {ngpu} GPU(s)"}
    launcher = subprocess.run(["which", "deepspeed"], capture_output=True, text=True).stdout.strip()
    if not launcher:
        return {"skipped": "the deepspeed launcher is not on PATH"}
    out = os.path.join(out_dir, name)
    port = str(29500 + 1 + os.getpid() % 2000)  # not the default port: other jobs may share the machine
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, os.path.join(REPO, "bench", "zero_memory.py"), "--size", z["size"],
           "--micro-batch", str(z["micro_batch"]), "--stages", z["stages"], "--precisions", z["precisions"],
           "--out", out]
    log("zero: " + " ".join(cmd))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if p.returncode != 0 or not os.path.isfile(out):
        tail = (p.stdout + p.stderr)[-3000:]
        raise RuntimeError(f"deepspeed launch failed (rc {p.returncode}):\n{tail}")
    with open(out) as f:
        doc = json.load(f)
    doc["command"] = " ".join(shlex.quote(c) for c in cmd)
    doc["launch_wall_s"] = time.time() - t0
    return doc


def sec_sampling(plan, dev, log):
    from .sampling_bench import bench_sampling

    rows, run = [], RowGuard(dev, log)
    for size, batch in plan["sampling"]:
        cfg = size_config(size)
        run(rows, f"sampling {size} B={batch} N={cfg.num_tokens}",
            lambda: bench_sampling(size, cfg, batch, dev, warmup=1, repeats=plan["sampling_repeats"],
                                   recompute=size in plan.get("sampling_recompute_sizes", [size]),
                                   recompute_repeats=plan.get("sampling_recompute_repeats")))
    return {"results": rows, "row_errors": run.errors}


def sec_data(plan, dev, log):
    from .data_bench import bench_reader_throughput

    log("shard reader")
    return bench_reader_throughput(**plan["reader"])


def sec_tokenize(plan, dev, log):
    from .data_bench import bench_tokenization

    log("tokenization")
    return bench_tokenization(device=dev, **plan["tokenize"])


def sec_profile(plan, dev, log):
    from .profile_step import profile_train_step

    size, batch, steps = plan["profile"]
    log(f"profile {size} B={batch}")
    res = profile_train_step(size_config(size), batch, dev, steps=steps)
    res["size"] = size
    return res


def sec_alitok(plan, dev, log, out_dir):
    from .alitok_bench import bench_sampling_vs_official, bench_step_vs_official
    from .train_step import bench_activation_memory

    a, rows, run = plan["alitok"], {}, RowGuard(dev, log)
    size, batch = a["step"]
    step, samp, mem, zero = [], [], [], []
    run(step, f"alitok train step {size} B={batch} vs the official AliTok code, {a['rounds']} interleaved rounds",
        lambda: bench_step_vs_official(size, size_config(size), batch, dev, rounds=a["rounds"]))
    size, batch = a["sampling"]
    run(samp, f"alitok KV-cache sampling {size} B={batch} vs the official generate()",
        lambda: bench_sampling_vs_official(size, size_config(size), batch, dev, rounds=a["sampling_rounds"]))
    for size, batch in a["memory"]:
        run(mem, f"alitok activation memory {size} B={batch}",
            lambda: bench_activation_memory(size, size_config(size), batch, dev))
    if a["zero"]:
        run(zero, f"alitok ZeRO memory {a['zero']['size']}",
            lambda: sec_zero(plan, dev, log, out_dir, a["zero"], "zero_memory_alitok.json"))
    rows = {"step_vs_official": step, "sampling_vs_official": samp, "memory": mem, "zero": zero}
    skipped = [f"{r['size']}: {r['skipped']}" for r in step + samp if "skipped" in r]
    return {"results": rows, "not_run": skipped, "row_errors": run.errors}


def sec_compile(plan, dev, log):
    from .compile_check import compile_check

    log("torch._dynamo.explain (graph breaks)")
    return compile_check(plan["compile"]["size"], whole_model=plan["compile"]["whole_model"])


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------


def _find(rows, **kw):
    for r in rows or []:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(res: dict, dev) -> dict:
    S = res["sections"]
    t: dict = {}
    train = S.get("train", {}).get("results")
    mem = S.get("memory", {}).get("results")
    if train:
        big = train[-1]["size"]  # the largest size trained (last in the plan)
        inter = _find(S["train"].get("interleaved") or [], size=big)
        m = _find(mem, size=big)
        if inter:  # rear, rear ckpt=all and eager stepped in turns in one process: medians of per-round ratios
            method = f"median of {inter['rounds']} interleaved rounds"
            over, ratio = inter["ckpt_time_overhead"], inter["rear_over_eager"]
            red = m.get("reduction_x") if m else None
            t["ckpt_activation_memory"] = {
                "target": ">= 3x less activation memory for <= 40% more step time", "size": big,
                "reduction_x": red, "time_overhead": over["median"], "method": method,
                "time_overhead_range": [over["min"], over["max"]],
                "met": (red is not None and red >= 3 and over["median"] <= 0.40)}
            t["vs_eager"] = {"target": "step time <= the eager reference's (ratio <= 1)", "size": big,
                             "rear_over_eager_step_time": ratio["median"], "speedup_x": 1 / ratio["median"],
                             "met": ratio["median"] <= 1.0, "method": method,
                             "ratio_range": [ratio["min"], ratio["max"]],
                             # the same comparison without the optimizer (forward + loss + backward only)
                             "fwd_bwd_rear_over_eager": inter["fwd_bwd_rear_over_eager"]["median"]}
        else:  # say so rather than drop the targets (e.g. the time budget ran out before the eager size)
            note = f"not measured: no interleaved rounds for size {big}"
            t["ckpt_activation_memory"] = {"target": ">= 3x less activation memory for <= 40% more step time",
                                           "size": big, "reduction_x": m.get("reduction_x") if m else None,
                                           "time_overhead": None,
                                           "method": note, "time_overhead_range": [None, None], "met": None}
            t["vs_eager"] = {"target": "step time <= the eager reference's (ratio <= 1)", "size": big,
                             "rear_over_eager_step_time": None, "speedup_x": None, "met": None, "method": note,
                             "ratio_range": [None, None]}
        # the best reAR-L step without checkpointing (eager blocks or per-block compiled)
        lrows = [r for r in train if r["impl"] == "rear" and r["size"] == "l" and r["ckpt"] == "off"]
        lrow = max(lrows, key=lambda r: r["mfu"] or 0.0) if lrows else None
        peak_known = res["machine"]["peak_bf16_tflops"] is not None
        t["mfu_l"] = {"target": ">= 50% MFU for reAR-L (bf16, full loss) on H100/H200",
                      "mfu": lrow["mfu"] if lrow else None, "compile_blocks": lrow["compile_blocks"] if lrow else None,
                      "samples_per_s": lrow["samples_per_s"] if lrow else None,
                      "met": (lrow["mfu"] >= 0.5) if (lrow and lrow["mfu"] is not None) else None,
                      "fraction_of_measured_gemm": (lrow["achieved_tflops"] / res["machine"]["measured_bf16_gemm_tflops"]
                                                    if lrow and res["machine"].get("measured_bf16_gemm_tflops") else None),
                      "note": None if (lrow and peak_known) else "needs a GPU with a known peak (CPU: MFU is null)"}
    if mem:
        t["ckpt_activation_memory_full_sizes"] = {
            r["size"]: {"reduction_x": r.get("reduction_x"), "batch": r["batch"]}
            for r in mem if r["size"] in ("s", "b", "l")} or None
    z = S.get("zero", {}).get("summary")
    if z:
        prec = "bf16" if "bf16" in z else next(iter(z))
        r3 = z[prec].get("zero3", {}).get("ratio_vs_zero0")
        t["zero3_vs_zero0"] = {"target": "ZeRO-3 params+grads+optimizer per process <= 0.55x ZeRO-0 (2 processes)",
                               "precision": prec, "ratio": r3, "met": r3 is not None and r3 <= 0.55,
                               "all": {p: {k: v["ratio_vs_zero0"] for k, v in z[p].items()} for p in z}}
    samp = S.get("sampling", {}).get("results")
    if samp:
        r256 = [r for r in samp if r["num_tokens"] == 256 and r.get("kv_speedup_x")]
        if r256:
            r = r256[-1]
            t["kv_cache_speedup"] = {"target": ">= 8x faster than recompute for 256 tokens", "size": r["size"],
                                     "speedup_x": r["kv_speedup_x"], "met": r["kv_speedup_x"] >= 8}
    d = S.get("data", {})
    rows = [r for r in train or [] if r["impl"] == "rear" and r["ckpt"] == "off"]
    if "samples_per_s" in d and rows:
        fastest = max(r["samples_per_s"] for r in rows)
        big = rows[-1]
        t["reader_vs_step"] = {"target": "shard reader >= 10x the training step's consumption",
                               "reader_samples_per_s": d["samples_per_s"],
                               "per_order": {o: v["samples_per_s"] / big["samples_per_s"]
                                             for o, v in d.get("orders", {}).items()},
                               "step_samples_per_s": big["samples_per_s"], "step_size": big["size"],
                               "ratio": d["samples_per_s"] / big["samples_per_s"],
                               "met": d["samples_per_s"] / big["samples_per_s"] >= 10,
                               "ratio_vs_fastest_size": d["samples_per_s"] / fastest,
                               "ratio_vs_paper_L_per_gpu_166": d["samples_per_s"] / PAPER_L_IMAGES_PER_S_PER_GPU}
    return t


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _f(x, nd=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"
    return str(x)


def _pct(x):
    return None if x is None else 100 * x


def _mib(b):
    return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def markdown(res: dict) -> str:
    m, S, T = res["machine"], res["sections"], res["targets"]
    L = []
    L.append(f"### {res['plan'].upper()} run {m['date']}")
    L.append("")
    L.append(f"- command: `{res['command']}`  (results JSON: `{res['out_rel']}`)")
    L.append(f"- machine: {m['cpu_model']}, {m['cpu_cores_visible']} cores visible ({m['torch_threads']} torch threads), "
             f"CPU bf16 ISA {m['cpu_bf16_isa'] or 'none'}; device **{m['device_name']}**; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}, python {m['python']}")
    L.append(f"- git commit: {m['git_commit']}; elapsed {res['elapsed_s']:.0f} s")
    if res.get("noise_note"):
        L.append(f"- note: {res['noise_note']}")
    L.append("")
    L.append("**Targets**")
    L.append("")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    if "vs_eager" in T:
        x = T["vs_eager"]
        lo, hi = x["ratio_range"]
        L.append(f"| step time vs eager reference ({x['size']}) | rear/eager = {_f(x['rear_over_eager_step_time'])} "
                 f"({x['method']}; rounds ranged {_f(lo)}-{_f(hi)}; forward + loss + backward alone "
                 f"{_f(x.get('fwd_bwd_rear_over_eager'))}) | {x['met']} |")
    if "ckpt_activation_memory" in T:
        x = T["ckpt_activation_memory"]
        lo, hi = x["time_overhead_range"]
        L.append(f"| activation checkpointing ({x['size']}): >=3x less memory, <=40% more time | "
                 f"{_f(x['reduction_x'])}x less, {_f(_pct(x['time_overhead']), 1)}% more time ({x['method']}; "
                 f"rounds ranged {_f(_pct(lo), 1)}-{_f(_pct(hi), 1)}%) | {x['met']} |")
    if T.get("ckpt_activation_memory_full_sizes"):
        L.append("| (activation memory reduction at the real sizes) | " + ", ".join(
            f"reAR-{k.upper()} {_f(v['reduction_x'])}x (batch {v['batch']})"
            for k, v in T["ckpt_activation_memory_full_sizes"].items()) + " | |")
    if "zero3_vs_zero0" in T:
        x = T["zero3_vs_zero0"]
        L.append(f"| ZeRO-3 / ZeRO-0 params+grads+optimizer per process, 2 procs ({x['precision']}) | "
                 f"{_f(x['ratio'])}x | {x['met']} |")
    if "kv_cache_speedup" in T:
        x = T["kv_cache_speedup"]
        L.append(f"| KV cache vs recompute, 256 tokens, CFG ({x['size']}) | {_f(x['speedup_x'], 1)}x | {x['met']} |")
    if "reader_vs_step" in T:
        x = T["reader_vs_step"]
        per = "".join(f"; {o} order {_f(r, 0)}x" for o, r in x.get("per_order", {}).items())
        L.append(f"| shard reader vs training-step consumption ({x['step_size']}) | {_f(x['reader_samples_per_s'], 0)} vs "
                 f"{_f(x['step_samples_per_s'])} samples/s = {_f(x['ratio'], 0)}x (vs the paper's 166 img/s/GPU: "
                 f"{_f(x['ratio_vs_paper_L_per_gpu_166'], 1)}x{per}) | {x['met']} |")
    if "mfu_l" in T:
        x = T["mfu_l"]
        how = "" if x["mfu"] is None else (" (per-block torch.compile)" if x.get("compile_blocks") else " (eager blocks)")
        gemm = "" if x.get("fraction_of_measured_gemm") is None else (
            f" = {_f(x['fraction_of_measured_gemm'])} of the measured bf16 GEMM rate "
            f"({_f(m.get('measured_bf16_gemm_tflops'), 0)} TFLOP/s)")
        measured = ("not measured" if x["mfu"] is None else
                    f"{_f(x['mfu'])}{how}{gemm}, {_f(x['samples_per_s'], 1)} samples/s (paper: 166 per A800)")
        L.append(f"| reAR-L MFU >= 50% (H100/H200) | {measured}{': ' + x['note'] if x.get('note') else ''} | "
                 f"{x['met']} |")
    L.append("")
    for name in SECTIONS:
        sec = S.get(name, {})
        if "skipped" in sec or "error" in sec:
            L.append(f"- **{name}**: {'skipped: ' + sec['skipped'] if 'skipped' in sec else 'ERROR: ' + sec['error'][:300]}")
    tr = S.get("train", {}).get("results")
    if tr:
        L.append("")
        L.append("**Training step** (forward + full reAR loss + backward + clip + AdamW, bf16 autocast; median of repeats)")
        L.append("")
        L.append("| impl | size | batch | ckpt | compile | step s (median) | samples/s | tokens/s | TFLOP/s | MFU | peak mem MiB | first step s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in tr:
            L.append(f"| {r['impl']} | {r['size']} | {r['batch']} | {r['ckpt']} | {r['compile_blocks']} | "
                     f"{_f(r['step_time']['median_s'], 3)} | {_f(r['samples_per_s'])} | {_f(r['tokens_per_s'], 0)} | "
                     f"{_f(r['achieved_tflops'], 3)} | {_f(r['mfu'])} | {_mib(r['peak_mem_bytes'])} | "
                     f"{_f(r.get('first_step_s'), 2)} |")
        for p in S["train"].get("interleaved") or []:
            L.append("")
            L.append(f"Interleaved rounds, {p['size']} batch {p['batch']} (the targets' numbers; optimizers: "
                     + ", ".join(f"{n} {o}" for n, o in p["optimizers"].items()) + "), step s: "
                     + "; ".join(f"{n} " + ", ".join(_f(t, 3) for t in v) for n, v in p["step_s"].items()))
    mem = S.get("memory", {}).get("results")
    if mem:
        L.append("")
        L.append("**Activation memory** (" + mem[0]["modes"]["off"]["method"] + ")")
        L.append("")
        L.append("| size | batch | ckpt off MiB | ckpt all MiB | reduction |")
        L.append("|---|---|---|---|---|")
        for r in mem:
            L.append(f"| {r['size']} | {r['batch']} | {_mib(r['modes']['off']['activation_bytes'])} | "
                     f"{_mib(r['modes']['all']['activation_bytes'])} | {_f(r.get('reduction_x'))}x |")
    z = S.get("zero", {})
    if z.get("results"):
        L.append("")
        L.append(f"**ZeRO memory per process** ({z['world_size']} processes, size {z['size']}, "
                 f"{z['param_count'] / 1e6:.2f}M params, accelerator {z['accelerator']}; persistent state after "
                 f"backward/step, MiB, max over ranks)")
        L.append("")
        L.append("| precision | stage | optimizer wrapper | params | grads | optimizer (+fp32 master) | other | p+g+o | vs ZeRO-0 | step s (CPU, noisy) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in z["results"]:
            worst = max(r["ranks"], key=lambda x: x["bytes"]["params_grads_optimizer"])
            b = worst["bytes"]
            ratio = z["summary"][r["precision"]][f"zero{r['stage']}"]["ratio_vs_zero0"]
            st = worst["step_time_s"]
            L.append(f"| {r['precision']} | {r['stage']} | {worst['optimizer_wrapper']} | {_mib(b['params'])} | "
                     f"{_mib(b['grads'])} | {_mib(b['optimizer'])} | {_mib(b['other'])} | "
                     f"{_mib(b['params_grads_optimizer'])} | {_f(ratio)} | {_f(min(st), 2) if st else 'n/a'} |")
    sm = S.get("sampling", {}).get("results")
    if sm:
        L.append("")
        L.append("**Sampling** (classifier-free guidance: doubled batch; images/s)")
        L.append("")
        L.append("| size | tokens | batch | precision | KV cache img/s | recompute img/s | KV speedup | same tokens |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in sm:
            rc = r["modes"].get("recompute")
            L.append(f"| {r['size']} | {r['num_tokens']} | {r['batch']} | {r['precision']} | "
                     f"{_f(r['modes']['kv_cache']['images_per_s'], 3)} | {_f(rc['images_per_s'], 3) if rc else 'n/a'} | "
                     f"{_f(r.get('kv_speedup_x'), 1)}x | {r.get('same_tokens')}"
                     + (f" ({100 * r['token_match_fraction']:.2f}% equal)" if r.get("same_tokens") is False else "")
                     + " |")
    d, tk = S.get("data", {}), S.get("tokenize", {})
    if "samples_per_s" in d or "images_per_s" in tk:
        L.append("")
        L.append("**Data**")
        L.append("")
        if "samples_per_s" in d:
            L.append(f"- shard reader: {_f(d['samples_per_s'], 0)} samples/s (micro-batch {d['micro_batch_size']}, "
                     f"{d['num_workers']} workers, 256-token samples, {d['helper']})")
        for o, v in d.get("orders", {}).items():
            mx = v["mixing"]
            L.append(f"- data.order={o}: {_f(v['samples_per_s'], 0)} samples/s; mixing (one rank owning one shard of "
                     f"{mx['population']} samples, {mx['workers']} workers, micro-batch {mx['micro_batch']}, "
                     f"{mx['accum']} per step): samples shared by the micro-batches of a step {_f(mx['step_shared'])}, "
                     f"by batch j of consecutive passes {_f(mx['pass_shared'])} (independent random batches: "
                     f"{_f(mx['random_shared'])})")
        for r in tk.get("rows", [tk] if "images_per_s" in tk else []):  # one process; encode only, in fp32
            L.append(f"- tokenization: {_f(r['images_per_s'], 3)} images/s ({r['tokenizer']} {r['image_size']}px, "
                     f"{r.get('num_tokens', 256)} tokens, {r['params'] / 1e6:.1f}M params, batch {tk['batch']}, "
                     f"{tk['weights']}, {tk.get('precision', 'fp32')})")
        if "alitok_vs_maskgit_x" in tk:
            L.append(f"- tokenization, AliTok / MaskGIT-VQGAN at the same batch: {tk['alitok_vs_maskgit_x']:.2f}x")
    pr = S.get("profile", {})
    if pr.get("families"):
        L.append("")
        L.append(f"**Profile** of the training step ({pr['size']}, batch {pr['batch']}, {pr['metric']}): "
                 + ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in pr["families"].items()))
        L.append("")
        L.append("| op | self ms / step | share | calls / step |")
        L.append("|---|---|---|---|")
        for o in pr["top_ops"][:10]:
            L.append(f"| `{o['op']}` | {_f(o['self_ms_per_step'], 1)} | {100 * o['share']:.1f}% | {_f(o['calls_per_step'], 0)} |")
    c = S.get("compile", {})
    if c.get("size"):
        parts = [f"{k}: {v['graph_count']} graph(s), {v['graph_break_count']} break(s)"
                 for k, v in c.items() if isinstance(v, dict) and "graph_count" in v]
        L.append("")
        L.append(f"**torch.compile check** ({c['size']}, torch._dynamo.explain): {c['status']}; " + "; ".join(parts))
    L += alitok_markdown(S.get("alitok", {}).get("results"))
    return "\n".join(L) + "\n"


def alitok_markdown(rows) -> list:
    if not rows:
        return []
    L = ["", "**reAR-AliTok vs the official AliTok code** (same shape, weights and batch, interleaved rounds in one "
         "process; ratio < 1: rear_ds is faster)", ""]
    for r in rows["step_vs_official"]:
        if "skipped" in r:
            L.append(f"- training step {r['size']}: skipped: {r['skipped']}")
            continue
        med = {n: sorted(v)[len(v) // 2] for n, v in r["step_s"].items()}
        L.append(f"- training step {r['size']} ({r['params'] / 1e6:.1f}M), batch {r['batch']}, {r['precision']}: "
                 f"rear_ds (plain AliTok loss) / official = {_f(r['alitok_over_official']['median'])} (rounds "
                 f"{_f(r['alitok_over_official']['min'])}-{_f(r['alitok_over_official']['max'])}); with reAR on "
                 f"{_f(r['alitok_rear_over_official']['median'])}; forward + loss + backward alone "
                 f"{_f(r['fwd_bwd_alitok_over_official']['median'])}; median step s: "
                 + ", ".join(f"{n} {_f(t, 3)}" for n, t in med.items()))
    for r in rows["sampling_vs_official"]:
        if "skipped" in r:
            L.append(f"- KV-cache sampling {r['size']}: skipped: {r['skipped']}")
            continue
        L.append(f"- KV-cache sampling {r['size']}, batch {r['batch']} (CFG {r['guidance'][0]} / {r['guidance'][1]}, "
                 f"doubled batch, fp32): rear_ds {_f(r['images_per_s']['alitok'], 2)} img/s, official "
                 f"{_f(r['images_per_s']['official'], 2)} img/s, time ratio {_f(r['alitok_over_official']['median'])}")
    for r in rows["memory"]:
        L.append(f"- activation memory {r['size']} batch {r['batch']}: "
                 f"{_mib(r['modes']['off']['activation_bytes'])} MiB, every block checkpointed "
                 f"{_mib(r['modes']['all']['activation_bytes'])} MiB ({_f(r.get('reduction_x'))}x less)")
    for z in rows["zero"]:
        if "skipped" in z:
            L.append(f"- ZeRO memory: skipped: {z['skipped']}")
            continue
        parts = [f"{p} ZeRO-{k[4:]} {_mib(v['params_grads_optimizer_bytes_max_rank'])} MiB"
                 + ("" if k == "zero0" else f" ({_f(v['ratio_vs_zero0'])}x)")
                 for p, row in z["summary"].items() for k, v in row.items()]
        L.append(f"- ZeRO params+grads+optimizer per process, {z['size']} ({z['param_count'] / 1e6:.1f}M with the "
                 f"align heads), {z['world_size']} processes on {z['accelerator']}: " + ", ".join(parts))
    return L


MD_HEADER = """# Benchmarks

Produced by `python -m bench.run` (see `bench/run.py`; quick CI smoke: `python -m bench.run --quick`, GPU:
`bash bench/gpu.sh`). Machine-readable results are in `bench/results/*.json`. Each run below replaces the
previous run of the same kind (CPU / GPU); the notes at the end are written by hand.
"""


def update_markdown(path: str, res: dict) -> None:
    key = res["plan"]
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{markdown(res)}{end}\n"
    text = open(path).read() if os.path.isfile(path) else MD_HEADER + "\n## Latest GPU run\n\n" \
        "<!-- bench:gpu:start -->\n(no GPU run recorded yet)\n<!-- bench:gpu:end -->\n\n## Latest CPU run\n\n" \
        "<!-- bench:cpu:start -->\n<!-- bench:cpu:end -->\n"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end) + 1
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n## Latest {key.upper()} run\n\n" + block
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (CI smoke; asserts nothing)")
    ap.add_argument("--gpu", action="store_true", help="the GPU plan (S/B/L); on a CPU-only machine it runs on the CPU")
    ap.add_argument("--out", default="", help="results JSON (default bench/results/<cpu|gpu>_<date>.json)")
    ap.add_argument("--only", default="", help=f"comma list of sections: {','.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--md", default=None, help="BENCHMARKS.md path to update (default: the repo's, full runs only)")
    ap.add_argument("--no-md", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="stop starting new sections / sizes after this many seconds (recorded as skipped)")
    ap.add_argument("--threads", type=int, default=-1,
                    help="torch CPU threads (default: 1 with --quick, else torch's default; on a CPU shared with "
                         "other jobs, 1 avoids the thread-pool stalls of an oversubscribed machine)")
    args = ap.parse_args(argv)
    threads = args.threads if args.threads > 0 else (1 if args.quick else 0)
    if threads:
        torch.set_num_threads(threads)

    enable_fast_kernels()  # the same process-wide kernel switches as rear_ds/train.py and rear_ds/sample.py
    dev = pick_device(want_gpu=True)
    plan_kind = "gpu" if dev.type == "cuda" else "cpu"
    plan = plan_for(args.quick, args.gpu)
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    skip = [s for s in args.skip.split(",") if s]
    bad = [s for s in only + skip if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    date = dt.date.today().isoformat()
    out = args.out or os.path.join(REPO, "bench", "results", f"{plan_kind}_{date}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    t_start = time.time()
    plan["deadline"] = t_start + args.budget_s if args.budget_s > 0 else 0

    def log(msg):
        print(f"[bench {time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    res = {
        "schema": SCHEMA,
        "command": "python -m bench.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "mode": "quick" if args.quick else "full", "plan": plan_kind, "gpu_plan": args.gpu,
        "machine": machine_info(dev),
        "noise_note": None if dev.type == "cuda" else (
            "CPU numbers from a machine whose cores are shared with other jobs: expect +-20% noise; ratios "
            "measured in the same run are more meaningful than absolute numbers"),
        "plan_detail": {k: v for k, v in plan.items()},
        "complete": False,  # true once every section ran and the targets were computed
        "sections": {},
    }
    res["out_rel"] = os.path.relpath(os.path.abspath(out), REPO)
    with tempfile.TemporaryDirectory(prefix="rear_bench_") as tmp:
        runners = {"train": sec_train, "memory": sec_memory, "sampling": sec_sampling, "data": sec_data,
                   "tokenize": sec_tokenize, "profile": sec_profile, "compile": sec_compile,
                   # these two launch processes that write into tmp
                   "zero": lambda *a: sec_zero(*a, tmp), "alitok": lambda *a: sec_alitok(*a, tmp)}
        for name in SECTIONS:
            if name not in only or name in skip:
                res["sections"][name] = {"skipped": "not selected (--only/--skip)", "status": "skipped"}
                continue
            if _over_budget(plan):
                res["sections"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s exhausted",
                                         "status": "skipped"}
                continue
            t0 = time.time()
            try:
                sec = runners[name](plan, dev, log)
                sec.setdefault("status", "skipped" if "skipped" in sec else "ok")
                if sec.get("row_errors"):  # the other rows were kept; the run still fails
                    sec["status"] = "error"
                    sec["error"] = "; ".join(f"{e['row']}: {e['error']}" for e in sec["row_errors"])
            except Exception as e:  # record and go on: one broken component must not hide the others
                sec = {"status": "error", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-4000:]}
                log(f"{name} FAILED: {type(e).__name__}: {e}")
            sec["wall_s"] = time.time() - t0
            res["sections"][name] = sec
            res["elapsed_s"] = time.time() - t_start
            write_json_atomic(out, res, sort_keys=False, default=str)  # after every section: a run killed by a timeout keeps what it measured
    res["targets"] = targets(res, dev)
    res["elapsed_s"] = time.time() - t_start
    res["complete"] = True
    write_json_atomic(out, res, sort_keys=False, default=str)
    log(f"wrote {out}")
    md = args.md or (None if args.quick else os.path.join(REPO, "BENCHMARKS.md"))
    if md and not args.no_md:
        update_markdown(md, res)
        log(f"updated {md}")
    print(markdown(res))
    return 0 if all(s.get("status") != "error" for s in res["sections"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
