"""The AliTok generator family (alitok spec section 2): a LlamaGen-style decoder-only transformer, no adaLN.

Sequence layout for N = P + G*G image tokens (AliTok: P = 17 prefix tokens, G = 16, N = 273; L = N + 1):

    p = 0        class token id (K + 1 + c, or the null id)  -> predicts t_0
    p = 1 + i    image token t_i                             -> predicts t_{i+1}  (p = N predicts nothing)

The vocabulary is the reAR one: codes 0..K-1, an unused slot K (reAR's [MASK] id), classes K+1+c, the null
class K+1+C (AliTok-B: 5098 rows). There is no position table: position comes only from RoPE (interleaved pairs,
fp32), whose row p is
    p = 0            all zeros: the class token's q and k are exactly 0 in every layer (LlamaGen's quirk, kept);
    p = 1 .. P       1-D RoPE over the whole head dim at positions 0 .. P-1;
    p = P+1 ..       2-D RoPE for grid cell (r, c): the first half of the head dim rotates with r + P, the second
                     half with c + P (coordinates continue after the prefix), frequencies base^(-4j/hd).
Blocks: pre-norm, RMSNorm computed in fp32; qkv with bias; QK RMSNorm (one weight over head_dim, shared by the
heads) BEFORE RoPE; causal SDPA with attention dropout; proj + dropout; SwiGLU + dropout. Element-wise token
dropout on the embeddings (class row included). The output head starts at zero (CE = ln K at step 0).

State-dict names are those of the released ``alitok_{b,l,xl}.bin`` (268 / 268 / 356 tensors), so the files load
strictly. The reAR alignment heads (GeneratorBase) read block outputs at p = 1..N (encode: rows holding t_i) and
p = 0..N-1 (decode: rows predicting t_i): reAR's slices shifted by one, since there is no cls token (alitok spec
3.2). Initialisation runs in each layer's ``reset_parameters`` (ZeRO-3 zero.Init); the RoPE table is computed
lazily in fp32 on the device that needs it (never a parameter or buffer: not in the state dict, never cast).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from rear_ds.config import ConfigError, ModelConfig
from rear_ds.models.generator import (Embedding, GeneratorBase, KVCache, Linear, ZeroLinear,
                                      causal_attention)

ROPE_BASE = 10_000


def ffn_width(hidden_size: int) -> int:
    """AliTok's SwiGLU width: int(2 * 4D / 3) rounded up to a multiple of 256 (B 2048, L 2816, XL 3584)."""
    return -(-int(2 * 4 * hidden_size / 3) // 256) * 256


def rope_table(prefix_tokens: int, grid: int, head_dim: int, base: int = ROPE_BASE) -> torch.Tensor:
    """(1 + P + G*G, head_dim / 2, 2) fp32 (cos, sin) per rotated pair, rows as in the module docstring."""
    half = head_dim // 2
    freqs_1d = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[:half] / head_dim))
    ang_1d = torch.outer(torch.arange(prefix_tokens, dtype=torch.float32), freqs_1d)  # (P, hd/2)
    quarter = head_dim // 4
    freqs_2d = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32)[:quarter] / half))
    coord = torch.outer(torch.arange(prefix_tokens, prefix_tokens + grid, dtype=torch.float32), freqs_2d)
    ang_2d = torch.cat([coord[:, None, :].expand(-1, grid, -1),  # row coordinate: first half of the pairs
                        coord[None, :, :].expand(grid, -1, -1)], dim=-1).flatten(0, 1)  # column: second half
    ang = torch.cat([ang_1d, ang_2d])
    table = torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
    return torch.cat([torch.zeros(1, half, 2), table])  # row 0 (class token): cos = sin = 0


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x (B, H, T, hd) by rope (T, hd/2, 2), in fp32; returns x's dtype."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Weight-only RMSNorm: normalised in fp32, cast back to the input dtype, then scaled (AliTok's numerics)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_layer=RMSNorm):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = norm_layer(self.head_dim)
        self.k_norm = norm_layer(self.head_dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        # QK-norm before RoPE; one dtype for the kernel (under autocast the norm's weight promotes to fp32)
        q = apply_rope(self.q_norm(q), rope).to(v.dtype)
        k = apply_rope(self.k_norm(k), rope).to(v.dtype)
        out = causal_attention(q, k, v, self.attn_dropout if self.training else 0.0, cache, layer)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, D)))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, M = cfg.hidden_size, cfg.mlp_dim
        self.w1 = Linear(D, M, bias=False)
        self.w3 = Linear(D, M, bias=False)
        self.w2 = Linear(M, D, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_layer=RMSNorm):
        super().__init__()
        self.norm1 = norm_layer(cfg.hidden_size)
        self.attn = Attention(cfg, norm_layer)
        self.norm2 = norm_layer(cfg.hidden_size)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class AliTokGenerator(GeneratorBase):
    CONTEXT_POSITIONS = 1  # [class]

    def __init__(self, cfg: ModelConfig, with_align_heads: bool = True, norm_layer=RMSNorm):
        """``norm_layer``: the RMSNorm class of the blocks, the QK-norm and the final norm."""
        super().__init__(cfg, with_align_heads)
        D = cfg.hidden_size
        self.blocks = nn.ModuleList([Block(cfg, norm_layer) for _ in range(cfg.depth)])
        self.embeddings = Embedding(cfg.vocab_size, D)
        self.norm = norm_layer(D)
        self.output = ZeroLinear(D, cfg.codebook_size)  # zero weight and bias: CE = ln K at step 0
        self.tok_dropout = nn.Dropout(cfg.tok_dropout)
        self._rope_cache: dict = {}
        self._add_align_heads()

    @staticmethod
    def check_config(cfg: ModelConfig, prefix: str) -> None:
        if cfg.head_dim % 4:
            raise ConfigError(f"{prefix}.hidden_size / {prefix}.num_heads = {cfg.head_dim}: the 2-D RoPE of the "
                              "alitok family rotates head_dim / 4 pairs per grid axis, so it must be divisible by 4")
        grid = math.isqrt(cfg.num_tokens - cfg.prefix_tokens)
        if grid * grid != cfg.num_tokens - cfg.prefix_tokens:
            raise ConfigError(f"{prefix}.num_tokens={cfg.num_tokens} - {prefix}.prefix_tokens={cfg.prefix_tokens} "
                              "must be a square number (the token grid after the prefix)")

    @staticmethod
    def norm_layer_for(train_cfg) -> tuple:
        if train_cfg.apex_layernorm == "always":
            raise ConfigError("train.apex_layernorm=always: the alitok family has no LayerNorm (its norms are "
                              "RMSNorm); use 'auto' or 'never'")
        return RMSNorm, "the alitok family's RMSNorm (normalised in fp32, as AliTok)"

    @property
    def grid(self) -> int:
        return math.isqrt(self.cfg.num_tokens - self.cfg.prefix_tokens)

    def rope(self, device: torch.device) -> torch.Tensor:
        """The (L, head_dim / 2, 2) fp32 RoPE table on ``device``, made once per device."""
        if device not in self._rope_cache:
            table = rope_table(self.cfg.prefix_tokens, self.grid, self.cfg.head_dim)
            self._rope_cache[device] = table.to(device)
        return self._rope_cache[device]

    def forward(self, image_tokens: torch.Tensor, class_ids: torch.Tensor,
                encode_align: bool = False, decode_align: bool = False):
        """Teacher-forced pass; the same contract as ReARGenerator.forward.

        image_tokens (B, n), n <= N; class_ids (B,) from :meth:`class_token_ids`. Returns (logits
        (B, min(n + 1, N), K) predicting t_0 .. t_min(n, N-1), encode feats (B, N, z) from block e's output at
        p = 1..N or None, decode feats (B, N, z) from block d's output at p = 0..N-1 or None).
        """
        N = self.cfg.num_tokens
        ids = torch.cat([class_ids[:, None], image_tokens], dim=1)
        x = self.tok_dropout(self.embeddings(ids))
        rope = self.rope(x.device)[:ids.shape[1]]
        x, enc, dec = self._run_blocks(x, (rope,), encode_align, decode_align,
                                       enc_rows=slice(1, N + 1), dec_rows=slice(0, N))
        last = min(image_tokens.shape[1] + 1, N)
        return self.output(self.norm(x[:, :last])), enc, dec

    def forward_cached(self, class_ids: torch.Tensor, cache: KVCache,
                       new_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One KV-cache step; logits (B, K) of the newest position. The first call (empty cache) processes
        [class] alone and predicts t_0; later calls take new_tokens (B, 1) = t_i at position cache.length."""
        ids = class_ids[:, None] if cache.length == 0 else new_tokens
        x = self.tok_dropout(self.embeddings(ids))
        start = cache.length
        rope = self.rope(x.device)[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer=i)
        cache.length += x.shape[1]
        return self.output(self.norm(x[:, -1:]))[:, 0]

    @staticmethod
    def flops_per_sample(cfg: ModelConfig, include_align: bool = True, training: bool = True) -> float:
        """Matmul FLOPs for one sequence of L = N + 1 positions (forward x3 for training), by the same
        convention as ReARGenerator.flops_per_sample: qkv, proj and the three SwiGLU matrices on every position,
        full L x L attention, the output head on every position, the align heads on N positions each."""
        D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.seq_len
        linear = cfg.depth * (3 * D * D + D * D + 3 * D * M) + D * cfg.codebook_size
        fwd = 2 * L * linear + cfg.depth * 4 * L * L * D
        if include_align:
            fwd += GeneratorBase.align_head_flops(cfg)
        return float(fwd * (3 if training else 1))
