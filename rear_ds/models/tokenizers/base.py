"""The tokenizer interface the rest of rear_ds relies on.

A tokenizer is a frozen VQ autoencoder: images in [0, 1] become sequences of token ids, and token ids
become images again. Training only needs :meth:`codebook_vectors` (the alignment targets); data prep
needs :meth:`encode`; sampling needs :meth:`decode`.

Token layout of one image: ``prefix_tokens`` tokens that belong to no grid cell (0 for MaskGIT-VQGAN,
17 for AliTok), then the ``grid`` (h, w) tokens in raster order: ``num_tokens = prefix_tokens + h * w``,
always in the tokenizer's own order, which is the order the generator models.

Shape rule: :meth:`encode` returns ``(B, *token_shape)``, where ``token_shape`` is ``grid`` for a plain grid
tokenizer and ``(num_tokens,)`` for one with prefix tokens; token shards store that shape. :meth:`decode`
takes either that shape or the flat ``(B, num_tokens)`` a generator produces.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rear_ds.config import token_layout


class Tokenizer(nn.Module):
    """Base class. Subclasses set the attributes below, keep the codebook in ``self.quantize.embedding``
    (the key both released checkpoints use) and implement :meth:`encode` and :meth:`decode`."""

    name: str
    codebook_size: int  # K
    embed_dim: int  # size of one codebook vector
    grid: tuple  # (h, w) of the raster grid of one image's tokens
    prefix_tokens: int = 0  # tokens before the grid
    quantize: nn.Module

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def token_shape(self) -> tuple:
        """Shape of one image's ids as :meth:`encode` returns them (and token shards store them)."""
        return tuple(self.grid) if not self.prefix_tokens else (self.num_tokens,)

    @property
    def layout(self) -> str:
        return token_layout(self.prefix_tokens, self.grid)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1] -> (B, *token_shape) int64 token ids, computed in fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, *token_shape) or (B, num_tokens) int token ids -> (B, 3, H, W) float images clamped to [0, 1]."""
        raise NotImplementedError

    def codebook_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) int ids -> (..., embed_dim) raw codebook rows, i.e. ``codebook[tokens]`` (the reAR alignment targets)."""
        weight = self.quantize.embedding.weight
        return F.embedding(tokens.to(weight.device, torch.long), weight)

    def flat_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Check ids given to :meth:`decode` and return them as (B, num_tokens)."""
        shape = tuple(tokens.shape[1:])
        if tokens.ndim < 2 or shape not in (self.token_shape, (self.num_tokens,)):
            grid = f"(B, {self.grid[0]}, {self.grid[1]}) or flat " if self.token_shape == tuple(self.grid) else ""
            raise ValueError(f"{self.name}.decode expects {grid}(B, {self.num_tokens}) ids ({self.layout}), "
                             f"got {tuple(tokens.shape)}")
        # Checked here because an out-of-range id (e.g. the generator's [MASK] id K) would otherwise be
        # an opaque device-side assert on GPU.
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"{self.name}.decode: token ids must be in [0, {self.codebook_size}), got "
                             f"range [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.reshape(tokens.shape[0], self.num_tokens)
