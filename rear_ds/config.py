"""Experiment configuration: dataclasses, YAML loading, dotted overrides, validation.

A run is described by one YAML file (``configs/*.yaml``) plus ``section.key=value``
overrides on the command line. Everything is checked when it is loaded, before any
model is built or any data is read: unknown keys, wrong types and inconsistent
values raise :class:`ConfigError` with a message that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, misspelled, of the wrong type or inconsistent."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The generator. Defaults are reAR-L's shape. ``family`` picks the architecture from the registry in
    rear_ds/models/__init__.py: "rear" (the adaLN reAR transformer, method spec section 2) or "alitok" (AliTok's
    LlamaGen-style decoder with RoPE, alitok spec section 2)."""

    family: str = "rear"
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    codebook_size: int = 1024  # K: image token ids 0..K-1, then [MASK]=K
    num_classes: int = 1000  # C: class c -> id K+1+c, null class -> K+1+C
    num_tokens: int = 256  # N: image tokens per sample (16x16 grid)
    dropout: float = 0.1  # projection and MLP dropout
    attn_dropout: float = 0.1  # attention-probability dropout
    # alitok family only: element-wise dropout on the input embeddings, and the tokens before the image grid
    # (AliTok: 17 1-D prefix tokens, then a square grid; RoPE is 1-D over the prefix, 2-D over the grid)
    tok_dropout: float = 0.0
    prefix_tokens: int = 0
    # Training-only alignment heads (spec 3.3). Their sizes are part of the checkpoint layout.
    align_proj_dim: int = 2048
    align_z_dim: int = 256  # must equal the tokenizer's codebook vector size
    align_head_layers: int = 3  # released code: 3 Linear layers with SiLU in between
    align_head_act: str = "silu"  # "silu" (released code) or "gelu" (paper text)
    encode_align_layer: int = 0  # 0-based block index whose output feeds the encode head
    decode_align_layer: int = 18  # 3/4 depth
    # Table sizes kept as in the reference for checkpoint compatibility (N + 1024, N + 100).
    pos_table_extra: int = 1024
    cond_table_extra: int = 100

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def class_offset(self) -> int:
        return self.codebook_size + 1

    @property
    def null_class_id(self) -> int:
        return self.codebook_size + 1 + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1 + self.num_classes + 1

    @property
    def seq_len(self) -> int:
        """Positions of a training sequence: the family's context positions ([cls, class] for rear, [class] for
        alitok) + the N image tokens."""
        from rear_ds.models import generator_class

        return self.num_tokens + generator_class(self).CONTEXT_POSITIONS

    def validate(self, prefix: str = "model") -> None:
        from rear_ds.models import GENERATORS

        if self.family not in GENERATORS:
            raise ConfigError(f"{prefix}.family={self.family!r}: expected one of {', '.join(map(repr, GENERATORS))}")
        _positive(self, prefix, "hidden_size", "depth", "num_heads", "mlp_dim", "codebook_size",
                  "num_classes", "num_tokens", "align_proj_dim", "align_z_dim")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_size={self.hidden_size} must be divisible by "
                              f"{prefix}.num_heads={self.num_heads}")
        for key in ("dropout", "attn_dropout", "tok_dropout"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{prefix}.{key}={v} must be in [0, 1)")
        for key in ("encode_align_layer", "decode_align_layer"):
            v = getattr(self, key)
            if not 0 <= v < self.depth:
                raise ConfigError(
                    f"{prefix}.{key}={v} is outside the model: block indices are 0-based and "
                    f"{prefix}.depth={self.depth}, so it must be in [0, {self.depth - 1}]")
        if self.encode_align_layer == self.decode_align_layer:
            # The reference then never runs the decode head (an if/elif) and silently reuses the encode features.
            raise ConfigError(f"{prefix}.encode_align_layer and {prefix}.decode_align_layer are both "
                              f"{self.decode_align_layer}: they must differ")
        if self.align_head_layers < 1:
            raise ConfigError(f"{prefix}.align_head_layers={self.align_head_layers} must be >= 1")
        if self.align_head_act not in ("silu", "gelu"):
            raise ConfigError(f"{prefix}.align_head_act={self.align_head_act!r}: expected 'silu' or 'gelu'")
        if not 0 <= self.prefix_tokens < self.num_tokens:
            raise ConfigError(f"{prefix}.prefix_tokens={self.prefix_tokens} must be in [0, {prefix}.num_tokens="
                              f"{self.num_tokens})")
        GENERATORS[self.family].check_config(self, prefix)


@dataclass
class ObjectiveConfig:
    """The reAR loss (spec section 3). Both regularizers off = the plain AR baseline."""

    noisy_context: bool = True  # noisy-context perturbation of the input tokens
    perturb_mode: str = "switch"  # "switch": uniform random codebook id; "mask": the [MASK] id
    anneal_start: int = 0  # optimizer step where rho starts to fall from 1
    # optimizer step where rho reaches 0; unset = 0.75 x optim.total_steps (the paper's f(t) = max(0, 1 - 4t/3):
    # 187,500 for reAR's 250k steps, 375,000 for AliTok's 500k), filled in by Config.validate
    anneal_end: Optional[int] = None
    encode_align: bool = True
    decode_align: bool = True
    align_weight: float = 1.0  # lambda
    mask_encode_at_perturbed: bool = True  # the released code masks the encode term there
    class_dropout: float = 0.1  # probability of replacing the class by the null class
    # Whether the model's prefix tokens (model.prefix_tokens: AliTok's 17) are perturbed and aligned like the grid
    # tokens (alitok spec 3.2, a reconstruction); false drops them (ablation). No effect without prefix tokens.
    perturb_prefix: bool = True
    align_prefix: bool = True

    ANNEAL_END_FRACTION = 0.75  # of optim.total_steps, when anneal_end is unset

    def resolve(self, total_steps: int) -> "ObjectiveConfig":
        """Fill in the derived anneal end (see ``anneal_end``)."""
        if self.anneal_end is None:
            self.anneal_end = round(self.ANNEAL_END_FRACTION * total_steps)
        return self

    def validate(self, prefix: str = "objective") -> None:
        if self.perturb_mode not in ("switch", "mask"):
            raise ConfigError(f"{prefix}.perturb_mode={self.perturb_mode!r}: expected 'switch' or 'mask'")
        if self.anneal_end is None:
            raise ConfigError(f"{prefix}.anneal_end is unset: call {prefix}.resolve(optim.total_steps) first "
                              "(load_config does)")
        if self.anneal_start < 0 or self.anneal_end <= self.anneal_start:
            raise ConfigError(f"{prefix}.anneal_end={self.anneal_end} must be > "
                              f"{prefix}.anneal_start={self.anneal_start} >= 0")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"{prefix}.class_dropout={self.class_dropout} must be in [0, 1)")
        if self.align_weight < 0:
            raise ConfigError(f"{prefix}.align_weight={self.align_weight} must be >= 0")


