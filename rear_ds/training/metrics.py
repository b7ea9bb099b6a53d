"""What a run reports: console lines, ``log.jsonl`` in the run folder, and Weights & Biases.

W&B never needs the network unless it is configured: ``wandb.mode`` (or the WANDB_MODE variable, which
wins) chooses; with neither, it is "online" only if an API key is configured, else "offline". The run id is
stored in ``<out_dir>/wandb_id`` and reused on resume, so a requeued job continues the same W&B run. Records
carry the optimizer step as the metric ``train/step`` (the x-axis of every chart) instead of W&B's own step:
a resumed run logs again the steps after its checkpoint, which W&B would drop as lower than the run's last
step. Only rank 0 logs; every number is already reduced over ranks by the caller.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Optional

import torch

from rear_ds.training import launch_env

log = logging.getLogger("rear_ds")

# Dense bf16 TFLOP/s per accelerator (no sparsity); matched as substrings of the device name, the longest
# key first ("H100 PCIe" before "H100", "GH200" before "H200"). The plain H100/H200 names are the SXM parts.
PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0,
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H800 PCIe": 756.0,
    "A100": 312.0, "A800": 312.0, "A6000": 154.8, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10": 125.0, "V100": 125.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def peak_tflops(override: float) -> Optional[float]:
    """Per-device peak, or None where unknown (the CPU: MFU is then reported as null)."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name())


def peak_tflops_of(device_name: str) -> Optional[float]:
    """The table's peak for a device name such as "NVIDIA H100 80GB HBM3", None if it is not listed."""
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


def read_run_log(out_dir: str) -> tuple:
    """A run's log.jsonl as (step -> loss record, event records in order). A resumed run appends to the same
    file and may log a step again: the last record of a step wins. ({}, []) if there is no log yet."""
    steps, events = {}, []
    path = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if "event" in rec:
                    events.append(rec)
                elif "loss" in rec and "step" in rec:
                    steps[rec["step"]] = rec
    return steps, events


def wandb_mode(cfg_mode: str) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg_mode:
        return cfg_mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.isfile(os.path.expanduser("~/.netrc")) and \
        "api.wandb.ai" in open(os.path.expanduser("~/.netrc")).read()
    return "online" if has_key else "offline"


