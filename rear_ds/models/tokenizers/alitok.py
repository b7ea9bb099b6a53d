"""AliTok tokenizer (alitok.md section 1): 273 tokens per 256x256 image, 17 prefix tokens then a 16x16 raster grid,
state-dict compatible with the released ``AliTok.pth`` (456 tensors, 389,899,308 parameters).

    latent_tokens            (273, 768) learned queries of the encoder (a top-level parameter)
    encoder                  ViT-B/16 over [256 patch tokens, 273 latent tokens]: patch_embed (16x16 conv),
                             positional_embedding, latent_token_positional_embedding, ln_pre, 12 blocks,
                             ln_post on the last 273 outputs, conv_out (1x1, 768 -> 32)
    quantize.embedding       4096 x 32 codebook, nearest row by squared L2 on raw vectors
    decoder                  the released stage-2 decoder, BIDIRECTIONAL: decoder_embed (32 -> 1024), 32 register
                             tokens (class_embedding) before the 273 tokens, latent_token_positional_embedding
                             (305 rows), ln_pre, 24 blocks, ln_post on the last 256 outputs, ffn.0 (1x1 conv to
                             16*16*3 values per patch), pixel shuffle, conv_out (1x1, 3 -> 3), sigmoid

Blocks are pre-LN (LayerNorm eps 1e-5), attention = one in_proj split q|k|v (head-major), SDPA in fp32, out_proj;
MLP 4x with exact GELU. The prefix tokens carry no pixels of their own: the decoder reads only the last h*w
outputs as patches, the prefix is context. Input is RGB in [0, 1] with no normalisation; ``decode`` returns the
sigmoid output clamped to [0, 1]. The architecture knobs (``tokenizer.alitok``) make tiny instances for tests.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rear_ds.config import TokenizerConfig
from rear_ds.models.tokenizers.base import Tokenizer

INIT_STD = 0.02  # random init (tests, speed runs): truncated normal for Linear/Conv/Embedding, as the original


class Attention(nn.Module):
    """Multi-head self-attention, no mask; q/k/v are upcast so the softmax runs in fp32 whatever the weights."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.in_proj(x), "b l (k h d) -> k b h l d", k=3, h=self.heads).float()
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)").to(x.dtype))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """The part both towers share: ln_pre, blocks, and ln_post on the last ``keep`` positions. Subclasses call
    :meth:`add_blocks` where the released state dict has those keys, so a saved file has the released key order."""

    def add_blocks(self, width: int, depth: int, heads: int) -> None:
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)

    def run(self, x: torch.Tensor, keep: int) -> torch.Tensor:
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x[:, -keep:])


class Encoder(ViT):
    """Image (B, 3, H, W) and the learned latent tokens -> pre-quantization latents z (B, num_tokens, embed_dim)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        a, (gh, gw) = cfg.alitok, cfg.grid
        self.patch_embed = nn.Conv2d(3, a.encoder_width, a.patch_size, stride=a.patch_size)
        self.positional_embedding = nn.Parameter(torch.zeros(gh * gw, a.encoder_width))
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(cfg.num_tokens, a.encoder_width))
        self.add_blocks(a.encoder_width, a.encoder_depth, a.encoder_heads)
        self.conv_out = nn.Conv2d(a.encoder_width, cfg.embed_dim, 1)  # a per-token linear map, stored as a conv

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        patches = rearrange(self.patch_embed(images), "b c h w -> b (h w) c") + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(images.shape[0], -1, -1)
        n = latents.shape[1]
        x = self.run(torch.cat([patches, latents.to(patches.dtype)], dim=1), keep=n)
        return rearrange(self.conv_out(rearrange(x, "b n c -> b c n 1")), "b c n 1 -> b n c")


