"""AdamW with the reference weight-decay groups, and warmup + cosine counted in optimizer steps.

Weight decay (spec section 5): a parameter gets NO decay if it is 1-D or its name contains any of
NO_DECAY_SUBSTRINGS (case-sensitive). That notably exempts ``adaln_before_head.*`` ("ln") while the
blocks' adaLN weights decay, and decays ``cls_token`` (3-D, no excluded substring), as the reference does.
"""
from __future__ import annotations

import math

import torch

NO_DECAY_SUBSTRINGS = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed")


def _ndim(p: torch.nn.Parameter) -> int:
    # Under ZeRO-3 a parameter is partitioned at construction and looks 1-D; ds_shape is its real shape.
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return _ndim(p) == 1 or any(s in name for s in NO_DECAY_SUBSTRINGS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device, offload: bool):
    """Returns (optimizer, implementation name), both AdamW (decoupled weight decay), same hyper-parameters:
    DeepSpeedCPUAdam with ZeRO offload, otherwise torch's fused AdamW (one kernel over all tensors, on GPUs and
    on the CPU, where it is ~5x faster than the default foreach loop: 0.04 s vs 0.22 s per step for 61M
    parameters, measured on one core). apex's FusedAdam is not used even when installed: under ZeRO-3
    DeepSpeed steps one sub-group at a time, leaving the other param group empty, which apex versions handle
    differently, and apex keeps its step count per group, so its checkpoints would not resume into torch's."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "deepspeed.ops.adam.DeepSpeedCPUAdam"
    return torch.optim.AdamW(groups, fused=True, **kw), "torch.optim.AdamW(fused)"


def inner_optimizer(optimizer):
    """The innermost optimizer inside DeepSpeed's wrappers (BF16_Optimizer, DeepSpeedZeroOptimizer[_Stage3], ...)."""
    while getattr(optimizer, "optimizer", None) is not None and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


def place_optimizer_state(optimizer) -> int:
    """Move tensor optimizer state onto its parameter's device (``step`` as float32, as fused AdamW wants).

    DeepSpeed's universal-checkpoint loader writes ``state[p]["step"]`` as a CPU tensor. torch's own
    load_state_dict would move it for a fused optimizer; this path does not, and the fused CUDA kernel would
    then read a host pointer. Called after every resume; returns how many tensors it moved or cast."""
    opt, moved = inner_optimizer(optimizer), 0
    if not isinstance(opt, torch.optim.Optimizer):
        return 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in list(state.items()):
                if not torch.is_tensor(value):
                    continue
                dtype = torch.float32 if key == "step" else value.dtype
                if value.device != p.device or value.dtype != dtype:
                    state[key] = value.to(device=p.device, dtype=dtype)
                    moved += 1
    return moved


def lr_lambda(step: int, warmup: int, total: int, base: float, end: float) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (spec section 5)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + (base - end) * 0.5 * (1.0 + math.cos(math.pi * progress))) / base


def build_scheduler(optimizer, cfg):
    """A LambdaLR stepped exactly once per optimizer step (DeepSpeed does this when handed the scheduler)."""
    fn = lambda s: lr_lambda(s, cfg.warmup_steps, cfg.total_steps, cfg.lr, cfg.end_lr)  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
