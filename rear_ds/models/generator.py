"""The reAR generator: a class-conditional, raster-order, causal transformer (method spec section 2).

Sequence layout for N image tokens (L = N + 2 positions):

    p = 0        learned cls vector                     (predicts nothing)
    p = 1        class token id (K + 1 + c, or null id)  -> predicts t_0
    p = 2 + i    image token t_i                         -> predicts t_{i+1}  (p = N + 1 predicts nothing)

Input at p:     x_p = E[id_p] + P[p] + T[p],   T[p] = A[p + 1] for 1 <= p <= N, else 0
Condition at p: c_p = E[class id] + S[p]       (per-position adaLN conditioning)

Blocks are pre-norm DiT-style adaLN-Zero with affine LayerNorms, QK-norm and causal SDPA. The state-dict
names follow the released reAR checkpoints (spec 2.8), so those load strictly into this module.
The model knows nothing of DeepSpeed, files or Slurm; initialisation happens inside each layer's own
``reset_parameters`` so that it also works when parameters are partitioned at construction (ZeRO-3).
GeneratorBase holds what every family shares (the second family: rear_ds/models/alitok_ar.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rear_ds.config import ConfigError, ModelConfig


def apex_layernorm():
    """NVIDIA apex's FusedLayerNorm class (same parameters and state-dict names as torch's), or None when apex
    is not installed: it is optional, never required. choose_layernorm decides where it is used."""
    try:  # pragma: no cover - apex is not installed on the CPU test machines
        from apex.normalization import FusedLayerNorm
    except Exception:  # ImportError, or a broken apex build
        return None
    return FusedLayerNorm


def choose_layernorm(t, apex_cls) -> tuple:
    """(class, why) of the blocks' LayerNorms for train config ``t``, given apex's class (None: not installed).

    apex's fused kernel pays off with 16-bit weights. Under autocast (bf16_autocast) it would run in bf16, where
    torch's LayerNorm runs in fp32 (the reference numerics), and under torch.compile its custom autograd
    function breaks the graph while inductor fuses torch's LayerNorm by itself: "auto" keeps torch's there."""
    if t.apex_layernorm == "never" or apex_cls is None:
        why = "train.apex_layernorm=never" if t.apex_layernorm == "never" else "apex not installed"
        return nn.LayerNorm, why
    if t.apex_layernorm == "always":
        return apex_cls, "train.apex_layernorm=always"
    if t.precision not in ("bf16", "fp16"):
        return nn.LayerNorm, f"train.precision={t.precision} (apex would change the LayerNorm numerics)"
    if t.compile:
        return nn.LayerNorm, "train.compile=true (inductor fuses torch's LayerNorm; apex would break the graph)"
    return apex_cls, f"apex installed, train.precision={t.precision}"


INIT_STD = 0.02


# --------------------------------------------------------------------------------------
# Layers with the reference initialisation (spec 2.6)
# --------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """Linear with weight ~ trunc_normal(0, 0.02) (truncated at +-2, i.e. effectively normal), bias 0."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroLinear(nn.Linear):
    """The adaLN-Zero output projection: weight and bias start at zero, so each block starts as identity."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=INIT_STD)


def _table(rows: int, dim: int) -> nn.Parameter:
    t = torch.empty(1, rows, dim)
    nn.init.trunc_normal_(t, std=INIT_STD)
    return nn.Parameter(t)


# --------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Preallocated keys/values for incremental sampling: (depth, B, H, max_len, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
    """Causal SDPA over (B, H, T, hd) tensors; with a cache, the T new positions follow the cached ones."""
    if cache is None:
        # Training / full recompute: the fused causal kernel, no materialised L x L mask.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    start, T = cache.length, q.shape[2]
    cache.k[layer, :, :, start:start + T] = k
    cache.v[layer, :, :, start:start + T] = v
    k_all = cache.k[layer, :, :, :start + T]
    v_all = cache.v[layer, :, :, :start + T]
    if T == 1:
        # A single new query may see every cached position: no mask at all (spec 2.9).
        return F.scaled_dot_product_attention(q, k_all, v_all)
    # Several new queries after `start` cached ones: query j sees keys 0..start+j.
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        # QK-norm: one LayerNorm over head_dim, shared by all heads.
        self.q_norm = norm_layer(self.head_dim, eps=1e-6)
        self.k_norm = norm_layer(self.head_dim, eps=1e-6)
        self.attn_dropout = cfg.attn_dropout
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, hd)
        # QK-norm; cast back so the attention kernel sees one dtype (a fused LayerNorm may return fp32).
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        out = causal_attention(q, k, v, self.attn_dropout if self.training else 0.0, cache, layer)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.mlp_dim)
        self.act = nn.GELU()  # exact erf GELU, not the tanh approximation
        self.drop1 = nn.Dropout(cfg.dropout)
        self.fc2 = Linear(cfg.mlp_dim, cfg.hidden_size)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm adaLN-Zero block; LayerNorms keep their own affine weights under the modulation."""

    def __init__(self, cfg: ModelConfig, norm_layer=nn.LayerNorm):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = norm_layer(D, eps=1e-6)
        self.attn = Attention(cfg, norm_layer)
        self.norm2 = norm_layer(D, eps=1e-6)
        self.mlp = MLP(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ZeroLinear(D, 6 * D))

    def forward(self, x: torch.Tensor, silu_cond: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        # silu_cond = SiLU(c_p), computed once for all blocks; adaLN_modulation[0] is that SiLU (kept for the
        # checkpoint layout, where the Linear is index 1).
        mod = self.adaLN_modulation[1](silu_cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, cache, layer)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x


class FinalLayer(nn.Module):
    """Final adaLN: note the chunk order (scale, shift), the opposite of the blocks'."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ZeroLinear(D, 2 * D))

    def forward(self, x: torch.Tensor, silu_cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation[1](silu_cond).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def align_head(cfg: ModelConfig) -> nn.Sequential:
    """Projection head D -> proj -> ... -> z_dim; 3 Linear + SiLU gives the released keys {0, 2, 4}."""
    act = nn.SiLU if cfg.align_head_act == "silu" else nn.GELU
    dims = [cfg.hidden_size] + [cfg.align_proj_dim] * (cfg.align_head_layers - 1) + [cfg.align_z_dim]
    layers: list = []
    for i in range(cfg.align_head_layers):
        if i:
            layers.append(act())
        layers.append(Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


class GeneratorBase(nn.Module):
    """What every generator family shares (the interface the objective, sampler and trainer use).

    A family subclasses this and supplies: ``CONTEXT_POSITIONS`` (positions before t_0), ``check_config``,
    ``flops_per_sample``, ``forward`` (teacher-forced logits + optional alignment features) and
    ``forward_cached`` (one KV-cache step). The registry in rear_ds/models/__init__.py maps ``model.family`` to
    the class; nothing outside the model files asks which family it has.
    """

    CONTEXT_POSITIONS = 0
    ALIGN_PREFIXES = ("encode_align_mlp.", "decode_align_mlp.")

    def __init__(self, cfg: ModelConfig, with_align_heads: bool):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.with_align_heads = with_align_heads
        self._checkpointed: set = set()

    def _add_align_heads(self) -> None:
        """The training-only heads; a family creates them last (its init's RNG order and key order)."""
        if self.with_align_heads:
            self.encode_align_mlp = align_head(self.cfg)
            self.decode_align_mlp = align_head(self.cfg)

    @staticmethod
    def check_config(cfg: ModelConfig, prefix: str) -> None:
        """Family-specific config checks (ModelConfig.validate calls this); raise ConfigError."""

    @staticmethod
    def norm_layer_for(train_cfg) -> tuple:
        """(class, why) of the norm layers to build for a run with train config ``train_cfg``."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def describe(self) -> str:
        c = self.cfg
        return (f"{type(self).__name__}(family={c.family}, hidden_size={c.hidden_size}, depth={c.depth}, "
                f"num_heads={c.num_heads}, mlp_dim={c.mlp_dim}, codebook_size={c.codebook_size}, "
                f"num_classes={c.num_classes}, num_tokens={c.num_tokens})")

    def class_token_ids(self, labels: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class indices 0..C-1 -> embedding ids; where ``drop`` is True, the null-class id (CFG / dropout)."""
        ids = labels.long() + self.cfg.class_offset
        if drop is not None:
            ids = torch.where(drop, torch.full_like(ids, self.cfg.null_class_id), ids)
        return ids

    def set_activation_checkpointing(self, mode: str = "off", k: int = 2) -> None:
        """"off", "all" blocks, or "every_k": blocks 0, k, 2k, ... recompute activations in backward."""
        if mode == "off":
            self._checkpointed = set()
        elif mode == "all":
            self._checkpointed = set(range(self.cfg.depth))
        elif mode == "every_k":
            self._checkpointed = set(range(0, self.cfg.depth, k))
        else:
            raise ValueError(f"activation checkpointing mode {mode!r}: expected 'off', 'all' or 'every_k'")

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile each block separately (as the reference does); the layers and state dict stay as they are.

        Compiling per block keeps compile time independent of depth and lets activation checkpointing wrap
        compiled blocks. Meant for GPUs; on the CPU the compile time rarely pays off.
        """
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def _run_blocks(self, x: torch.Tensor, block_args: tuple, encode_align: bool, decode_align: bool,
                    enc_rows: slice, dec_rows: slice):
        """All blocks (checkpointed where asked); the align heads read block outputs at the rows the family maps
        to t_0..t_{N-1}: ``enc_rows`` hold them (encode), ``dec_rows`` predict them (decode)."""
        if (encode_align or decode_align) and not self.with_align_heads:
            raise ValueError("alignment features requested from a generator built without align heads")
        enc = dec = None
        for i, block in enumerate(self.blocks):
            if i in self._checkpointed and torch.is_grad_enabled():
                x = checkpoint(block, x, *block_args, use_reentrant=False)
            else:
                x = block(x, *block_args)
            if encode_align and i == self.cfg.encode_align_layer:
                enc = self.encode_align_mlp(x[:, enc_rows])
            if decode_align and i == self.cfg.decode_align_layer:
                dec = self.decode_align_mlp(x[:, dec_rows])
        return x, enc, dec

    def new_kv_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        w = self.embeddings.weight
        shape = (self.cfg.depth, batch, self.cfg.num_heads, self.cfg.seq_len, self.cfg.head_dim)
        return KVCache(torch.empty(shape, device=device or w.device, dtype=dtype or w.dtype),
                       torch.empty(shape, device=device or w.device, dtype=dtype or w.dtype))

    def inference_state_dict(self) -> dict:
        """The state dict without the training-only alignment heads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.ALIGN_PREFIXES)}

    @staticmethod
    def align_head_flops(cfg: ModelConfig) -> int:
        """Forward matmul FLOPs of the two align heads, each on N positions."""
        P, Z = cfg.align_proj_dim, cfg.align_z_dim
        dims = [cfg.hidden_size] + [P] * (cfg.align_head_layers - 1) + [Z]
        return 2 * 2 * cfg.num_tokens * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