class Decoder(ViT):
    """Codebook vectors (B, num_tokens, embed_dim) -> image (B, 3, H, W) in (0, 1) (sigmoid, not yet clamped)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        a = cfg.alitok
        self.grid, self.patch_size = cfg.grid, a.patch_size
        self.decoder_embed = nn.Linear(cfg.embed_dim, a.decoder_width)
        self.class_embedding = nn.Parameter(torch.zeros(a.decoder_registers, a.decoder_width))  # the registers
        self.latent_token_positional_embedding = nn.Parameter(
            torch.zeros(a.decoder_registers + cfg.num_tokens, a.decoder_width))
        self.add_blocks(a.decoder_width, a.decoder_depth, a.decoder_heads)
        # A Sequential so the conv keeps its released name ffn.0 (the pixel shuffle after it has no weights).
        self.ffn = nn.Sequential(nn.Conv2d(a.decoder_width, a.patch_size * a.patch_size * 3, 1))
        self.conv_out = nn.Conv2d(3, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        x = self.decoder_embed(z)
        registers = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([registers, x], dim=1) + self.latent_token_positional_embedding
        x = rearrange(self.run(x, keep=gh * gw), "b (h w) c -> b c h w", h=gh, w=gw)
        # Pixel shuffle: channel (p1 * patch + p2) * 3 + c of cell (h, w) is pixel (h * patch + p1, w * patch + p2).
        x = rearrange(self.ffn(x), "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=self.patch_size, p2=self.patch_size)
        return torch.sigmoid(self.conv_out(x))


class VectorQuantizer(nn.Module):
    """The 4096 x 32 codebook: nearest row by squared L2 distance on raw vectors (no normalisation)."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, C) latents -> (B, N) int64 ids, in fp32 with autocast off whatever the caller's context."""
        with torch.autocast(z.device.type, enabled=False):
            flat, emb = z.float().reshape(-1, z.shape[-1]), self.embedding.weight.float()
            # |z|^2 + |e|^2 - 2 z.e in the original's order (only near-ties can tell orders apart).
            dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * (flat @ emb.t())
            return dist.argmin(dim=1).reshape(z.shape[:-1])


class AliTok(Tokenizer):
    """The frozen AliTok tokenizer, built from a :class:`TokenizerConfig` with ``name: alitok``."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        a = cfg.alitok
        self.name, self.codebook_size, self.embed_dim = cfg.name, cfg.codebook_size, cfg.embed_dim
        self.grid, self.prefix_tokens, self.image_size = cfg.grid, a.prefix_tokens, cfg.image_size
        arch = " ".join(f"{k}={v}" for k, v in vars(a).items())
        self.arch = (f"tokenizer.name={cfg.name} image_size={cfg.image_size} codebook_size={cfg.codebook_size} "
                     f"embed_dim={cfg.embed_dim} alitok: {arch}")
        self.latent_tokens = nn.Parameter(torch.zeros(self.num_tokens, a.encoder_width))
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init as the original (only weights files make a useful tokenizer)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for p in (self.latent_tokens, self.encoder.positional_embedding, self.encoder.latent_token_positional_embedding,
                  self.decoder.class_embedding, self.decoder.latent_token_positional_embedding):
            p.normal_(std=p.shape[-1] ** -0.5)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the encoder's pre-quantization output (B, num_tokens, embed_dim)."""
        size = self.grid[0] * self.encoder.patch_embed.stride[0]
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.name}.encode expects (B, 3, {size}, {size}) images, got {tuple(images.shape)}")
        return self.encoder(images.to(self.latent_tokens), self.latent_tokens)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, num_tokens) int64 ids: prefix tokens, then the grid in raster order."""
        # Token ids must not depend on the caller's autocast context: a bf16 latent changes argmins.
        with torch.autocast(images.device.type, enabled=False):
            return self.quantize.nearest(self.latents(images))

    def decode_unclamped(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, num_tokens) ids -> the decoder's sigmoid output (B, 3, H, W); all tokens are decoded together."""
        return self.decoder(self.codebook_vectors(self.flat_ids(tokens)).to(self.latent_tokens))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_unclamped(tokens).clamp(0.0, 1.0)
