"""Generator families and the one place that maps ``model.family`` to a class.

Every family subclasses rear_ds.models.generator.GeneratorBase (same constructor, forward, KV-cache and FLOP
interface), so the trainer, objective, sampler, export and benchmarks never ask which family they have.
"""
from __future__ import annotations

import torch

from rear_ds.models.alitok_ar import AliTokGenerator
from rear_ds.models.generator import GeneratorBase, ReARGenerator

GENERATORS = {"rear": ReARGenerator, "alitok": AliTokGenerator}


def generator_class(model_cfg) -> type:
    """The class of ``model_cfg.family`` (validated by ModelConfig.validate)."""
    return GENERATORS[model_cfg.family]


def build_generator(model_cfg, with_align_heads: bool = True, **kwargs) -> GeneratorBase:
    return generator_class(model_cfg)(model_cfg, with_align_heads=with_align_heads, **kwargs)


def count_parameters(model_cfg, include_align: bool = False) -> int:
    """Parameter count of a config, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_generator(model_cfg, with_align_heads=include_align)
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model_cfg, include_align: bool = True, training: bool = True) -> float:
    return generator_class(model_cfg).flops_per_sample(model_cfg, include_align, training)


def load_generator(path: str, model_cfg, device="cpu", with_align_heads: bool = False) -> GeneratorBase:
    """Load released weights (reAR-{S,B,L}, alitok_{b,l,xl}.bin) or an exported file strictly, through the safe
    reader (safetensors or torch weights_only); the training-only align heads in the file are optional."""
    from rear_ds.models.weights import load_strict, read_state_dict

    prefixes = GeneratorBase.ALIGN_PREFIXES
    state = read_state_dict(path)
    model = build_generator(model_cfg, with_align_heads=with_align_heads)
    if not with_align_heads:
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    load_strict(model, state, what=f"generator weights {path}", expected=model.describe(),
                optional_prefixes=prefixes if with_align_heads else ())
    return model.to(device).eval()
