"""Training-step throughput and activation memory: rear_ds's generator + objective vs the eager reference."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Optional

import torch
from torch.autograd.graph import saved_tensors_hooks

from rear_ds.config import ModelConfig, ObjectiveConfig, OptimConfig
from rear_ds.models import build_generator, count_parameters, flops_per_sample
from rear_ds.objective import ReARObjective
from rear_ds.training.optim import build_optimizer, param_groups

from .common import autocast, peak_tflops, release, sync, time_fn
from .eager_reference import EagerReAR, eager_loss


def _optimizer(impl: str, model: torch.nn.Module, device: torch.device):
    """rear: the trainer's own choice (rear_ds.training.optim, with its weight-decay groups); eager and official:
    what a straightforward implementation writes (and AliTok's trainer does), torch.optim.AdamW with its defaults
    (the foreach loop), on the same groups."""
    ocfg = OptimConfig()
    if impl == "rear":
        return build_optimizer(model, ocfg, device, offload=False)
    return (torch.optim.AdamW(param_groups(model, ocfg.weight_decay), lr=ocfg.lr, betas=tuple(ocfg.betas),
                              eps=ocfg.eps),
            "torch.optim.AdamW (defaults)")


class StepRunner:
    """One training step (zero_grad, forward + loss under autocast, backward, clip, AdamW).

    impl "rear": rear_ds's generator of cfg.family + objective (default: the full reAR loss); "eager": the eager
    reAR reference (bench/eager_reference.py); "official": the official AliTok AR model and its loss, from the
    checkout at ``official_repo`` (bench/official_alitok.py)."""

    def __init__(self, impl: str, cfg: ModelConfig, batch: int, device: torch.device, precision: str = "bf16",
                 ckpt: str = "off", seed: int = 0, compile_blocks: bool = False,
                 objective: Optional[ObjectiveConfig] = None, official_repo: Optional[str] = None):
        torch.manual_seed(seed)
        self.impl, self.cfg, self.batch, self.device, self.precision = impl, cfg, batch, device, precision
        # default: the full loss (noisy context, encode + decode alignment, class dropout)
        self.ocfg = objective or ObjectiveConfig().resolve(OptimConfig().total_steps)
        if impl == "rear":
            with torch.device(device):  # initialise on the device (fast for the big sizes on a GPU)
                self.model = build_generator(cfg)
            self.model.set_activation_checkpointing(ckpt)
            if compile_blocks:
                for i, blk in enumerate(self.model.blocks):
                    self.model.blocks[i] = torch.compile(blk)
            self.objective = ReARObjective(self.ocfg, cfg)
        elif impl == "eager":
            if ckpt != "off":
                raise ValueError("the eager reference has no activation checkpointing")
            with torch.device(device):
                self.model = EagerReAR(cfg)
        elif impl == "official":
            from .official_alitok import build_official

            with torch.device(device):
                self.model, self.official_loss = build_official(cfg, official_repo)
        else:
            raise ValueError(impl)
        self.model.train()
        self.opt, self.opt_name = _optimizer(impl, self.model, device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), generator=g).to(device)
        self.labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
        self.codebook = torch.randn(cfg.codebook_size, cfg.align_z_dim, generator=g).to(device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.step_no = 0

    def loss(self):
        with autocast(self.device, self.precision):
            if self.impl == "rear":
                loss, _ = self.objective(self.model, self.tokens, self.labels, self.codebook, step=self.step_no,
                                         generator=self.gen)
            elif self.impl == "official":  # its training step: class dropout 0.1, forward, ARLoss
                cond = self.model.preprocess_condition(self.labels, cond_drop_prob=self.ocfg.class_dropout)
                loss = self.official_loss(*self.model(self.tokens, cond, return_labels=True))[0]
            else:
                loss = eager_loss(self.model, self.ocfg, self.tokens, self.labels, self.codebook,
                                  rho=1.0, generator=self.gen)
        return loss

    def forward_backward(self):
        """The step without clipping and the optimizer: what the model and loss code alone cost."""
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step_no += 1  # no .item(): no host-device sync inside the step


def bench_train(impl: str, size: str, cfg: ModelConfig, batch: int, device: torch.device, ckpt: str = "off",
                warmup: int = 1, repeats: int = 3, precision: str = "bf16", compile_blocks: bool = False) -> dict:
    r = StepRunner(impl, cfg, batch, device, precision, ckpt, compile_blocks=compile_blocks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    r.step()  # the first step: with compile_blocks it includes compilation
    sync(device)
    first_step_s = time.perf_counter() - t0
    t = time_fn(r.step, device, max(0, warmup - 1), repeats)
    fps = flops_per_sample(cfg, include_align=True, training=True)
    sps = batch / t["median_s"]
    peak = peak_tflops(device)
    tflops = fps * sps / 1e12
    out = {
        "impl": impl, "size": size, "batch": batch, "ckpt": ckpt, "precision": precision,
        "compile_blocks": compile_blocks, "optimizer": r.opt_name, "first_step_s": first_step_s,
        "params_total": sum(p.numel() for p in r.model.parameters()),
        "params_inference": count_parameters(cfg),
        "flops_per_sample": fps, "step_time": t,
        "samples_per_s": sps, "tokens_per_s": sps * cfg.seq_len,
        "achieved_tflops": tflops, "mfu": (tflops / peak) if peak else None,
        "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    del r
    release(device)
    return out


def interleave(tasks: dict, device: torch.device, rounds: int) -> dict:
    """{name: [seconds per round]}: each task runs once per round, in an order rotated every round, so that the
    slow drifts of a shared machine hit all alike."""
    names = list(tasks)
    times: dict = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(time_fn(tasks[n], device, warmup=0, repeats=1)["median_s"])
    return times


def ratios(times: dict, a: str, b: str, minus: float = 0.0) -> dict:
    """Per-round a/b (minus ``minus``): median and range."""
    r = [x / y - minus for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def bench_interleaved(size: str, cfg: ModelConfig, batch: int, device: torch.device, warmup: int = 1,
                      rounds: int = 6, precision: str = "bf16") -> dict:
    """The two step-time targets from one process: rear (no checkpointing), rear with every block checkpointed,
    and the eager reference take turns, one step each per round, in a rotating order. The verdicts are medians
    of the per-round ratios. Forward + loss + backward alone (no clipping, no optimizer) is timed in the same
    rounds for rear and eager, so the share of the difference that comes from the optimizer is visible."""
    runners = {"rear": StepRunner("rear", cfg, batch, device, precision),
               "rear_ckpt_all": StepRunner("rear", cfg, batch, device, precision, ckpt="all"),
               "eager": StepRunner("eager", cfg, batch, device, precision)}
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    tasks = {n: r.step for n, r in runners.items()}
    tasks.update(rear_fwd_bwd=runners["rear"].forward_backward, eager_fwd_bwd=runners["eager"].forward_backward)
    times = interleave(tasks, device, rounds)
    out = {"size": size, "batch": batch, "precision": precision, "rounds": rounds, "warmup": warmup,
           "optimizers": {n: r.opt_name for n, r in runners.items()},
           "step_s": {n: [round(t, 6) for t in v] for n, v in times.items()},
           "rear_over_eager": ratios(times, "rear", "eager"),
           "ckpt_time_overhead": ratios(times, "rear_ckpt_all", "rear", minus=1.0),
           "fwd_bwd_rear_over_eager": ratios(times, "rear_fwd_bwd", "eager_fwd_bwd")}
    del runners
    release(device)
    return out


# ----------------------------------------------------------------------------------------------
# Activation memory
# ----------------------------------------------------------------------------------------------


def _is_weight_cast(t: torch.Tensor) -> bool:
    """An autocast copy of a parameter (bf16 weight, possibly seen through a transpose/view), which the
    autocast cache holds anyway: not an activation."""
    fn = t.grad_fn
    for _ in range(4):  # walk back through single-input view ops (TBackward0, ViewBackward0, ...)
        if fn is None:
            return False
        if type(fn).__name__ == "ToCopyBackward0":
            return any(n is not None and type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions)
        nxt = [n for n, _ in fn.next_functions if n is not None]
        if len(nxt) != 1 or not type(fn).__name__.endswith(("TBackward0", "ViewBackward0", "TransposeBackward0",
                                                             "PermuteBackward0", "ExpandBackward0")):
            return False
        fn = nxt[0]
    return False


def saved_activation_bytes(runner: StepRunner) -> dict:
    """Bytes of the distinct storages autograd keeps for backward after one forward + loss (CPU method).

    Counted with saved_tensors_hooks, deduplicated by storage; parameters and autocast weight copies are
    excluded (reported separately). Non-reentrant checkpointing keeps the inputs of each checkpointed block
    (outside the hooks' view): they are added through forward pre-hooks."""
    model = runner.model
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    acts: dict = {}
    casts: dict = {}

    def record(t: torch.Tensor, into: dict):
        try:
            st = t.untyped_storage()
        except Exception:  # e.g. a tensor subclass without storage
            return
        if st.data_ptr() in param_ptrs or st.nbytes() == 0:
            return
        into[st.data_ptr()] = st.nbytes()

    def pack(t):
        record(t, casts if _is_weight_cast(t) else acts)
        return t

    handles = []
    ckpt_set = getattr(model, "_checkpointed", set())
    for i, blk in enumerate(getattr(model, "blocks", [])):
        if i in ckpt_set:
            handles.append(blk.register_forward_pre_hook(
                lambda mod, args: [record(a, acts) for a in args if isinstance(a, torch.Tensor)] and None))
    runner.opt.zero_grad(set_to_none=True)
    with saved_tensors_hooks(pack, lambda t: t):
        loss = runner.loss()
    for h in handles:
        h.remove()
    del loss
    gc.collect()
    return {"activation_bytes": sum(acts.values()), "weight_cast_bytes": sum(casts.values()),
            "method": "saved_tensors_hooks (distinct storages, params and autocast weight casts excluded)"}


def gpu_peak_fwd_bwd_bytes(runner: StepRunner) -> dict:
    """GPU only, besides the saved-tensor count: peak allocated during forward + backward minus what was
    allocated before it (params, optimizer state). It also holds gradients, autocast weight copies and
    backward temporaries, so its ratio between checkpointing modes is lower than the activation ratio."""
    dev = runner.device
    runner.step()  # optimizer state exists
    runner.opt.zero_grad(set_to_none=True)
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    loss = runner.loss()
    loss.backward()
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    runner.opt.zero_grad(set_to_none=True)
    del loss
    return {"fwd_bwd_peak_minus_base_bytes": peak - base, "peak_allocated_bytes": peak, "base_allocated_bytes": base}


def bench_activation_memory(size: str, cfg: ModelConfig, batch: int, device: torch.device,
                            modes=("off", "all"), precision: str = "bf16") -> dict:
    res = {"size": size, "batch": batch, "precision": precision, "modes": {}}
    for mode in modes:
        r = StepRunner("rear", cfg, batch, device, precision, ckpt=mode)
        m = saved_activation_bytes(r)  # the same count on every device, so CPU and GPU ratios compare
        m["activation_bytes_per_sample"] = m["activation_bytes"] / batch
        if device.type == "cuda":
            m.update(gpu_peak_fwd_bwd_bytes(r))
        res["modes"][mode] = m
        del r
        gc.collect()
    if "off" in res["modes"] and "all" in res["modes"]:
        res["reduction_x"] = res["modes"]["off"]["activation_bytes"] / max(1, res["modes"]["all"]["activation_bytes"])
    return res
