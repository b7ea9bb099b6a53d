"""A straightforward eager PyTorch implementation of the reAR generator and loss (the bench baseline).

Same model and loss as rear_ds.models.generator / rear_ds.objective (spec sections 2-3), written the way a
first implementation would be: separate q/k/v Linear layers, a materialised float causal mask rebuilt in every
forward, plain softmax attention (scores -> softmax -> dropout -> @ v), position tables sliced and padded per
call, no fused kernels. ``EagerReAR.from_rear(gen)`` copies the weights of a ReARGenerator so the two can be
checked against each other (tests/test_bench.py does, in fp32 with dropout off).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rear_ds.config import ModelConfig, ObjectiveConfig


class EagerAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.h, self.hd = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.q_norm = nn.LayerNorm(self.hd, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.hd, eps=1e-6)
        self.attn_drop = nn.Dropout(cfg.attn_dropout)
        self.proj = nn.Linear(D, D)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.h, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.h, self.hd).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = torch.triu(torch.full((T, T), float("-inf"), device=x.device), diagonal=1)  # float, materialised
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd) + mask
        att = self.attn_drop(torch.softmax(scores, dim=-1))
        out = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out))


class EagerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = EagerAttention(cfg)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(D, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, D)
        self.drop1, self.drop2 = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.ada = nn.Linear(D, 6 * D)

    def forward(self, x, cond):
        s1, c1, g1, s2, c2, g2 = self.ada(F.silu(cond)).chunk(6, dim=-1)
        x = x + g1 * self.attn(self.norm1(x) * (1 + c1) + s1)
        h = self.norm2(x) * (1 + c2) + s2
        x = x + g2 * self.drop2(self.fc2(self.drop1(F.gelu(self.fc1(h)))))
        return x


def _head(cfg: ModelConfig) -> nn.Sequential:
    act = nn.SiLU if cfg.align_head_act == "silu" else nn.GELU
    dims = [cfg.hidden_size] + [cfg.align_proj_dim] * (cfg.align_head_layers - 1) + [cfg.align_z_dim]
    layers = []
    for i in range(cfg.align_head_layers):
        if i:
            layers.append(act())
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


class EagerReAR(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D, N = cfg.hidden_size, cfg.num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.embeddings = nn.Embedding(cfg.vocab_size, D)
        self.pos_embed = nn.Parameter(torch.randn(1, N + cfg.pos_table_extra, D) * 0.02)
        self.target_aware_pos_embed = nn.Parameter(torch.randn(1, N + cfg.pos_table_extra, D) * 0.02)
        self.timesteps_embeddings = nn.Parameter(torch.randn(1, N + cfg.cond_table_extra, D) * 0.02)
        self.blocks = nn.ModuleList([EagerBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.final_ada = nn.Linear(D, 2 * D)
        self.lm_head = nn.Linear(D, cfg.codebook_size)
        self.encode_align_mlp = _head(cfg)
        self.decode_align_mlp = _head(cfg)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens, class_ids):
        """tokens (B, N) (already perturbed), class_ids (B,) embedding ids -> (logits (B,N,K), enc, dec)."""
        cfg = self.cfg
        B, N = tokens.shape
        ids = torch.cat([class_ids[:, None], tokens], dim=1)
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.embeddings(ids)], dim=1)  # (B, L, D)
        L = x.shape[1]
        target = torch.zeros(1, L, x.shape[-1], device=x.device)  # T[p] = A[p+1] for 1 <= p <= N
        target[:, 1:N + 1] = self.target_aware_pos_embed[:, 2:N + 2]
        x = x + self.pos_embed[:, :L] + target
        cond = self.embeddings(class_ids)[:, None] + self.timesteps_embeddings[:, :L]
        enc = dec = None
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond)
            if i == cfg.encode_align_layer:
                enc = self.encode_align_mlp(x[:, 2:N + 2])
            if i == cfg.decode_align_layer:
                dec = self.decode_align_mlp(x[:, 1:N + 1])
        scale, shift = self.final_ada(F.silu(cond)).chunk(2, dim=-1)
        h = self.final_norm(x) * (1 + scale) + shift
        return self.lm_head(h[:, 1:N + 1]), enc, dec

    @torch.no_grad()
    def from_rear(self, gen) -> "EagerReAR":
        """Copy a ReARGenerator's weights (splitting its fused qkv) into this module."""
        sd = gen.state_dict()
        mine = {"cls_token": "cls_token", "embeddings.weight": "embeddings.weight", "pos_embed": "pos_embed",
                "target_aware_pos_embed": "target_aware_pos_embed",
                "timesteps_embeddings": "timesteps_embeddings", "final_ada.weight": "adaln_before_head.adaLN_modulation.1.weight",
                "final_ada.bias": "adaln_before_head.adaLN_modulation.1.bias", "lm_head.weight": "lm_head.weight",
                "lm_head.bias": "lm_head.bias"}
        for name in list(self.state_dict()):
            if name.startswith(("encode_align_mlp", "decode_align_mlp")):
                mine[name] = name
        for i in range(self.cfg.depth):
            p, q = f"blocks.{i}.", f"blocks.{i}."
            for a, b in [("norm1", "norm1"), ("norm2", "norm2"), ("attn.q_norm", "attn.q_norm"),
                         ("attn.k_norm", "attn.k_norm"), ("attn.proj", "attn.proj"), ("fc1", "mlp.fc1"),
                         ("fc2", "mlp.fc2"), ("ada", "adaLN_modulation.1")]:
                for s in ("weight", "bias"):
                    mine[p + a + "." + s] = q + b + "." + s
        own = self.state_dict()
        for k, src in mine.items():
            own[k].copy_(sd[src])
        D = self.cfg.hidden_size
        for i in range(self.cfg.depth):
            w, b = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.bias"]
            for j, n in enumerate("qkv"):
                own[f"blocks.{i}.attn.{n}.weight"].copy_(w[j * D:(j + 1) * D])
                own[f"blocks.{i}.attn.{n}.bias"].copy_(b[j * D:(j + 1) * D])
        return self


def eager_loss(model: EagerReAR, ocfg: ObjectiveConfig, tokens, labels, codebook, rho: float,
               generator=None, noisy_tokens=None, noise_mask=None, drop=None):
    """The full reAR loss (CE + lambda * (enc + dec cosine alignment)) written out plainly."""
    cfg = model.cfg
    B, N = tokens.shape
    if drop is None:
        drop = torch.rand(B, generator=generator, device=tokens.device) < ocfg.class_dropout
    if noisy_tokens is None:
        ratio = torch.rand(B, 1, generator=generator, device=tokens.device) * rho
        noise_mask = torch.rand(B, N, generator=generator, device=tokens.device) < ratio
        repl = torch.randint(0, cfg.codebook_size, (B, N), generator=generator, device=tokens.device)
        noisy_tokens = torch.where(noise_mask, repl, tokens)
    class_ids = torch.where(drop, torch.full_like(labels, cfg.null_class_id), labels + cfg.class_offset)
    logits, enc, dec = model(noisy_tokens, class_ids)
    ce = F.cross_entropy(logits.float().reshape(-1, cfg.codebook_size), tokens.reshape(-1))
    target = codebook.float()[tokens]
    keep = (~noise_mask).float()
    enc_loss = -(keep * F.cosine_similarity(enc.float(), target, dim=-1, eps=1e-12)).sum() / (B * N)
    dec_loss = -F.cosine_similarity(dec.float(), target, dim=-1, eps=1e-12).sum() / (B * N)
    return ce + ocfg.align_weight * (enc_loss + dec_loss)
