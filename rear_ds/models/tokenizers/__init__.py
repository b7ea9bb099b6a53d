"""Building the frozen tokenizer from the ``tokenizer`` config section.

``build_tokenizer(cfg)`` returns a :class:`~rear_ds.models.tokenizers.base.Tokenizer` in eval mode
with gradients off. With ``load_weights`` the weights file named by ``tokenizer.weights`` (a torch
``.bin`` state dict or a ``.safetensors`` copy, see ``python -m rear_ds.models.tokenizers.convert``)
is loaded strictly; if it is not configured or not there, :class:`TokenizerWeightsError` says which
file to put where.
"""
from __future__ import annotations

import os

import torch

from rear_ds.config import TokenizerConfig
from rear_ds.models.tokenizers.alitok import AliTok
from rear_ds.models.tokenizers.base import Tokenizer
from rear_ds.models.tokenizers.maskgit_vqgan import MaskGITVQGAN
from rear_ds.models.weights import WeightsError, load_strict, read_state_dict

__all__ = ["Tokenizer", "TokenizerWeightsError", "build_tokenizer", "released_config", "tokenizer_weights_sha256"]

MASKGIT_WEIGHTS_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
MASKGIT_WEIGHTS_REPO = "fun-research/TiTok"
ALITOK_WEIGHTS_FILE = "AliTok.pth"
# The "tokenizer weight" link of the official README (github.com/ali-vilab/alitok); Google Drive only.
ALITOK_WEIGHTS_URL = "https://drive.google.com/file/d/1Rir4QEJ_HTvZkhcnw9MTfWlSFemcGVIW/view"

# The class of each family (config.TOKENIZER_FAMILIES); "toy_vq" is a small MaskGIT-VQGAN (no public weights).
IMPLEMENTATIONS = {"maskgit_vqgan": MaskGITVQGAN, "alitok": AliTok}


def released_config(family: str) -> TokenizerConfig:
    """The architecture of a family's public checkpoint (the other config keys default to it or are set here)."""
    if family == "alitok":
        return TokenizerConfig(name="alitok", codebook_size=4096, embed_dim=32)
    return TokenizerConfig(name=family)


class TokenizerWeightsError(WeightsError):
    """The tokenizer weights file is not configured or not where the config says."""


def _where_to_get(cfg: TokenizerConfig) -> str:
    if cfg.name == "maskgit_vqgan":
        return (f"download {MASKGIT_WEIGHTS_FILE} from the HF repo {MASKGIT_WEIGHTS_REPO} and set "
                f"tokenizer.weights=/path/to/{MASKGIT_WEIGHTS_FILE} (or to a .safetensors copy made with "
                f"`python -m rear_ds.models.tokenizers.convert`)")
    if cfg.name == "alitok":
        return (f"download {ALITOK_WEIGHTS_FILE} (the tokenizer weight linked in the README of "
                f"github.com/ali-vilab/alitok: {ALITOK_WEIGHTS_URL}) and set "
                f"tokenizer.weights=/path/to/{ALITOK_WEIGHTS_FILE} (or to a .safetensors copy made with "
                f"`python -m rear_ds.models.tokenizers.convert --tokenizer alitok`)")
    return ("the toy_vq tokenizer has no public weights: set tokenizer.weights=/path/to/toy_vq.safetensors "
            "(a state dict of a toy_vq tokenizer with this config) or build it with load_weights=False")


def build_tokenizer(cfg: TokenizerConfig, load_weights: bool = True, device="cpu") -> Tokenizer:
    """Build the tokenizer ``cfg.name`` (eval mode, requires_grad False), strictly loading ``cfg.weights``."""
    cfg.validate()
    # Check the file before building, so a missing download fails at once.
    if load_weights and not cfg.weights:
        raise TokenizerWeightsError(f"tokenizer.weights is not set: {_where_to_get(cfg)}")
    if load_weights and not os.path.isfile(cfg.weights):
        raise TokenizerWeightsError(f"tokenizer weights file {cfg.weights!r} does not exist: {_where_to_get(cfg)}")
    if not load_weights:
        return IMPLEMENTATIONS[cfg.family](cfg).to(device).eval().requires_grad_(False)
    state = read_state_dict(cfg.weights)
    with torch.device("meta"):  # no random init to throw away (AliTok: 390M parameters)
        tokenizer = IMPLEMENTATIONS[cfg.family](cfg)
    tokenizer = tokenizer.to_empty(device=device)  # the strict load overwrites every tensor (or raises)
    load_strict(tokenizer, state, what=f"tokenizer weights {cfg.weights!r}", expected=tokenizer.arch)
    return tokenizer.eval().requires_grad_(False)


def tokenizer_weights_sha256(path: str) -> str:
    """Content SHA-256 of a weights file (recorded in manifests so token shards name their tokenizer);
    a .safetensors header is hashed in canonical key order (see weights.weights_sha256)."""
    from rear_ds.models.weights import weights_sha256

    return weights_sha256(path)