@dataclass
class AliTokArchConfig:
    """Architecture of the AliTok family (alitok.md section 1): a ViT encoder over [patches, learned latent tokens]
    and a ViT decoder with register tokens. Defaults are the released AliTok.pth; tiny test configs shrink them."""

    patch_size: int = 16
    prefix_tokens: int = 17  # latent tokens before the grid ones: 17 + 16x16 = 273 tokens per image
    encoder_width: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    decoder_registers: int = 32

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "patch_size", "encoder_width", "encoder_depth", "encoder_heads", "decoder_width",
                  "decoder_depth", "decoder_heads")
        for key in ("prefix_tokens", "decoder_registers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be >= 0")
        for part in ("encoder", "decoder"):
            w, h = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            if w % h:
                raise ConfigError(f"{prefix}.{part}_width={w} must be divisible by {prefix}.{part}_heads={h}")


def token_layout(prefix_tokens: int, grid) -> str:
    """How one image's tokens are laid out, for messages: "grid 16x16=256" or "17 prefix + 16x16 grid = 273 tokens"."""
    h, w = grid
    if not prefix_tokens:
        return f"grid {h}x{w}={h * w}"
    return f"{prefix_tokens} prefix + {h}x{w} grid = {prefix_tokens + h * w} tokens"


# tokenizer.name -> family. A family is one implementation (rear_ds/models/tokenizers/<family>.py) and decides
# which architecture keys apply and how the tokens of one image are laid out.
TOKENIZER_FAMILIES = {"maskgit_vqgan": "maskgit_vqgan", "toy_vq": "maskgit_vqgan", "alitok": "alitok"}
_MASKGIT_KEYS = ("base_channels", "channel_mult", "num_res_blocks")