def wandb_run_of(run_dir: str) -> dict:
    """``wandb.init`` arguments that continue the W&B run of the training run in ``run_dir``: its run id (the
    ``wandb_id`` file), project and mode (config.yaml's wandb section, chosen as for training: WANDB_MODE wins,
    offline without an API key). ValueError when the folder has no W&B run."""
    import yaml

    from rear_ds.config import WandbConfig

    id_file = os.path.join(run_dir, "wandb_id")
    if not os.path.isfile(id_file):
        raise ValueError(f"{run_dir!r} has no wandb_id file: not a training run folder (train.out_dir), or "
                         f"its training ran with wandb.enabled=false")
    cfg_path, section = os.path.join(run_dir, "config.yaml"), {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            section = (yaml.safe_load(f) or {}).get("wandb") or {}
    defaults = WandbConfig()
    with open(id_file) as f:
        run_id = f.read().strip()
    return {"project": section.get("project", defaults.project), "id": run_id, "resume": "allow",
            "mode": wandb_mode(section.get("mode", defaults.mode)), "dir": run_dir}


def log_to_wandb_run(init: dict, values: dict, step: Optional[int], prefix: str) -> str:
    """Log ``values`` as ``<prefix>/<key>`` to the run ``init`` names (see :func:`wandb_run_of`), against the
    training step (``train/step``) when it is known. W&B takes one writer per run at a time: call this when
    the training run is not writing. Returns where the values went, for the log."""
    import wandb

    run = wandb.init(**init)
    try:
        values = {f"{prefix}/{k}": v for k, v in values.items()}
        if step is not None:  # (W&B would fill an unknown step with the last one it saw)
            run.define_metric("train/step")
            run.define_metric(f"{prefix}/*", step_metric="train/step")
            values["train/step"] = step
        run.log(values)
    finally:
        run.finish()
        # finish() can return before W&B's service has written the run (wandb 0.31, offline: the first run of a
        # process had only its file header on disk); teardown waits for it.
        wandb.teardown()
    return f"W&B run {init['id']} of project {init['project']} ({init['mode']} mode, files under {init['dir']})"


class RunLogger:
    """Rank 0 only (other ranks get a RunLogger with enabled=False that does nothing)."""

    def __init__(self, out_dir: str, cfg, enabled: bool, run_info: dict):
        self.enabled = enabled
        self.out_dir = out_dir
        self.wandb = None
        self.wandb_id: Optional[str] = None
        if not enabled:
            return
        self.jsonl = open(os.path.join(out_dir, "log.jsonl"), "a", buffering=1)
        # Progress: steps this process has done so far, for the ETA (a resumed run counts from its start step).
        self.max_steps, self._t0, self._step0 = cfg.train.max_steps, time.perf_counter(), run_info["start_step"]
        launch_env.at_exit(lambda code: self.close(exit_code=code))
        self.write({"event": "start", **run_info})
        if cfg.wandb.enabled:
            import wandb

            id_file = os.path.join(out_dir, "wandb_id")
            if os.path.isfile(id_file):
                self.wandb_id = open(id_file).read().strip()
            else:
                self.wandb_id = uuid.uuid4().hex[:12]
                with open(id_file, "w") as f:
                    f.write(self.wandb_id + "\n")
            mode = wandb_mode(cfg.wandb.mode)
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.run_name or None, id=self.wandb_id,
                                    resume="allow", mode=mode, dir=out_dir, config=cfg.to_dict())
            self.wandb.define_metric("train/step")
            for pattern in ("train/*", "samples"):
                self.wandb.define_metric(pattern, step_metric="train/step")
            self.wandb.summary.update({k: v for k, v in run_info.items() if not isinstance(v, (dict, list))})
            log.info("W&B run %s (%s mode)", self.wandb_id, mode)

    def write(self, record: dict) -> None:
        if self.enabled:
            self.jsonl.write(json.dumps(record) + "\n")

    def eta_s(self, step: int) -> Optional[float]:
        """Seconds to train.max_steps at the average pace of this process so far (checkpoints, sample grids
        and evaluations included)."""
        done = step - self._step0
        return (self.max_steps - step) * (time.perf_counter() - self._t0) / done if done > 0 else None

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        training = "loss" in record  # else an evaluation record (in-training FID)
        if training:
            record["eta_s"] = self.eta_s(record["step"])
        self.write(record)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if v is not None})
        parts = [f"step {record['step']}/{self.max_steps}"]
        if training:
            eta = record["eta_s"]
            parts.append(f"eta {format_duration(eta)}" if eta is not None else "eta n/a")
        for k, fmt in (("loss", ".4f"), ("ce", ".4f"), ("enc_align", ".4f"), ("dec_align", ".4f"),
                       ("token_acc", ".3f"), ("rho", ".3f"), ("lr", ".2e"), ("grad_norm", ".3f"),
                       ("samples_per_s", ".1f"), ("tflops", ".2f"), ("mfu", ".3f"), ("data_wait_frac", ".2f"),
                       ("step_time_s", ".3f"), ("peak_mem_gb", ".2f"), ("epochs", ".4f")):
            v = record.get(k)
            if v is not None:
                parts.append(f"{k} {v:{fmt}}")
            elif k == "mfu" and training:
                parts.append("mfu n/a")  # no known peak: the CPU, or a GPU missing from PEAK_TFLOPS (train.peak_tflops)
        log.info(" | ".join(parts))

    def log_image(self, path: str, step: int) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(path), "train/step": step})

    def close(self, exit_code: int = 0) -> None:
        """Close log.jsonl and finish the W&B run (which may upload for a while: call it after the last
        collective). Also run by launch_env.exit_process on every other way out, with the exit code."""
        if self.enabled and not self.jsonl.closed:
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=exit_code)


class Throughput:
    """Accumulates step time, time spent waiting for data, and samples over one log interval."""

    def __init__(self, flops_per_sample: float, tokens_per_sample: int, world_size: int, peak: Optional[float]):
        self.flops_per_sample = flops_per_sample
        self.tokens_per_sample = tokens_per_sample
        self.world_size = world_size
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0

    def summary(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        sps = self.samples / dt
        tflops = sps * self.flops_per_sample / 1e12 / self.world_size  # per device
        out = {
            "samples_per_s": sps,
            "tokens_per_s": sps * self.tokens_per_sample,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "step_time_s": dt / max(self.steps, 1),
            "data_wait_frac": self.data_s / dt,
            "peak_mem_gb": peak_memory_gb(),
        }
        self.reset()
        return out


def format_duration(seconds: float) -> str:
    """3725 -> "1h02m", 185 -> "3m05s", 42 -> "42s"."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class DataDigest:
    """A running hash of the micro-batches this rank consumed, content and order (logged as ``data_digest``,
    rank 0's): two runs that log the same digests saw the same data in the same order (the ablation checks
    its arms with it). Integer arithmetic on the device, no host sync per step; it starts again at every
    (re)start of the process."""

    MOD = 2_147_483_647  # 2^31 - 1: every product and sum below stays exact in int64

    def __init__(self, device):
        self.value = torch.zeros((), dtype=torch.int64, device=device)
        self._weights = None

    def update(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        flat = torch.cat([labels.reshape(-1, 1), tokens.reshape(labels.shape[0], -1)], 1).reshape(-1).long()
        if self._weights is None or self._weights.numel() != flat.numel():  # fixed pseudo-random weights
            gen = torch.Generator().manual_seed(0)  # its own generator: the global RNG streams stay untouched
            self._weights = torch.randint(1, self.MOD, (flat.numel(),), generator=gen).to(flat.device)
        h = (flat * self._weights).remainder(self.MOD).sum().remainder(self.MOD)
        self.value = (self.value * 1_000_003 + h + 1).remainder(self.MOD)


def peak_memory_gb() -> Optional[float]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    try:  # the CPU: this process's peak resident set size
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    except Exception:
        return None