class ReARGenerator(GeneratorBase):
    CONTEXT_POSITIONS = 2  # [cls, class]

    def __init__(self, cfg: ModelConfig, with_align_heads: bool = True, norm_layer=nn.LayerNorm):
        """``norm_layer``: the class of the blocks' LayerNorms (torch's, or apex's fused one in training)."""
        super().__init__(cfg, with_align_heads)
        D, N = cfg.hidden_size, cfg.num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.embeddings = Embedding(cfg.vocab_size, D)
        self.pos_embed = _table(N + cfg.pos_table_extra, D)
        self.target_aware_pos_embed = _table(N + cfg.pos_table_extra, D)
        self.timesteps_embeddings = _table(N + cfg.cond_table_extra, D)
        self.blocks = nn.ModuleList([Block(cfg, norm_layer) for _ in range(cfg.depth)])
        self.adaln_before_head = FinalLayer(cfg)
        self.lm_head = Linear(D, cfg.codebook_size)
        self._add_align_heads()

    @staticmethod
    def norm_layer_for(train_cfg) -> tuple:
        return choose_layernorm(train_cfg, apex_layernorm())

    @staticmethod
    def check_config(cfg: ModelConfig, prefix: str) -> None:
        for key in ("prefix_tokens", "tok_dropout"):
            if getattr(cfg, key):
                raise ConfigError(f"{prefix}.{key}={getattr(cfg, key)} is for {prefix}.family=alitok; the rear "
                                  "family has no prefix tokens and no token dropout")

    # ---- helpers ---------------------------------------------------------------------

    def _target_term(self, start: int, length: int) -> torch.Tensor:
        """T[p] for p in [start, start + length): A[p + 1] where 1 <= p <= N, zero elsewhere. (1, length, D)."""
        N = self.cfg.num_tokens
        lo, hi = max(start, 1), min(start + length, N + 1)  # positions that predict a token
        if hi <= lo:
            return torch.zeros_like(self.target_aware_pos_embed[:, :length])
        rows = self.target_aware_pos_embed[:, lo + 1:hi + 1]
        return F.pad(rows, (0, 0, lo - start, start + length - hi))

    def _embed(self, ids: torch.Tensor, start: int, class_ids: torch.Tensor, with_cls: bool):
        """Inputs x_p and conditions c_p for positions start .. start + T - 1 (the cls vector when with_cls)."""
        x = self.embeddings(ids)
        if with_cls:
            x = torch.cat([self.cls_token.expand(ids.shape[0], -1, -1).to(x.dtype), x], dim=1)
        T = x.shape[1]
        x = x + self.pos_embed[:, start:start + T] + self._target_term(start, T)
        cond = self.embeddings(class_ids).unsqueeze(1) + self.timesteps_embeddings[:, start:start + T]
        return x, cond

    # ---- training / full recompute ----------------------------------------------------

    def forward(self, image_tokens: torch.Tensor, class_ids: torch.Tensor,
                encode_align: bool = False, decode_align: bool = False):
        """Teacher-forced pass.

        image_tokens: (B, n) int64, n <= N (n = N in training; shorter prefixes for full-recompute sampling).
        class_ids:    (B,) embedding ids from :meth:`class_token_ids`.
        encode_align / decode_align: also return the projected alignment features (training, n = N):
            encode: g_enc(output of block e) at the positions holding t_0..t_{N-1} (p = 2..N+1), (B, N, z);
            decode: g_dec(output of block d) at the positions predicting t_0..t_{N-1} (p = 1..N), (B, N, z).
        Returns (logits, encode_feats or None, decode_feats or None); logits (B, min(n + 1, N), K) are for
        positions 1 .. min(n + 1, N), i.e. the predictions of t_0 .. t_{min(n, N - 1)}.
        The heads run inside this forward so that ZeRO-3 gathers their parameters like any other layer.
        """
        N = self.cfg.num_tokens
        ids = torch.cat([class_ids[:, None], image_tokens], dim=1)
        x, cond = self._embed(ids, 0, class_ids, with_cls=True)
        cond = F.silu(cond)
        x, enc, dec = self._run_blocks(x, (cond,), encode_align, decode_align,
                                       enc_rows=slice(2, N + 2), dec_rows=slice(1, N + 1))
        last = min(image_tokens.shape[1] + 1, N)
        out = self.adaln_before_head(x[:, 1:last + 1], cond[:, 1:last + 1])
        return self.lm_head(out), enc, dec

    # ---- incremental sampling ------------------------------------------------------------

    def forward_cached(self, class_ids: torch.Tensor, cache: KVCache,
                       new_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One sampling step with a KV cache; returns the logits (B, K) of the newest position.

        First call (empty cache, new_tokens None): processes [cls, class] and predicts t_0.
        Later calls: new_tokens (B, 1) holds t_i, placed at position cache.length; predicts t_{i+1}.
        """
        if cache.length == 0:
            x, cond = self._embed(class_ids[:, None], 0, class_ids, with_cls=True)
        else:
            x, cond = self._embed(new_tokens, cache.length, class_ids, with_cls=False)
        cond = F.silu(cond)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, cache, layer=i)
        cache.length += x.shape[1]
        out = self.adaln_before_head(x[:, -1:], cond[:, -1:])
        return self.lm_head(out)[:, 0]

    @staticmethod
    def flops_per_sample(cfg: ModelConfig, include_align: bool = True, training: bool = True) -> float:
        """Matmul FLOPs for one sequence of L = N + 2 positions (forward x3 for training).

        Every Linear runs on all L positions (the adaLN modulation is per position too); attention counts
        the full L x L score and value products (the usual MFU convention, no causal discount). The align
        heads run on N positions each. reAR-L comes to about 7.4e11 per training sample (spec section 11).
        """
        D, M, L = cfg.hidden_size, cfg.mlp_dim, cfg.seq_len
        per_block = 3 * D * D + D * D + 2 * D * M + 6 * D * D  # qkv, proj, fc1+fc2, adaLN
        linear = cfg.depth * per_block + 2 * D * D + D * cfg.codebook_size  # + final adaLN + lm_head
        fwd = 2 * L * linear + cfg.depth * 4 * L * L * D
        if include_align:
            fwd += GeneratorBase.align_head_flops(cfg)
        return float(fwd * (3 if training else 1))


ALIGN_PREFIXES = GeneratorBase.ALIGN_PREFIXES