@dataclass
class TokenizerConfig:
    """The frozen VQ tokenizer. ``name`` selects the implementation in rear_ds.models.tokenizers."""

    name: str = "maskgit_vqgan"  # "maskgit_vqgan", "toy_vq" (a small MaskGIT-VQGAN) or "alitok"
    weights: str = ""  # path to .bin/.pth (torch state dict) or .safetensors; "" = not available
    image_size: int = 256
    codebook_size: int = 1024  # AliTok: 4096
    embed_dim: int = 256  # size of one codebook vector; AliTok: 32
    # MaskGIT-VQGAN architecture knobs (f16 defaults; the toy tokenizer uses smaller ones).
    base_channels: int = 128
    channel_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    # AliTok architecture knobs (used when name is "alitok").
    alitok: AliTokArchConfig = field(default_factory=AliTokArchConfig)

    @property
    def family(self) -> str:
        return TOKENIZER_FAMILIES[self.name]

    @property
    def downsample(self) -> int:
        """Pixels per grid token along one side."""
        if self.family == "alitok":
            return self.alitok.patch_size
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid(self) -> tuple:
        g = self.image_size // self.downsample
        return (g, g)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the raster grid in an image's sequence (0 for a plain grid tokenizer)."""
        return self.alitok.prefix_tokens if self.family == "alitok" else 0

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    def architecture(self) -> dict:
        """The keys that define this tokenizer's weights and tokens (those of its family; no weights path)."""
        keys = ["name", "image_size", "codebook_size", "embed_dim"]
        keys += ["alitok"] if self.family == "alitok" else list(_MASKGIT_KEYS)
        return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in ((k, getattr(self, k)) for k in keys)}

    def validate(self, prefix: str = "tokenizer") -> None:
        if self.name not in TOKENIZER_FAMILIES:
            raise ConfigError(f"{prefix}.name={self.name!r}: expected one of {sorted(TOKENIZER_FAMILIES)}")
        _positive(self, prefix, "image_size", "base_channels", "num_res_blocks", "codebook_size", "embed_dim")
        if self.family == "alitok":
            self.alitok.validate(f"{prefix}.alitok")
        if self.image_size % self.downsample:
            where = f"{prefix}.alitok.patch_size" if self.family == "alitok" else f"{prefix}.channel_mult"
            raise ConfigError(f"{prefix}.image_size={self.image_size} must be divisible by the "
                              f"downsampling factor {self.downsample} (from {where})")


