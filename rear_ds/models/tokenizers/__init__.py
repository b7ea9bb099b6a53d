"""Building the frozen tokenizer from the ``tokenizer`` config section.

``build_tokenizer(cfg)`` returns a :class:`~rear_ds.models.tokenizers.base.Tokenizer` in eval mode
with gradients off. With ``load_weights`` the weights file named by ``tokenizer.weights`` (a torch
``.bin`` state dict or a ``.safetensors`` copy, see ``python -m rear_ds.models.tokenizers.convert``)
is loaded strictly; if it is not configured or not there, :class:`TokenizerWeightsError` says which
file to put where.
"""
from __future__ import annotations

import os

from rear_ds.config import TokenizerConfig
from rear_ds.models.tokenizers.base import Tokenizer
from rear_ds.models.tokenizers.maskgit_vqgan import MaskGITVQGAN
from rear_ds.models.weights import WeightsError, load_strict, read_state_dict

__all__ = ["Tokenizer", "TokenizerWeightsError", "build_tokenizer", "tokenizer_weights_sha256"]

MASKGIT_WEIGHTS_FILE = "maskgit-vqgan-imagenet-f16-256.bin"
MASKGIT_WEIGHTS_REPO = "fun-research/TiTok"

# Both names build the same class; "toy_vq" is a small configuration of it (no public weights).
_IMPLEMENTATIONS = {"maskgit_vqgan": MaskGITVQGAN, "toy_vq": MaskGITVQGAN}


class TokenizerWeightsError(WeightsError):
    """The tokenizer weights file is not configured or not where the config says."""


def _where_to_get(cfg: TokenizerConfig) -> str:
    if cfg.name == "maskgit_vqgan":
        return (f"download {MASKGIT_WEIGHTS_FILE} from the HF repo {MASKGIT_WEIGHTS_REPO} and set "
                f"tokenizer.weights=/path/to/{MASKGIT_WEIGHTS_FILE} (or to a .safetensors copy made with "
                f"`python -m rear_ds.models.tokenizers.convert`)")
    return ("the toy_vq tokenizer has no public weights: set tokenizer.weights=/path/to/toy_vq.safetensors "
            "(a state dict of a toy_vq tokenizer with this config) or build it with load_weights=False")


def build_tokenizer(cfg: TokenizerConfig, load_weights: bool = True, device="cpu") -> Tokenizer:
    """Build the tokenizer ``cfg.name`` (eval mode, requires_grad False), strictly loading ``cfg.weights``."""
    if cfg.name not in _IMPLEMENTATIONS:
        raise ValueError(f"tokenizer.name={cfg.name!r}: expected one of {sorted(_IMPLEMENTATIONS)}")
    # Check the file before building, so a missing download fails at once.
    if load_weights and not cfg.weights:
        raise TokenizerWeightsError(f"tokenizer.weights is not set: {_where_to_get(cfg)}")
    if load_weights and not os.path.isfile(cfg.weights):
        raise TokenizerWeightsError(f"tokenizer weights file {cfg.weights!r} does not exist: {_where_to_get(cfg)}")
    tokenizer = _IMPLEMENTATIONS[cfg.name](cfg)
    if load_weights:
        load_strict(tokenizer, read_state_dict(cfg.weights), what=f"tokenizer weights {cfg.weights!r}",
                    expected=tokenizer.arch)
    return tokenizer.to(device).eval().requires_grad_(False)


def tokenizer_weights_sha256(path: str) -> str:
    """Content SHA-256 of a weights file (recorded in manifests so token shards name their tokenizer);
    a .safetensors header is hashed in canonical key order (see weights.weights_sha256)."""
    from rear_ds.models.weights import weights_sha256

    return weights_sha256(path)
