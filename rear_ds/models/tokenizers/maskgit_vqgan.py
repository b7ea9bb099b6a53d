"""MaskGIT-VQGAN f16 tokenizer (method spec 7.1), state-dict compatible with the public
``maskgit-vqgan-imagenet-f16-256.bin`` (HF repo fun-research/TiTok): 168 tensors, 54.5M parameters.

Layout with the default :class:`~rear_ds.config.TokenizerConfig` (128 channels, mult [1,1,2,2,4]):

    encoder: conv_in 3->128 | down.0..4 (2 resnet blocks each; 2x2 avg-pool after levels 0..3)
             | mid.0,1 | norm_out, SiLU, conv_out 1x1 512->256
    quantize.embedding: 1024 x 256 codebook, nearest entry by squared L2
    decoder: conv_in 256->512 | mid.0,1 | up.4..up.0 (stored by resolution level, executed from the
             coarsest; levels 4..1 end with nearest x2 + upsample_conv) | norm_out, SiLU, conv_out -> 3

Two things must be exactly as in the original for the checkpoint to work: the resnet-block shortcut
quirk (see :class:`ResnetBlock`) and the input range, RGB in [0, 1] with no normalisation.

Convolutions: the original pads TF-"same" on the fly; for the stride-1 3x3 and 1x1 kernels used here
that is symmetric padding k // 2, so plain ``nn.Conv2d`` is equivalent and keeps the key names.

The architecture knobs make tiny instances for tests and the toy demo ("toy_vq" is this class).
GroupNorm uses 32 groups as in the original; a layer with fewer than 32 channels (tiny configs only)
uses one group per channel instead, and channel counts >= 32 must be divisible by 32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rear_ds.config import TokenizerConfig
from rear_ds.models.tokenizers.base import Tokenizer

GN_GROUPS = 32
GN_EPS = 1e-6


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6, affine); ``channels`` groups when there are fewer than 32 channels."""
    if channels >= GN_GROUPS and channels % GN_GROUPS:
        raise ValueError(f"GroupNorm with {GN_GROUPS} groups needs a channel count divisible by "
                         f"{GN_GROUPS}, got {channels} (check tokenizer.base_channels and tokenizer.channel_mult)")
    return nn.GroupNorm(min(GN_GROUPS, channels), channels, eps=GN_EPS, affine=True)


def conv(cin: int, cout: int, kernel: int, bias: bool) -> nn.Conv2d:
    """Stride-1 conv with TF-"same" padding (symmetric k // 2 for the odd kernels used here)."""
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)