@dataclass
class DataConfig:
    """Training data: WebDataset token shards (see README, "Shard format") or a reference JSONL."""

    shards: str = ""  # folder holding shards + manifest.json, or a brace pattern of .tar files
    jsonl: str = ""  # alternatively the reference's pretokenized JSONL
    num_workers: int = 2
    # "epoch": one global permutation per epoch, every item once per epoch (the reference's order); "resampled":
    # random runs of each rank's share, with replacement (data too large to index). rear_ds/data/reader.py
    order: str = "epoch"
    # "all": every view (sample) is an item; "one_per_image": an item is an image and each fetch reads one of
    # its views at random (AliTok's trainer: an epoch = one pass over the images)
    views: str = "all"
    shuffle_buffer: int = 16384  # resampled order: samples read and mixed per draw (512 bytes each)
    on_corrupt_shard: str = "skip"  # "skip" (warn, count, go on) or "error"

    def validate(self, prefix: str = "data") -> None:
        if bool(self.shards) == bool(self.jsonl):
            raise ConfigError(f"exactly one of {prefix}.shards and {prefix}.jsonl must be set "
                              f"(got shards={self.shards!r}, jsonl={self.jsonl!r})")
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers={self.num_workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"{prefix}.shuffle_buffer={self.shuffle_buffer} must be >= 1 (1 = no shuffling)")
        if self.order not in ("epoch", "resampled"):
            raise ConfigError(f"{prefix}.order={self.order!r}: expected 'epoch' or 'resampled'")
        if self.views not in ("all", "one_per_image"):
            raise ConfigError(f"{prefix}.views={self.views!r}: expected 'all' or 'one_per_image'")
        if self.on_corrupt_shard not in ("skip", "error"):
            raise ConfigError(f"{prefix}.on_corrupt_shard={self.on_corrupt_shard!r}: expected 'skip' or 'error'")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay, all counted in optimizer steps (spec section 5)."""

    lr: float = 4e-4
    end_lr: float = 1e-5
    betas: list = field(default_factory=lambda: [0.9, 0.96])
    eps: float = 1e-8
    weight_decay: float = 0.03
    warmup_steps: int = 62_500
    total_steps: int = 250_000
    grad_clip: float = 1.0

    def validate(self, prefix: str = "optim") -> None:
        if self.lr <= 0 or self.end_lr < 0:
            raise ConfigError(f"{prefix}.lr and {prefix}.end_lr must be positive")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{prefix}.betas={self.betas} must be two numbers in [0, 1)")
        if self.warmup_steps < 0 or self.total_steps <= self.warmup_steps:
            raise ConfigError(f"{prefix}.total_steps={self.total_steps} must be > "
                              f"{prefix}.warmup_steps={self.warmup_steps} >= 0")


@dataclass
class TrainConfig:
    """The run: folder, batch sizes, steps, precision, checkpoints, logging and in-training evaluation."""

    out_dir: str = "runs/default"
    seed: int = 42
    micro_batch_size: int = 128  # per process
    grad_accum: int = 1
    # Pins the batch of one optimizer step: grad_accum is then derived from it and the process count
    # (rear_ds.training.ds_config.pin_global_batch), so the recipe's 2048 holds on 8 GPUs or 64.
    global_batch: int = 0  # 0 = not pinned: micro_batch_size x grad_accum x processes
    max_steps: int = 250_000  # optimizer steps
    # "bf16" (DeepSpeed bf16 mode), "bf16_autocast" (fp32 weights, autocast forward), "fp16" or "fp32";
    # must agree with the DeepSpeed config (rear_ds.training.ds_config.precision_of)
    precision: str = "bf16"
    activation_checkpointing: str = "off"  # "off", "all" or "every_k"
    checkpoint_every_k: int = 2  # with "every_k": blocks 0, k, 2k, ... are checkpointed
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    sample_every: int = 0  # 0 = never; else a PNG grid every N steps (needs the tokenizer decoder)
    sample_classes: list = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6, 7])
    compile: bool = False  # per-block torch.compile (GPU only)
    # apex's FusedLayerNorm in the blocks (rear_ds.models.generator.choose_layernorm): "auto" uses it when apex is
    # installed and the run has 16-bit weights (bf16, fp16) and no compile; "always" requires it; "never" skips
    # it (not on/off: YAML reads those as booleans)
    apex_layernorm: str = "auto"
    peak_tflops: float = 0.0  # 0 = look up the accelerator in the built-in table
    images_per_epoch: int = 1_281_167  # for "ImageNet-equivalent epochs" in the log
    collective_timeout_s: int = 600
    # In-training FID (rear_ds/training/eval_hook.py): every eval_every steps, eval_num_samples images scored
    # against precomputed reference statistics (python -m rear_ds.evaluation.ref_stats). 0 = off.
    eval_every: int = 0
    eval_num_samples: int = 1000
    eval_ref_stats: str = ""
    eval_inception_weights: str = ""  # "" = $REAR_INCEPTION_WEIGHTS
    # (training helper) Build the tokenizer with random weights when tokenizer.weights is "": its codebook
    # then gives meaningless alignment targets, so this is for tests and toy runs only.
    allow_random_tokenizer: bool = False

    def validate(self, prefix: str = "train") -> None:
        _positive(self, prefix, "micro_batch_size", "grad_accum", "max_steps", "log_every",
                  "ckpt_every", "keep_last", "checkpoint_every_k", "collective_timeout_s")
        if self.global_batch < 0 or self.global_batch % self.micro_batch_size:
            raise ConfigError(f"{prefix}.global_batch={self.global_batch} must be 0 (not pinned) or a positive "
                              f"multiple of {prefix}.micro_batch_size={self.micro_batch_size}")
        if self.precision not in ("bf16", "bf16_autocast", "fp16", "fp32"):
            raise ConfigError(f"{prefix}.precision={self.precision!r}: expected 'bf16', 'bf16_autocast', 'fp16' "
                              "or 'fp32'")
        if self.eval_every < 0 or self.eval_num_samples < 2:
            raise ConfigError(f"{prefix}.eval_every must be >= 0 and {prefix}.eval_num_samples >= 2")
        if self.eval_every and not os.path.isfile(self.eval_ref_stats):
            raise ConfigError(f"{prefix}.eval_every={self.eval_every} needs {prefix}.eval_ref_stats: reference "
                              f"statistics file {self.eval_ref_stats!r} does not exist (make it with "
                              "`python -m rear_ds.evaluation.ref_stats`)")
        if self.apex_layernorm not in ("auto", "always", "never"):
            raise ConfigError(f"{prefix}.apex_layernorm={self.apex_layernorm!r}: expected 'auto', 'always' or "
                              "'never'")
        if self.apex_layernorm == "always":
            from rear_ds.models.generator import apex_layernorm

            if apex_layernorm() is None:
                raise ConfigError(f"{prefix}.apex_layernorm=always but NVIDIA apex (apex.normalization."
                                  "FusedLayerNorm) cannot be imported here; install apex with its CUDA extensions, "
                                  "or use 'auto'/'never'")
        if self.activation_checkpointing not in ("off", "all", "every_k"):
            raise ConfigError(f"{prefix}.activation_checkpointing={self.activation_checkpointing!r}: "
                              "expected 'off', 'all' or 'every_k'")


@dataclass
class SamplingConfig:
    """Sampler settings (spec section 6); per-size defaults live in configs/*.yaml."""

    guidance_scale: float = 10.0
    guidance_power: float = 1.75
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    kv_cache: bool = True
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    batch_size: int = 50
    seed: int = 42

    def validate(self, prefix: str = "sampling") -> None:
        if self.guidance_scale < 0 or self.temperature <= 0:
            raise ConfigError(f"{prefix}.guidance_scale must be >= 0 and {prefix}.temperature > 0")
        if not 0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ConfigError(f"{prefix}.top_p must be in (0, 1] and {prefix}.top_k >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{prefix}.precision={self.precision!r}: expected 'fp32' or 'bf16'")
        _positive(self, prefix, "batch_size")


@dataclass
class WandbConfig:
    """Weights & Biases logging (offline unless an API key is configured; see rear_ds/training/metrics.py)."""

    enabled: bool = True
    project: str = "rear_ds"
    mode: str = ""  # "" = online if an API key is configured, else offline; WANDB_MODE wins
    run_name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self, need_data: bool = False) -> "Config":
        self.model.validate()
        self.objective.resolve(self.optim.total_steps).validate()
        self.tokenizer.validate()
        self.optim.validate()
        self.train.validate()
        self.sampling.validate()
        if need_data:
            self.data.validate()
        m, t = self.model, self.tokenizer
        from rear_ds.models import generator_class

        generator_class(m).norm_layer_for(self.train)  # e.g. apex's LayerNorm required by a family without one
        if m.codebook_size != t.codebook_size:
            raise ConfigError(f"model.codebook_size={m.codebook_size} disagrees with "
                              f"tokenizer.codebook_size={t.codebook_size}")
        if m.num_tokens != t.num_tokens:
            raise ConfigError(f"model.num_tokens={m.num_tokens} disagrees with the tokenizer "
                              f"{token_layout(t.prefix_tokens, t.grid)} (tokenizer.name={t.name}, "
                              f"tokenizer.image_size={t.image_size})")
        if m.prefix_tokens and m.prefix_tokens != t.prefix_tokens:  # the model's RoPE layout is the tokens'
            raise ConfigError(f"model.prefix_tokens={m.prefix_tokens} disagrees with the tokenizer "
                              f"{token_layout(t.prefix_tokens, t.grid)} (tokenizer.name={t.name})")
        o = self.objective
        if (not o.perturb_prefix or not o.align_prefix) and m.prefix_tokens == 0:
            raise ConfigError(f"objective.perturb_prefix={o.perturb_prefix} / objective.align_prefix="
                              f"{o.align_prefix} have no effect: model.prefix_tokens=0 (the model has no prefix)")
        if (self.objective.encode_align or self.objective.decode_align) and m.align_z_dim != t.embed_dim:
            raise ConfigError(f"model.align_z_dim={m.align_z_dim} disagrees with "
                              f"tokenizer.embed_dim={t.embed_dim} (the alignment targets are codebook vectors)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _positive(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        v = getattr(obj, key)
        if v <= 0:
            raise ConfigError(f"{prefix}.{key}={v} must be positive")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``typ``; ints are accepted for floats."""
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin is typing.Union:  # Optional[...]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}={value!r} has type {type(value).__name__}, expected {name}")


def apply_section(obj: Any, data: dict, prefix: str) -> None:
    """Set ``data``'s values on the dataclass ``obj`` (nested sections recursively), checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_section(current, value, full)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def parse_override(text: str) -> tuple:
    """``"train.max_steps=100"`` -> (["train", "max_steps"], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.strip().split("."), value


def _nest(path: list, value: Any) -> dict:
    out: dict = {}
    cur = out
    for p in path[:-1]:
        cur = cur.setdefault(p, {})
    cur[path[-1]] = value
    return out


# The checkout rear_ds runs from (an editable install or PYTHONPATH): where configs/ and ds_configs/ live.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_config_file(path: str, folder: str = "configs", what: str = "config file") -> str:
    """``path`` itself if it exists; else, for a relative path, the same path in the rear_ds checkout, then a
    bare name in its ``folder`` (``configs`` or ``ds_configs``): ``--config configs/rear_l.yaml`` works from any
    directory after ``pip install -e .``. The error names every place it looked."""
    tried = [os.path.abspath(path)]
    if not os.path.isabs(path):
        tried.append(os.path.join(SOURCE_ROOT, path))
    if not os.path.dirname(path):
        tried.append(os.path.join(SOURCE_ROOT, folder, path))
    for cand in tried:
        if os.path.isfile(cand):
            return path if cand == tried[0] else cand
    raise ConfigError(f"{what} {path!r} does not exist (looked for {', '.join(dict.fromkeys(tried))})")


def load_config(path: Optional[str] = None, overrides: Optional[list] = None,
                need_data: bool = False) -> Config:
    """Build a validated :class:`Config` from a YAML file (see :func:`find_config_file`) and dotted overrides."""
    cfg = Config()
    if path:
        path = find_config_file(path)
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        try:
            apply_section(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_section(cfg, _nest(keys, value), "")
    return cfg.validate(need_data=need_data)


def config_from_dict(data: dict, need_data: bool = False) -> Config:
    cfg = Config()
    apply_section(cfg, data, "")
    return cfg.validate(need_data=need_data)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def config_json(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)
