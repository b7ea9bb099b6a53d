"""The reAR training objective (method spec section 3).

    L = CE(logits at p = 1..N, clean t_0..t_{N-1})
        + lambda * (L_enc + L_dec)

    L_enc = -(1 / (B N)) sum_{b,i} (1 - m_{b,i}) cos(g_enc(h^e_{b, 2+i}), codebook[t_{b,i}])
    L_dec = -(1 / (B N)) sum_{b,i}               cos(g_dec(h^d_{b, 1+i}), codebook[t_{b,i}])

m marks the input positions replaced by the noisy-context perturbation. Labels and alignment targets
always use the clean tokens. With ``noisy_context``, ``encode_align`` and ``decode_align`` all off this
is the plain AR baseline, computed by the same code.

The same objective serves every generator family: the model maps t_0..t_{N-1} to its own positions (the
alitok family has no cls token, so its rows are reAR's shifted by one; alitok spec 3.2) and returns the
features already at those rows. Noise only ever touches the N image tokens, never the class token. For a model
with prefix tokens (AliTok's 17), ``perturb_prefix`` / ``align_prefix`` false keep them out of the noise / out
of both alignment sums (the denominator stays B*N).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rear_ds.config import ModelConfig, ObjectiveConfig


def rho_schedule(step: int, start: int, end: int) -> float:
    """Noise anneal factor at optimizer step ``step``: 1 before ``start``, linear to 0 at ``end``, then 0."""
    if step < start:
        return 1.0
    if step <= end:
        return 1.0 - (step - start) / (end - start)
    return 0.0


def perturb_tokens(tokens: torch.Tensor, rho: float, mode: str, codebook_size: int,
                   generator: Optional[torch.Generator] = None):
    """Noisy context: per sample a ratio r_b = U_b * rho, then each token is replaced with probability r_b.

    "switch" replaces with a uniform random codebook id (which may equal the original: it is still
    flagged), "mask" with the [MASK] id K. Returns (noisy tokens, mask m as bool).
    """
    B, N = tokens.shape
    dev = tokens.device
    ratio = torch.rand(B, 1, device=dev, generator=generator) * rho
    mask = torch.rand(B, N, device=dev, generator=generator) < ratio
    if mode == "switch":
        repl = torch.randint(0, codebook_size, (B, N), device=dev, generator=generator)
    else:
        repl = torch.full_like(tokens, codebook_size)
    return torch.where(mask, repl, tokens), mask


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a/|a|, b/|b|> over the last dimension."""
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


class ReARObjective:
    """Callable loss: draws class dropout and perturbation (training only), runs the model, sums the terms."""

    def __init__(self, cfg: ObjectiveConfig, model_cfg: ModelConfig):
        cfg.validate()  # e.g. an unresolved anneal_end: ObjectiveConfig.resolve(optim.total_steps)
        self.cfg = cfg
        self.model_cfg = model_cfg

    def rho(self, step: int) -> float:
        if not self.cfg.noisy_context:
            return 0.0
        return rho_schedule(step, self.cfg.anneal_start, self.cfg.anneal_end)

    def __call__(self, model, tokens: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor,
                 step: int, generator: Optional[torch.Generator] = None, training: bool = True,
                 noisy_tokens: Optional[torch.Tensor] = None, noise_mask: Optional[torch.Tensor] = None,
                 drop: Optional[torch.Tensor] = None):
        """Loss and metrics for one batch.

        model:    the generator (or a DeepSpeed engine wrapping it; only its forward is called).
        tokens:   (B, N) int64 clean image tokens.  labels: (B,) class indices in [0, C).
        codebook: (K, z) tokenizer codebook matrix (the alignment targets), any float dtype.
        step:     the global optimizer step, which sets rho.
        noisy_tokens / noise_mask / drop: give these to replay a fixed perturbation and class dropout
                  (parity checks); otherwise they are drawn here when ``training``.
        Returns (loss, metrics) with 0-d detached tensors in metrics (no host sync here).
        """
        cfg, mcfg = self.cfg, self.model_cfg
        B, N = tokens.shape
        rho = self.rho(step) if training else 0.0
        # Random draws happen whenever the reference draws them (also at p = 0 or rho = 0), so that the RNG
        # stream, and with it the dropout masks that follow, can be replayed against the reference.
        if drop is None and training:
            drop = torch.rand(B, device=tokens.device, generator=generator) < cfg.class_dropout
        if noisy_tokens is None:
            if training and cfg.noisy_context:
                noisy_tokens, noise_mask = perturb_tokens(tokens, rho, cfg.perturb_mode, mcfg.codebook_size,
                                                          generator)
            else:
                noisy_tokens = tokens
        if noise_mask is None:
            noise_mask = torch.zeros_like(tokens, dtype=torch.bool)
        P = mcfg.prefix_tokens
        if P and not cfg.perturb_prefix:  # drawn for all N (same RNG stream either way), then undone
            noise_mask = torch.cat([torch.zeros_like(noise_mask[:, :P]), noise_mask[:, P:]], dim=1)
            noisy_tokens = torch.where(noise_mask, noisy_tokens, tokens)
        class_ids = (model.module if hasattr(model, "module") else model).class_token_ids(labels, drop)

        logits, enc, dec = model(noisy_tokens, class_ids, encode_align=cfg.encode_align,
                                 decode_align=cfg.decode_align)
        logits = logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        loss = ce
        zero = ce.new_zeros(())
        enc_loss = dec_loss = zero
        if cfg.encode_align or cfg.decode_align:
            with torch.no_grad():
                target = codebook.float()[tokens]  # (B, N, z), raw codebook rows
            # As the reference: with one head switched off, the enabled head's features serve both terms.
            enc_feats = (enc if cfg.encode_align else dec).float()
            dec_feats = (dec if cfg.decode_align else enc).float()
            aligned = torch.ones_like(target[..., 0])
            if P and not cfg.align_prefix:
                aligned[:, :P] = 0.0
            keep = aligned * (~noise_mask).float() if cfg.mask_encode_at_perturbed else aligned
            # Masked at perturbed inputs but divided by B*N, all positions (as the reference does).
            enc_loss = -(keep * cosine(enc_feats, target)).sum() / (B * N)
            dec_loss = -(aligned * cosine(dec_feats, target)).sum() / (B * N)
            loss = loss + cfg.align_weight * (enc_loss + dec_loss)

        with torch.no_grad():
            metrics = {
                "ce": ce.detach(),
                "enc_align": enc_loss.detach(),
                "dec_align": dec_loss.detach(),
                "token_acc": (logits.argmax(-1) == tokens).float().mean(),
                "rho": torch.tensor(rho),
                "noise_frac": noise_mask.float().mean(),
            }
        return loss, metrics
