"""torch.profiler over a few training steps: where the time goes, grouped by operator family."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from rear_ds.config import ModelConfig

from .train_step import StepRunner

FAMILIES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "aten::_addmm_activation")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "aten::_softmax",
                   "aten::softmax", "_safe_softmax", "aten::_softmax_backward_data")),
    ("layernorm", ("layer_norm",)),
    ("optimizer", ("aten::_foreach", "Optimizer.step", "aten::_fused_adam")),
    ("grad_clip", ("aten::linalg_vector_norm", "aten::norm")),
    ("dtype_copies", ("aten::to", "aten::_to_copy", "aten::copy_")),
    ("embedding", ("embedding",)),
    ("dropout", ("dropout", "aten::bernoulli")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
]


def _family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other elementwise / misc"


def profile_train_step(cfg: ModelConfig, batch: int, device: torch.device, steps: int = 2, top: int = 15,
                       impl: str = "rear", ckpt: str = "off") -> dict:
    r = StepRunner(impl, cfg, batch, device, ckpt=ckpt)
    r.step()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        for _ in range(steps):
            r.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return {"impl": impl, "batch": batch, "ckpt": ckpt,
            **summarize(prof.key_averages(), on_gpu=device.type == "cuda", steps=steps, top=top)}


def summarize(events, on_gpu: bool, steps: int, top: int = 15) -> dict:
    """Top operators and operator families from ``prof.key_averages()`` rows.

    On the CPU each operator row's self CPU time is used. On a GPU the kernels appear twice, as rows of their
    own and inside the device time of the operator that launched them, so only the operator (CPU-side) rows
    are kept and their self *device* time is used: each kernel's time is credited once, to its operator."""
    from torch.autograd import DeviceType

    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [e for e in events if not e.key.startswith("ProfilerStep")
              and (not on_gpu or getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU)]
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, key))
    fam: dict = {}
    for e in events:
        f = _family(e.key)
        fam[f] = fam.get(f, 0.0) + getattr(e, key)
    return {
        "steps": steps, "metric": key,
        "top_ops": [{"op": e.key, "self_ms_per_step": getattr(e, key) / 1000 / steps,
                     "share": getattr(e, key) / total, "calls_per_step": e.count / steps} for e in rows[:top]],
        "families": {k: {"self_ms_per_step": v / 1000 / steps, "share": v / total}
                     for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
    }