class ResnetBlock(nn.Module):
    """GN, SiLU, conv3x3, GN, SiLU, conv3x3 (no biases, dropout 0) plus a shortcut.

    THE SHORTCUT QUIRK (as in the original MaskGIT JAX model): when the channel count changes, the
    1x1 ``nin_shortcut`` (cout -> cout) is applied to the residual branch output ``u`` and the block
    returns ``u + nin_shortcut(u)``; the input ``x`` is not used by the shortcut at all. Otherwise
    the block returns ``u + x``.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = conv(cin, cout, 3, bias=False)
        self.norm2 = group_norm(cout)
        self.conv2 = conv(cout, cout, 3, bias=False)
        self.nin_shortcut = conv(cout, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.conv1(F.silu(self.norm1(x)))
        u = self.conv2(F.silu(self.norm2(u)))
        if self.nin_shortcut is not None:
            return u + self.nin_shortcut(u)
        return u + x


def _blocks(cin: int, cout: int, n: int) -> nn.ModuleList:
    """``n`` resnet blocks; only the first one changes the channel count."""
    return nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(n)])


class DownLevel(nn.Module):
    """One encoder resolution level: resnet blocks, then 2x2 average pooling unless it is the last."""

    def __init__(self, cin: int, cout: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = _blocks(cin, cout, num_blocks)
        self.downsample = downsample  # parameter-free: the original pools, it has no strided conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpLevel(nn.Module):
    """One decoder resolution level: resnet blocks, then (levels > 0) nearest x2 and a 3x3 conv."""

    def __init__(self, cin: int, cout: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = _blocks(cin, cout, num_blocks)
        self.upsample_conv = conv(cout, cout, 3, bias=True) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """Image in [0, 1] (B, 3, H, W) -> latent (B, embed_dim, H / f, W / f), f = 2 ** (levels - 1)."""

    def __init__(self, base_channels: int, channel_mult: list, num_res_blocks: int, embed_dim: int):
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        self.conv_in = conv(3, base_channels, 3, bias=False)
        cins = [base_channels] + chans[:-1]
        last = len(chans) - 1
        self.down = nn.ModuleList([DownLevel(cins[i], chans[i], num_res_blocks, downsample=i != last)
                                   for i in range(len(chans))])
        # The original sizes the middle stage with num_res_blocks too (2 blocks at the defaults).
        self.mid = _blocks(chans[-1], chans[-1], num_res_blocks)
        self.norm_out = group_norm(chans[-1])
        self.conv_out = conv(chans[-1], embed_dim, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for blk in self.mid:
            x = blk(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, embed_dim, h, w) -> image (B, 3, h * f, w * f), not yet clamped."""

    def __init__(self, base_channels: int, channel_mult: list, num_res_blocks: int, embed_dim: int):
        super().__init__()
        chans = [base_channels * m for m in channel_mult]
        self.conv_in = conv(embed_dim, chans[-1], 3, bias=True)
        self.mid = _blocks(chans[-1], chans[-1], num_res_blocks)
        # Level i maps the output of level i + 1 (the mid stage for the last level) to chans[i].
        cins = chans[1:] + [chans[-1]]
        self.up = nn.ModuleList([UpLevel(cins[i], chans[i], num_res_blocks, upsample=i != 0)
                                 for i in range(len(chans))])
        self.norm_out = group_norm(chans[0])
        self.conv_out = conv(chans[0], 3, 3, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for blk in self.mid:
            x = blk(x)
        for level in reversed(self.up):  # stored up.0..up.L-1 by resolution, run coarsest first
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """The codebook: nearest entry by squared L2, no normalisation or projection."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, h, w) int64 ids of the nearest codebook rows."""
        b, _, h, w = z.shape
        flat = rearrange(z, "b c h w -> (b h w) c")  # raster order: index = row * w + col
        emb = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, computed in this order as in the reference (matters only for near-ties).
        dist = torch.addmm(flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1)[None, :], flat, emb.t(),
                           alpha=-2.0)
        return dist.argmin(dim=1).reshape(b, h, w)


class MaskGITVQGAN(Tokenizer):
    """The frozen MaskGIT-VQGAN tokenizer, built from a :class:`TokenizerConfig`."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if not cfg.channel_mult:
            raise ValueError("tokenizer.channel_mult must not be empty")
        self.name = cfg.name
        self.codebook_size = cfg.codebook_size
        self.embed_dim = cfg.embed_dim
        self.grid = cfg.grid
        self.downsample = cfg.downsample
        # What a weights file is checked against, in config terms (shown in load errors).
        self.arch = (f"tokenizer.name={cfg.name} base_channels={cfg.base_channels} "
                     f"channel_mult={list(cfg.channel_mult)} num_res_blocks={cfg.num_res_blocks} "
                     f"codebook_size={cfg.codebook_size} embed_dim={cfg.embed_dim}")
        knobs = (cfg.base_channels, list(cfg.channel_mult), cfg.num_res_blocks, cfg.embed_dim)
        self.encoder = Encoder(*knobs)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim)
        self.decoder = Decoder(*knobs)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] (no mean/std normalisation) -> (B, H / f, W / f) int64 ids."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % self.downsample \
                or images.shape[3] % self.downsample:
            raise ValueError(f"{self.name}.encode expects (B, 3, H, W) with H and W divisible by "
                             f"{self.downsample}, got {tuple(images.shape)}")
        # Token ids must not depend on the caller's autocast context: a bf16 latent changes argmins.
        with torch.autocast(images.device.type, enabled=False):
            z = self.encoder(images.to(self.quantize.embedding.weight))
            return self.quantize.nearest(z)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h * w) token ids (flat ones in raster order) -> (B, 3, H, W) in [0, 1]."""
        ids = self.flat_ids(tokens).reshape(-1, *self.grid)
        z = rearrange(self.codebook_vectors(ids), "b h w c -> b c h w")
        return self.decoder(z).clamp(0.0, 1.0)
