"""The tokenizer interface the rest of rear_ds relies on.

A tokenizer is a frozen VQ autoencoder: images in [0, 1] become grids of token ids,
and token ids become images again. Training only needs :meth:`codebook_vectors`
(the alignment targets); data prep needs :meth:`encode`; sampling needs :meth:`decode`.
"""
from __future__ import annotations

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Base class. Subclasses set the four attributes and implement the three methods."""

    name: str
    codebook_size: int  # K
    embed_dim: int  # size of one codebook vector
    grid: tuple  # (h, w) of the token grid for one image

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, h, w) int64 token ids (raster order when flattened)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h*w) int token ids -> (B, 3, H, W) float images clamped to [0, 1]."""
        raise NotImplementedError

    def codebook_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., ) int token ids -> (..., embed_dim) raw codebook rows (the reAR alignment targets)."""
        raise NotImplementedError
