"""Shared helpers: machine description, device selection, in-process timing, model-size presets."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from rear_ds.config import ModelConfig
from rear_ds.training.metrics import peak_tflops_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pick_device(want_gpu: bool = True) -> torch.device:
    return torch.device("cuda") if want_gpu and torch.cuda.is_available() else torch.device("cpu")


def peak_tflops(device: torch.device) -> Optional[float]:
    """Peak bf16 TFLOP/s of the device, None on the CPU or an unknown GPU (MFU is then null)."""
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))  # the trainer's table (dense bf16)


def measured_gemm_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> Optional[float]:
    """bf16 TFLOP/s of a large square matmul on this GPU (None on the CPU): what the datasheet peak shrinks to
    in practice (about 790 of 989 on an H200), reported next to MFU as the ceiling the matmuls can reach."""
    if device.type != "cuda":
        return None
    a, b, c = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3))

    def gemms():
        for _ in range(iters):
            torch.mm(a, b, out=c)

    t = time_fn(gemms, device, warmup=1, repeats=3)
    return 2 * n ** 3 * iters / t["median_s"] / 1e12


def release(device: torch.device) -> None:
    """Free what the last measurement left (Python garbage, then the CUDA caching allocator's blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str = "bf16"):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 1, repeats: int = 3) -> dict:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs.

    On a GPU each run is bracketed by CUDA events after a synchronize (device time of the whole step,
    including any host stalls inside it); on the CPU by perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": repeats, "warmup": warmup, "all_s": [round(t, 6) for t in times]}


def git_commit() -> str:
    """HEAD (+dirty), or $REAR_GIT_COMMIT where the tree was copied without .git (a lent GPU machine)."""
    if os.environ.get("REAR_GIT_COMMIT"):
        return os.environ["REAR_GIT_COMMIT"] + " (from REAR_GIT_COMMIT)"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
        return "none (repository has no commits yet)"
    except Exception as e:  # git missing
        return f"unknown ({type(e).__name__})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_bf16_isa": [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak_tflops(device),
        "measured_bf16_gemm_tflops": measured_gemm_tflops(device),
        "git_commit": git_commit(),
    }
    try:
        import deepspeed  # noqa: F401
        info["deepspeed"] = deepspeed.__version__
    except Exception:
        info["deepspeed"] = None
    return info


# ----------------------------------------------------------------------------------------------
# Model presets
# ----------------------------------------------------------------------------------------------

def _cfg(**kw) -> ModelConfig:
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def size_config(name: str) -> ModelConfig:
    """Model shapes used by the bench.

    tiny      configs/tiny.yaml's model (16 tokens)
    s_d4      reAR-S width (768, 16 heads, MLP 3072), 256 tokens, full vocab, but only 4 blocks (CPU)
    s_w256    a reduced-width model (256, 4 blocks) with the full 256-token sequence: CPU sampling target
    s, b, l   the released reAR-S / B / L shapes from configs/rear_{s,b,l}.yaml (GPU)
    alitok_b      reAR-B-AliTok from configs/rear_b_alitok.yaml (177M; AliTok's 273-token layout)
    alitok_b_d4   its width (768, SwiGLU 2048, 4096 codes, 1000 classes), 273 tokens, 4 blocks (CPU)
    alitok_tiny   the same layout at width 64, 2 blocks, 64 codes (quick mode)
    """
    if name == "tiny":
        return _cfg(hidden_size=64, depth=4, num_heads=4, mlp_dim=256, codebook_size=64, num_classes=10,
                    num_tokens=16, align_proj_dim=64, align_z_dim=16, encode_align_layer=0, decode_align_layer=3)
    if name == "s_d4":
        return _cfg(hidden_size=768, depth=4, num_heads=16, mlp_dim=3072, encode_align_layer=0, decode_align_layer=3)
    if name == "s_w256":
        return _cfg(hidden_size=256, depth=4, num_heads=4, mlp_dim=1024, align_proj_dim=512,
                    encode_align_layer=0, decode_align_layer=3)
    if name == "tiny_256":  # quick-mode stand-in for s_w256: 256 tokens, tiny width
        return _cfg(hidden_size=64, depth=2, num_heads=4, mlp_dim=256, align_proj_dim=64,
                    encode_align_layer=0, decode_align_layer=1)
    if name in ("s", "b", "l", "alitok_b"):  # the shipped configs are the source of truth
        from rear_ds.config import load_config
        stem = "rear_b_alitok" if name == "alitok_b" else f"rear_{name}"
        return load_config(os.path.join(REPO, "configs", f"{stem}.yaml")).model
    alitok = dict(family="alitok", num_tokens=273, prefix_tokens=17, tok_dropout=0.1, encode_align_layer=0)
    if name == "alitok_b_d4":
        return _cfg(**alitok, hidden_size=768, depth=4, num_heads=16, mlp_dim=2048, codebook_size=4096,
                    align_z_dim=32, decode_align_layer=3)
    if name == "alitok_tiny":
        return _cfg(**alitok, hidden_size=64, depth=2, num_heads=4, mlp_dim=256, codebook_size=64, num_classes=10,
                    align_proj_dim=64, align_z_dim=16, decode_align_layer=1)
    raise ValueError(f"unknown bench size {name!r}")
