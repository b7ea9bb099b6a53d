"""The DeepSpeed JSON: load it, fill "auto" from the YAML, and check it agrees with the YAML.

The YAML is the single source of truth for batch sizes, clipping and the optimizer/schedule; a DeepSpeed
JSON mostly chooses the ZeRO stage, precision and offload. Values written as ``"auto"`` are filled from
the YAML; explicit values must agree with it, or a :class:`ConfigError` names both keys. Optimizer and
scheduler blocks in the JSON are checked the same way and then removed: the optimizer (with its
weight-decay groups) and the LambdaLR schedule are always built by rear_ds.training.optim.
"""
from __future__ import annotations

import copy
import json

from rear_ds.config import Config, ConfigError, find_config_file

# optimizer.params key in the DeepSpeed JSON -> getter on the YAML config
_OPTIM_KEYS = {
    "lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay",
}
_SCHED_KEYS = {  # DeepSpeed WarmupCosineLR / WarmupDecayLR names -> optim.<key>
    "warmup_num_steps": "warmup_steps", "total_num_steps": "total_steps", "warmup_max_lr": "lr",
}


def load_json(path: str) -> dict:
    if not path:
        raise ConfigError("--deepspeed_config is required (one of ds_configs/*.json)")
    path = find_config_file(path, "ds_configs", "DeepSpeed config file")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None


def _fill(ds: dict, key: str, value, yaml_key: str, where: str) -> None:
    """ds[key] = value if "auto" or missing; otherwise it must equal value."""
    cur = ds.get(key, "auto")
    if cur == "auto":
        ds[key] = value
    elif cur != value:
        raise ConfigError(f"{where}: {key}={cur!r} disagrees with {yaml_key}={value!r} in the YAML "
                          f"(write \"auto\" in the DeepSpeed config to take the YAML value)")


BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")  # DeepSpeed's spellings of bfloat16


def precision_of(ds: dict) -> str:
    """"bf16" (DeepSpeed bf16 mode: bf16 weights, fp32 master weights in the optimizer), "bf16_autocast"
    (fp32 weights and gradients, forward under torch.autocast(bf16): the reference recipe), "fp16" or "fp32"."""
    bf16 = ds.get("bf16", {}).get("enabled", False) or ds.get("bfloat16", {}).get("enabled", False)
    fp16 = ds.get("fp16", {}).get("enabled", False)
    autocast = ds.get("torch_autocast", {})
    on = [name for name, enabled in (("bf16", bf16), ("fp16", fp16), ("torch_autocast", autocast.get("enabled")))
          if enabled]
    if len(on) > 1:
        raise ConfigError(f"DeepSpeed config enables {' and '.join(on)}: choose one precision mode")
    if autocast.get("enabled"):
        if autocast.get("dtype") not in BF16_NAMES:
            raise ConfigError(f"torch_autocast.dtype={autocast.get('dtype')!r}: expected one of {BF16_NAMES} "
                              "(fp16 autocast would need a gradient scaler, which ZeRO does not apply)")
        return "bf16_autocast"
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def pin_global_batch(cfg: Config, world_size: int) -> str | None:
    """With ``train.global_batch`` set, derive ``train.grad_accum`` (in place) so that micro_batch_size x
    grad_accum x world_size equals it: the schedules count optimizer steps, so the batch of one step is part
    of the recipe and must not change with the number of GPUs. Returns a line for the log when grad_accum
    changed, else None."""
    t = cfg.train
    if not t.global_batch:
        return None
    per_pass = t.micro_batch_size * world_size
    if t.global_batch % per_pass:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x {world_size} processes = {per_pass}: choose a micro_batch_size that divides "
            f"global_batch / processes, or set train.global_batch=0 to use train.grad_accum as given")
    accum = t.global_batch // per_pass
    if accum == t.grad_accum:
        return None
    old, t.grad_accum = t.grad_accum, accum
    return (f"train.grad_accum {old} -> {accum}: keeps train.global_batch={t.global_batch} with "
            f"micro_batch_size {t.micro_batch_size} on {world_size} processes")


def precision_warnings(ds: dict, cfg: Config) -> list:
    """Numerics worth a warning (not errors): in "bf16" mode DeepSpeed accumulates the micro-batches'
    gradients in bf16 unless data_types.grad_accum_dtype says otherwise."""
    t = cfg.train
    if t.precision == "bf16" and t.grad_accum >= 8 and "grad_accum_dtype" not in ds.get("data_types", {}):
        return [f"train.precision=bf16 accumulates {t.grad_accum} micro-batches' gradients in bf16 (DeepSpeed's "
                "default for bf16 weights); for fp32 accumulation use train.precision=bf16_autocast "
                "(ds_configs/zero2_bf16_autocast.json), more processes, or a larger micro_batch_size"]
    return []


def resolve(ds_in: dict, cfg: Config, world_size: int, path: str = "deepspeed config") -> dict:
    """A complete DeepSpeed config for this run (a copy; ``ds_in`` is not changed)."""
    ds = copy.deepcopy(ds_in)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", path)
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip", path)
    want = t.micro_batch_size * t.grad_accum * world_size
    tbs = ds.get("train_batch_size", "auto")
    if tbs == "auto":
        ds["train_batch_size"] = want
    elif tbs != want:
        raise ConfigError(
            f"{path}: train_batch_size={tbs} but train.micro_batch_size={t.micro_batch_size} x "
            f"train.grad_accum={t.grad_accum} x data-parallel size {world_size} = {want}. Set "
            f"train_batch_size to \"auto\" or change the YAML so the product matches.")
    ds_prec = precision_of(ds)
    if ds_prec != t.precision:
        raise ConfigError(f"train.precision={t.precision!r} but {path} selects {ds_prec!r} "
                          f"(its bf16 / fp16 / torch_autocast sections); make them agree")
    if ds_prec == "bf16_autocast":
        # Unless the JSON names modules, none is "lower-precision safe": gradients are reduced in fp32, as in
        # the reference (DeepSpeed's default would tag torch.nn.Linear parameters for bf16 reduction).
        ds["torch_autocast"].setdefault("lower_precision_safe_modules", [])
    for block, keys in (("optimizer", _OPTIM_KEYS), ("scheduler", _SCHED_KEYS)):
        if block in ds:
            params = ds[block].get("params", {})
            for k, yaml_key in keys.items():
                if k in params:
                    value = getattr(cfg.optim, yaml_key)
                    _fill(params, k, list(value) if isinstance(value, (list, tuple)) else value,
                          f"optim.{yaml_key}", f"{path} {block}.params")
            unknown = [k for k in params if k not in keys]
            if block == "optimizer" and ds[block].get("type", "adamw").lower() not in ("adam", "adamw"):
                raise ConfigError(f"{path}: optimizer.type={ds[block]['type']!r}: only AdamW is supported")
            if unknown and block == "optimizer":
                raise ConfigError(f"{path}: optimizer.params {unknown} cannot be honoured; the AdamW values "
                                  "come from the optim section of the YAML")
            del ds[block]  # built in code (rear_ds.training.optim) from the values just checked
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and zero_stage(ds) == 0:
        raise ConfigError(f"{path}: offload_optimizer needs zero_optimization.stage >= 1")
    ds.setdefault("steps_per_print", 10 ** 9)  # our own logger prints; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in ("none", None)
